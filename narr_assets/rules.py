"""The `rules` backend: an offline, deterministic lexicon classifier for IPV victimisation.

It is the default experiment (the whole graph runs with no LLM server) and a real baseline for
the LLM experiments. The lexicon (`configs/lexicon.yaml`) holds every word list; this module
holds the decision logic, which works per sentence (";" also ends a clause):

1. *Evidence* is an abuse term (six types plus unspecified abuse) or an indirect indicator
   (shelter, restraining order, police called to a domestic, ...). Neutral phrases such as
   "substance abuse" or "heart attack" are matched first and ignored.
2. A term is *negated* when a cue ("no history of", "denied", "never", ...) ends at most
   `negation.window` words before it and only gap words ("known", "any", "physical", ...)
   stand in between; negation carries over a coordinated list ("no physical or sexual abuse").
3. A sentence where the decedent is the abuser (perpetrator cues such as "V was arrested for
   assaulting his wife") gives no evidence, and a narrative with such a cue gives no credit
   to indirect or carried-over evidence, which may be about the decedent's own violence.
4. Evidence counts only when the relation term nearest to it in the sentence is a partner
   ("her husband"), not a parent, sibling, friend, ... With no relation term in the sentence,
   the last one of the previous sentence decides, at a reduced weight. Terms that name
   intimate-partner violence by themselves ("domestic violence", "DV shelter") count without
   a relation term unless the nearest one is a non-partner. Abuse aimed at a relative ("her
   husband beat her son") is not abuse of the decedent.
5. A decedent described as a homicide victim is out of scope: not detected.

An argument, a breakup or a separation without abuse is deliberately *not* evidence: NVDRS
codes those as intimate-partner problems, and the strict prompt excludes a single argument.

`confidence` follows the LLM answer's meaning, confidence in the verdict: when detected it
rises from 0.5 with the number and weight of the evidence kinds; when not detected it is
`scoring.negative_confidence` and drops for each kind of evidence that was set aside (negated,
non-partner, perpetrator). A probability-like score for ranking is `confidence` when detected
and `1 - confidence` otherwise. The rationale is built from indicator labels only and never
quotes the narrative.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RULES_VERSION = "1.0.0"

ABUSE_TYPES = ("physical", "sexual", "psychological", "emotional", "economic", "legal")
_ABUSE_GROUPS = (*ABUSE_TYPES, "general")
_SEXES = ("female", "male", "unknown")
_RATIONALE_MAX = 200

_TOP_KEYS = {
    "version": False,
    "partner_terms": True,
    "non_partner_terms": True,
    "abuse": True,
    "indirect_indicators": True,
    "neutral_terms": False,
    "negation": True,
    "perpetrator_cues": True,
    "homicide_victim_cues": False,
    "scoring": False,
}
_SCORING_DEFAULTS = {
    "carryover_factor": 0.7,
    "standalone_factor": 0.85,
    "negative_confidence": 0.9,
    "suppressed_penalty": 0.08,
    "min_negative_confidence": 0.6,
}

# Placeholders for the decedent; the pronoun variants are added per narrative sex.
_V_SUBJECT = r"(?:v|the\s+decedent|decedent|the\s+deceased|the\s+victim)"
_V_OBJECT = _V_SUBJECT
_V_POSS = r"(?:v['’]s|the\s+decedent['’]s|the\s+deceased['’]s|the\s+victim['’]s)"
_POSS = r"(?:his|her|their|v['’]s|the\s+decedent['’]s|the\s+victim['’]s)"
# "her" is an object only when no noun follows ("an order against her." vs "against her husband").
_HER_OBJECT = (
    r"her(?=\s*(?:[.,;:!?)]|$)|\s+(?:and|after|because|in|on|at|for|when|which|who|that|but|as|"
    r"until|since|from|over|during|following|earlier|previously|the|a|an|before|while)\b)"
)
_PRONOUNS = {
    "female": {"V": "she", "VOBJ": _HER_OBJECT, "VPOSS": "her"},
    "male": {"V": "he", "VOBJ": "him", "VPOSS": "his"},
    "unknown": {},
}
_V_PLACEHOLDERS = ("{V}", "{VOBJ}", "{VPOSS}")

_WORD = re.compile(r"[\w']+")
_SENTENCE_END = re.compile(r"[.!?;]+[\"'’”)\]]*\s+|\n\s*")
_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "approx", "a.m", "p.m", "e.g", "i.e", "lt", "sgt", "det", "ofc", "dep", "co", "inc", "ft", "hwy", "ave", "rd", "apt", "u.s", "y.o", "yo", "yrs", "appx", "est", "no"]
)
_SEX_WORDS = re.compile(r"\b(?:(female|woman|girl|lady)|(male|man|boy|gentleman))\b", re.IGNORECASE)
_FEMALE_PRONOUNS = re.compile(r"\b(?:she|her|herself)\b", re.IGNORECASE)
_MALE_PRONOUNS = re.compile(r"\b(?:he|him|his|himself)\b", re.IGNORECASE)


class LexiconError(ValueError):
    """The lexicon file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class _Spec:
    """What one group of evidence terms means."""

    kind: str  # "neutral" | "indicator" | "abuse"
    label: str  # label when attributed to a partner (or standalone)
    weight: float
    needs_partner: bool


@dataclass(frozen=True)
class _Scoring:
    carryover_factor: float
    standalone_factor: float
    negative_confidence: float
    suppressed_penalty: float
    min_negative_confidence: float


@dataclass(frozen=True, eq=False)
class Lexicon:
    """A validated lexicon with its patterns compiled once (they run on lower-cased text).

    Attributes:
        path: The file it was loaded from.
        sha256: Hash of the file bytes and `RULES_VERSION`: changes when either changes.
        counts: Number of terms per section, for metadata.
    """

    path: str
    sha256: str
    evidence: re.Pattern[str]  # every evidence and neutral term, in priority order
    evidence_groups: tuple[tuple[_Spec, re.Pattern[str]], ...]  # the same, one per spec
    relations: re.Pattern[str]  # partner terms, then non-partner terms
    partner: re.Pattern[str]  # partner terms only, to tell which kind a relation match is
    negation_cues: re.Pattern[str]
    post_cues: re.Pattern[str] | None
    scope_breaks: frozenset[str]
    gap_words: frozenset[str]
    window: int
    post_window: int
    perpetrator: Mapping[str, re.Pattern[str]]  # by decedent sex
    homicide: Mapping[str, re.Pattern[str] | None]  # by decedent sex
    scoring: _Scoring
    counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RulesVerdict:
    """The rules classifier's answer, shaped like the answer asked of an LLM.

    Attributes:
        detected: True when the decedent is judged a victim of intimate partner violence.
        confidence: Confidence in the verdict, in [0, 1] (see the module docstring).
        indicators: Labels of the evidence found, strongest first.
        rationale: At most 200 characters, built from indicator labels only.
    """

    detected: bool
    confidence: float
    indicators: tuple[str, ...]
    rationale: str

    def as_answer_json(self) -> str:
        """The verdict as the JSON object an LLM is asked for.

        Returns:
            `{"detected": bool, "confidence": float, "indicators": [str], "rationale": str}`.
        """
        return json.dumps(
            {
                "detected": self.detected,
                "confidence": round(self.confidence, 3),
                "indicators": list(self.indicators),
                "rationale": self.rationale,
            }
        )


# --------------------------------------------------------------------------- loading


def _phrase_to_regex(phrase: str) -> str:
    """Turn one lexicon phrase into a regex fragment (see the syntax in the lexicon file).

    The fragment has no leading word-boundary check: `_alternation` adds a single one in
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


def _lower_regex(pattern: str) -> str:
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


def _distribute(pattern: str, at_word_start: bool) -> list[str]:
    """Rewrite `(?:X|Y)REST` as `XREST`, `YREST` (same order, same meaning), recursively.

    At a word start a leading `\\b` always holds and is dropped. A quantified group, or one
    that would expand too much, is left alone.
    """
    if at_word_start and pattern.startswith("\\b"):
        return _distribute(pattern[2:], at_word_start)
    if not pattern.startswith("(?:"):
        return [pattern]
    end = _group_end(pattern, 0)
    rest = pattern[end + 1 :]
    if rest[:1] in _QUANTIFIERS:
        return [pattern]
    out: list[str] = []
    for alternative in _split_top(pattern[3:end]):
        out.extend(_distribute(alternative + rest, at_word_start))
        if len(out) > _EXPANSION_BUDGET:
            return [pattern]
    return out


def _trie(alternatives: list[str], at_word_start: bool = True) -> str:
    """Merge ordered alternatives on their common literal prefixes ("abuse|abusive" -> "abus(?:e|ive)").

    Python's engine tries every alternative at every position unless it starts with a literal
    character, so a flat list of ~250 terms scans text four times slower than the same terms
    as a trie. The order of alternatives that can match at the same place is kept (an
    alternative without a literal first character ends the run that can be reordered), so
    the regex means exactly the same; a test compares both on real narratives.
    """
    expanded = [alt for pattern in alternatives for alt in _distribute(pattern, at_word_start)]
    segments: list[str | dict[str, list[str]]] = []
    for alt in expanded:
        if alt[:1].isalnum() and alt[1:2] not in _QUANTIFIERS:
            if not segments or not isinstance(segments[-1], dict):
                segments.append({})
            segments[-1].setdefault(alt[0], []).append(alt[1:])
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
                parts.append(f"{char}(?:{_trie(rests, at_word_start=False)})")
    return "|".join(parts)


def _alternation(fragments: list[tuple[str, str]]) -> str:
    """Join (source, regex) pairs longest source first, so longer phrases win ties."""
    ordered = sorted(fragments, key=lambda item: len(item[0]), reverse=True)
    return "|".join(regex for _, regex in ordered)


def _lower_text(text: str) -> str:
    """Lower-case text keeping every offset (a few characters grow when lower-cased)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


class _Loader:
    """Validates the raw YAML and compiles it; every error names the file and the key."""

    def __init__(self, path: Path, raw: Any, sha256: str):
        self.path = path
        self.raw = raw
        self.sha256 = sha256

    def fail(self, key: str, problem: str) -> LexiconError:
        return LexiconError(f"{self.path}: key '{key}': {problem}")

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def terms(self, value: Any, key: str, *, allow_v: bool = False, required: bool = True) -> list[str]:
        if value is None and not required:
            return []
        if not isinstance(value, list) or (required and not value):
            raise self.fail(key, "expected a non-empty list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.fail(f"{key}[{i}]", "expected a non-empty string")
            if "(?P<" in item:
                raise self.fail(f"{key}[{i}]", "named groups are not allowed in patterns")
            if not allow_v and any(p in item for p in _V_PLACEHOLDERS):
                raise self.fail(
                    f"{key}[{i}]",
                    "{V}, {VOBJ} and {VPOSS} are only allowed in perpetrator_cues and homicide_victim_cues",
                )
        return [item.strip() for item in value]

    def number(self, value: Any, key: str, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.fail(key, f"expected a number in [{low}, {high}], got {value!r}")
        return float(value)

    def integer(self, value: Any, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"expected an integer in [{low}, {high}], got {value!r}")
        return value

    def compile(self, body: str, key: str, *, word_start: bool = True, optimise: bool = True) -> re.Pattern[str]:
        """Compile an alternation body for lower-cased text, optionally at a word start."""
        body = _lower_regex(body)
        try:
            if word_start and optimise:
                body = _trie([f"(?:{body})"])
            # "(?=\w)" skips the many non-word positions before trying the alternatives.
            return re.compile(rf"(?<!\w)(?=\w)(?:{body})" if word_start else f"(?:{body})")
        except re.error as exc:
            raise self.fail(key, f"invalid pattern ({exc})") from None

    def fragments(self, phrases: list[str], key: str, subst: Mapping[str, str]) -> list[tuple[str, str]]:
        """Expand placeholders and convert phrases; a bad pattern is reported by its index."""
        out = []
        for phrase in phrases:
            regex = _phrase_to_regex(phrase)
            for name, value in subst.items():
                regex = regex.replace("{" + name + "}", value)
            out.append((phrase, regex))
        try:
            re.compile(_lower_regex("|".join(regex for _, regex in out)))
        except re.error:
            # only now compile them one by one, to name the bad pattern by its index
            for i, (_, regex) in enumerate(out):
                self.compile(regex, f"{key}[{i}]", optimise=False)
            raise self.fail(key, "the patterns do not compile together") from None
        return out

    def build(self) -> Lexicon:
        raw = self.mapping(self.raw, "<top level>")
        for key in raw:
            if key not in _TOP_KEYS:
                raise self.fail(str(key), f"unknown key (expected one of {sorted(_TOP_KEYS)})")
        for key, required in _TOP_KEYS.items():
            if required and key not in raw:
                raise self.fail(key, "missing")

        scoring = self.scoring(raw.get("scoring") or {})  # cheap checks before compiling
        partner = self.terms(raw["partner_terms"], "partner_terms")
        partner_frag = self.fragments(partner, "partner_terms", {})
        subst = {"PARTNER": f"(?:{_alternation(partner_frag)})", "POSS": _POSS}
        non_partner_frag = self.fragments(
            self.terms(raw["non_partner_terms"], "non_partner_terms"), "non_partner_terms", subst
        )
        # Partner alternatives first: "father of her children" must beat "father".
        relations = self.compile(f"{_alternation(partner_frag)}|{_alternation(non_partner_frag)}", "non_partner_terms")

        groups: list[tuple[_Spec, list[tuple[str, str]]]] = []
        neutral = self.terms(raw.get("neutral_terms"), "neutral_terms", required=False)
        if neutral:
            groups.append((_Spec("neutral", "", 0.0, False), self.fragments(neutral, "neutral_terms", subst)))
        groups.extend(self.indicator_groups(raw["indirect_indicators"], subst))
        groups.extend(self.abuse_groups(raw["abuse"], subst))
        # One flat alternation finds the hits fast (named groups would defeat the engine's
        # first-character fast path); the per-spec patterns then tell which spec a hit is.
        evidence = self.compile("|".join(_alternation(frags) for _, frags in groups), "abuse")
        evidence_groups = tuple(
            (spec, self.compile(_alternation(frags), "abuse", word_start=False)) for spec, frags in groups
        )

        negation = self.mapping(raw["negation"], "negation")
        for key in negation:
            if key not in {"window", "post_window", "cues", "post_cues", "scope_breaks", "gap_words"}:
                raise self.fail(f"negation.{key}", "unknown key")
        cues = self.fragments(self.terms(negation.get("cues"), "negation.cues"), "negation.cues", {})
        post = self.terms(negation.get("post_cues"), "negation.post_cues", required=False)
        post_frag = self.fragments(post, "negation.post_cues", {})
        breaks = self.terms(negation.get("scope_breaks"), "negation.scope_breaks", required=False)
        gap = self.terms(negation.get("gap_words"), "negation.gap_words", required=False)

        perpetrator, homicide = {}, {}
        perp_terms = self.terms(raw["perpetrator_cues"], "perpetrator_cues", allow_v=True)
        hom_terms = self.terms(raw.get("homicide_victim_cues"), "homicide_victim_cues", allow_v=True, required=False)
        for sex in _SEXES:
            pron = _PRONOUNS[sex]
            v_subst = {
                **subst,
                "VOBJ": f"(?:{_V_OBJECT}|{pron['VOBJ']})" if pron else _V_OBJECT,
                "VPOSS": f"(?:{_V_POSS}|{pron['VPOSS']})" if pron else _V_POSS,
                "V": f"(?:{_V_SUBJECT}|{pron['V']})" if pron else _V_SUBJECT,
            }
            frags = self.fragments(perp_terms, "perpetrator_cues", v_subst)
            perpetrator[sex] = self.compile(_alternation(frags), "perpetrator_cues")
            hom = self.fragments(hom_terms, "homicide_victim_cues", v_subst)
            homicide[sex] = self.compile(_alternation(hom), "homicide_victim_cues") if hom else None

        return Lexicon(
            path=str(self.path),
            sha256=self.sha256,
            evidence=evidence,
            evidence_groups=evidence_groups,
            relations=relations,
            partner=self.compile(_alternation(partner_frag), "partner_terms", word_start=False),
            negation_cues=self.compile(_alternation(cues), "negation.cues"),
            post_cues=self.compile(_alternation(post_frag), "negation.post_cues") if post_frag else None,
            scope_breaks=frozenset(w.lower() for w in breaks),
            gap_words=frozenset(w.lower() for w in gap),
            window=self.integer(negation.get("window", 4), "negation.window", 0, 20),
            post_window=self.integer(negation.get("post_window", 2), "negation.post_window", 0, 20),
            perpetrator=perpetrator,
            homicide=homicide,
            scoring=scoring,
            counts={
                "partner_terms": len(partner),
                "non_partner_terms": len(non_partner_frag),
                "evidence_terms": sum(len(frags) for _, frags in groups),
                "perpetrator_cues": len(perp_terms),
            },
        )

    def indicator_groups(self, value: Any, subst: Mapping[str, str]) -> list[tuple[_Spec, list]]:
        if not isinstance(value, list) or not value:
            raise self.fail("indirect_indicators", "expected a non-empty list of mappings")
        out = []
        for i, item in enumerate(value):
            key = f"indirect_indicators[{i}]"
            item = self.mapping(item, key)
            for sub in item:
                if sub not in {"label", "weight", "needs_partner", "terms"}:
                    raise self.fail(f"{key}.{sub}", "unknown key")
            label = item.get("label")
            if not isinstance(label, str) or not label.strip():
                raise self.fail(f"{key}.label", "expected a non-empty string")
            needs = item.get("needs_partner", True)
            if not isinstance(needs, bool):
                raise self.fail(f"{key}.needs_partner", "expected true or false")
            spec = _Spec("indicator", label.strip(), self.number(item.get("weight"), f"{key}.weight", 0, 1), needs)
            terms = self.terms(item.get("terms"), f"{key}.terms")
            out.append((spec, self.fragments(terms, f"{key}.terms", subst)))
        return out

    def abuse_groups(self, value: Any, subst: Mapping[str, str]) -> list[tuple[_Spec, list]]:
        abuse = self.mapping(value, "abuse")
        for name in abuse:
            if name not in _ABUSE_GROUPS:
                raise self.fail(f"abuse.{name}", f"unknown abuse type (expected {list(_ABUSE_GROUPS)})")
        for name in ABUSE_TYPES:
            if name not in abuse:
                raise self.fail(f"abuse.{name}", "missing (all six abuse types are required)")
        standalone, dependent = [], []
        # "general" goes last so that e.g. "violent toward" (physical) beats "violent".
        for name in _ABUSE_GROUPS:
            if name not in abuse:
                continue
            key = f"abuse.{name}"
            group = self.mapping(abuse[name], key)
            for sub in group:
                if sub not in {"weight", "terms", "standalone_terms"}:
                    raise self.fail(f"{key}.{sub}", "unknown key")
            weight = self.number(group.get("weight"), f"{key}.weight", 0, 1)
            label = "abuse by partner" if name == "general" else f"{name} abuse by partner"
            alone = self.terms(group.get("standalone_terms"), f"{key}.standalone_terms", required=False)
            if alone:
                alone_label = "domestic violence" if name == "general" else label
                standalone.append(
                    (
                        _Spec("abuse", alone_label, weight, False),
                        self.fragments(alone, f"{key}.standalone_terms", subst),
                    )
                )
            terms = self.terms(group.get("terms"), f"{key}.terms")
            dependent.append((_Spec("abuse", label, weight, True), self.fragments(terms, f"{key}.terms", subst)))
        return standalone + dependent

    def scoring(self, value: Any) -> _Scoring:
        scoring = self.mapping(value, "scoring")
        for key in scoring:
            if key not in _SCORING_DEFAULTS:
                raise self.fail(f"scoring.{key}", "unknown key")
        merged = {**_SCORING_DEFAULTS, **scoring}
        return _Scoring(**{k: self.number(v, f"scoring.{k}", 0, 1) for k, v in merged.items()})


def load_lexicon(path: str | Path) -> Lexicon:
    """Load, validate and compile a lexicon file.

    Compiling takes a few tenths of a second, so the result is memoised on the file's path
    and content: loading an unchanged file again is free, and an edited file is recompiled.

    Args:
        path: The lexicon YAML (see `configs/lexicon.yaml` for the format).

    Returns:
        The compiled lexicon, to reuse for every narrative.

    Raises:
        LexiconError: The file is missing, is not YAML, or a key is missing or invalid; the
            message names the file and the key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LexiconError(f"{path}: cannot read lexicon ({exc.strerror})") from None
    return _compile_lexicon(str(path), data)


@functools.lru_cache(maxsize=8)
def _compile_lexicon(path: str, data: bytes) -> Lexicon:
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise LexiconError(f"{path}: not valid YAML ({exc})") from None
    digest = hashlib.sha256(data + RULES_VERSION.encode()).hexdigest()
    return _Loader(Path(path), raw, digest).build()


# --------------------------------------------------------------------------- classifying


def _sentence_starts(text: str) -> list[int]:
    """Start offsets of the sentences (and ';' clauses), skipping common abbreviations."""
    starts = [0]
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if end >= len(text):
            break
        if text[m.start()] == ".":
            # only the last word before the period matters: look at a short window
            before = text[max(0, m.start() - 12) : m.start()].rsplit(None, 1)
            if before and before[-1].lower().lstrip("(") in _ABBREVIATIONS:
                continue
        starts.append(end)
    return starts


def _decedent_sex(text: str) -> str:
    """The decedent's sex from the first sex word of the narrative, else from pronouns."""
    m = _SEX_WORDS.search(text, 0, 300)
    if m:
        return "female" if m.group(1) else "male"
    she = len(_FEMALE_PRONOUNS.findall(text))
    he = len(_MALE_PRONOUNS.findall(text))
    if she > 2 * he:
        return "female"
    if he > 2 * she:
        return "male"
    return "unknown"


def _gap_ok(gap: str, lexicon: Lexicon, window: int, gap_words: frozenset[str] | None) -> bool:
    words = [w.lower() for w in _WORD.findall(gap)]
    if len(words) > window:
        return False
    if any(w in lexicon.scope_breaks for w in words):
        return False
    return gap_words is None or all(w in gap_words for w in words)


_NEGATIVE_RATIONALE = "No IPV indicators found."


def _verdict(evidence: dict[str, float], suppressed: dict[str, None], scoring: _Scoring) -> RulesVerdict:
    if evidence:
        ordered = sorted(evidence, key=lambda label: -evidence[label])
        remaining = 1.0
        for weight in evidence.values():
            remaining *= 1.0 - weight
        confidence = 0.5 + 0.49 * (1.0 - remaining)
        rationale = "IPV indicators: " + "; ".join(ordered) + "."
        if suppressed:
            rationale += " Set aside: " + "; ".join(suppressed) + "."
        return RulesVerdict(True, confidence, tuple(ordered), _clip(rationale))
    confidence = max(
        scoring.min_negative_confidence,
        scoring.negative_confidence - scoring.suppressed_penalty * len(suppressed),
    )
    rationale = _NEGATIVE_RATIONALE
    if suppressed:
        rationale = "No IPV indicators counted; set aside: " + "; ".join(suppressed) + "."
    return RulesVerdict(False, confidence, (), _clip(rationale))


def _clip(text: str) -> str:
    if len(text) <= _RATIONALE_MAX:
        return text
    return text[: _RATIONALE_MAX - 3].rsplit(";", 1)[0].rstrip() + "..."


# Words that may stand between an abuse term and its object ("beat [her] son").
_OBJECT_GAP = re.compile(r"\s+(?:(?:her|his|their|the|a|v['’]s)\s+)?")


def _next_non_partner(relations: list[tuple[int, int, bool]], after: int) -> int:
    """Start of the first relation term after `after` if it is a non-partner, else -1."""
    for start, _, is_partner in relations:
        if start >= after:
            return -1 if is_partner else start
    return -1


def _spec_of(lexicon: Lexicon, low: str, pos: int) -> _Spec:
    """The spec of the evidence hit at `pos`: the first group matching there, as in the regex."""
    for spec, pattern in lexicon.evidence_groups:
        if pattern.match(low, pos):
            return spec
    raise AssertionError("an evidence hit matches no group")  # the groups are the alternation


def classify(text: str, lexicon: Lexicon) -> RulesVerdict:
    """Classify one narrative.

    Args:
        text: The narrative (any length; empty or blank text is simply not detected).
        lexicon: A lexicon from `load_lexicon`.

    Returns:
        The verdict; `as_answer_json()` gives the JSON an LLM is asked for.
    """
    scoring = lexicon.scoring
    low = _lower_text(text or "")
    hits = []
    for m in lexicon.evidence.finditer(low):
        spec = _spec_of(lexicon, low, m.start())
        if spec.kind != "neutral":
            hits.append((m.start(), m.end(), spec))
    if not hits:
        return _verdict({}, {}, scoring)

    sex = _decedent_sex(low)
    homicide = lexicon.homicide[sex]
    if homicide is not None and homicide.search(low):
        return _verdict({}, {"decedent as homicide victim (out of scope)": None}, scoring)

    starts = _sentence_starts(text)
    n_sent = len(starts)
    bounds = [(starts[i], starts[i + 1] if i + 1 < n_sent else len(low)) for i in range(n_sent)]

    # Relations, cues and perpetrator cues are only looked for in the sentences that need
    # them (those with a hit, and the one before for carry-over): most text has no hit.
    cache: dict[tuple[str, int], Any] = {}

    def relations_in(sent: int) -> list[tuple[int, int, bool]]:
        key = ("rel", sent)
        if key not in cache:
            lo, hi = bounds[sent]
            cache[key] = [
                (m.start(), m.end(), lexicon.partner.match(low, m.start()) is not None)
                for m in lexicon.relations.finditer(low, lo, hi)
            ]
        return cache[key]

    def perpetrator_in(sent: int) -> bool:
        key = ("perp", sent)
        if key not in cache:
            lo, hi = bounds[sent]
            cache[key] = lexicon.perpetrator[sex].search(low, lo, hi) is not None
        return cache[key]

    def perpetrator_anywhere() -> bool:
        key = ("perp", -1)
        if key not in cache:
            cache[key] = lexicon.perpetrator[sex].search(low) is not None
        return cache[key]

    def cues_in(sent: int) -> tuple[list[int], list[int]]:
        key = ("cue", sent)
        if key not in cache:
            lo, hi = bounds[sent]
            pre = [m.end() for m in lexicon.negation_cues.finditer(low, lo, hi)]
            post = [m.start() for m in lexicon.post_cues.finditer(low, lo, hi)] if lexicon.post_cues else []
            cache[key] = (pre, post)
        return cache[key]

    evidence: dict[str, float] = {}
    suppressed: dict[str, None] = {}  # an ordered set of reasons
    last_negated: tuple[int, int] = (-1, -1)  # (sentence, end offset) of the last negated term
    for start, end, spec in hits:
        sent = bisect.bisect_right(starts, start) - 1

        if perpetrator_in(sent):
            suppressed["decedent as perpetrator"] = None
            continue

        pre, post = cues_in(sent)
        negated = False
        i = bisect.bisect_right(pre, end) - 1
        if i >= 0:
            # a cue inside a long indicator ("police had no record of domestic calls") counts
            negated = pre[i] > start or _gap_ok(low[pre[i] : start], lexicon, lexicon.window, lexicon.gap_words)
        if not negated and last_negated[0] == sent:
            # coordinated terms share the cue: "no physical or sexual abuse"
            negated = _gap_ok(low[last_negated[1] : start], lexicon, lexicon.window, lexicon.gap_words)
        if not negated and post:
            j = bisect.bisect_left(post, end)
            if j < len(post):
                negated = _gap_ok(low[end : post[j]], lexicon, lexicon.post_window, None)
        if negated:
            last_negated = (sent, end)
            suppressed["negated mention"] = None
            continue

        factor = 1.0
        nearest = None
        best = -1
        for r_start, r_end, is_partner in relations_in(sent):
            distance = max(r_start - end, start - r_end, 0)
            if nearest is None or distance < best or (distance == best and is_partner):
                best, nearest = distance, is_partner
        if nearest is None:
            previous = relations_in(sent - 1) if sent > 0 else []
            if not spec.needs_partner:
                factor = scoring.standalone_factor
            elif previous and previous[-1][2]:
                factor = scoring.carryover_factor
            else:
                if previous:
                    suppressed["abuse by non-partner"] = None
                continue
        elif not nearest:
            suppressed["abuse by non-partner"] = None
            continue
        target = _next_non_partner(relations_in(sent), end)
        if target > end and _OBJECT_GAP.fullmatch(low, end, target):
            # "her husband had beaten her son": the abuse is aimed at someone else
            suppressed["abuse of someone else"] = None
            continue

        if (spec.kind == "indicator" or factor < 1.0) and perpetrator_anywhere():
            suppressed["decedent as perpetrator"] = None
            continue
        weight = spec.weight * factor
        if weight > evidence.get(spec.label, 0.0):
            evidence[spec.label] = weight
    return _verdict(evidence, suppressed, scoring)
