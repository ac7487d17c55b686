"""Tolerant parser for the model's JSON verdict.

The model is asked for ``{"detected": bool, "confidence": 0..1, "indicators": [str],
"rationale": str}``, but real answers arrive wrapped in prose or code fences, with harmony
tokens (``<|channel|>final<|message|>...``), ``<think>`` blocks, Python/JavaScript-flavoured
literals, spelled-out decimals, an empty ``content`` with the JSON in ``reasoning``, refusals
and truncation. :func:`parse_answer` turns any of these into a :class:`ParsedAnswer` and never
raises.

How an answer is found:

1. A non-empty ``refusal`` argument wins: status ``refusal``.
2. The text searched is ``content``; only when ``content`` is empty (after removing harmony
   tokens) is ``reasoning`` searched instead. Prose in ``content`` is never second-guessed
   with drafts from the reasoning trace, so such rows stay non-ok and can be retried.
3. Within a text, the harmony ``final`` channel and the text after the last ``</think>`` are
   searched before the whole text.
4. A linear brace scanner that respects double-quoted strings lists every balanced ``{...}``
   span. Spans are tried from the one that ends last backwards; the first that parses to an
   object with a ``detected`` key is the answer (reasoning models often sketch a draft
   first, and an outer object closes after the objects it contains). Each span goes through
   :func:`json.loads` first and through a small lenient parser only when that fails.
5. No such object: refusal phrases in ``content`` give ``refusal``; otherwise
   ``parse_error`` - or ``truncated`` when ``finish_reason`` says the token limit was hit.

Field normalisation is documented on :func:`parse_answer`. Bump :data:`PARSER_VERSION`
whenever any of this behaviour changes, because the version is stored with every row.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from narr_assets.vocabulary import ANSWER_STATUSES, OK, PARSE_ERROR, REFUSAL, TRUNCATED

__all__ = [
    "PARSER_VERSION",
    "RESULT_SCHEMA",
    "STATUSES",
    "ParsedAnswer",
    "parse_answer",
]

PARSER_VERSION = "1.0.0"

RESULT_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "detected": {"type": "boolean"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "indicators": {"type": "array", "items": {"type": "string"}},
        "rationale": {"type": "string", "maxLength": 200},
    },
    "required": ["detected", "confidence", "indicators", "rationale"],
    "additionalProperties": False,
}

# What one answer can parse to (`vocabulary.ANSWER_STATUSES`, under this module's old name).
STATUSES: tuple[str, ...] = ANSWER_STATUSES

RATIONALE_MAX_CHARS = 1000
"""Rationales longer than the requested 200 chars are kept, but capped here."""

# finish_reason values meaning "stopped by the token limit" (OpenAI, some proxies of Anthropic).
_LENGTH_FINISH_REASONS = frozenset({"length", "max_tokens"})

# Work limits that keep adversarial inputs (100k chars of nested braces) fast: a verdict is a
# few hundred characters, so these are generous for real answers.
_MAX_ATTEMPTS = 64  # candidate spans handed to a JSON parser per text
_MAX_LENIENT_SPAN = 20_000  # longest span given to the (pure Python) lenient parser
_LENIENT_BUDGET = 200_000  # total chars the lenient parser may consume per text
_MAX_DEPTH = 40  # nesting accepted by the lenient parser

_HARMONY_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_.:-]{0,40}\|>")
_HARMONY_STOPS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")
_SCAN_RE = re.compile(r'[{}"\\]')
_BRACE_RE = re.compile(r"[{}]")
_KEY_END_RE = re.compile(r"[:=,}\n]")
_SCALAR_END_RE = re.compile(r"[,}\]\n\r]")

_DOUBLE_QUOTES = '"\u201c\u201d\u201e\u201f'
_SINGLE_QUOTES = "'\u2018\u2019"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
# A closing quote is accepted only when one of these follows it (after spaces/tabs), so an
# apostrophe or an unescaped quote inside a value does not end the string early.
_AFTER_STRING = frozenset(",:}]\n\r/#")

_TRUE_WORDS = frozenset({"true", "yes", "y", "1", "1.0"})
_FALSE_WORDS = frozenset({"false", "no", "n", "0", "0.0"})
_NULL_WORDS = frozenset({"null", "none", "nan", "undefined"})

# Verbal confidence levels; "high"/"medium"/"low" are the ones models actually use.
_CONFIDENCE_WORDS = {
    "very high": 0.95,
    "high": 0.9,
    "medium": 0.6,
    "moderate": 0.6,
    "low": 0.3,
    "very low": 0.1,
}
_DIGIT_WORDS = {
    word: str(digit)
    for digit, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
}

# Lower-case, straight-apostrophe phrases that mark a refusal when no verdict was found.
_REFUSAL_PHRASES = (
    "i'm sorry",
    "i am sorry",
    "i cannot help",
    "i can't help",
    "i cannot assist",
    "i can't assist",
    "i won't",
    "i will not",
    "as an ai",
    "i'm unable to",
    "i am unable to",
    "i cannot comply",
    "i can't comply",
    "i must decline",
)


@dataclass(frozen=True)
class ParsedAnswer:
    """One model answer, normalised.

    Attributes:
        status: One of :data:`STATUSES`.
        detected: The verdict; None unless status is ``ok``.
        confidence: In [0, 1], or None when absent or unusable (status may still be ``ok``).
        indicators: Indicator strings, empty when absent.
        rationale: The model's rationale (capped at 1000 chars), None when absent.
        error: Short reason for a non-ok status, None when ok. Quotes at most 40 characters
            of the answer.
        answer_source: ``"content"`` or ``"reasoning"``: where the answer object was found;
            None when no object with a ``detected`` key was found.
    """

    status: str
    detected: bool | None
    confidence: float | None
    indicators: tuple[str, ...]
    rationale: str | None
    error: str | None
    answer_source: str | None


class _LenientError(ValueError):
    """The lenient parser gave up on a span."""


class _Budget:
    """Mutable work allowance shared by all candidate spans of one text."""

    def __init__(self) -> None:
        self.attempts = _MAX_ATTEMPTS
        self.lenient_chars = _LENIENT_BUDGET


@dataclass(frozen=True)
class _Search:
    """Outcome of looking for the answer object in one text."""

    obj: dict | None
    error: str | None


def parse_answer(
    content: str | None,
    reasoning: str | None = None,
    finish_reason: str | None = None,
    refusal: str | None = None,
) -> ParsedAnswer:
    """Parse one chat-completion answer into a verdict; never raises.

    Field rules:

    * ``detected``: JSON/Python booleans, ``"true"``/``"false"``, ``"yes"``/``"no"`` (any
      case, a trailing full stop allowed), ``1``/``0``. Anything else gives ``parse_error``.
    * ``confidence``: numbers in [0, 1] as is; ``1 < x <= 100`` is read as a percentage;
      strings may be ``"85%"``, ``".9"``, ``"0. nine"``, ``"zero point eight"``,
      ``"point seven"`` or ``"0,9"``; the words very high/high/medium (moderate)/low/very low
      map to 0.95/0.9/0.6/0.3/0.1. Anything else (negative, > 100, NaN, garbage, booleans)
      gives None without affecting the status.
    * ``indicators``: a list (non-strings converted with ``str()``, blanks dropped); a single
      string becomes a one-element tuple; missing gives an empty tuple.
    * ``rationale``: stripped and capped at 1000 characters; missing gives None.

    Keys match case-insensitively. Trailing commas, single quotes, smart quotes, unquoted
    keys and values, ``True``/``False``/``None``, and ``//``, ``/* */`` and ``#`` comments
    are repaired.

    Args:
        content: The message content.
        reasoning: The reasoning/thinking field some servers return separately; searched
            only when ``content`` is empty.
        finish_reason: The choice's finish reason; ``"length"`` (or ``"max_tokens"``) turns
            every failure except a refusal into ``truncated``.
        refusal: The message's refusal field; any non-blank value gives ``refusal``.

    Returns:
        The parsed answer; its ``status`` is always one of :data:`STATUSES`.
    """
    content = _as_text(content)
    reasoning = _as_text(reasoning)
    truncated = _as_text(finish_reason).strip().lower() in _LENGTH_FINISH_REASONS

    if _as_text(refusal).strip():
        return _failure(REFUSAL, "refusal field set")

    content_clean = _strip_tokens(content).strip()
    if content_clean:
        source, text = "content", content
    elif _strip_tokens(reasoning).strip():
        source, text = "reasoning", reasoning
    else:
        return _failure(TRUNCATED if truncated else PARSE_ERROR, "empty response")

    segments = _preferred_segments(text)
    search = _Search(None, "no JSON object found")
    for segment in segments:
        search = _search(segment)
        if search.obj is not None:
            break

    if search.obj is not None:
        answer = _build(search.obj, source)
        if answer.status == OK or not truncated:
            return answer
        return _failure(TRUNCATED, f"finish_reason=length; {answer.error}", source)

    if source == "content":
        phrase = _refusal_phrase(segments[0])
        if phrase is not None:
            return _failure(REFUSAL, f"refusal phrase: {phrase!r}")

    if truncated:
        return _failure(TRUNCATED, f"finish_reason=length; {search.error}")
    return _failure(PARSE_ERROR, search.error)


def _as_text(value: Any) -> str:
    """Coerce an optional field to text so odd client objects cannot raise later."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _failure(status: str, error: str | None, source: str | None = None) -> ParsedAnswer:
    return ParsedAnswer(status, None, None, (), None, error, source)


def _snippet(value: Any) -> str:
    """A short representation of a bad value, never more than 40 characters of it."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _strip_tokens(text: str) -> str:
    """Remove chat-template tokens such as ``<|channel|>`` and ``<|end|>``."""
    if "<|" not in text:
        return text
    return _HARMONY_TOKEN_RE.sub(" ", text)


def _preferred_segments(text: str) -> list[str]:
    """The parts of ``text`` to search, most authoritative first, tokens removed.

    The harmony ``final`` channel and the text after ``</think>`` hold the answer proper;
    the whole text comes last as a fallback.
    """
    segments: list[str] = []
    marker = text.rfind("<|channel|>final")
    if marker >= 0:
        message = text.find("<|message|>", marker)
        if message >= 0:
            start = message + len("<|message|>")
            stops = [i for i in (text.find(s, start) for s in _HARMONY_STOPS) if i >= 0]
            segments.append(text[start : min(stops, default=len(text))])
    think = text.rfind("</think>")
    if think >= 0:
        segments.append(text[think + len("</think>") :])
    segments.append(text)
    return [_strip_tokens(s) for s in segments]


def _refusal_phrase(text: str) -> str | None:
    lowered = text.lower().replace("\u2019", "'")
    for phrase in _REFUSAL_PHRASES:
        if phrase in lowered:
            return phrase
    return None


def _keyword_positions(text: str) -> list[int]:
    """Sorted start offsets of "detected" in any common capitalisation.

    Searching "etected"/"ETECTED" covers "detected", "Detected" and "DETECTED" without
    lower-casing, which could shift offsets for some non-ASCII characters.
    """
    positions: list[int] = []
    for needle in ("etected", "ETECTED"):
        i = text.find(needle)
        while i >= 0:
            positions.append(i)
            i = text.find(needle, i + 1)
    positions.sort()
    return positions


def _brace_spans(text: str, respect_strings: bool) -> tuple[list[tuple[int, int]], int | None]:
    """List balanced ``{...}`` spans in closing order, in one linear pass.

    Args:
        text: Text to scan.
        respect_strings: Ignore braces inside double-quoted strings of an open object.
            Prose outside objects is never treated as strings, so its apostrophes and
            quotes cannot throw the scanner off.

    Returns:
        The spans as (start, end) ordered by end, and the offset of the outermost brace
        left open at the end of the text (None when all braces closed).
    """
    spans: list[tuple[int, int]] = []
    stack: list[int] = []
    in_string = False
    skip = -1
    for match in (_SCAN_RE if respect_strings else _BRACE_RE).finditer(text):
        i = match.start()
        if i == skip:
            continue
        char = text[i]
        if in_string:
            if char == "\\":
                skip = i + 1
            elif char == '"':
                in_string = False
        elif char == "{":
            stack.append(i)
        elif char == "}":
            if stack:
                spans.append((stack.pop(), i + 1))
        elif char == '"' and stack:
            in_string = True
    return spans, (stack[0] if stack else None)


def _search(text: str) -> _Search:
    """Find the last object with a ``detected`` key in ``text``."""
    keywords = _keyword_positions(text)
    budget = _Budget()
    found_object = False
    unterminated = False
    passes = (True, False) if '"' in text else (True,)
    for respect_strings in passes:
        spans, open_at = _brace_spans(text, respect_strings)
        found_object = found_object or bool(spans)
        if open_at is not None and keywords and keywords[-1] > open_at:
            unterminated = True
        for start, end in reversed(spans):
            k = bisect.bisect_left(keywords, start)
            if k == len(keywords) or keywords[k] >= end:
                continue
            if budget.attempts <= 0:
                break
            budget.attempts -= 1
            obj = _load(text[start:end], budget)
            if isinstance(obj, dict) and "detected" in _lower_keys(obj):
                return _Search(obj, None)
    if unterminated:
        return _Search(None, "unterminated JSON object")
    if found_object:
        return _Search(None, "no object with a 'detected' key")
    return _Search(None, "no JSON object found")


def _load(span: str, budget: _Budget) -> Any:
    """Strict JSON first, the lenient parser only when that fails; None if both fail."""
    try:
        return json.loads(span, strict=False)
    except (ValueError, RecursionError):
        pass
    if len(span) > _MAX_LENIENT_SPAN or len(span) > budget.lenient_chars:
        return None
    budget.lenient_chars -= len(span)
    try:
        return _LenientParser(span).parse()
    except (_LenientError, RecursionError):
        return None


def _lower_keys(obj: dict) -> dict[str, Any]:
    return {str(key).strip().lower(): value for key, value in obj.items()}


class _LenientParser:
    """Recursive-descent parser for JSON as models write it.

    Accepts single and smart quotes, unquoted keys and values, missing or trailing commas,
    comments and Python literals. Bare values run to the next ``,``, ``}``, ``]`` or line
    end and are kept as text (``0. nine`` stays ``"0. nine"``) unless they are JSON
    numbers or literals, so the field normalisers see what the model wrote.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)

    def parse(self) -> Any:
        pos = self._skip(0)
        if pos >= self.n or self.text[pos] != "{":
            raise _LenientError("not an object")
        value, _ = self._value(pos, 0)
        return value

    def _skip(self, pos: int) -> int:
        """Skip whitespace and comments."""
        text, n = self.text, self.n
        while pos < n:
            char = text[pos]
            if char.isspace():
                pos += 1
            elif char == "#" or text.startswith("//", pos):
                newline = text.find("\n", pos)
                pos = n if newline < 0 else newline + 1
            elif text.startswith("/*", pos):
                close = text.find("*/", pos + 2)
                pos = n if close < 0 else close + 2
            else:
                break
        return pos

    def _value(self, pos: int, depth: int) -> tuple[Any, int]:
        if depth > _MAX_DEPTH:
            raise _LenientError("too deep")
        if pos >= self.n:
            raise _LenientError("unexpected end")
        char = self.text[pos]
        if char == "{":
            return self._object(pos + 1, depth + 1)
        if char == "[":
            return self._array(pos + 1, depth + 1)
        if char in _DOUBLE_QUOTES or char in _SINGLE_QUOTES:
            return self._string(pos)
        return self._scalar(pos)

    def _object(self, pos: int, depth: int) -> tuple[dict, int]:
        result: dict[str, Any] = {}
        text = self.text
        while True:
            pos = self._skip(pos)
            if pos >= self.n:
                raise _LenientError("unterminated object")
            char = text[pos]
            if char == "}":
                return result, pos + 1
            if char == ",":
                pos += 1
                continue
            if char in "{[]":
                raise _LenientError("bad key")
            if char in _DOUBLE_QUOTES or char in _SINGLE_QUOTES:
                key, pos = self._string(pos)
            else:
                match = _KEY_END_RE.search(text, pos)
                end = match.start() if match else self.n
                key, pos = text[pos:end].strip(), end
            pos = self._skip(pos)
            if pos < self.n and text[pos] in ":=":
                pos = self._skip(pos + 1)
                value, pos = self._value(pos, depth)
                result[key] = value
            # A key without a colon is prose inside the braces: dropped.

    def _array(self, pos: int, depth: int) -> tuple[list, int]:
        result: list[Any] = []
        text = self.text
        while True:
            pos = self._skip(pos)
            if pos >= self.n:
                raise _LenientError("unterminated array")
            char = text[pos]
            if char == "]":
                return result, pos + 1
            if char == ",":
                pos += 1
                continue
            if char in "}:":
                raise _LenientError("mismatched bracket")
            value, pos = self._value(pos, depth)
            result.append(value)

    def _string(self, pos: int) -> tuple[str, int]:
        text, n = self.text, self.n
        closers = _DOUBLE_QUOTES if text[pos] in _DOUBLE_QUOTES else _SINGLE_QUOTES
        chunks: list[str] = []
        i = pos + 1
        while i < n:
            char = text[i]
            if char == "\\":
                if i + 1 >= n:
                    break
                escaped = text[i + 1]
                if escaped == "u" and _is_hex(text[i + 2 : i + 6]):
                    chunks.append(chr(int(text[i + 2 : i + 6], 16)))
                    i += 6
                    continue
                chunks.append(_ESCAPES.get(escaped, escaped))
                i += 2
                continue
            if char in closers:
                j = i + 1
                while j < n and text[j] in " \t":
                    j += 1
                if j >= n or text[j] in _AFTER_STRING:
                    return "".join(chunks), i + 1
            chunks.append(char)
            i += 1
        raise _LenientError("unterminated string")

    def _scalar(self, pos: int) -> tuple[Any, int]:
        match = _SCALAR_END_RE.search(self.text, pos)
        end = match.start() if match else self.n
        raw = self.text[pos:end]
        for marker in ("//", "/*", " #"):
            cut = raw.find(marker)
            if cut >= 0:
                raw = raw[:cut]
        return _literal(raw.strip()), end


def _is_hex(text: str) -> bool:
    return len(text) == 4 and all(c in "0123456789abcdefABCDEF" for c in text)


def _literal(raw: str) -> Any:
    """Interpret an unquoted value: JSON/Python literals and JSON numbers, else the text."""
    lowered = raw.lower()
    if not raw or lowered in _NULL_WORDS:
        return None
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if raw[0] in "-0123456789" and len(raw) <= 64:
        try:
            number = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(number, (int, float)):
            return number
    return raw


def _build(obj: dict, source: str) -> ParsedAnswer:
    """Normalise an answer object that has a ``detected`` key."""
    fields = _lower_keys(obj)
    detected = _normalise_detected(fields.get("detected"))
    if detected is None:
        return _failure(PARSE_ERROR, f"invalid 'detected' value: {_snippet(fields.get('detected'))}", source)
    return ParsedAnswer(
        status=OK,
        detected=detected,
        confidence=_normalise_confidence(fields.get("confidence")),
        indicators=_normalise_indicators(fields.get("indicators")),
        rationale=_normalise_rationale(fields.get("rationale")),
        error=None,
        answer_source=source,
    )


def _normalise_detected(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().strip("\"'").strip().rstrip(".").lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _normalise_confidence(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return _scale_confidence(float(value), percent=False)
    if isinstance(value, str):
        return _confidence_from_text(value)
    return None


def _scale_confidence(x: float, percent: bool) -> float | None:
    """Map a number to [0, 1]: as is, or as a percentage when ``1 < x <= 100``."""
    if not math.isfinite(x) or x < 0:
        return None
    if percent:
        return x / 100 if x <= 100 else None
    if x <= 1:
        return x
    return x / 100 if x <= 100 else None


def _confidence_from_text(value: str) -> float | None:
    text = value.strip().strip("\"'").strip().lower()
    if text in _CONFIDENCE_WORDS:
        return _CONFIDENCE_WORDS[text]
    percent = False
    for suffix in ("%", "percent"):
        if text.endswith(suffix):
            text, percent = text[: -len(suffix)].strip(), True
            break
    if "." not in text and text.count(",") == 1:
        text = text.replace(",", ".")  # decimal comma
    words = text.replace("point", " . ").split()
    digits = "".join(_DIGIT_WORDS.get(word, word) for word in words)
    if (
        not digits
        or digits.count(".") > 1
        or not any(c.isdigit() for c in digits)
        or not all(c in "0123456789." for c in digits)
    ):
        return None
    return _scale_confidence(float(digits), percent)


def _normalise_indicators(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    texts = (item.strip() if isinstance(item, str) else str(item) for item in items if item is not None)
    return tuple(text for text in texts if text)


def _normalise_rationale(value: Any) -> str | None:
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    return text[:RATIONALE_MAX_CHARS]
