"""Tests for the tolerant model-answer parser (narr_assets.parsing)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narr_assets.parsing import (
    PARSER_VERSION,
    RESULT_SCHEMA,
    STATUSES,
    ParsedAnswer,
    parse_answer,
)

FULL = (
    '{"detected": true, "confidence": 0.9, "indicators": ["restraining order"], '
    '"rationale": "Ex-boyfriend assaulted her."}'
)
HARMONY_FULL = (
    "<|start|>assistant<|channel|>analysis<|message|>The narrative mentions a restraining "
    'order. Draft: {"detected": false, "confidence": 0.2}<|end|>'
    "<|start|>assistant<|channel|>final<|message|>" + FULL + "<|return|>"
)


def _ok(detected: bool, confidence: float | None, source: str = "content") -> dict:
    return {"status": "ok", "detected": detected, "confidence": confidence, "answer_source": source}


# --------------------------------------------------------------------------------------
# Module constants
# --------------------------------------------------------------------------------------


def test_result_schema_shape() -> None:
    assert RESULT_SCHEMA["type"] == "object"
    assert RESULT_SCHEMA["additionalProperties"] is False
    assert sorted(RESULT_SCHEMA["required"]) == ["confidence", "detected", "indicators", "rationale"]
    props = RESULT_SCHEMA["properties"]
    assert props["detected"] == {"type": "boolean"}
    assert props["confidence"]["type"] == "number"
    assert (props["confidence"]["minimum"], props["confidence"]["maximum"]) == (0, 1)
    assert props["indicators"] == {"type": "array", "items": {"type": "string"}}
    assert props["rationale"] == {"type": "string", "maxLength": 200}
    json.dumps(RESULT_SCHEMA)  # must be serialisable as a response_format payload


def test_constants() -> None:
    assert STATUSES == ("ok", "parse_error", "refusal", "truncated")
    assert isinstance(PARSER_VERSION, str) and PARSER_VERSION


def test_parsed_answer_is_frozen() -> None:
    answer = parse_answer(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.status = "parse_error"  # type: ignore[misc]


def test_full_answer_all_fields() -> None:
    assert parse_answer(FULL) == ParsedAnswer(
        status="ok",
        detected=True,
        confidence=0.9,
        indicators=("restraining order",),
        rationale="Ex-boyfriend assaulted her.",
        error=None,
        answer_source="content",
    )


# --------------------------------------------------------------------------------------
# Where the JSON hides
# --------------------------------------------------------------------------------------

WRAPPING_CASES = {
    "plain": FULL,
    "json_fence": "```json\n" + FULL + "\n```",
    "bare_fence": "```\n" + FULL + "\n```",
    "prose_before": "Based on the narrative, here is my answer: " + FULL,
    "prose_after": FULL + "\nLet me know if you need more detail.",
    "prose_both_with_fence": "Answer below.\n```json\n" + FULL + "\n```\nHope this helps.",
    "draft_then_final": 'Draft: {"detected": false, "confidence": 0.1}\nFinal:\n' + FULL,
    "object_without_key_after": FULL + '\n{"note": "end"}',
    "harmony_final_channel": HARMONY_FULL,
    "harmony_final_before_analysis": (
        "<|channel|>final<|message|>" + FULL + '<|end|><|channel|>analysis<|message|>{"detected": false}'
    ),
    "stray_channel_token": "<|channel|>" + FULL,
    "stray_message_end_tokens": "<|message|>" + FULL + "<|end|>",
    "token_inside_object": '{"detected": true<|end|>, "confidence": 0.9}',
    "harmony_tokens_stripped_by_server": "analysisNeed to decide. assistantfinal" + FULL,
    "think_block": '<think>maybe {"detected": false, "confidence": 0.3}</think>\n' + FULL,
    "wrapper_object": '{"result": ' + FULL + "}",
    "array_wrapper": "[" + FULL + "]",
    "braces_in_rationale": '{"detected": true, "confidence": 0.9, "rationale": "she wrote {x} and }"}',
    "stray_brace_in_prose": "Use {braces. Answer: " + FULL,
    "capitalised_key": '{"Detected": true, "Confidence": 0.9}',
    "unescaped_inner_quotes": '{"detected": true, "confidence": 0.9, "rationale": "she said "leave" to him"}',
}


@pytest.mark.parametrize("content", WRAPPING_CASES.values(), ids=WRAPPING_CASES.keys())
def test_answer_found_in_wrappings(content: str) -> None:
    answer = parse_answer(content)
    assert (answer.status, answer.detected, answer.confidence, answer.error) == ("ok", True, 0.9, None)
    assert answer.answer_source == "content"


def test_nested_detected_outer_object_wins() -> None:
    answer = parse_answer('{"detected": true, "confidence": 0.7, "evidence": {"detected": false}}')
    assert (answer.detected, answer.confidence) == (True, 0.7)


def test_unescaped_inner_quotes_keep_rationale() -> None:
    answer = parse_answer(WRAPPING_CASES["unescaped_inner_quotes"])
    assert answer.rationale == 'she said "leave" to him'


def test_braces_inside_string_do_not_split_object() -> None:
    answer = parse_answer(WRAPPING_CASES["braces_in_rationale"])
    assert answer.rationale == "she wrote {x} and }"


# --------------------------------------------------------------------------------------
# Broken JSON syntax
# --------------------------------------------------------------------------------------

SYNTAX_CASES = {
    "trailing_commas": ('{"detected": true, "confidence": 0.8, "indicators": ["a", "b",],}', True, 0.8, ("a", "b")),
    "single_quotes": ("{'detected': false, 'confidence': 0.2, 'indicators': ['x']}", False, 0.2, ("x",)),
    "python_literals": ("{'detected': True, 'confidence': None, 'indicators': []}", True, None, ()),
    "python_false": ("{'detected': False, 'confidence': 0.1, 'indicators': None}", False, 0.1, ()),
    "apostrophe_in_single_quoted": (
        "{'detected': True, 'confidence': 0.6, 'indicators': [\"partner's threats\"], "
        "'rationale': 'partner's threats'}",
        True,
        0.6,
        ("partner's threats",),
    ),
    "line_comments": ('{\n  // verdict\n  "detected": true, // yes\n  "confidence": 0.7\n}', True, 0.7, ()),
    "block_comments": ('{/* c */ "detected": false, /* c2 */ "confidence": 0.4}', False, 0.4, ()),
    "hash_comment": ('{\n# python style\n"detected": true,\n"confidence": 0.5\n}', True, 0.5, ()),
    "unquoted_keys": (
        "{detected: true, confidence: 0.75, indicators: [shelter stay]}",
        True,
        0.75,
        ("shelter stay",),
    ),
    "unquoted_values_yes": ("{detected: yes, confidence: high}", True, 0.9, ()),
    "smart_double_quotes": (
        "{\u201cdetected\u201d: true, \u201cconfidence\u201d: 0.65, \u201cindicators\u201d: [\u201cDV shelter\u201d]}",
        True,
        0.65,
        ("DV shelter",),
    ),
    "smart_single_quotes": ("{\u2018detected\u2019: \u2018no\u2019, \u2018confidence\u2019: 0.3}", False, 0.3, ()),
    "missing_commas_newlines": ('{\n"detected": "yes"\n"confidence": 0.55\n}', True, 0.55, ()),
    "raw_newline_in_string": (
        '{"detected": true, "confidence": 0.9, "rationale": "line one\nline two"}',
        True,
        0.9,
        (),
    ),
    "control_char_in_string": ('{"detected": false, "confidence": 0.9, "rationale": "tab\there"}', False, 0.9, ()),
    "nan_confidence": ('{"detected": true, "confidence": NaN}', True, None, ()),
    "equals_sign": ("{detected = false, confidence = 0.2}", False, 0.2, ()),
}


@pytest.mark.parametrize(
    ("content", "detected", "confidence", "indicators"), SYNTAX_CASES.values(), ids=SYNTAX_CASES.keys()
)
def test_repairs_broken_syntax(
    content: str, detected: bool, confidence: float | None, indicators: tuple[str, ...]
) -> None:
    answer = parse_answer(content)
    assert answer.status == "ok", answer.error
    assert answer.detected is detected
    assert answer.confidence == (pytest.approx(confidence) if confidence is not None else None)
    assert answer.indicators == indicators


def test_escapes_decoded_in_repair() -> None:
    answer = parse_answer("{'detected': true, 'rationale': 'caf\\u00e9 \\'quoted\\' \\n end',}")
    assert answer.rationale == "café 'quoted' \n end"


# --------------------------------------------------------------------------------------
# confidence
# --------------------------------------------------------------------------------------

CONFIDENCE_CASES = [
    ('"0. nine"', 0.9),
    ("0. 9", 0.9),
    ('"0. 9"', 0.9),
    ('"zero point eight"', 0.8),
    ('"Zero Point Eight Five"', 0.85),
    ('"point seven"', 0.7),
    ('"85%"', 0.85),
    ("85%", 0.85),
    ('"85 percent"', 0.85),
    ("85", 0.85),
    ("100", 1.0),
    ('"85"', 0.85),
    ('".9"', 0.9),
    (".9", 0.9),
    ('"0,9"', 0.9),
    ('"0.9"', 0.9),
    ("0", 0.0),
    ("1", 1.0),
    ("0.35", 0.35),
    ('"high"', 0.9),
    ('"High"', 0.9),
    ('"medium"', 0.6),
    ('"moderate"', 0.6),
    ('"low"', 0.3),
    ("low", 0.3),
    ('"very high"', 0.95),
    ('"very low"', 0.1),
    ("-0.2", None),
    ("101", None),
    ('"150%"', None),
    ("1e400", None),
    ('"banana"', None),
    ('"0.9.1"', None),
    ("true", None),
    ("null", None),
    ("[0.9]", None),
    ('{"v": 0.9}', None),
    ('""', None),
]


@pytest.mark.parametrize(("raw", "expected"), CONFIDENCE_CASES, ids=[c[0] for c in CONFIDENCE_CASES])
def test_confidence_normalisation(raw: str, expected: float | None) -> None:
    answer = parse_answer('{"detected": true, "confidence": ' + raw + "}")
    # Bad confidence never costs the verdict.
    assert (answer.status, answer.detected) == ("ok", True)
    if expected is None:
        assert answer.confidence is None
    else:
        assert answer.confidence == pytest.approx(expected)


def test_missing_confidence_is_none() -> None:
    answer = parse_answer('{"detected": false}')
    assert (answer.status, answer.detected, answer.confidence) == ("ok", False, None)


# --------------------------------------------------------------------------------------
# detected
# --------------------------------------------------------------------------------------

DETECTED_CASES = [
    ("true", True),
    ("false", False),
    ('"true"', True),
    ('"false"', False),
    ('"TRUE"', True),
    ('"yes"', True),
    ('"no"', False),
    ('"Yes"', True),
    ('"No"', False),
    ("1", True),
    ("0", False),
    ("1.0", True),
    ("True", True),
    ("False", False),
    ("yes", True),
    ('"Yes."', True),
]


@pytest.mark.parametrize(("raw", "expected"), DETECTED_CASES, ids=[c[0] for c in DETECTED_CASES])
def test_detected_accepted_forms(raw: str, expected: bool) -> None:
    answer = parse_answer('{"detected": ' + raw + ', "confidence": 0.5}')
    assert (answer.status, answer.detected, answer.error) == ("ok", expected, None)


BAD_DETECTED = ['"maybe"', "2", "null", '"unclear"', "[true]", '""', "-1", '"probably yes"']


@pytest.mark.parametrize("raw", BAD_DETECTED)
def test_detected_invalid_is_parse_error(raw: str) -> None:
    answer = parse_answer('{"detected": ' + raw + ', "confidence": 0.5}')
    assert answer.status == "parse_error"
    assert answer.detected is None and answer.confidence is None
    assert answer.error.startswith("invalid 'detected' value")
    assert answer.answer_source == "content"


def test_missing_detected_key_is_parse_error() -> None:
    answer = parse_answer('{"ipv": true, "confidence": 0.9}')
    assert (answer.status, answer.error) == ("parse_error", "no object with a 'detected' key")


def test_last_object_with_detected_key_wins_even_if_invalid() -> None:
    answer = parse_answer('{"detected": true} then {"detected": "unsure"}')
    assert answer.status == "parse_error"


def test_error_quotes_at_most_80_chars_of_answer() -> None:
    secret = "x" * 500
    answer = parse_answer('{"detected": "' + secret + '"}')
    assert answer.status == "parse_error"
    assert len(answer.error) < 80
    assert "x" * 41 not in answer.error


# --------------------------------------------------------------------------------------
# indicators and rationale
# --------------------------------------------------------------------------------------

INDICATOR_CASES = [
    ('["a", "b"]', ("a", "b")),
    ('"restraining order"', ("restraining order",)),
    ('""', ()),
    ("[]", ()),
    ("[1, true, 2.5]", ("1", "True", "2.5")),
    ('[" padded ", "", null]', ("padded",)),
    ("null", ()),
    ("42", ("42",)),
]


@pytest.mark.parametrize(("raw", "expected"), INDICATOR_CASES, ids=[c[0] for c in INDICATOR_CASES])
def test_indicators_normalisation(raw: str, expected: tuple[str, ...]) -> None:
    answer = parse_answer('{"detected": true, "indicators": ' + raw + "}")
    assert answer.status == "ok"
    assert answer.indicators == expected


def test_missing_indicators_and_rationale() -> None:
    answer = parse_answer('{"detected": true, "confidence": 0.5}')
    assert answer.indicators == ()
    assert answer.rationale is None


@pytest.mark.parametrize(("length", "kept"), [(150, 150), (200, 200), (450, 450), (1000, 1000), (5000, 1000)])
def test_rationale_length_cap(length: int, kept: int) -> None:
    answer = parse_answer(json.dumps({"detected": False, "rationale": "r" * length}))
    assert answer.status == "ok"
    assert answer.rationale == "r" * kept


def test_rationale_non_string_converted() -> None:
    assert parse_answer('{"detected": true, "rationale": 12}').rationale == "12"


# --------------------------------------------------------------------------------------
# reasoning field, refusals, truncation, empty
# --------------------------------------------------------------------------------------

SOURCE_CASES = {
    "json_in_reasoning_content_none": (
        {"content": None, "reasoning": "Thinking... " + FULL},
        _ok(True, 0.9, "reasoning"),
    ),
    "json_in_reasoning_content_blank": (
        {"content": "  \n", "reasoning": FULL},
        _ok(True, 0.9, "reasoning"),
    ),
    "json_in_reasoning_content_tokens_only": (
        {"content": "<|end|>", "reasoning": FULL},
        _ok(True, 0.9, "reasoning"),
    ),
    "content_preferred_over_reasoning": (
        {"content": '{"detected": false, "confidence": 0.2}', "reasoning": FULL},
        _ok(False, 0.2, "content"),
    ),
    "harmony_in_reasoning": ({"content": "", "reasoning": HARMONY_FULL}, _ok(True, 0.9, "reasoning")),
}


@pytest.mark.parametrize(("kwargs", "expected"), SOURCE_CASES.values(), ids=SOURCE_CASES.keys())
def test_answer_source(kwargs: dict, expected: dict) -> None:
    answer = parse_answer(**kwargs)
    assert {k: getattr(answer, k) for k in expected} == expected


REFUSAL_CASES = {
    "refusal_field": {"content": None, "refusal": "I can't help with that."},
    "refusal_field_overrides_content": {"content": FULL, "refusal": "Refused."},
    "im_sorry": {"content": "I'm sorry, but I can't provide that."},
    "curly_apostrophe": {"content": "I\u2019m sorry, I can\u2019t assist with this request."},
    "cannot_help": {"content": "I cannot help with requests about this."},
    "cant_assist": {"content": "Unfortunately I can't assist with that."},
    "wont": {"content": "I won't classify this content."},
    "as_an_ai": {"content": "As an AI, I am not able to judge this."},
    "harmony_final_refusal": {"content": "<|channel|>final<|message|>I'm sorry, but I can't help with that.<|return|>"},
    "refusal_even_with_length": {"content": "I'm sorry, I cannot help.", "finish_reason": "length"},
    "json_without_detected_and_refusal": {"content": '{"error": "I cannot assist with this."}'},
}


@pytest.mark.parametrize("kwargs", REFUSAL_CASES.values(), ids=REFUSAL_CASES.keys())
def test_refusals(kwargs: dict) -> None:
    answer = parse_answer(**kwargs)
    assert answer.status == "refusal"
    assert (answer.detected, answer.confidence, answer.indicators) == (None, None, ())
    assert answer.error


def test_refusal_phrase_ignored_when_answer_present() -> None:
    answer = parse_answer("I'm sorry this took long. " + FULL)
    assert (answer.status, answer.detected) == ("ok", True)


def test_refusal_phrase_in_reasoning_only_is_not_refusal() -> None:
    answer = parse_answer("", reasoning="I'm sorry, thinking aloud without an answer")
    assert answer.status == "parse_error"


def test_prose_content_does_not_fall_back_to_reasoning_draft() -> None:
    # Prose answers must stay non-ok (retryable), not be papered over with a draft.
    answer = parse_answer("The narrative is a placeholder.", reasoning=FULL)
    assert (answer.status, answer.error) == ("parse_error", "no JSON object found")


TRUNCATION_CASES = {
    "complete_answer_ok": (FULL, "length", "ok"),
    "complete_answer_then_cut_prose": (FULL + "\nExplanation: the narra", "length", "ok"),
    "cut_inside_object": ('{"detected": true, "confidence": 0.9, "rationale": "Her ex-hus', "length", "truncated"),
    "cut_before_object": ("Let me analyse the narrative step by step. First", "length", "truncated"),
    "invalid_detected": ('{"detected": "mayb"}', "length", "truncated"),
    "empty": ("", "length", "truncated"),
    "max_tokens_synonym": ('{"detected": tr', "max_tokens", "truncated"),
}


@pytest.mark.parametrize(("content", "reason", "status"), TRUNCATION_CASES.values(), ids=TRUNCATION_CASES.keys())
def test_finish_reason_length(content: str, reason: str, status: str) -> None:
    answer = parse_answer(content, finish_reason=reason)
    assert answer.status == status
    assert answer.status != "parse_error"
    assert (answer.error is None) == (status == "ok")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"detected": true, "confidence": 0.9, "rationale": "Her ex-hus', "unterminated JSON object"),
        ("The narrative says only: Need LE report.", "no JSON object found"),
        ('{"verdict": "yes"}', "no object with a 'detected' key"),
    ],
)
def test_parse_errors_without_length(content: str, error: str) -> None:
    answer = parse_answer(content, finish_reason="stop")
    assert (answer.status, answer.error, answer.detected) == ("parse_error", error, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": None},
        {"content": ""},
        {"content": "   \n\t"},
        {"content": None, "reasoning": None, "finish_reason": None, "refusal": None},
        {"content": "", "reasoning": "", "refusal": "  "},
        {"content": "<|start|><|end|>", "reasoning": " "},
        {"content": None, "finish_reason": "stop"},
    ],
)
def test_empty_response(kwargs: dict) -> None:
    answer = parse_answer(**kwargs)
    assert (answer.status, answer.error, answer.answer_source) == ("parse_error", "empty response", None)


# --------------------------------------------------------------------------------------
# Robustness: adversarial and property tests
# --------------------------------------------------------------------------------------

_N = 100_000
ADVERSARIAL = {
    "open_braces": "{" * _N,
    "close_braces": "}" * _N,
    "deep_brackets": "[" * _N + "]" * _N,
    "deep_brackets_in_object": '{"detected": ' + "[" * _N + "]" * _N + "}",
    "nested_detected_open": '{"detected":' * (_N // 12),
    "nested_detected_closed": '{"detected": ' * (_N // 13) + "}" * (_N // 13),
    "quotes": '"' * _N,
    "apostrophes": "'" * _N,
    "empty_pairs": "{}" * (_N // 2),
    "keyword_pairs": "{detected}" * (_N // 10),
    "open_strings": '{"a":"' * (_N // 6),
    "huge_lenient_spans": ("{detected: [" + "x," * 9000 + "] ") * 5 + "}" * 5,
    "unterminated_single_quote": "{'detected': '" + "a" * _N + "}",
    "harmony_tokens": "<|channel|>final<|message|>" * (_N // 27),
    "open_comments": "{/*" * (_N // 3),
    "backslashes": '{"detected": "' + "\\" * _N + '"}',
    "control_chars": "".join(chr(i % 32) for i in range(_N)),
    "huge_valid_answer": json.dumps({"detected": True, "confidence": 0.5, "rationale": "r" * _N}),
}


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_inputs_return(text: str) -> None:
    for kwargs in ({"content": text}, {"content": "", "reasoning": text, "finish_reason": "length"}):
        answer = parse_answer(**kwargs)
        assert answer.status in STATUSES
        assert answer.error is None or len(answer.error) < 120


def test_huge_valid_answer_still_parses() -> None:
    answer = parse_answer(ADVERSARIAL["huge_valid_answer"])
    assert (answer.status, answer.confidence) == ("ok", 0.5)
    assert len(answer.rationale) == 1000


_TRICKY_ALPHABET = st.sampled_from(
    [
        *"{}[]\"'\\:,.#/*\n\t ",
        *("detected", "true", "0. nine", "<|end|>", "</think>", "\x00"),
        *("<|channel|>final<|message|>", "\u201c", "I'm sorry"),
    ]
)
_ANY_TEXT = st.one_of(
    st.text(),
    st.text(st.characters(categories=("Cc", "Cs", "Zs", "Po", "Ps", "Pe")), max_size=200),
    st.lists(_TRICKY_ALPHABET, max_size=200).map("".join),
    # ~100k-character strings built by repetition, so each example stays cheap to generate.
    st.builds(
        lambda unit, n: unit * n,
        st.lists(_TRICKY_ALPHABET, min_size=1, max_size=8).map("".join),
        st.integers(1, 12_000),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.one_of(st.none(), _ANY_TEXT),
    reasoning=st.one_of(st.none(), _ANY_TEXT),
    finish_reason=st.sampled_from([None, "stop", "length", "max_tokens", ""]),
    refusal=st.one_of(st.none(), st.just(""), st.text(max_size=20)),
)
def test_never_raises(
    content: str | None, reasoning: str | None, finish_reason: str | None, refusal: str | None
) -> None:
    answer = parse_answer(content, reasoning, finish_reason, refusal)
    assert answer.status in STATUSES
    assert answer.answer_source in (None, "content", "reasoning")
    if answer.status == "ok":
        assert answer.error is None and isinstance(answer.detected, bool)
    else:
        assert answer.error and answer.detected is None
    if answer.confidence is not None:
        assert 0.0 <= answer.confidence <= 1.0 and math.isfinite(answer.confidence)
    assert all(isinstance(i, str) for i in answer.indicators)


_VALID_ANSWERS = st.fixed_dictionaries(
    {
        "detected": st.booleans(),
        "confidence": st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
        "indicators": st.lists(st.text(max_size=40), max_size=5),
        "rationale": st.text(max_size=200),
    }
)
# Prose may contain anything but braces: a stray brace pair around the answer would make
# a different (legitimate) object the last one.
_PROSE = st.text(st.characters(exclude_characters="{}"), max_size=200)
_WRAPPERS = st.sampled_from(
    [
        "{prose}{json}",
        "{json}{prose}",
        "{prose}\n```json\n{json}\n```\n{prose}",
        "```\n{json}\n```",
        "{prose}<|channel|>final<|message|>{json}<|return|>",
        "<think>{prose}</think>{json}",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    answer=_VALID_ANSWERS,
    wrapper=_WRAPPERS,
    prose=_PROSE,
    indent=st.sampled_from([None, 2]),
    ascii_only=st.booleans(),
)
def test_round_trip(answer: dict, wrapper: str, prose: str, indent: int | None, ascii_only: bool) -> None:
    payload = json.dumps(answer, indent=indent, ensure_ascii=ascii_only)
    text = wrapper.replace("{prose}", prose).replace("{json}", payload)
    parsed = parse_answer(text)
    assert parsed.status == "ok", parsed.error
    assert parsed.detected is answer["detected"]
    assert parsed.confidence == answer["confidence"]
