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
