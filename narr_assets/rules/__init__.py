"""The `rules` backend: an offline, deterministic lexicon classifier for IPV victimisation.

It is the default experiment (the whole graph runs with no LLM server) and a real baseline for
the LLM experiments. The lexicon (`configs/lexicon.yaml`) holds every word list; this package
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

Modules: `patterns` turns lexicon phrases into fast regular expressions, `lexicon` validates
and compiles the lexicon file, `classifier` applies the rules above to one narrative.
"""

from __future__ import annotations

from narr_assets.rules.classifier import RulesVerdict, classify
from narr_assets.rules.lexicon import ABUSE_TYPES, RULES_VERSION, Lexicon, LexiconError, load_lexicon

__all__ = [
    "ABUSE_TYPES",
    "RULES_VERSION",
    "Lexicon",
    "LexiconError",
    "RulesVerdict",
    "classify",
    "load_lexicon",
]
