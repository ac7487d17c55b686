"""Backend response handling: which fields are kept from real servers' chat.completion bodies."""

from __future__ import annotations

import pytest

from narr_assets.llm import TransientError, raw_from_body


def body(message: dict, usage: dict | None = None, finish: str = "stop") -> dict:
    return {
        "model": "m",
        "choices": [{"message": message, "finish_reason": finish}],
        **({"usage": usage} if usage else {}),
    }


@pytest.mark.parametrize(
    ("message", "reasoning"),
    [
        ({"content": "{}", "reasoning_content": "thought A"}, "thought A"),  # vLLM, LM Studio
        ({"content": "{}", "reasoning": "thought B"}, "thought B"),  # Ollama, OpenRouter
        ({"content": "{}"}, None),
        ({"content": "{}", "reasoning": {"not": "text"}}, None),
    ],
)
def test_reasoning_from_whichever_field(message, reasoning):
    assert raw_from_body(body(message), 0.1).reasoning == reasoning


def test_usage_and_reasoning_tokens_when_reported():
    raw = raw_from_body(
        body(
            {"content": "x"},
            {"prompt_tokens": 995, "completion_tokens": 258, "completion_tokens_details": {"reasoning_tokens": 120}},
        ),
        4.97,
    )
    assert (raw.prompt_tokens, raw.completion_tokens, raw.reasoning_tokens, raw.latency_s) == (995, 258, 120, 4.97)
    bare = raw_from_body(body({"content": "x"}), 1.0)
    assert (bare.prompt_tokens, bare.completion_tokens, bare.reasoning_tokens) == (None, None, None)


def test_empty_content_refusal_and_length_are_kept_raw():
    raw = raw_from_body(body({"content": None, "refusal": "no"}, finish="length"), 1.0)
    assert raw.content is None and raw.refusal == "no" and raw.finish_reason == "length"


@pytest.mark.parametrize("bad", [{}, {"choices": []}, {"choices": "x"}, [], {"error": {"message": "oops"}}])
def test_bodies_without_choices_are_transient(bad):
    with pytest.raises(TransientError, match="without choices"):
        raw_from_body(bad, 0.1)


def _one_error(folder, base_url: str, timeout_s: float = 5.0) -> str:
    import asyncio

    from conftest import write_experiment

    from narr_assets.experiments import load_experiment
    from narr_assets.llm import OpenAIBackend

    cfg = load_experiment(write_experiment(folder, "probe", base_url, timeout=timeout_s))

    async def go() -> str:
        backend = OpenAIBackend(cfg)
        try:
            await backend.complete("a narrative")
        except TransientError as exc:
            return str(exc)
        finally:
            await backend.aclose()
        raise AssertionError("no error")

    return asyncio.run(go())


def test_transport_errors_say_what_happened(server, tmp_path):
    """A server that is not running is a connection error, not a timeout, and vice versa."""
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert _one_error(tmp_path, f"http://127.0.0.1:{port}/v1").startswith("connection error: ")
    server.configure(drop=1.0)
    assert _one_error(tmp_path, server.base_url).startswith("connection error: ")
    server.configure(drop=0.0, hang=1.0, hang_s=5.0)
    assert _one_error(tmp_path, server.base_url, timeout_s=0.5) == "timed out after 0.5 s"


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ({"choices": [{"message": "just text"}]}, "message"),
        ({"choices": [{"message": ["a", "b"]}]}, "message"),
        ({"choices": [{"message": {"content": "{}"}}], "usage": "lots"}, "usage"),
        ({"choices": [{"message": {"content": "{}"}}], "usage": [1, 2]}, "usage"),
    ],
)
def test_a_message_or_usage_that_is_not_an_object_is_transient(bad, what):
    with pytest.raises(TransientError, match=f"malformed response body \\({what} is not an object\\)"):
        raw_from_body(bad, 0.1)


SECRET = "sk-proj-Zx81kQ0v2LmN4pR6tY8wE1aS3dF5gH7j"


@pytest.mark.parametrize(
    "echo",
    [
        f"Incorrect API key provided: {SECRET}.",
        f"Incorrect API key provided: Bearer {SECRET}",
        f"bad key {SECRET[:20]} (truncated)",  # a piece of the key is the key too
        f"header was 'authorization: bearer {SECRET}', refused",
        f"key={SECRET}&model=x",
    ],
)
def test_redact_removes_the_key_a_piece_of_it_and_bearer_tokens(echo):
    from narr_assets.llm import redact

    out = redact(echo, [SECRET])
    assert SECRET not in out and SECRET[3:11] not in out and "[redacted]" in out


def test_redact_cuts_an_echoed_narrative_truncates_after_redacting_and_keeps_one_line():
    from narr_assets.llm import redact

    narrative = "Her ex-husband Bartholomew Okonkwo-Reyes had threatened her at the laundromat."
    out = redact(f"Invalid input 'Classify:\n{narrative}' at position 3", text=narrative)
    assert "Okonkwo" not in out and "[narrative text]" in out and "\n" not in out
    assert out.startswith("Invalid input") and out.endswith("at position 3")
    # The key sits across the truncation point: redacted first, so no half of it survives.
    long = "x" * 190 + SECRET
    cut = redact(long, [SECRET], limit=200)
    assert SECRET[:10] not in cut and len(cut) <= 203
    assert redact("short and fine") == "short and fine"


def _status_error(status: int, body: object = None, headers: dict | None = None):
    """`OpenAIBackend._status_error` on what it reads of the SDK's APIStatusError."""
    from types import SimpleNamespace

    from narr_assets.llm import OpenAIBackend

    cfg = SimpleNamespace(
        source_file="experiments/x.yaml",
        run=SimpleNamespace(timeout_s=5.0),
        model=SimpleNamespace(base_url="http://h/v1", name="m", api_key_env="K"),
    )
    backend = OpenAIBackend.__new__(OpenAIBackend)
    backend.cfg, backend.secrets = cfg, (SECRET,)  # type: ignore[assignment]
    exc = SimpleNamespace(status_code=status, body=body, response=SimpleNamespace(headers=headers or {}))
    return backend._status_error(exc, "a narrative text here")  # type: ignore[arg-type]


def test_http_errors_sort_into_transient_unreachable_rejected_and_fatal():
    from narr_assets.llm import FatalError, RejectedError

    for status in (502, 503, 504):
        err = _status_error(status)
        assert isinstance(err, TransientError) and err.unreachable
    for status in (429, 500):
        err = _status_error(status, headers={"retry-after": "2"})
        assert isinstance(err, TransientError) and not err.unreachable and err.retry_after == 2.0
    refused = _status_error(
        400, {"message": "maximum context length is 8192 tokens, got 9000", "code": "context_length_exceeded"}
    )
    assert isinstance(refused, RejectedError)
    assert str(refused) == "HTTP 400 (context_length_exceeded): maximum context length is 8192 tokens, got 9000"
    # Token counts differ per narrative; the signature does not.
    other = _status_error(
        400, {"message": "maximum context length is 8192 tokens, got 12000", "code": "context_length_exceeded"}
    )
    assert isinstance(other, RejectedError) and other.signature == refused.signature
    assert isinstance(_status_error(413, "Payload Too Large"), RejectedError)
    detail = {"detail": [{"msg": "Value error, too long", "input": "a narrative text here, quoted"}]}
    fastapi = _status_error(422, detail)
    assert isinstance(fastapi, RejectedError) and str(fastapi) == "HTTP 422: Value error, too long"
    for status in (401, 403, 404):
        fatal = _status_error(status, {"message": f"no: Bearer {SECRET}"})
        assert isinstance(fatal, FatalError) and SECRET not in str(fatal) and "http://h/v1" in str(fatal)
    wide = refused.experiment_wide(5)
    assert "refused the first 5 narratives" in str(wide) and "output.mode" in str(wide)
    assert "experiments/x.yaml: endpoint http://h/v1" in str(wide)


def test_a_server_that_is_not_running_is_unreachable(tmp_path):
    import socket

    from conftest import write_experiment

    from narr_assets.experiments import load_experiment
    from narr_assets.llm import OpenAIBackend

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_experiment(write_experiment(tmp_path, "probe", f"http://127.0.0.1:{port}/v1"))

    async def go() -> TransientError:
        backend = OpenAIBackend(cfg)
        try:
            await backend.complete("a narrative")
        except TransientError as exc:
            return exc
        finally:
            await backend.aclose()
        raise AssertionError("no error")

    import asyncio

    assert asyncio.run(go()).unreachable
