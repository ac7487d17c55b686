"""Tests of the fault-injecting OpenAI-compatible test server, through the real openai SDK."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from narr_assets.testing.server import (
    DEFAULT_MODEL,
    OUTCOMES,
    REFUSAL_TEXT,
    FakeOpenAIServer,
    FaultConfig,
    ServerHandle,
    extract_narrative,
    narrative_key,
    oracle_answer,
    render_answer,
    serve_in_subprocess,
    serve_in_thread,
)

POSITIVE = "The decedent's husband hit her repeatedly; she had a restraining order against him."
NEGATIVE = "The decedent was found at home by a neighbour. No note was found."
MODEL = "fake-model"


def user_prompt(narrative: str) -> str:
    return f"Classify this narrative.\n<narrative>\n{narrative}\n</narrative>\nAnswer in JSON."


def messages(narrative: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are an IPV classifier."},
        {"role": "user", "content": user_prompt(narrative)},
    ]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ServerHandle]:
    with serve_in_thread(seed=0) as handle:
        yield handle


@pytest.fixture
def srv(shared_server: ServerHandle) -> ServerHandle:
    """The shared server with the startup config and zeroed counters."""
    shared_server.reset(config=True)
    return shared_server


@pytest.fixture
def client(srv: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=srv.base_url, api_key="test", max_retries=0, timeout=10) as c:
        yield c


def chat(client: OpenAI, narrative: str = POSITIVE, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages(narrative), **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("narrative", "detected", "indicators"),
    [
        (POSITIVE, True, ["restraining order", "hit"]),
        ("Her ex-boyfriend had threatened and strangled her.", True, ["threat", "strangulation"]),
        ("V's wife reported a history of domestic violence.", True, ["violence", "domestic"]),
        ("His girlfriend said he was depressed after losing his job.", False, []),
        ("The decedent was assaulted by a stranger two years ago.", False, ["assault"]),
        (NEGATIVE, False, []),
        ("Her partner mentioned a hitch in the plans.", False, []),  # 'hitch' is not 'hit'
    ],
)
def test_oracle_answer(narrative: str, detected: bool, indicators: list[str]) -> None:
    answer = oracle_answer(narrative)
    assert answer["detected"] is detected
    assert answer["indicators"] == indicators
    assert 0.0 <= answer["confidence"] <= 1.0
    assert len(answer["rationale"]) <= 200
    assert narrative not in answer["rationale"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("intro <narrative>  the text \n</narrative> outro", "the text"),
        ("no markers here ", "no markers here"),
        ([{"type": "text", "text": "<narrative>a"}, {"type": "text", "text": "b</narrative>"}], "ab"),
    ],
)
def test_extract_narrative_from_last_user_message(content: object, expected: str) -> None:
    msgs = [
        {"role": "user", "content": "<narrative>older</narrative>"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": content},
    ]
    assert extract_narrative(msgs) == expected
    assert extract_narrative([{"role": "system", "content": "x"}]) is None


@pytest.mark.parametrize(
    ("updates", "match"),
    [
        ({"rate_limit": 1.5}, "rate_limit"),
        ({"drop": True}, "drop"),
        ({"latency_s": -1}, "latency_s"),
        ({"answer_style": "xml"}, "answer_style"),
        ({"fail_first_n": 1.5}, "fail_first_n"),
        ({"models": "gpt"}, "models"),
        ({"no_such_key": 1}, "no_such_key"),
        ({"echo_key": "yes"}, "echo_key"),
        ({"echo_input": 1}, "echo_input"),
        ({"reject_param": ""}, "reject_param"),
        ({"reject_text": 3}, "reject_text"),
        ({"max_prompt_chars": -1}, "max_prompt_chars"),
    ],
)
def test_fault_config_rejects_bad_values(updates: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FaultConfig().merged(updates)


# ----------------------------------------------------------------------------- answers


def test_basic_completion_and_usage(srv: ServerHandle, client: OpenAI) -> None:
    response = chat(client)
    choice = response.choices[0]
    expected = render_answer(oracle_answer(POSITIVE), "json")
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert json.loads(expected)["detected"] is True
    prompt_chars = sum(len(m["content"]) for m in messages(POSITIVE))
    assert response.usage is not None
    assert response.usage.prompt_tokens == prompt_chars // 4
    assert response.usage.completion_tokens == len(expected) // 4
    assert response.usage.total_tokens == prompt_chars // 4 + len(expected) // 4
    assert response.usage.completion_tokens_details is not None
    assert response.usage.completion_tokens_details.reasoning_tokens == 0
    assert "reasoning" not in (choice.message.model_extra or {})


def test_response_format_still_plain_json(srv: ServerHandle, client: OpenAI) -> None:
    schema = {"name": "verdict", "schema": {"type": "object"}}
    response = chat(client, NEGATIVE, response_format={"type": "json_schema", "json_schema": schema})
    assert json.loads(response.choices[0].message.content or "") == oracle_answer(NEGATIVE)


def test_models_list(srv: ServerHandle, client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    srv.configure(models=["a", "b"])
    assert [m.id for m in client.models.list().data] == ["a", "b"]


@pytest.mark.parametrize(
    ("style", "prefix", "suffix"),
    [
        ("json", "{", "}"),
        ("fenced", "```json\n{", "}\n```"),
        ("prose", "Based on the narrative", "need more detail."),
        ("harmony", "<|channel|>final<|message|>{", "}"),
    ],
)
def test_answer_styles(srv: ServerHandle, client: OpenAI, style: str, prefix: str, suffix: str) -> None:
    srv.configure(answer_style=style)
    content = chat(client).choices[0].message.content or ""
    assert content.startswith(prefix)
    assert content.endswith(suffix)
    embedded = content[content.index("{") : content.rindex("}") + 1]
    assert json.loads(embedded) == oracle_answer(POSITIVE)


def test_include_reasoning(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(include_reasoning=True)
    response = chat(client)
    extra = response.choices[0].message.model_extra or {}
    assert extra["reasoning"] == extra["reasoning_content"]
    assert extra["reasoning"]
    assert response.usage is not None and response.usage.completion_tokens_details is not None
    reasoning_tokens = response.usage.completion_tokens_details.reasoning_tokens
    assert reasoning_tokens == len(extra["reasoning"]) // 4
    assert json.loads(response.choices[0].message.content or "")["detected"] is True


def test_max_tokens_cuts_with_finish_reason_length(srv: ServerHandle, client: OpenAI) -> None:
    response = chat(client, max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == render_answer(oracle_answer(POSITIVE), "json")[:20]


# ----------------------------------------------------------------------------- faults


def test_rate_limit_carries_retry_after(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(rate_limit=1.0, retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as info:
        chat(client)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "rate_limit_exceeded"
    assert srv.stats()["by_outcome"]["rate_limited"] == 1


def test_server_error(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(server_error=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        chat(client)
    assert info.value.status_code == 500
    stats = srv.stats()
    assert stats["by_outcome"]["server_error"] == 1
    assert stats["completions_ok"] == 0


def test_drop_is_a_connection_error(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(drop=1.0)
    with pytest.raises(openai.APIConnectionError) as info:
        chat(client)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert srv.stats()["by_outcome"]["drop"] == 1


def test_hang_times_out_and_the_late_answer_is_not_counted(srv: ServerHandle) -> None:
    srv.configure(hang=1.0, hang_s=0.6)
    with OpenAI(base_url=srv.base_url, api_key="test", max_retries=0, timeout=0.3) as short:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            chat(short)
        assert time.monotonic() - started < 0.55
    time.sleep(0.6)  # let the hang end: the server must notice the client has gone
    stats = srv.stats()
    assert stats["by_outcome"]["hang"] == 1
    assert stats["completions_ok"] == 0
    assert stats["client_gone"] == 1


def test_hang_answers_a_patient_client(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(hang=1.0, hang_s=0.2)
    started = time.monotonic()
    assert chat(client).choices[0].finish_reason == "stop"
    assert time.monotonic() - started >= 0.2
    assert srv.stats()["completions_ok"] == 1


def test_malformed_body_fails_json_decoding(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(malformed=1.0)
    # The SDK does not wrap this one: a broken JSON body surfaces as json.JSONDecodeError.
    with pytest.raises(json.JSONDecodeError):
        chat(client)
    stats = srv.stats()
    assert stats["by_outcome"]["malformed"] == 1
    assert stats["completions_ok"] == 0


def test_reasoning_only(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(reasoning_only=1.0)
    response = chat(client)
    message = response.choices[0].message
    extra = message.model_extra or {}
    assert message.content == ""
    assert json.loads(extra["reasoning"]) == oracle_answer(POSITIVE)
    assert extra["reasoning_content"] == extra["reasoning"]
    assert response.usage is not None and response.usage.completion_tokens_details is not None
    assert response.usage.completion_tokens_details.reasoning_tokens == len(extra["reasoning"]) // 4


def test_refusal(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(refusal=1.0)
    response = chat(client)
    assert response.choices[0].message.content == REFUSAL_TEXT
    assert response.choices[0].finish_reason == "stop"
    assert srv.stats()["by_outcome"]["refusal"] == 1


def test_truncated(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(truncated=1.0)
    response = chat(client)
    content = response.choices[0].message.content or ""
    full = render_answer(oracle_answer(POSITIVE), "json")
    assert response.choices[0].finish_reason == "length"
    assert content == full[: len(full) // 2]
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)


def test_prose_fault_overrides_answer_style(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(prose=1.0, answer_style="json")
    content = chat(client).choices[0].message.content or ""
    assert content == render_answer(oracle_answer(POSITIVE), "prose")


def test_api_key_required(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as info:
        chat(client)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with OpenAI(base_url=srv.base_url, api_key="s3cret", max_retries=0) as good:
        assert chat(good).choices[0].finish_reason == "stop"
    stats = srv.stats()
    assert stats["by_outcome"]["unauthorized"] == 1
    assert stats["by_outcome"]["ok"] == 1
    assert srv.configure()["api_key"] == "***"


def test_echo_key_repeats_the_bearer_token_in_error_messages(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(api_key="s3cret", echo_key=True)
    with pytest.raises(openai.AuthenticationError) as info:
        chat(client)  # the client's key is "test"
    assert "Incorrect API key provided: Bearer test" in str(info.value)
    srv.configure(api_key=None, max_prompt_chars=10)
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client)
    assert "[Authorization: Bearer test]" in str(refused.value)


def test_reject_param_refuses_every_request_that_carries_it(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(reject_param="response_format")
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, response_format={"type": "json_object"})
    assert "Unrecognized request argument supplied: response_format" in str(info.value)
    assert chat(client).choices[0].finish_reason == "stop"  # without it: answered
    outcomes = srv.stats()["by_outcome"]
    assert outcomes["bad_param"] == 1 and outcomes["ok"] == 1


def test_max_prompt_chars_refuses_long_prompts_only(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(max_prompt_chars=400)
    assert chat(client).choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, narrative=POSITIVE * 10)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in str(info.value)
    stats = srv.stats()
    assert stats["by_outcome"]["too_long"] == 1 and stats["chat_requests"] == 2


def test_reject_text_is_a_content_filter_per_narrative(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(reject_text="RESTRAINING order")
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, narrative=POSITIVE)
    assert info.value.code == "content_filter"
    assert chat(client, narrative=NEGATIVE).choices[0].finish_reason == "stop"
    assert srv.stats()["by_outcome"]["filtered"] == 1


def test_echo_input_answers_refusals_in_fastapis_shape(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(max_prompt_chars=50, echo_input=True)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        chat(client)
    (detail,) = info.value.body["detail"]  # type: ignore[index]
    assert detail["loc"] == ["body", "messages", 1, "content"] and detail["input"] == user_prompt(POSITIVE)
    assert detail["msg"].startswith("Value error, This model's maximum context length")


def test_unknown_model_404(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(models=[MODEL])
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="other-model", messages=messages(POSITIVE))  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
    assert chat(client).model == MODEL
    assert srv.stats()["by_outcome"]["not_found"] == 1


def test_fail_first_n_and_text_counters(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(fail_first_n=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            chat(client, POSITIVE)
    chat(client, POSITIVE)
    chat(client, POSITIVE)
    with pytest.raises(openai.InternalServerError):
        chat(client, NEGATIVE)  # the count is per narrative
    stats = srv.stats()
    pos, neg = narrative_key(POSITIVE), narrative_key(NEGATIVE)
    assert stats["by_text"] == {pos: 4, neg: 1}
    assert stats["ok_by_text"] == {pos: 2}
    assert stats["by_outcome"]["fail_first"] == 3
    assert stats["by_outcome"]["ok"] == 2
    assert stats["chat_requests"] == 5 == sum(stats["by_outcome"].values())
    assert set(stats["by_outcome"]) == set(OUTCOMES)
    assert stats["completions_ok"] == 2
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    srv.reset()
    assert srv.stats()["by_text"] == {}
    with pytest.raises(openai.InternalServerError):
        chat(client, POSITIVE)  # reset restarts the fail_first_n count


def test_fail_text_fails_every_request_for_matching_narratives(srv: ServerHandle, client: OpenAI) -> None:
    srv.configure(fail_text="HUSBAND")  # case-insensitive; only POSITIVE mentions a husband
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            chat(client, POSITIVE)
    chat(client, NEGATIVE)
    stats = srv.stats()
    assert stats["by_outcome"]["fail_text"] == 3 and stats["ok_by_text"] == {narrative_key(NEGATIVE): 1}


def test_same_seed_same_fault_sequence(srv: ServerHandle, client: OpenAI) -> None:
    def run() -> list[str]:
        outcomes = []
        for _ in range(20):
            try:
                chat(client)
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append("429")
            except openai.InternalServerError:
                outcomes.append("500")
        return outcomes

    srv.configure(seed=42, rate_limit=0.3, server_error=0.3)
    first = run()
    srv.reset()  # re-seeds
    assert run() == first
    assert {"ok", "429", "500"} <= set(first)
    srv.configure(seed=43)
    assert run() != first


def test_down_window_then_recovery(srv: ServerHandle, client: OpenAI) -> None:
    srv.down(0.4)
    with pytest.raises(openai.APIConnectionError):
        chat(client)
    assert client.models.list().data  # only chat requests are affected
    time.sleep(0.45)
    assert chat(client).choices[0].finish_reason == "stop"
    stats = srv.stats()
    assert stats["by_outcome"]["down"] == 1
    assert stats["by_outcome"]["ok"] == 1
    assert stats["by_text"] == {narrative_key(POSITIVE): 2}
    assert stats["ok_by_text"] == {narrative_key(POSITIVE): 1}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda h: h.configure(rate_limit=2), "rate_limit"),
        (lambda h: h.configure(bogus=1), "bogus"),
        (lambda h: h.down(-1), "seconds"),
    ],
)
def test_control_endpoints_reject_bad_input(
    srv: ServerHandle, call: Callable[[ServerHandle], object], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call(srv)
    assert "(400)" in str(info.value)
    assert srv.configure()["rate_limit"] == 0.0  # nothing was applied


# ----------------------------------------------------------------------------- HTTP layer


def test_keep_alive_and_connection_close(srv: ServerHandle) -> None:
    port = int(srv.base_url.rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"model": MODEL, "messages": messages(NEGATIVE)})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(3):
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Connection") == "keep-alive"
        assert json.loads(response.read())["object"] == "chat.completion"
    conn.request("GET", "/v1/models", headers={"Connection": "close"})
    response = conn.getresponse()
    assert response.getheader("Connection") == "close"
    response.read()
    conn.close()
    stats = srv.stats()
    assert stats["connections"] == 1
    assert stats["completions_ok"] == 3


def test_chunked_body_and_bad_requests(srv: ServerHandle) -> None:
    port = int(srv.base_url.rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"model": MODEL, "messages": messages(POSITIVE)}).encode()
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunked
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 200 OK")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/v1/chat/completions", b"not json")
    response = conn.getresponse()
    assert response.status == 400
    response.read()
    conn.request("GET", "/v1/nothing")
    response = conn.getresponse()
    assert response.status == 404
    assert json.loads(response.read())["error"]["code"] == "unknown_url"
    conn.close()
    assert srv.stats()["by_outcome"]["bad_request"] == 1


def test_64_concurrent_requests_on_keep_alive_connections(srv: ServerHandle) -> None:
    srv.configure(latency_s=0.3)
    narratives = [f"Narrative {i}: her husband threatened her." for i in range(64)]

    async def run() -> list[str | None]:
        async with AsyncOpenAI(base_url=srv.base_url, api_key="test", max_retries=0, timeout=10) as aclient:
            results: list[str | None] = []
            for _ in range(2):  # the second round must reuse the first round's connections
                responses = await asyncio.gather(
                    *(
                        aclient.chat.completions.create(model=MODEL, messages=messages(n))  # type: ignore[arg-type]
                        for n in narratives
                    )
                )
                results += [r.choices[0].message.content for r in responses]
            return results

    contents = asyncio.run(run())
    assert len(contents) == 128
    assert all(json.loads(c or "")["detected"] for c in contents)
    stats = srv.stats()
    assert stats["completions_ok"] == 128
    assert stats["max_in_flight"] == 64
    assert stats["connections"] == 64
    assert stats["ok_by_text"] == {narrative_key(n): 2 for n in narratives}


def test_in_process_server_on_callers_loop() -> None:
    async def run() -> str | None:
        async with FakeOpenAIServer(FaultConfig(answer_style="fenced")) as fake:
            async with AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as aclient:
                response = await aclient.chat.completions.create(
                    model=MODEL,
                    messages=messages(NEGATIVE),  # type: ignore[arg-type]
                )
            assert fake.stats.completions_ok == 1
            return response.choices[0].message.content

    assert (asyncio.run(run()) or "").startswith("```json")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.org"])
def test_non_loopback_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        serve_in_thread(host=host)


# ----------------------------------------------------------------------------- subprocess / CLI


def test_subprocess_handle_starts_and_stops_cleanly() -> None:
    with serve_in_subprocess(latency_s=0.01, seed=3, models=[MODEL]) as handle:
        assert handle.base_url.startswith("http://127.0.0.1:")
        assert handle.base_url.endswith("/v1")
        with OpenAI(base_url=handle.base_url, api_key="test", max_retries=0) as c:
            assert chat(c).choices[0].finish_reason == "stop"
        assert handle.configure(drop=0.5)["drop"] == 0.5
        handle.down(0)
        assert handle.stats()["completions_ok"] == 1
        handle.reset()
        assert handle.stats()["completions_ok"] == 0
        process = handle.process
        port = int(handle.base_url.rsplit(":", 1)[1].split("/")[0])
    assert process is not None
    assert process.returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_cli_prints_one_line_and_refuses_public_hosts() -> None:
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": root, "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(
        [sys.executable, "-m", "narr_assets.testing.server", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert refused.returncode == 2
    assert "loopback" in refused.stderr
    assert refused.stdout == ""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "narr_assets.testing.server",
            "--port",
            "0",
            "--latency",
            "0.1",
            "--config",
            '{"rate_limit": 0.1}',
            "--seed",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening http://127.0.0.1:")
        assert line.rstrip().endswith("/v1")
        handle = ServerHandle(line.split()[1], lambda: None)
        assert handle.configure()["latency_s"] == 0.1
        assert handle.configure()["rate_limit"] == 0.1
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert output == ""  # exactly one line was printed
