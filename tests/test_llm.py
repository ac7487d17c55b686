"""Backend response handling: which fields are kept from real servers' chat.completion bodies."""

from __future__ import annotations

import pytest

from narr_assets.llm import TransientError, raw_from_body


def body(message: dict, usage: dict | None = None, finish: str = "stop") -> dict:
    return {"model": "m", "choices": [{"message": message, "finish_reason": finish}], **({"usage": usage} if usage else {})}


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
    raw = raw_from_body(body({"content": "x"}, {"prompt_tokens": 995, "completion_tokens": 258,
                                                "completion_tokens_details": {"reasoning_tokens": 120}}), 4.97)
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
