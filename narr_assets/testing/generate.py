"""Synthetic NVDRS-style narratives for tests and benchmarks: the bundled sample and production-sized files.

Every sentence below is written for this project in the style of NVDRS death-investigation
narratives ("V was a 34-year-old female who died of ..."); no real narrative is used. A
narrative is an opener (who, how, where), optional IPV and hard-negative sentences and neutral
fillers, so that a lexicon cannot separate the classes perfectly:

- positive sentences cover the six abuse types and the indirect indicators, and some are
  worded without any lexicon term (`SUBTLE_POSITIVE`);
- hard negatives cover an explicit "no history of domestic violence", violence by a parent or
  sibling, the decedent as the perpetrator, breakups and arguments without abuse, financial
  stress, homicide-victim wording and a few traps (`TRAP_NEGATIVE`) that a lexicon misreads.

`generate_production` writes the unlabelled (or labelled) wide layout at the proportions of
the real production file (20,946 rows, 35,312 non-empty narratives; see `PRODUCTION`),
scaled to the requested number of rows:

    python -m narr_assets.testing.generate --out data/generated/production.xlsx [--incidents N]
        [--seed S] [--labelled]
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl import Workbook

UNLABELLED_COLUMNS = ("IncidentID", "IncidentYear", "SiteID", "NarrativeCME", "NarrativeLE")
LABEL_COLUMNS = ("ipv_manualCME", "ipv_manualLE", "ipv_manual")

# The real production file, which the generator scales to the requested row count: 20,946
# rows (20,940 incidents, 6 of them on two rows), 35,312 non-empty narratives.
PRODUCTION: dict[str, int] = {
    "rows": 20946,
    "duplicated_incidents": 6,
    "both": 15327,
    "cme_only": 4222,
    "le_only": 436,
    "placeholders": 1500,  # between 1,254 and 1,952 in the real file
}
# Share of the production incidents with a narrative that are positive.
POSITIVE_INCIDENT_RATE = 0.084

PLACEHOLDERS_LE = (
    "Need LE report.",
    "Need LE report",
    "NEED LE REPORT.",
    "Need LE Report.",
    "Pending LE report.",
    "Awaiting LE report.",
    "LE report not received.",
    "See CME narrative.",
    "No narrative available.",
)
PLACEHOLDERS_CME = (
    "Need CME report.",
    "No narrative available.",
    "Narrative pending.",
    "Awaiting ME report.",
    "See LE narrative.",
)

SITES = (
    "AK",
    "AZ",
    "CO",
    "GA",
    "IL",
    "KY",
    "MA",
    "MD",
    "MI",
    "MN",
    "NC",
    "NJ",
    "NM",
    "OH",
    "OK",
    "OR",
    "RI",
    "SC",
    "UT",
    "VA",
    "WA",
    "WI",
)

# --------------------------------------------------------------------------- sentence banks
# Placeholders: {age} {sexw}; the decedent's pronouns {pr} {Pr} {obj} {pos} {Pos} {refl};
# the partner {partner} (e.g. "husband") with pronouns {ppr} {Ppr} {pobj} {ppos}; {ex} (e.g.
# "ex-husband"); {method} {place} {finder} {relative} {month} {year} {time} {substance}
# {illness} {job} {topic}.

_HOME = ("at {pos} residence", "in the bedroom of {pos} apartment", "in the basement of {pos} house")
_OUTDOORS = (
    "in a wooded area near {pos} apartment complex",
    "at a city park",
    "at a campground outside of town",
    "in a shed on {pos} property",
)
_VEHICLE = ("in {pos} vehicle parked behind a shopping center",)
# (cause of death, the places where it plausibly happens)
METHODS = (
    ("a self-inflicted gunshot wound to the head", _HOME + _OUTDOORS + _VEHICLE),
    ("a self-inflicted gunshot wound to the chest", _HOME + _OUTDOORS),
    ("hanging", (*_HOME, *_OUTDOORS, "in the garage of {pos} home", "in a motel room")),
    ("asphyxia due to hanging", (*_HOME, "in the garage of {pos} home", "in a shed on {pos} property")),
    ("an intentional overdose of prescription medication", (*_HOME, "in a motel room")),
    ("mixed drug toxicity", (*_HOME, "in a motel room", *_VEHICLE)),
    ("carbon monoxide poisoning", ("in the garage of {pos} home", *_VEHICLE)),
    ("sharp force injuries", (*_HOME, "in a motel room")),
    ("blunt force injuries after jumping from a parking structure", ("downtown", "near {pos} workplace")),
    ("asphyxia due to a plastic bag over the head", (*_HOME, "in a motel room")),
)

OPENERS_CME = (
    "V was a {age}-year-old {sexw} who died of {method} {place}.",
    "V, a {age} year old {sexw}, died of {method} {place}.",
    "The decedent was a {age} year old {sexw} who was found deceased {place}; the cause of death was {method}.",
    "V was a {age} y/o {sexw} who was found {place} and pronounced dead at the scene; cause of death was {method}.",
    "This {age}-year-old {sexw} died by suicide {place}; the cause of death was {method}.",
)
OPENERS_LE = (
    "Officers responded to a call {place} and found V, a {age}-year-old {sexw}, deceased from {method}.",
    "V, a {age} year old {sexw}, was found deceased {place} by {finder}.",
    "According to the police report, V was a {age} year old {sexw} who died of {method} {place}.",
    "Law enforcement was dispatched {place} where V, a {age}-year-old {sexw}, was located unresponsive.",
    "Deputies responded to a 911 call and located V, a {age} y/o {sexw}, {place}.",
)

FILLERS_CME = (
    "{Pr} was found by {finder} at approximately {time}.",
    "EMS responded and pronounced {obj} dead at the scene.",
    "{Pr} was transported to a local hospital where {pr} died the following day.",
    "Toxicology was positive for {substance}.",
    "Toxicology testing was negative for alcohol and drugs.",
    "The autopsy found no injuries other than those related to the cause of death.",
    (
        "{Pr} had a history of depression and had been prescribed an antidepressant, though family said {pr} had"
        " stopped taking it."
    ),
    "{Pr} had been diagnosed with {illness} and was reportedly in constant pain.",
    "{Pr} had made a previous suicide attempt by overdose in {year}.",
    "{Pr} left a note apologizing to {pos} family.",
    "No suicide note was found.",
    "A handwritten note was found on the kitchen table.",
    "{Pr} had been seeing a counselor for anxiety.",
    "The medical examiner ruled the manner of death a suicide.",
    "{Pr} had been hospitalized for suicidal ideation {months} months earlier.",
    "Family said {pr} had been withdrawn and sleeping most of the day.",
    "{Pr} had a history of substance abuse and had recently relapsed.",
    "{Pr} had been receiving treatment for PTSD through the VA.",
    "{Pr} had told {pos} doctor at a recent visit that {pr} was not sleeping well.",
    "Prescription bottles belonging to {obj} were found nearby.",
)
FILLERS_LE = (
    "Officers noted no signs of forced entry or struggle.",
    "{Pr} had texted a friend earlier that evening saying {pr} could not do this anymore.",
    "{Pr} had recently lost {pos} job at {job} and was worried about paying rent.",
    "Family reported {pr} had been drinking heavily in the weeks before {pos} death.",
    "{Pr} had a pending court date for a DUI charge.",
    "{Pr} had been struggling since the death of {pos} {relative} last year.",
    "{Pr} had been evicted from {pos} apartment the week before.",
    "{Pr} was last seen alive by {finder} the night before.",
    "A welfare check was requested when {pr} did not report to work.",
    "{Pr} had posted a goodbye message on social media shortly before {pos} death.",
    "Investigators recovered {pos} phone, which contained searches about suicide methods.",
    "{Pr} had talked about suicide to {pos} {relative} in the past.",
    "{Pr} had been staying with {pos} {relative} for several weeks.",
    "{Pr} was described by friends as a private person who rarely talked about problems.",
    "The scene was processed and the death was consistent with suicide.",
    "A family friend told officers {pr} seemed upset but did not say why.",
    "{Pr} had recently been released from jail after a probation violation.",
    "{Pr} had been out of work since an injury at {job}.",
    "Officers located a suicide note in {pos} vehicle.",
    "Neighbors heard a single gunshot at approximately {time}.",
)

# IPV victimisation, by the label the lexicon should find (or, for SUBTLE, should not).
POSITIVE = {
    "physical": (
        "{Pos} {partner} had physically abused {obj} for years, and {pr} had shown bruises to coworkers.",
        "According to {pos} sister, {pos} {partner} had beaten {obj} several times in the months before {pos} death.",
        "{Pr} had told {pos} therapist that {pos} {partner} choked {obj} during an argument in {month}.",
        "Friends said {pos} {partner} would push and slap {obj} when {ppr} was drinking.",
        (
            "{Pr} had been in a relationship with {pos} {partner} for three years. {Ppr} had hit {obj} on several"
            " occasions, once breaking {pos} nose."
        ),
    ),
    "sexual": (
        "{Pr} had disclosed to a counselor that {pos} {partner} had raped {obj} on several occasions.",
        "Records showed {pr} had reported a sexual assault by {pos} {ex} in {year}.",
    ),
    "psychological": (
        "{Pos} {partner} had threatened to kill {obj} if {pr} ever left.",
        "{Pr} told friends that {pos} {ex} was stalking {obj} and tracking {pos} location.",
        (
            "Family described {pos} {partner} as extremely controlling; {ppr} monitored {pos} phone and would not"
            " let {obj} see {pos} friends."
        ),
    ),
    "emotional": (
        "{Pos} {partner} was verbally abusive and constantly belittled {obj} in front of the children.",
        "Coworkers reported that {pos} {partner} called {obj} names and humiliated {obj} in public.",
    ),
    "economic": (
        "{Pos} {partner} controlled all of {pos} money and would not let {obj} work.",
        "{Pr} had told {pos} mother that {pos} {partner} took {pos} paychecks and left {obj} with nothing for food.",
    ),
    "legal": (
        (
            "{Pos} {ex} had filed false reports against {obj} with child protective services and threatened to"
            " take the children."
        ),
    ),
    "shelter": (
        "{Pr} had stayed at a domestic violence shelter with {pos} children earlier that year.",
        "{Pr} had contacted a women's shelter two weeks before {pos} death, saying {pr} was afraid to go home.",
    ),
    "restraining order": (
        "{Pr} had obtained a restraining order against {pos} {partner} in {month}, which {ppr} had violated twice.",
        "There was an active protective order against {pos} {ex} at the time of {pos} death.",
    ),
    "police": (
        "Police had responded to the home several times for domestic disturbances between V and {pos} {partner}.",
        "Officers had been called to the residence in {month} after {pos} {partner} assaulted {obj}.",
    ),
    "arrest": (
        "{Pos} {partner} had been arrested for domestic violence against {obj} three weeks before {pos} death.",
        "{Pos} {ex} was in jail on domestic battery charges involving V at the time of the incident.",
    ),
    "domestic issues": ("{Pr} and {pos} {partner} had a history of domestic issues, and {pr} had recently moved out.",),
}
SUBTLE_POSITIVE = (
    (
        "{Pr} told a friend {pr} was afraid of {pos} {partner}, who had put {ppos} hands around {pos} neck during"
        " a fight last spring."
    ),
    "Photos on {pos} phone showed injuries that {pr} said were caused by {pos} {partner}.",
    "{Pr} had moved into a shelter with the children two months earlier to get away from {pos} {partner}.",
    "{Pos} {partner} kept {obj} from seeing family and took {pos} car keys whenever {pr} tried to leave.",
    "{Pos} sister said {pr} often came to family events with marks on {pos} arms that {pr} blamed on {pos} {partner}.",
)

HARD_NEGATIVE = {
    "no history": (
        "{Pos} {partner} told investigators there was no history of domestic violence in the relationship.",
        "Family denied any history of abuse between V and {pos} {partner}.",
        "There were no known domestic violence incidents involving V.",
        "Law enforcement had no record of domestic calls to the residence.",
    ),
    "family violence": (
        "{Pr} had been physically abused by {pos} father as a child and had spoken about it in therapy.",
        "{Pos} brother had assaulted {obj} during a family gathering the previous month.",
        "{Pr} had reported to police that {pos} mother hit {obj} during an argument over money.",
        "{Pr} was a survivor of childhood sexual abuse by an uncle.",
    ),
    "perpetrator": (
        "{Pr} had been arrested for assaulting {pos} {partner} two weeks earlier and was out on bond.",
        "{Pos} {partner} had obtained a protective order against {obj} after {pr} threatened {pobj}.",
        "V was on probation for domestic battery against {pos} {ex}.",
        "{Pr} had a history of violence toward {pos} {partner} and had been ordered to attend anger management.",
    ),
    "breakup": (
        (
            "{Pr} and {pos} {partner} had separated a month earlier, and {pr} was described as distraught over the"
            " breakup."
        ),
        "{Pos} {partner} had recently ended their relationship of six years.",
        "{Pr} had been having relationship problems with {pos} {partner} and had moved in with {pos} {relative}.",
    ),
    "argument": (
        "{Pr} and {pos} {partner} had argued about {topic} earlier that evening, and {ppr} left to stay with a friend.",
        "Witnesses said V had a loud argument with {pos} {partner} on the phone shortly before {pos} death.",
    ),
    "financial": (
        "{Pr} was behind on {pos} mortgage and had told {pos} {partner} that {pr} felt like a failure.",
        "{Pr} had significant gambling debts and {pos} {partner} had recently found out.",
    ),
    "homicide victim": (
        (
            "V was shot and killed by {pos} estranged {partner}, who then died of a self-inflicted gunshot wound."
            " Family said {ppr} had been abusive toward {obj} for years."
        ),
        (
            "V was fatally stabbed by {pos} {ex} during an argument at the residence. {Pr} had previously reported"
            " that {ppr} assaulted {obj}."
        ),
    ),
}
TRAP_NEGATIVE = (
    "{Pr} worked as an advocate at a domestic violence shelter.",
    "V's daughter had recently obtained a protective order against her boyfriend, which had upset V.",
    "{Pr} had been investigated for a domestic battery in {year} involving {pos} {partner}, but charges were dropped.",
    (
        "As a police officer, {pr} had responded to many domestic violence calls and had spoken about the stress"
        " of the job."
    ),
)

# A homicide victim's narrative cannot open or go on like a suicide's.
OPENERS_HOMICIDE = (
    "V was a {age}-year-old {sexw} who was found deceased {place}.",
    "Officers responded to a report of shots fired and found V, a {age} year old {sexw}, {place}.",
)
FILLERS_HOMICIDE = (
    "EMS responded and pronounced {obj} dead at the scene.",
    "Toxicology was positive for {substance}.",
    "Neighbors heard a disturbance at approximately {time}.",
    "{Pr} was last seen alive by {finder} the night before.",
    "The medical examiner ruled the manner of death a homicide.",
    "Investigators interviewed family members at the scene.",
)

FINDERS = (
    "a neighbor",
    "{pos} roommate",
    "{pos} adult son",
    "{pos} mother",
    "a coworker",
    "{pos} landlord",
    "{pos} {partner}",
    "{pos} brother",
    "a family friend",
)
RELATIVES = ("mother", "father", "brother", "sister", "grandmother", "best friend", "son", "daughter")
SUBSTANCES = (
    "alcohol",
    "ethanol and diphenhydramine",
    "methamphetamine",
    "fentanyl",
    "oxycodone",
    "cannabinoids",
    "alprazolam",
    "cocaine metabolites",
)
ILLNESSES = ("multiple sclerosis", "cancer", "chronic back pain", "diabetes", "COPD", "epilepsy")
JOBS = (
    "a warehouse",
    "the county hospital",
    "a car dealership",
    "a restaurant",
    "a factory",
    "a construction company",
    "a call center",
)
TOPICS = ("money", "the children", "household chores", "his drinking", "moving out of state", "her work schedule")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
TIMES = ("0600 hours", "0830 hours", "1130 hours", "1400 hours", "1715 hours", "2100 hours", "2330 hours", "0200 hours")

_PRONOUNS = {
    "female": {"pr": "she", "obj": "her", "pos": "her", "refl": "herself"},
    "male": {"pr": "he", "obj": "him", "pos": "his", "refl": "himself"},
}
_PARTNERS = {
    # partner nouns by the partner's sex, with the matching "ex-" noun
    "male": (
        ("husband", "ex-husband"),
        ("boyfriend", "ex-boyfriend"),
        ("fiance", "ex-fiance"),
        ("partner", "ex-partner"),
        ("estranged husband", "ex-husband"),
        ("live-in boyfriend", "ex-boyfriend"),
    ),
    "female": (
        ("wife", "ex-wife"),
        ("girlfriend", "ex-girlfriend"),
        ("fiancee", "ex-fiancee"),
        ("partner", "ex-partner"),
        ("estranged wife", "ex-wife"),
    ),
}


class Incident:
    """The shared facts of one incident, rendered into its CME and LE narratives."""

    def __init__(self, rng: random.Random, *, female_rate: float):
        self.rng = rng
        sex = "female" if rng.random() < female_rate else "male"
        partner_sex = sex if rng.random() < 0.08 else ("male" if sex == "female" else "female")
        partner, ex = rng.choice(_PARTNERS[partner_sex])
        pron = _PRONOUNS[sex]
        ppron = _PRONOUNS[partner_sex]
        self.ctx: dict[str, str] = {
            "age": str(rng.randint(19, 79)),  # "a 19-year-old": no "an 8x"
            "sexw": rng.choice(("female", "woman") if sex == "female" else ("male", "man")),
            **pron,
            "Pr": pron["pr"].capitalize(),
            "Pos": pron["pos"].capitalize(),
            "partner": partner,
            "ex": ex,
            "ppr": ppron["pr"],
            "Ppr": ppron["pr"].capitalize(),
            "pobj": ppron["obj"],
            "ppos": ppron["pos"],
            "month": rng.choice(MONTHS),
            "year": str(rng.randint(2008, 2021)),
            "months": str(rng.randint(2, 11)),
            "time": rng.choice(TIMES),
            "substance": rng.choice(SUBSTANCES),
            "illness": rng.choice(ILLNESSES),
            "job": rng.choice(JOBS),
            "topic": rng.choice(TOPICS),
            "relative": rng.choice(RELATIVES),
        }
        method, places = rng.choice(METHODS)
        self.ctx["method"] = method
        self.ctx["place"] = self.fill(rng.choice(places))
        self.ctx["finder"] = self.fill(rng.choice(FINDERS))

    def fill(self, template: str) -> str:
        """Fill a sentence template with this incident's facts."""
        return template.format(**self.ctx)

    def narrative(
        self,
        kind: str,
        *,
        special: Sequence[str] = (),
        sentences: tuple[int, int] | None = None,
        length: tuple[int, int] | None = None,
    ) -> str:
        """Render one narrative.

        Args:
            kind: "cme" or "le" (which opener and filler banks to draw from).
            special: Sentences (templates) that must appear: IPV or hard-negative content.
            sentences: (min, max) sentence count, for the short sample narratives.
            length: (min, max) character target, for production-like narratives.

        Returns:
            The narrative: an opener, then fillers with the special sentences among them.

        Raises:
            ValueError: Neither or both of `sentences` and `length` are given.
        """
        if (sentences is None) == (length is None):
            raise ValueError("give exactly one of sentences and length")
        rng = self.rng
        openers, pool = self._banks(kind, special)
        body = [self.fill(t) for t in special]
        fillers: list[str] = []
        if sentences is not None:
            n_special = sum(t.count(". ") + 1 for t in special)  # a template may hold two
            n_fill = max(0, rng.randint(*sentences) - 1 - n_special)
            fillers = [self.fill(t) for t in pool[:n_fill]]
        elif length is not None:
            target = rng.randint(*length)
            fillers = self._fill_up_to(target, pool, size=sum(len(s) + 1 for s in body) + 120)
        # the special sentences go somewhere in the middle, as investigators write them
        parts = fillers[:]
        for sentence in body:
            parts.insert(rng.randint(0, len(parts)), sentence)
        return " ".join([self.fill(rng.choice(openers)), *parts])

    def _banks(self, kind: str, special: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
        """The openers and the shuffled filler pool for a narrative of `kind` holding `special`."""
        rng = self.rng
        openers: tuple[str, ...]
        if any(t in HARD_NEGATIVE["homicide victim"] for t in special):
            openers, pool = OPENERS_HOMICIDE, list(FILLERS_HOMICIDE)
        else:
            openers, own, other = (
                (OPENERS_CME, FILLERS_CME, FILLERS_LE) if kind == "cme" else (OPENERS_LE, FILLERS_LE, FILLERS_CME)
            )
            # mostly the narrative type's own fillers, with a few of the other type's
            pool = list(own) + rng.sample(other, 4)
        rng.shuffle(pool)
        return openers, pool

    def _fill_up_to(self, target: int, pool: Sequence[str], *, size: int) -> list[str]:
        """Fillers from `pool`, in order, until the narrative (`size` characters so far) reaches `target`."""
        fillers = []
        for t in pool:
            if size >= target:
                break
            sentence = self.fill(t)
            fillers.append(sentence)
            size += len(sentence) + 1
        return fillers


def positive_template(rng: random.Random, *, subtle_rate: float = 0.2) -> str:
    """One IPV-victimisation sentence template, subtle (no lexicon term) at `subtle_rate`."""
    if rng.random() < subtle_rate:
        return rng.choice(SUBTLE_POSITIVE)
    return rng.choice(POSITIVE[rng.choice(sorted(POSITIVE))])


def hard_negative_template(rng: random.Random, *, trap_rate: float = 0.15) -> str:
    """One hard-negative sentence template, a lexicon trap at `trap_rate`."""
    if rng.random() < trap_rate:
        return rng.choice(TRAP_NEGATIVE)
    return rng.choice(HARD_NEGATIVE[rng.choice(sorted(HARD_NEGATIVE))])


# --------------------------------------------------------------------------- production


def _scaled(count: int, scale: float) -> int:
    return round(count * scale)


def _plan(n_rows: int) -> dict[str, int]:
    """Scale the production proportions to `n_rows` rows (duplicates included)."""
    scale = n_rows / PRODUCTION["rows"]
    dups = max(1, _scaled(PRODUCTION["duplicated_incidents"], scale)) if n_rows >= 100 else 0
    unique = n_rows - dups
    both = _scaled(PRODUCTION["both"], scale)
    cme_only = _scaled(PRODUCTION["cme_only"], scale)
    le_only = _scaled(PRODUCTION["le_only"], scale)
    excess = both + cme_only + le_only - unique
    if excess > 0:  # tiny n: rounding may exceed the row count
        both -= excess
    return {
        "duplicate_rows": dups,
        "incidents": unique,
        "both": both,
        "cme_only": cme_only,
        "le_only": le_only,
        "no_narrative": unique - both - cme_only - le_only,
        "placeholders": _scaled(PRODUCTION["placeholders"], scale),
    }


@dataclass(frozen=True)
class _Layout:
    """The random layout of a production file, drawn before any narrative is written.

    Attributes:
        shapes: Per incident, which narratives it has: "both", "cme", "le" or "none".
        ids: Per incident, its IncidentID.
        positive: The positive incidents.
        placeholder: The (incident, "cme" | "le") cells holding a placeholder.
        duplicated: The incidents written on two rows.
        order: The incidents in row order (the duplicated ones twice).
    """

    shapes: list[str]
    ids: list[int]
    positive: set[int]
    placeholder: set[tuple[int, str]]
    duplicated: set[int]
    order: list[int]


def _layout(rng: random.Random, plan: dict[str, int]) -> _Layout:
    """Draw the shapes, IDs, positives, placeholders, duplicates and row order of `plan`."""
    n_inc = plan["incidents"]
    shapes = (
        ["both"] * plan["both"]
        + ["cme"] * plan["cme_only"]
        + ["le"] * plan["le_only"]
        + ["none"] * plan["no_narrative"]
    )
    rng.shuffle(shapes)
    ids = rng.sample(range(100000, 100000 + 40 * max(n_inc, 1000)), n_inc)
    with_text = [i for i, shape in enumerate(shapes) if shape != "none"]
    n_pos = round(POSITIVE_INCIDENT_RATE * len(with_text))
    positive = set(rng.sample(with_text, n_pos))
    placeholder = _placeholder_cells(rng, shapes, plan["placeholders"])
    dup_pool = [i for i, s in enumerate(shapes) if s == "both"]
    duplicated = set(rng.sample(dup_pool, min(plan["duplicate_rows"], len(dup_pool))))
    order = list(range(n_inc)) + sorted(duplicated)
    rng.shuffle(order)
    return _Layout(shapes, ids, positive, placeholder, duplicated, order)


def _placeholder_cells(rng: random.Random, shapes: list[str], n_placeholders: int) -> set[tuple[int, str]]:
    """The narrative cells a placeholder replaces; an LE report is the one usually still missing."""
    cells = [(i, "le") for i, s in enumerate(shapes) if s in ("both", "le")]
    cells += [(i, "cme") for i, s in enumerate(shapes) if s in ("both", "cme")]
    le_cells = [c for c in cells if c[1] == "le"]
    cme_cells = [c for c in cells if c[1] == "cme"]
    n_ph = min(n_placeholders, len(cells))
    n_ph_le = min(len(le_cells), round(n_ph * 0.8))
    placeholder = set(rng.sample(le_cells, n_ph_le))
    placeholder |= set(rng.sample(cme_cells, min(len(cme_cells), n_ph - n_ph_le)))
    return placeholder


def _positive_types(rng: random.Random, real: list[str]) -> set[str]:
    """Which of a positive incident's real (non-placeholder) narratives carry the IPV content."""
    if not real:
        return set()
    pick = rng.random()
    if len(real) == 2:
        return {"cme", "le"} if pick < 0.55 else ({"le"} if pick < 0.8 else {"cme"})
    return set(real)


def _narrative_cell(
    rng: random.Random, incident: Incident, kind: str, *, positive: bool, placeholder: bool
) -> tuple[str, int | None]:
    """One narrative cell and its label: a placeholder (no label) or a narrative of 600-1,500 characters."""
    if placeholder:
        return rng.choice(PLACEHOLDERS_LE if kind == "le" else PLACEHOLDERS_CME), None
    special = []
    if positive:
        special.append(positive_template(rng))
    elif rng.random() < 0.12:
        special.append(hard_negative_template(rng))
    return incident.narrative(kind, special=special, length=(600, 1500)), int(positive)


def _rows(rng: random.Random, layout: _Layout, labelled: bool, stats: dict[str, Any]) -> Iterator[list[Any]]:
    """The data rows in order, counting positives into `stats` as they go (mean_chars at the end)."""
    cache: dict[int, list[Any]] = {}
    total_chars = n_text = 0
    for i in layout.order:
        if i in cache:  # a duplicated incident: the very same row again
            yield cache[i]
            continue
        inc = Incident(rng, female_rate=0.7 if i in layout.positive else 0.22)
        present = [t for t in ("cme", "le") if layout.shapes[i] in ("both", t)]
        real = [t for t in present if (i, t) not in layout.placeholder]
        pos_types = _positive_types(rng, real) if i in layout.positive else set()
        texts: dict[str, str | None] = {"cme": None, "le": None}
        labels: dict[str, int | None] = {"cme": None, "le": None}
        for t in present:
            text, labels[t] = _narrative_cell(
                rng, inc, t, positive=t in pos_types, placeholder=(i, t) in layout.placeholder
            )
            texts[t] = text
            if t in real:
                total_chars += len(text)
                n_text += 1
        incident_label = int(bool(pos_types))
        stats["positive_incidents"] += incident_label
        stats["positive_narratives"] += len(pos_types)
        row: list[Any] = [layout.ids[i], rng.randint(2015, 2022), rng.choice(SITES), texts["cme"], texts["le"]]
        if labelled:
            known = labels["cme"] is not None or labels["le"] is not None
            row += [labels["cme"], labels["le"], incident_label if known else None]
        if i in layout.duplicated:
            cache[i] = row
        yield row
    stats["mean_chars"] = round(total_chars / n_text, 1) if n_text else 0.0


def _production_rows(n_rows: int, seed: int, labelled: bool) -> tuple[list[str], Iterator[list[Any]], dict[str, Any]]:
    """The header, a lazy row iterator and the stats it fills in (mean_chars at the end)."""
    rng = random.Random(seed)
    plan = _plan(n_rows)
    layout = _layout(rng, plan)
    stats: dict[str, Any] = {
        "rows": len(layout.order),
        "incidents": plan["incidents"],
        "duplicate_rows": len(layout.duplicated),
        "both": plan["both"],
        "cme_only": plan["cme_only"],
        "le_only": plan["le_only"],
        "no_narrative": plan["no_narrative"],
        "narratives_cme": plan["both"] + plan["cme_only"],
        "narratives_le": plan["both"] + plan["le_only"],
        "placeholders": len(layout.placeholder),
        "positive_incidents": 0,
        "positive_narratives": 0,
        "mean_chars": 0.0,
    }
    columns = list(UNLABELLED_COLUMNS) + (list(LABEL_COLUMNS) if labelled else [])
    return columns, _rows(rng, layout, labelled, stats), stats


_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_CORE_TIMESTAMP = re.compile(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms:)")


def make_xlsx_reproducible(path: str | Path) -> None:
    """Rewrite an .xlsx so the same content gives the same bytes.

    openpyxl stamps the save time into `docProps/core.xml` and into every zip entry; fixing
    both makes the file's checksum (the source asset's data version) depend on content only.

    Args:
        path: The workbook to rewrite in place.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in members:
            if name == "docProps/core.xml":
                data = _CORE_TIMESTAMP.sub(rb"\g<1>2020-01-01T00:00:00Z\g<2>", data)
            info = zipfile.ZipInfo(name, date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
    tmp.replace(path)


def write_table(
    path: str | Path, columns: Sequence[str], rows: Iterator[Sequence[Any]], *, sheet: str = "narratives"
) -> None:
    """Write rows to `.xlsx` (first sheet, openpyxl write-only) or `.csv`, by extension.

    Args:
        path: Output file; its parent folder is created.
        columns: Header row.
        rows: Data rows (None becomes an empty cell).
        sheet: Sheet name for `.xlsx`.

    Raises:
        ValueError: The extension is neither `.xlsx` nor `.csv`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".xlsx", ".csv"):
        raise ValueError(f"{path}: unsupported extension {suffix!r} (use .xlsx or .csv)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
        return
    workbook = Workbook(write_only=True)
    worksheet = workbook.create_sheet(sheet)
    worksheet.append(list(columns))
    for row in rows:
        worksheet.append(list(row))
    workbook.save(path)
    make_xlsx_reproducible(path)


def generate_production(
    path: str | Path, n_incidents: int = 20946, seed: int = 0, labelled: bool = False
) -> dict[str, Any]:
    """Write a production-shaped file of synthetic narratives.

    The proportions are those of the real production file scaled to `n_incidents` rows: 6 of
    20,946 rows repeat an incident, 15,327 incidents have both narratives, 4,222 only CME,
    436 only LE, the rest none; about 1,500 narratives are placeholders ("Need LE report."
    and variants); 8.4% of incidents with a narrative are positive; narratives are
    600-1,500 characters.

    Args:
        path: Output `.xlsx` or `.csv` (the wide layout, first sheet).
        n_incidents: Number of data rows, repeated incidents included (the real file's
            20,946 rows hold 20,940 distinct incidents).
        seed: Random seed; the same seed gives the same content (and the same bytes).
        labelled: Add `ipv_manualCME`, `ipv_manualLE` and `ipv_manual` (0/1; empty for
            missing and placeholder narratives, and for an incident with neither labelled).

    Returns:
        Counts of what was written (rows, incidents, duplicate_rows, both, cme_only,
        le_only, no_narrative, narratives_cme, narratives_le, placeholders,
        positive_incidents, positive_narratives, mean_chars) plus path and seconds.
    """
    if n_incidents < 1:
        raise ValueError(f"n_incidents must be positive, got {n_incidents}")
    start = time.perf_counter()
    columns, rows, stats = _production_rows(n_incidents, seed, labelled)
    write_table(path, columns, rows)
    stats["path"] = str(path)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write a production-shaped file and print its counts."""
    parser = argparse.ArgumentParser(
        prog="python -m narr_assets.testing.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="output .xlsx or .csv")
    parser.add_argument(
        "--incidents",
        type=int,
        default=PRODUCTION["rows"],
        help="number of rows (default: %(default)s, as in production)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled", action="store_true", help="add the manual label columns")
    args = parser.parse_args(argv)
    try:
        stats = generate_production(args.out, args.incidents, args.seed, args.labelled)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in stats.items():
        print(f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
