"""Load, validate and compile the lexicon of the `rules` backend (`configs/lexicon.yaml`).

Validation names the file and the key of every problem; compiling builds one fast alternation
per section (see `narr_assets.rules.patterns`) and is memoised on the file's path and content.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from narr_assets.rules.patterns import alternation, lower_regex, phrase_to_regex, trie

# The version of the decision logic; it is hashed with the lexicon file, so a change to either
# gives a new `Lexicon.sha256`.
RULES_VERSION = "1.0.0"

ABUSE_TYPES = ("physical", "sexual", "psychological", "emotional", "economic", "legal")
_ABUSE_GROUPS = (*ABUSE_TYPES, "general")
_SEXES = ("female", "male", "unknown")

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


class LexiconError(ValueError):
    """The lexicon file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Spec:
    """What one group of evidence terms means."""

    kind: str  # "neutral" | "indicator" | "abuse"
    label: str  # label when attributed to a partner (or standalone)
    weight: float
    needs_partner: bool


@dataclass(frozen=True)
class Scoring:
    """The lexicon's `scoring` section (see the package docstring for what each factor does)."""

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
    evidence_groups: tuple[tuple[Spec, re.Pattern[str]], ...]  # the same, one per spec
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
    scoring: Scoring
    counts: Mapping[str, int] = field(default_factory=dict)


# (source phrase, regex fragment) pairs, in lexicon order.
_Fragments = list[tuple[str, str]]


class _Negation(NamedTuple):
    """The `negation` section: the mapping itself and its validated terms."""

    section: dict[str, Any]
    cues: _Fragments
    post: _Fragments
    breaks: list[str]
    gap: list[str]


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
        body = lower_regex(body)
        try:
            if word_start and optimise:
                body = trie([f"(?:{body})"])
            # "(?=\w)" skips the many non-word positions before trying the alternatives.
            return re.compile(rf"(?<!\w)(?=\w)(?:{body})" if word_start else f"(?:{body})")
        except re.error as exc:
            raise self.fail(key, f"invalid pattern ({exc})") from None

    def fragments(self, phrases: list[str], key: str, subst: Mapping[str, str]) -> _Fragments:
        """Expand placeholders and convert phrases; a bad pattern is reported by its index."""
        out = []
        for phrase in phrases:
            regex = phrase_to_regex(phrase)
            for name, value in subst.items():
                regex = regex.replace("{" + name + "}", value)
            out.append((phrase, regex))
        try:
            re.compile(lower_regex("|".join(regex for _, regex in out)))
        except re.error:
            # only now compile them one by one, to name the bad pattern by its index
            for i, (_, regex) in enumerate(out):
                self.compile(regex, f"{key}[{i}]", optimise=False)
            raise self.fail(key, "the patterns do not compile together") from None
        return out

    def build(self) -> Lexicon:
        """Validate and compile every section (cheap checks first); errors name the file and key."""
        raw = self.top_level()
        scoring = self.scoring(raw.get("scoring") or {})  # cheap checks before compiling
        partner = self.terms(raw["partner_terms"], "partner_terms")
        partner_frag = self.fragments(partner, "partner_terms", {})
        subst = {"PARTNER": f"(?:{alternation(partner_frag)})", "POSS": _POSS}
        non_partner_frag = self.fragments(
            self.terms(raw["non_partner_terms"], "non_partner_terms"), "non_partner_terms", subst
        )
        # Partner alternatives first: "father of her children" must beat "father".
        relations = self.compile(f"{alternation(partner_frag)}|{alternation(non_partner_frag)}", "non_partner_terms")
        groups = self.evidence_fragments(raw, subst)
        # One flat alternation finds the hits fast (named groups would defeat the engine's
        # first-character fast path); the per-spec patterns then tell which spec a hit is.
        evidence = self.compile("|".join(alternation(frags) for _, frags in groups), "abuse")
        evidence_groups = tuple(
            (spec, self.compile(alternation(frags), "abuse", word_start=False)) for spec, frags in groups
        )
        negation = self.negation(raw["negation"])
        perp_terms = self.terms(raw["perpetrator_cues"], "perpetrator_cues", allow_v=True)
        hom_terms = self.terms(raw.get("homicide_victim_cues"), "homicide_victim_cues", allow_v=True, required=False)
        perpetrator, homicide = self.decedent_cues(perp_terms, hom_terms, subst)
        return Lexicon(
            path=str(self.path),
            sha256=self.sha256,
            evidence=evidence,
            evidence_groups=evidence_groups,
            relations=relations,
            partner=self.compile(alternation(partner_frag), "partner_terms", word_start=False),
            negation_cues=self.compile(alternation(negation.cues), "negation.cues"),
            post_cues=self.compile(alternation(negation.post), "negation.post_cues") if negation.post else None,
            scope_breaks=frozenset(w.lower() for w in negation.breaks),
            gap_words=frozenset(w.lower() for w in negation.gap),
            window=self.integer(negation.section.get("window", 4), "negation.window", 0, 20),
            post_window=self.integer(negation.section.get("post_window", 2), "negation.post_window", 0, 20),
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

    def top_level(self) -> dict[str, Any]:
        """The top-level mapping, checked for unknown and missing keys."""
        raw = self.mapping(self.raw, "<top level>")
        for key in raw:
            if key not in _TOP_KEYS:
                raise self.fail(str(key), f"unknown key (expected one of {sorted(_TOP_KEYS)})")
        for key, required in _TOP_KEYS.items():
            if required and key not in raw:
                raise self.fail(key, "missing")
        return raw

    def evidence_fragments(self, raw: dict[str, Any], subst: Mapping[str, str]) -> list[tuple[Spec, _Fragments]]:
        """Every evidence group in priority order: neutral terms, indirect indicators, abuse."""
        groups: list[tuple[Spec, _Fragments]] = []
        neutral = self.terms(raw.get("neutral_terms"), "neutral_terms", required=False)
        if neutral:
            groups.append((Spec("neutral", "", 0.0, False), self.fragments(neutral, "neutral_terms", subst)))
        groups.extend(self.indicator_groups(raw["indirect_indicators"], subst))
        groups.extend(self.abuse_groups(raw["abuse"], subst))
        return groups

    def negation(self, value: Any) -> _Negation:
        """The `negation` section's terms (its patterns are compiled with the rest, in `build`)."""
        negation = self.mapping(value, "negation")
        for key in negation:
            if key not in {"window", "post_window", "cues", "post_cues", "scope_breaks", "gap_words"}:
                raise self.fail(f"negation.{key}", "unknown key")
        cues = self.fragments(self.terms(negation.get("cues"), "negation.cues"), "negation.cues", {})
        post = self.terms(negation.get("post_cues"), "negation.post_cues", required=False)
        post_frag = self.fragments(post, "negation.post_cues", {})
        breaks = self.terms(negation.get("scope_breaks"), "negation.scope_breaks", required=False)
        gap = self.terms(negation.get("gap_words"), "negation.gap_words", required=False)
        return _Negation(negation, cues, post_frag, breaks, gap)

    def decedent_cues(
        self, perp_terms: list[str], hom_terms: list[str], subst: Mapping[str, str]
    ) -> tuple[dict[str, re.Pattern[str]], dict[str, re.Pattern[str] | None]]:
        """Perpetrator and homicide-victim cues compiled per decedent sex ({V} and its pronouns)."""
        perpetrator: dict[str, re.Pattern[str]] = {}
        homicide: dict[str, re.Pattern[str] | None] = {}
        for sex in _SEXES:
            pron = _PRONOUNS[sex]
            v_subst = {
                **subst,
                "VOBJ": f"(?:{_V_OBJECT}|{pron['VOBJ']})" if pron else _V_OBJECT,
                "VPOSS": f"(?:{_V_POSS}|{pron['VPOSS']})" if pron else _V_POSS,
                "V": f"(?:{_V_SUBJECT}|{pron['V']})" if pron else _V_SUBJECT,
            }
            frags = self.fragments(perp_terms, "perpetrator_cues", v_subst)
            perpetrator[sex] = self.compile(alternation(frags), "perpetrator_cues")
            hom = self.fragments(hom_terms, "homicide_victim_cues", v_subst)
            homicide[sex] = self.compile(alternation(hom), "homicide_victim_cues") if hom else None
        return perpetrator, homicide

    def indicator_groups(self, value: Any, subst: Mapping[str, str]) -> list[tuple[Spec, _Fragments]]:
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
            spec = Spec("indicator", label.strip(), self.number(item.get("weight"), f"{key}.weight", 0, 1), needs)
            terms = self.terms(item.get("terms"), f"{key}.terms")
            out.append((spec, self.fragments(terms, f"{key}.terms", subst)))
        return out

    def abuse_groups(self, value: Any, subst: Mapping[str, str]) -> list[tuple[Spec, _Fragments]]:
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
                        Spec("abuse", alone_label, weight, False),
                        self.fragments(alone, f"{key}.standalone_terms", subst),
                    )
                )
            terms = self.terms(group.get("terms"), f"{key}.terms")
            dependent.append((Spec("abuse", label, weight, True), self.fragments(terms, f"{key}.terms", subst)))
        return standalone + dependent

    def scoring(self, value: Any) -> Scoring:
        scoring = self.mapping(value, "scoring")
        for key in scoring:
            if key not in _SCORING_DEFAULTS:
                raise self.fail(f"scoring.{key}", "unknown key")
        merged = {**_SCORING_DEFAULTS, **scoring}
        return Scoring(**{k: self.number(v, f"scoring.{k}", 0, 1) for k, v in merged.items()})


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
