"""Lexicon phrases to regular expressions, and the rewrite that keeps long alternations fast.

Every pattern runs case-sensitively on lower-cased text (see `lower_regex`); `trie` merges an
ordered alternation on common literal prefixes without changing what it matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator


def phrase_to_regex(phrase: str) -> str:
    """Turn one lexicon phrase into a regex fragment (see the syntax in the lexicon file).

    The fragment has no leading word-boundary check: `alternation` adds a single one in
    front of the whole alternation, which keeps the regex engine's fast path per alternative.
    """
    if phrase.startswith("re:"):
        return f"(?:{phrase[3:]})"
    words = []
    for word in phrase.split():
        wildcard = word.endswith("*")
        word = word.rstrip("*").replace("’", "'")
        part = re.escape(word).replace(r"\-", r"[\s-]*").replace("'", "['’]")
        words.append(part + (r"\w*" if wildcard else ""))
    return r"\s+".join(words) + r"(?!\w)"


def lower_regex(pattern: str) -> str:
    """Lower-case a pattern's literal letters, leaving escapes such as `\\S` or `\\B` intact.

    Patterns run case-sensitively on lower-cased text: with IGNORECASE Python's regex engine
    loses its first-character fast path in alternations and runs about five times slower.
    """
    out = []
    escaped = False
    for char in pattern:
        out.append(char if escaped else char.lower())
        escaped = not escaped and char == "\\"
    return "".join(out)


_QUANTIFIERS = frozenset("?*+{")
_EXPANSION_BUDGET = 256


def _structure(pattern: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """Yield (index, char, depth after it) for each regex metacharacter outside escapes and
    character classes, from `start`: the one scanner both helpers below walk."""
    depth, i, in_class = 0, start, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 1 if pattern[i + 1 : i + 2] == "^" else 0
            i += 1 if pattern[i + 1 : i + 2] == "]" else 0
        elif char in "()|":
            depth += {"(": 1, ")": -1, "|": 0}[char]
            yield i, char, depth
        i += 1


def _group_end(pattern: str, start: int) -> int:
    """Index of the parenthesis closing the group opened at `start` (escapes and classes aware)."""
    for i, char, depth in _structure(pattern, start):
        if char == ")" and depth == 0:
            return i
    raise re.error("unbalanced parenthesis")


def _split_top(pattern: str) -> list[str]:
    """Split a pattern on its top-level `|`."""
    parts, begin = [], 0
    for i, char, depth in _structure(pattern):
        if char == "|" and depth == 0:
            parts.append(pattern[begin:i])
            begin = i + 1
    parts.append(pattern[begin:])
    return parts


def distribute(pattern: str, at_word_start: bool) -> list[str]:
    """Rewrite `(?:X|Y)REST` as `XREST`, `YREST` (same order, same meaning), recursively.

    At a word start a leading `\\b` always holds and is dropped. A quantified group, or one
    that would expand too much, is left alone.
    """
    if at_word_start and pattern.startswith("\\b"):
        return distribute(pattern[2:], at_word_start)
    if not pattern.startswith("(?:"):
        return [pattern]
    end = _group_end(pattern, 0)
    rest = pattern[end + 1 :]
    if rest[:1] in _QUANTIFIERS:
        return [pattern]
    out: list[str] = []
    for alternative in _split_top(pattern[3:end]):
        out.extend(distribute(alternative + rest, at_word_start))
        if len(out) > _EXPANSION_BUDGET:
            return [pattern]
    return out


def trie(alternatives: list[str], at_word_start: bool = True) -> str:
    """Merge ordered alternatives on their common literal prefixes ("abuse|abusive" -> "abus(?:e|ive)").

    Python's engine tries every alternative at every position unless it starts with a literal
    character, so a flat list of ~250 terms scans text four times slower than the same terms
    as a trie. The order of alternatives that can match at the same place is kept (an
    alternative without a literal first character ends the run that can be reordered), so
    the regex means exactly the same; a test compares both on real narratives.
    """
    expanded = [alt for pattern in alternatives for alt in distribute(pattern, at_word_start)]
    segments: list[str | dict[str, list[str]]] = []
    for alt in expanded:
        if alt[:1].isalnum() and alt[1:2] not in _QUANTIFIERS:
            run = segments[-1] if segments else None
            if not isinstance(run, dict):
                run = {}
                segments.append(run)
            run.setdefault(alt[0], []).append(alt[1:])
        else:
            segments.append(alt)
    parts = []
    for segment in segments:
        if isinstance(segment, str):
            parts.append(segment)
            continue
        for char, rests in segment.items():
            if len(rests) == 1:
                parts.append(char + rests[0])
            else:
                parts.append(f"{char}(?:{trie(rests, at_word_start=False)})")
    return "|".join(parts)


def alternation(fragments: list[tuple[str, str]]) -> str:
    """Join (source, regex) pairs longest source first, so longer phrases win ties."""
    ordered = sorted(fragments, key=lambda item: len(item[0]), reverse=True)
    return "|".join(regex for _, regex in ordered)
