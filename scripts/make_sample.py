"""Write the bundled labelled sample, `data/sample_labelled.xlsx` (deterministic, seeded).

    python -m scripts.make_sample [--out data/sample_labelled.xlsx] [--seed 20240611]

The narratives are synthetic, written for this project in NVDRS style from the sentence
banks of `narr_assets.testing.generate` (3-6 sentences each). The first sheet has the
labelled wide layout: IncidentID, IncidentYear, SiteID, NarrativeCME, NarrativeLE,
ipv_manualCME, ipv_manualLE, ipv_manual. Labels come in mixed forms across rows, as in real
files: 1/0, TRUE/FALSE (Excel booleans), "TRUE"/"FALSE", "yes"/"no", "Yes"/"No";
`ipv_manual` is the incident label (positive if either narrative is). A blank or
placeholder narrative has an empty label cell.

Content: 57 incidents - 40 with both narratives, 9 CME only, 7 LE only, 1 with none -
14 of them positive (both narratives positive in 5, only LE in 3, only CME in 2, plus 2 CME-only
and 2 LE-only positives). Positives cover the six abuse types and every indirect indicator;
4 are worded without any lexicon term. Hard negatives: explicit "no history of domestic
violence", violence by a parent or sibling, the decedent as the perpetrator, a breakup or an
argument without abuse, financial stress, homicide victims with prior abuse, and 4 traps for a
lexicon (a DV-shelter advocate, a daughter's protective order, ...).

Dirty rows, which ingestion tests rely on (exact counts in `EXPECTED`):

- one exact duplicate row (a repeated positive incident);
- one conflicting duplicate: a second row for an IncidentID whose NarrativeLE has one extra
  sentence (labels unchanged, both negative);
- one empty narrative: NarrativeCME is an empty cell but ipv_manualCME is filled, while
  NarrativeLE has text (Excel keeps no empty strings, so this is what "" looks like);
- one whitespace-only narrative: NarrativeLE is "   \\n " (its label is filled too);
- one row with no IncidentID (a complete negative incident, not counted below);
- two placeholders: "Need LE report." (NarrativeLE) and "No narrative available."
  (NarrativeCME), each next to a real narrative;
- IncidentIDs are text ("398122"), except one stored as a number, the float 727037.0 (it is
  incident "727037"; readers hand it over as 727037 or 727037.0).

`EXPECTED` counts, over the distinct IncidentIDs and the first row of each: `narratives`
are non-blank narrative cells (placeholders included, blank = empty or whitespace-only),
`labelled` the narratives with a manual label (non-blank, not a placeholder), `positives`
the positive ones; `both`, `cme_only`, `le_only` and `no_narrative` classify incidents by
their non-blank cells.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

from narr_assets.testing.generate import (
    HARD_NEGATIVE,
    LABEL_COLUMNS,
    POSITIVE,
    SITES,
    SUBTLE_POSITIVE,
    TRAP_NEGATIVE,
    UNLABELLED_COLUMNS,
    Incident,
    write_table,
)

ROOT = Path(__file__).resolve().parent.parent
SEED = 20240611
DEFAULT_OUT = ROOT / "data" / "sample_labelled.xlsx"
FLOAT_ID = 727037
PLACEHOLDER_LE = "Need LE report."
PLACEHOLDER_CME = "No narrative available."
WHITESPACE = "   \n "
CONFLICT_SENTENCE = "A supplemental report added that the family was notified the same day."

EXPECTED: dict[str, int] = {
    "rows": 60,
    "incidents": 57,
    "duplicates": 1,
    "conflicts": 1,
    "missing_id": 1,
    "float_ids": 1,
    "empty": 1,
    "whitespace": 1,
    "placeholders": 2,
    "narratives": 94,
    "narratives_cme": 48,
    "narratives_le": 46,
    "labelled": 92,
    "positives": 19,
    "positives_cme": 9,
    "positives_le": 10,
    "positive_incidents": 14,
    "both": 38,
    "cme_only": 10,
    "le_only": 8,
    "no_narrative": 1,
}

# (shape, CME positive, LE positive) of the 57 incidents
_POSITIVE_PLAN = (
    [("both", True, True)] * 5
    + [("both", False, True)] * 3
    + [("both", True, False)] * 2
    + [("cme", True, False)] * 2
    + [("le", False, True)] * 2
)
_NEGATIVE_PLAN = (
    [("both", False, False)] * 30 + [("cme", False, False)] * 7 + [("le", False, False)] * 5 + [("none", False, False)]
)

_LABEL_STYLES: tuple[tuple[Any, Any], ...] = (
    (1, 0),
    (True, False),
    ("TRUE", "FALSE"),
    ("yes", "no"),
    ("Yes", "No"),
)


def _positive_templates(rng: random.Random, n: int) -> list[str]:
    """Every positive kind once, 4 subtle ones, the rest at random: `n` templates."""
    chosen = [rng.choice(POSITIVE[kind]) for kind in sorted(POSITIVE)]
    chosen += rng.sample(SUBTLE_POSITIVE, 4)
    while len(chosen) < n:
        chosen.append(rng.choice(POSITIVE[rng.choice(sorted(POSITIVE))]))
    rng.shuffle(chosen)
    return chosen[:n]


def _negative_templates(rng: random.Random) -> tuple[list[str], list[str]]:
    """Hard negatives: every kind twice (two wordings when there are) and every trap once.

    Returns:
        (homicide-victim templates, the others); a homicide victim's narrative cannot sit
        next to a suicide narrative of the same incident, so those go to single-narrative
        incidents.
    """
    homicide = list(HARD_NEGATIVE["homicide victim"])
    others = []
    for kind in sorted(HARD_NEGATIVE):
        if kind == "homicide victim":
            continue
        options = list(HARD_NEGATIVE[kind])
        rng.shuffle(options)
        others += (options * 2)[:2]
    others += list(TRAP_NEGATIVE)
    rng.shuffle(others)
    return homicide, others


def build_rows(seed: int = SEED) -> list[list[Any]]:
    """Build the sheet's data rows (without the header).

    Args:
        seed: Random seed; the default gives the committed file.

    Returns:
        Rows in the column order of `UNLABELLED_COLUMNS + LABEL_COLUMNS`.
    """
    rng = random.Random(seed)
    plan = _POSITIVE_PLAN + _NEGATIVE_PLAN
    rng.shuffle(plan)
    n = len(plan)
    ids: list[Any] = [str(i) for i in rng.sample(range(300000, 999999), n + 1) if i != FLOAT_ID][:n]
    override, conflict, floaty = _dirty_cells(rng, plan)
    ids[floaty] = float(FLOAT_ID)
    special = _hard_negative_cells(rng, plan, override)
    n_pos = sum(cme + le for _, cme, le in plan)
    positives = _positive_templates(rng, n_pos)
    rows = [
        _incident_row(rng, i, ids[i], plan=plan, override=override, special=special, positives=positives)
        for i in range(n)
    ]
    _insert_extra_rows(rng, plan, rows, conflict)
    return rows


def _dirty_cells(rng: random.Random, plan: list[tuple[str, bool, bool]]) -> tuple[dict[tuple[int, str], Any], int, int]:
    """Choose the dirty cells, each in its own negative incident with both narratives.

    Returns:
        The cells overridden with an empty, blank or placeholder text; the incident whose row
        gets a conflicting duplicate; the incident whose ID is stored as a number.
    """
    clean_both = [i for i, (shape, cme, le) in enumerate(plan) if shape == "both" and not (cme or le)]
    empty, blank, ph_le, ph_cme, conflict, floaty = rng.sample(clean_both, 6)
    override = {
        (empty, "cme"): None,
        (blank, "le"): WHITESPACE,
        (ph_le, "le"): PLACEHOLDER_LE,
        (ph_cme, "cme"): PLACEHOLDER_CME,
    }
    return override, conflict, floaty


def _hard_negative_cells(
    rng: random.Random, plan: list[tuple[str, bool, bool]], override: dict[tuple[int, str], Any]
) -> dict[tuple[int, str], str]:
    """Which negative narratives carry a hard negative, and which one (a template)."""
    homicide, others = _negative_templates(rng)
    single = [(i, shape) for i, (shape, cme, le) in enumerate(plan) if shape in ("cme", "le") and not (cme or le)]
    special: dict[tuple[int, str], str] = {}
    for template, (i, shape) in zip(homicide, rng.sample(single, len(homicide)), strict=True):
        special[(i, shape)] = template
    slots = [
        (i, kind)
        for i, (shape, cme, le) in enumerate(plan)
        if not (cme or le)
        for kind in ("cme", "le")
        if shape in ("both", kind) and (i, kind) not in override and (i, kind) not in special
    ]
    for template, slot in zip(others, rng.sample(slots, len(others)), strict=True):
        special[slot] = template
    return special


def _incident_row(
    rng: random.Random,
    i: int,
    incident_id: Any,
    *,
    plan: list[tuple[str, bool, bool]],
    override: dict[tuple[int, str], Any],
    special: dict[tuple[int, str], str],
    positives: list[str],
) -> list[Any]:
    """The row of incident `i`: its narratives (or dirty cells) and labels in a random label style.

    A positive narrative takes (pops) the last of `positives`; a negative one carries its hard
    negative from `special`, if any.
    """
    shape, cme_pos, le_pos = plan[i]
    inc = Incident(rng, female_rate=0.75 if (cme_pos or le_pos) else 0.3)
    yes, no = rng.choice(_LABEL_STYLES)
    cells: dict[str, tuple[str | None, Any]] = {}
    for kind, positive in (("cme", cme_pos), ("le", le_pos)):
        if shape not in ("both", kind):
            cells[kind] = (None, None)
        elif (i, kind) in override:
            text = override[(i, kind)]
            # a blank narrative keeps its label, as in real files; a placeholder has none
            cells[kind] = (text, no if _is_blank(text) else None)
        else:
            extra = [positives.pop()] if positive else ([special[(i, kind)]] if (i, kind) in special else [])
            text = inc.narrative(kind, special=extra, sentences=(3, 6))
            cells[kind] = (text, yes if positive else no)
    known = [label for _, label in cells.values() if label is not None]
    incident = (yes if (cme_pos or le_pos) else no) if known else None
    (cme_text, cme_label), (le_text, le_label) = cells["cme"], cells["le"]
    return [incident_id, rng.randint(2015, 2022), rng.choice(SITES), cme_text, le_text, cme_label, le_label, incident]


def _insert_extra_rows(
    rng: random.Random, plan: list[tuple[str, bool, bool]], rows: list[list[Any]], conflict: int
) -> None:
    """Spread the exact duplicate, the conflicting duplicate and the row without an ID through `rows`."""
    positive_both = [i for i, (shape, cme, _) in enumerate(plan) if shape == "both" and cme]
    dup_row = list(rows[rng.choice(positive_both)])
    conflict_row = list(rows[conflict])
    conflict_row[4] = f"{conflict_row[4]} {CONFLICT_SENTENCE}"
    orphan = Incident(rng, female_rate=0.3)
    orphan_row = [
        None,
        rng.randint(2015, 2022),
        rng.choice(SITES),
        orphan.narrative("cme", sentences=(3, 6)),
        orphan.narrative("le", sentences=(3, 6)),
        0,
        0,
        0,
    ]
    for extra_row in (dup_row, conflict_row, orphan_row):
        rows.insert(rng.randint(len(rows) // 3, len(rows)), extra_row)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def count(rows: list[list[Any]]) -> dict[str, int]:
    """Recount `EXPECTED` from rows, so the script (and tests) can check the sample.

    Args:
        rows: Data rows as built by `build_rows`, or as read back from the sheet.

    Returns:
        The same keys as `EXPECTED`.
    """
    placeholders = {PLACEHOLDER_LE, PLACEHOLDER_CME}
    seen: dict[str, list[Any]] = {}
    out = dict.fromkeys(EXPECTED, 0)
    out["rows"] = len(rows)
    row_keys: set[tuple] = set()
    for r in rows:
        if r[0] is None:
            out["missing_id"] += 1
            continue
        out["float_ids"] += not isinstance(r[0], str)
        key = str(int(float(r[0])))
        if key in seen:
            if tuple(r) in row_keys:
                out["duplicates"] += 1
            else:
                out["conflicts"] += 1
            continue
        row_keys.add(tuple(r))
        seen[key] = r
    out["incidents"] = len(seen)
    for r in seen.values():
        present = {}
        for kind, text, label in (("cme", r[3], r[5]), ("le", r[4], r[6])):
            present[kind] = not _is_blank(text)
            # an empty narrative is an empty cell whose label is filled
            out["empty"] += (text is None or text == "") and label is not None
            out["whitespace"] += isinstance(text, str) and text != "" and not text.strip()
            if not present[kind]:
                continue
            out["narratives"] += 1
            out[f"narratives_{kind}"] += 1
            if text in placeholders:
                out["placeholders"] += 1
                continue
            out["labelled"] += label is not None
            positive = label in (1, True, "TRUE", "yes", "Yes")
            out["positives"] += positive
            out[f"positives_{kind}"] += positive
        out["positive_incidents"] += r[7] in (1, True, "TRUE", "yes", "Yes")
        shape = (
            ("both" if present["le"] else "cme_only")
            if present["cme"]
            else ("le_only" if present["le"] else "no_narrative")
        )
        out[shape] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the sample, check it against `EXPECTED` and write it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    rows = build_rows(args.seed)
    counts = count(rows)
    if args.seed == SEED and counts != EXPECTED:
        diff = {k: (EXPECTED[k], counts[k]) for k in EXPECTED if counts[k] != EXPECTED[k]}
        print(f"error: counts differ from EXPECTED (expected, got): {diff}", file=sys.stderr)
        return 1
    write_table(args.out, UNLABELLED_COLUMNS + LABEL_COLUMNS, iter(rows), sheet="sample")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
