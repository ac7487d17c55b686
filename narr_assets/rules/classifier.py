"""Classify one narrative with a compiled lexicon: the decision logic of the `rules` backend.

The rules themselves (evidence, negation, perpetrator cues, partner attribution, homicide
victims) and the meaning of `confidence` are described in the `narr_assets.rules` docstring.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass

from narr_assets.rules.lexicon import Lexicon, Scoring, Spec

_RATIONALE_MAX = 200
_WORD = re.compile(r"[\w']+")
_SENTENCE_END = re.compile(r"[.!?;]+[\"'’”)\]]*\s+|\n\s*")
# fmt: off
_ABBREVIATIONS = frozenset([
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "approx", "a.m", "p.m", "e.g", "i.e", "lt", "sgt", "det",
    "ofc", "dep", "co", "inc", "ft", "hwy", "ave", "rd", "apt", "u.s", "y.o", "yo", "yrs", "appx", "est", "no",
])
# fmt: on
_SEX_WORDS = re.compile(r"\b(?:(female|woman|girl|lady)|(male|man|boy|gentleman))\b", re.IGNORECASE)
_FEMALE_PRONOUNS = re.compile(r"\b(?:she|her|herself)\b", re.IGNORECASE)
_MALE_PRONOUNS = re.compile(r"\b(?:he|him|his|himself)\b", re.IGNORECASE)


@dataclass(frozen=True)
class RulesVerdict:
    """The rules classifier's answer, shaped like the answer asked of an LLM.

    Attributes:
        detected: True when the decedent is judged a victim of intimate partner violence.
        confidence: Confidence in the verdict, in [0, 1] (see the `narr_assets.rules` docstring).
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


def _lower_text(text: str) -> str:
    """Lower-case text keeping every offset (a few characters grow when lower-cased)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


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


def _verdict(evidence: dict[str, float], suppressed: dict[str, None], scoring: Scoring) -> RulesVerdict:
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


def _spec_of(lexicon: Lexicon, low: str, pos: int) -> Spec:
    """The spec of the evidence hit at `pos`: the first group matching there, as in the regex."""
    for spec, pattern in lexicon.evidence_groups:
        if pattern.match(low, pos):
            return spec
    raise AssertionError("an evidence hit matches no group")  # the groups are the alternation


class _Narrative:
    """One narrative under classification: its lower-cased text, its sentences, and lookups per sentence.

    Relations, negation cues and perpetrator cues are only looked for in the sentences that
    need them (those with a hit, and the one before for carry-over), once each: most text has
    no hit.
    """

    def __init__(self, text: str, low: str, lexicon: Lexicon, sex: str):
        self.low = low
        self.lexicon = lexicon
        self.sex = sex
        self.starts = _sentence_starts(text)
        self._relations: dict[int, list[tuple[int, int, bool]]] = {}
        self._perpetrator: dict[int, bool] = {}
        self._perpetrator_anywhere: bool | None = None
        self._cues: dict[int, tuple[list[int], list[int]]] = {}

    def sentence_of(self, offset: int) -> int:
        """Index of the sentence holding `offset`."""
        return bisect.bisect_right(self.starts, offset) - 1

    def _bounds(self, sent: int) -> tuple[int, int]:
        starts = self.starts
        return starts[sent], starts[sent + 1] if sent + 1 < len(starts) else len(self.low)

    def relations(self, sent: int) -> list[tuple[int, int, bool]]:
        """(start, end, is_partner) of every relation term of sentence `sent`."""
        if sent not in self._relations:
            lo, hi = self._bounds(sent)
            partner, low = self.lexicon.partner, self.low
            self._relations[sent] = [
                (m.start(), m.end(), partner.match(low, m.start()) is not None)
                for m in self.lexicon.relations.finditer(low, lo, hi)
            ]
        return self._relations[sent]

    def perpetrator_in(self, sent: int) -> bool:
        """Whether a perpetrator cue (the decedent as the abuser) is in sentence `sent`."""
        if sent not in self._perpetrator:
            lo, hi = self._bounds(sent)
            self._perpetrator[sent] = self.lexicon.perpetrator[self.sex].search(self.low, lo, hi) is not None
        return self._perpetrator[sent]

    def perpetrator_anywhere(self) -> bool:
        """Whether a perpetrator cue is anywhere in the narrative."""
        if self._perpetrator_anywhere is None:
            self._perpetrator_anywhere = self.lexicon.perpetrator[self.sex].search(self.low) is not None
        return self._perpetrator_anywhere

    def cues(self, sent: int) -> tuple[list[int], list[int]]:
        """End offsets of the negation cues and start offsets of the post cues in sentence `sent`."""
        if sent not in self._cues:
            lo, hi = self._bounds(sent)
            lexicon, low = self.lexicon, self.low
            pre = [m.end() for m in lexicon.negation_cues.finditer(low, lo, hi)]
            post = [m.start() for m in lexicon.post_cues.finditer(low, lo, hi)] if lexicon.post_cues else []
            self._cues[sent] = (pre, post)
        return self._cues[sent]


def _evidence_hits(low: str, lexicon: Lexicon) -> list[tuple[int, int, Spec]]:
    """(start, end, spec) of every evidence term in the lower-cased text, neutral terms left out."""
    hits = []
    for m in lexicon.evidence.finditer(low):
        spec = _spec_of(lexicon, low, m.start())
        if spec.kind != "neutral":
            hits.append((m.start(), m.end(), spec))
    return hits


def _negated(narrative: _Narrative, sent: int, start: int, end: int, last_negated: tuple[int, int]) -> bool:
    """Whether the hit at [start, end) of sentence `sent` is negated (rule 2 of the package docstring).

    `last_negated` is (sentence, end offset) of the last negated hit, whose cue a coordinated
    term shares.
    """
    lexicon, low = narrative.lexicon, narrative.low
    pre, post = narrative.cues(sent)
    i = bisect.bisect_right(pre, end) - 1
    # a cue inside a long indicator ("police had no record of domestic calls") counts
    if i >= 0 and (pre[i] > start or _gap_ok(low[pre[i] : start], lexicon, lexicon.window, lexicon.gap_words)):
        return True
    # coordinated terms share the cue: "no physical or sexual abuse"
    if last_negated[0] == sent and _gap_ok(low[last_negated[1] : start], lexicon, lexicon.window, lexicon.gap_words):
        return True
    if post:
        j = bisect.bisect_left(post, end)
        if j < len(post):
            return _gap_ok(low[end : post[j]], lexicon, lexicon.post_window, None)
    return False


def _nearest_is_partner(relations: list[tuple[int, int, bool]], start: int, end: int) -> bool | None:
    """Whether the relation term nearest to [start, end) is a partner (a tie goes to the partner).

    None when the sentence has no relation term.
    """
    nearest = None
    best = -1
    for r_start, r_end, is_partner in relations:
        distance = max(r_start - end, start - r_end, 0)
        if nearest is None or distance < best or (distance == best and is_partner):
            best, nearest = distance, is_partner
    return nearest


def _partner_factor(narrative: _Narrative, sent: int, start: int, end: int, spec: Spec) -> tuple[float | None, str]:
    """How much a hit counts, from the relation terms around it (rule 4 of the package docstring).

    Returns:
        (factor, "") when the hit counts; (None, reason) when it is set aside, where the reason
        is "" when no relation term names anyone in this sentence or the previous one.
    """
    scoring = narrative.lexicon.scoring
    relations = narrative.relations(sent)
    nearest = _nearest_is_partner(relations, start, end)
    factor = 1.0
    if nearest is None:
        previous = narrative.relations(sent - 1) if sent > 0 else []
        if not spec.needs_partner:
            factor = scoring.standalone_factor
        elif previous and previous[-1][2]:
            factor = scoring.carryover_factor
        else:
            return None, "abuse by non-partner" if previous else ""
    elif not nearest:
        return None, "abuse by non-partner"
    target = _next_non_partner(relations, end)
    if target > end and _OBJECT_GAP.fullmatch(narrative.low, end, target):
        # "her husband had beaten her son": the abuse is aimed at someone else
        return None, "abuse of someone else"
    return factor, ""


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
    hits = _evidence_hits(low, lexicon)
    if not hits:
        return _verdict({}, {}, scoring)

    sex = _decedent_sex(low)
    homicide = lexicon.homicide[sex]
    if homicide is not None and homicide.search(low):
        return _verdict({}, {"decedent as homicide victim (out of scope)": None}, scoring)

    narrative = _Narrative(text, low, lexicon, sex)
    evidence: dict[str, float] = {}
    suppressed: dict[str, None] = {}  # an ordered set of reasons
    last_negated: tuple[int, int] = (-1, -1)  # (sentence, end offset) of the last negated term
    for start, end, spec in hits:
        sent = narrative.sentence_of(start)
        if narrative.perpetrator_in(sent):
            suppressed["decedent as perpetrator"] = None
            continue
        if _negated(narrative, sent, start, end, last_negated):
            last_negated = (sent, end)
            suppressed["negated mention"] = None
            continue
        factor, reason = _partner_factor(narrative, sent, start, end, spec)
        if factor is not None and (spec.kind == "indicator" or factor < 1.0) and narrative.perpetrator_anywhere():
            # indirect or carried-over evidence may be about the decedent's own violence
            factor, reason = None, "decedent as perpetrator"
        if factor is None:
            if reason:
                suppressed[reason] = None
            continue
        weight = spec.weight * factor
        if weight > evidence.get(spec.label, 0.0):
            evidence[spec.label] = weight
    return _verdict(evidence, suppressed, scoring)
