"""Tests for narr_assets.narratives: cleaning rules, placeholders and the batch ledger."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import openpyxl
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narr_assets.ingest import read_source
from narr_assets.narratives import (
    CONFLICT_COLUMNS,
    DEFAULT_PLACEHOLDER_PATTERNS,
    NARRATIVE_COLUMNS,
    REJECTED_COLUMNS,
    assign_batches,
    batch_key,
    batch_number,
    clean_narratives,
    compare_narratives,
    placeholder_mask,
    text_hash,
)


def long_frame(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """Build an ingest-style frame from (incident_id, type, text, ind, flag, label_error, source_row)."""
    frame = pd.DataFrame(
        rows,
        columns=[
            "incident_id",
            "narrative_type",
            "narrative_text",
            "manual_flag_ind",
            "manual_flag",
            "label_error",
            "source_row",
        ],
    )
    frame["manual_flag_ind"] = frame["manual_flag_ind"].astype("Int64")
    frame["manual_flag"] = frame["manual_flag"].astype("Int64")
    frame["source_path"] = "/data/in.xlsx"
    frame["attributes"] = "{}"
    frame["data_checksum"] = "abc"
    frame["loaded_at"] = pd.Timestamp("2024-01-01", tz="UTC")
    return frame


def accounted(stats: dict[str, int]) -> int:
    return (
        stats["narratives"]
        + stats["empty_dropped"]
        + stats["rejected"]
        + stats["duplicates_removed"]
        + stats["conflicts"]
    )


# --------------------------------------------------------------------------- hashing


@pytest.mark.parametrize(
    "text",
    ["abc", "Caf\u00e9 \u2019quoted\u2019", "line\nbreak", " padded "],
)
def test_text_hash_is_sha256_prefix(text: str) -> None:
    assert text_hash(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def test_text_hash_known_value_and_sensitivity() -> None:
    assert text_hash("abc") == "ba7816bf8f01cfea"
    assert text_hash("abc ") != text_hash("abc")


# --------------------------------------------------------------------------- cleaning


def test_empty_narratives_dropped_not_rejected() -> None:
    frame = long_frame(
        [
            ("1", "cme", "real text", None, None, None, 2),
            ("1", "le", None, None, None, None, 2),
            ("2", "cme", "   \n\t ", None, None, None, 3),
            (None, "le", "", None, None, None, 3),
        ]
    )
    result = clean_narratives(frame)
    assert result.narratives["incident_id"].tolist() == ["1"]
    assert result.stats["empty_dropped"] == 3
    assert result.stats["rejected"] == 0
    assert result.rejected.empty


def test_rejections_with_reasons_and_no_text() -> None:
    frame = long_frame(
        [
            (None, "cme", "secret text a", None, None, None, 2),
            ("  ", "le", "secret text b", None, None, None, 2),
            ("3", "le", "secret text c", None, None, "unrecognised label 'maybe' in column ipv_manualLE", 3),
            ("4", "xx", "secret text d", None, None, None, 4),
            ("5", None, "secret text e", None, None, None, 5),
            (None, "narrative with a very long wrong type", "secret text f", None, None, "bad label", 6),
            ("7", "CME", "kept text", None, None, None, 7),
        ]
    )
    result = clean_narratives(frame)
    assert list(result.rejected.columns) == list(REJECTED_COLUMNS)
    assert result.rejected["reason"].tolist() == [
        "missing incident ID",
        "missing incident ID",
        "unrecognised label 'maybe' in column ipv_manualLE",
        "unknown narrative_type 'xx'",
        "missing narrative_type",
        "missing incident ID; unknown narrative_type <text of 37 characters>; bad label",
    ]
    assert result.rejected["source_row"].tolist() == [2, 2, 3, 4, 5, 6]
    assert result.rejected["source_path"].eq("/data/in.xlsx").all()
    assert not result.rejected.astype(str).apply(lambda col: col.str.contains("secret")).any().any()
    assert result.narratives["narrative_type"].tolist() == ["cme"]  # "CME" normalised
    assert result.stats["rejected"] == 6
    assert accounted(result.stats) == len(frame)


def test_unreadable_narrative_cell_is_rejected_not_dropped_as_empty() -> None:
    """A formula cell without a saved value reads as empty; `text_error` sends it to the rejected rows."""
    formula = "column NarrativeCME holds a formula without a saved value; open and save the file in Excel"
    frame = long_frame(
        [
            ("1", "cme", None, None, None, None, 2),
            ("1", "le", "real text", None, None, None, 2),
            ("2", "cme", None, None, None, None, 3),
            (None, "le", None, None, None, None, 3),
        ]
    )
    frame["text_error"] = [formula, None, None, formula]
    result = clean_narratives(frame)
    assert result.rejected["reason"].tolist() == [formula, f"missing incident ID; {formula}"]
    assert result.rejected["source_row"].tolist() == [2, 3]
    assert result.stats["empty_dropped"] == 1 and result.stats["rejected"] == 2 and result.stats["narratives"] == 1
    assert accounted(result.stats) == len(frame)


def test_exact_duplicates_removed_first_kept() -> None:
    frame = long_frame(
        [
            ("1", "cme", "same", 1, 1, None, 2),
            ("1", "le", "other", 0, 1, None, 2),
            ("1", "cme", "same", 1, 1, None, 3),
            ("1", "le", "other", 0, 1, None, 3),
            ("2", "cme", "x", None, None, None, 4),
        ]
    )
    result = clean_narratives(frame)
    assert result.stats["duplicates_removed"] == 2
    assert result.stats["conflicts"] == 0
    assert result.conflicts.empty
    assert list(result.conflicts.columns) == list(CONFLICT_COLUMNS)
    assert result.narratives["source_row"].tolist() == [2, 2, 4]


def test_conflicting_duplicates_keep_lowest_source_row() -> None:
    # Frame order is deliberately not file order: the rule is about source_row.
    frame = long_frame(
        [
            ("9", "cme", "second version", 1, None, None, 7),
            ("9", "cme", "first version", 0, None, None, 3),
            ("9", "cme", "first version", 0, None, None, 5),
            ("9", "cme", "first version", 1, None, None, 6),
            ("9", "le", "le text", None, None, None, 3),
        ]
    )
    result = clean_narratives(frame)
    kept = result.narratives.set_index("narrative_type")
    assert kept.loc["cme", "narrative_text"] == "first version"
    assert kept.loc["cme", "source_row"] == 3
    assert result.conflicts[["source_row", "kept", "reason"]].values.tolist() == [
        [3, True, "kept: first occurrence in file order"],
        [5, False, "exact duplicate of kept row 3"],
        [6, False, "differs from kept row 3 in labels"],
        [7, False, "differs from kept row 3 in text and labels"],
    ]
    assert result.conflicts["text_hash"].tolist() == [text_hash("first version")] * 3 + [text_hash("second version")]
    assert result.conflicts["manual_flag_ind"].tolist() == [0, 0, 1, 1]
    assert result.stats["duplicates_removed"] == 1
    assert result.stats["conflicts"] == 2
    assert accounted(result.stats) == len(frame)


def test_conflict_on_text_only() -> None:
    frame = long_frame([("1", "le", "a", None, None, None, 2), ("1", "le", "b", None, None, None, 9)])
    result = clean_narratives(frame)
    assert result.conflicts["reason"].tolist() == [
        "kept: first occurrence in file order",
        "differs from kept row 2 in text",
    ]
    assert result.narratives["narrative_text"].tolist() == ["a"]


def test_incident_label_kept_or_left_null() -> None:
    frame = long_frame(
        [
            ("1", "cme", "a", 1, 1, None, 2),
            ("1", "le", "b", 0, 1, None, 2),
            ("2", "cme", "c", 1, None, None, 3),
            ("2", "le", "d", 0, None, None, 3),
        ]
    )
    narratives = clean_narratives(frame).narratives
    assert narratives["manual_flag"].tolist()[:2] == [1, 1]
    # Not derived from the per-narrative labels here: evaluation does that.
    assert narratives["manual_flag"].isna().tolist() == [False, False, True, True]


def test_output_columns_and_stats() -> None:
    frame = long_frame(
        [
            ("1", "cme", "Need LE report.", None, None, None, 2),
            ("1", "le", "She was killed", 1, None, None, 2),
            ("2", "cme", "he", 0, None, None, 3),
            ("2", "le", None, None, None, None, 3),
        ]
    )
    result = clean_narratives(frame, rows_read=2)
    assert list(result.narratives.columns) == list(NARRATIVE_COLUMNS)
    assert result.narratives["is_placeholder"].tolist() == [True, False, False]
    assert result.narratives["text_hash"].tolist() == [
        text_hash(t) for t in ("Need LE report.", "She was killed", "he")
    ]
    assert result.stats == {
        "rows_read": 2,
        "input_rows": 4,
        "narratives": 3,
        "cme": 2,
        "le": 1,
        "empty_dropped": 1,
        "duplicates_removed": 0,
        "conflicts": 0,
        "rejected": 0,
        "placeholders": 1,
        "labelled": 2,
        "labelled_positive": 1,
    }
    assert all(type(v) is int for v in result.stats.values())


def test_minimal_frame_input() -> None:
    frame = pd.DataFrame(
        {"incident_id": [727037.0, "8 "], "narrative_type": ["cme", "LE"], "narrative_text": ["  a  ", "b"]}
    )
    result = clean_narratives(frame)
    assert result.narratives["incident_id"].tolist() == ["727037", "8"]
    assert result.narratives["narrative_text"].tolist() == ["a", "b"]
    assert result.narratives["source_row"].tolist() == [2, 3]
    assert result.narratives["attributes"].tolist() == ["{}", "{}"]
    assert result.stats["rows_read"] == 2


def test_missing_required_column() -> None:
    with pytest.raises(ValueError, match="narrative_text"):
        clean_narratives(pd.DataFrame({"incident_id": ["1"], "narrative_type": ["cme"]}))


def test_from_rawload_end_to_end(tmp_path: Path) -> None:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for row in [
        ["IncidentID", "NarrativeCME", "NarrativeLE", "ipv_manualCME", "ipv_manualLE", "IncidentYear"],
        [101.0, "CME one", "LE one", 1, 0, 2019],
        [102, "Need LE report.", None, "no", None, 2019],
        [None, "orphan text", None, None, None, 2019],
        [103, "CME three", "LE three", "maybe", 1, 2020],
        [101, "CME one", "LE one", 1, 0, 2019],
    ]:
        sheet.append(row)
    path = tmp_path / "in.xlsx"
    workbook.save(path)
    raw = read_source(path)
    result = clean_narratives(raw)
    assert result.stats["rows_read"] == 5
    assert result.stats["input_rows"] == 10
    assert result.narratives[["incident_id", "narrative_type", "source_row", "is_placeholder"]].values.tolist() == [
        ["101", "cme", 2, False],
        ["101", "le", 2, False],
        ["102", "cme", 3, True],
        ["103", "le", 5, False],
    ]
    assert result.rejected[["source_row", "reason"]].values.tolist() == [
        [4, "missing incident ID"],
        [5, "unrecognised label 'maybe' in column ipv_manualCME"],
    ]
    assert result.stats["duplicates_removed"] == 2
    assert result.stats["empty_dropped"] == 2
    assert (result.narratives["source_path"] == raw.source_path).all()
    assert (result.narratives["data_checksum"] == raw.checksum).all()
    assert accounted(result.stats) == result.stats["input_rows"]


def test_clean_40k_rows() -> None:
    """Production-sized input goes through (speed is measured in benchmarks/, not here)."""
    n = 20_000
    ids = [str(700_000 + i) for i in range(n)]
    frame = long_frame(
        [
            (ids[i], t, f"narrative {i} {t} " + "word " * 150, i % 2, None, None, i + 2)
            for i in range(n)
            for t in ("cme", "le")
        ]
    )
    result = clean_narratives(frame)
    assert result.stats["narratives"] == 2 * n
    assert result.narratives["text_hash"].is_unique


# --------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    "text",
    [
        "Need LE report.",
        "need le report",
        "NEED CME REPORT",
        "Need LE and CME reports.",
        "Needs law enforcement report",
        "Still need LE report.",
        "Need  LE   report .",
        "Need coroner/ME report",
        "No narrative.",
        "No narrative available",
        "No LE report",
        "no information provided.",
        "Narrative not available.",
        "narrative unavailable",
        "N/A",
        "NA",
        "n/a.",
        "Pending.",
        "pending LE report",
        "See LE narrative.",
        "see CME report",
        "None",
        "Unknown",
        "Awaiting LE report.",
        "Waiting for CME report",
        "LE report pending.",
        "CME report not yet received",
        "-",
        "...",
        "  TBD  ",
    ],
)
def test_default_placeholders_match(text: str) -> None:
    assert placeholder_mask(pd.Series([text])).tolist() == [True]


@pytest.mark.parametrize(
    "text",
    [
        "Need LE report. The victim was found hanging in the garage by her husband.",
        "The decedent had no narrative history of abuse and was found by police.",
        "None of the family members reported abuse.",
        "V was pending divorce from her husband who had assaulted her several times over the past year.",
        "Victim shot self.",
        "na na na na na na na na na",
        "Nancy",
    ],
)
def test_real_narratives_are_not_placeholders(text: str) -> None:
    assert placeholder_mask(pd.Series([text])).tolist() == [False]


def test_custom_and_empty_patterns() -> None:
    texts = pd.Series(["Sealed record", "Need LE report.", None])
    assert placeholder_mask(texts, [r"sealed\s+record"]).tolist() == [True, False, False]
    assert placeholder_mask(texts, []).tolist() == [False, False, False]
    result = clean_narratives(
        long_frame([("1", "cme", "SEALED RECORD", None, None, None, 2)]),
        placeholder_patterns=(r"sealed\s+record",),
    )
    assert result.stats["placeholders"] == 1


def test_invalid_pattern_is_named() -> None:
    with pytest.raises(ValueError, match=r"invalid placeholder pattern '\(unclosed'"):
        placeholder_mask(pd.Series(["x"]), ["(unclosed"])


def test_default_patterns_are_a_tuple_of_str() -> None:
    assert isinstance(DEFAULT_PLACEHOLDER_PATTERNS, tuple)
    assert all(isinstance(p, str) for p in DEFAULT_PLACEHOLDER_PATTERNS)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize(("index", "expected"), [(0, "b00000"), (7, "b00007"), (12345, "b12345"), (100000, "b100000")])
def test_batch_key_roundtrip(index: int, expected: str) -> None:
    assert batch_key(index) == expected
    assert batch_number(expected) == index


@pytest.mark.parametrize("bad", ["00001", "b", "bx1", "B00001", "b-1"])
def test_batch_number_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a batch ID"):
        batch_number(bad)


def test_batch_key_negative() -> None:
    with pytest.raises(ValueError):
        batch_key(-1)


def keys(ids: list[str], types: tuple[str, ...] = ("cme", "le")) -> pd.DataFrame:
    return pd.DataFrame([(i, t) for i in ids for t in types], columns=["incident_id", "narrative_type"])


def test_first_assignment_sorted_and_sized() -> None:
    current = keys([f"{i:03d}" for i in range(125)])[::-1]  # reversed on purpose
    new = assign_batches(current, None, batch_size=100)
    assert list(new.columns) == ["incident_id", "narrative_type", "batch_id"]
    assert new["batch_id"].value_counts().sort_index().to_dict() == {
        "b00000": 100,
        "b00001": 100,
        "b00002": 50,
    }
    assert new[["incident_id", "narrative_type"]].values.tolist()[:3] == [
        ["000", "cme"],
        ["000", "le"],
        ["001", "cme"],
    ]


def test_unchanged_input_adds_nothing() -> None:
    current = keys(["1", "2", "3"])
    ledger = assign_batches(current, pd.DataFrame(columns=["incident_id", "narrative_type", "batch_id"]), batch_size=4)
    assert assign_batches(current, ledger, batch_size=4).empty


def test_added_rows_go_to_new_batches_only() -> None:
    ledger = assign_batches(keys(["1", "2", "3"]), None, batch_size=4)  # b00000 full, b00001 has 2
    current = keys(["0", "1", "2", "3", "4"])
    new = assign_batches(current, ledger, batch_size=4)
    assert new.values.tolist() == [
        ["0", "cme", "b00002"],
        ["0", "le", "b00002"],
        ["4", "cme", "b00002"],
        ["4", "le", "b00002"],
    ]


def test_edited_text_and_removed_rows_keep_ledger() -> None:
    narratives = pd.DataFrame(
        {"incident_id": ["1", "2"], "narrative_type": ["cme", "cme"], "narrative_text": ["a", "b"]}
    )
    ledger = assign_batches(narratives, None)
    edited = narratives.assign(narrative_text=["a changed", "b"])
    assert assign_batches(edited, ledger).empty
    # Narrative "2" disappears from the input, then comes back: it is still in the ledger.
    assert assign_batches(narratives.iloc[:1], ledger).empty
    assert assign_batches(narratives, ledger).empty


def test_highest_batch_counts_not_ledger_size() -> None:
    ledger = pd.DataFrame({"incident_id": ["1"], "narrative_type": ["cme"], "batch_id": ["b00041"]})
    new = assign_batches(keys(["2"], ("cme",)), ledger)
    assert new["batch_id"].tolist() == ["b00042"]


def test_assign_batches_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        assign_batches(keys(["1"]), None, batch_size=0)
    bad = pd.DataFrame({"incident_id": ["1"], "narrative_type": ["cme"], "batch_id": ["batch-1"]})
    with pytest.raises(ValueError, match="not a batch ID"):
        assign_batches(keys(["2"]), bad)


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(st.sets(st.integers(0, 60), max_size=40), min_size=1, max_size=5),
    batch_size=st.integers(1, 7),
)
def test_ledger_properties(runs: list[set[int]], batch_size: int) -> None:
    ledger = pd.DataFrame(columns=["incident_id", "narrative_type", "batch_id"])
    for ids in runs:
        before = ledger.copy()
        new = assign_batches(keys([str(i) for i in sorted(ids)]), ledger, batch_size=batch_size)
        if not before.empty and not new.empty:
            # New batches are strictly after every existing one: old batches are never topped up.
            assert min(map(batch_number, new["batch_id"])) > max(map(batch_number, before["batch_id"]))
        if len(new):
            sizes = new["batch_id"].value_counts().sort_index().tolist()
            # Full batches, except possibly the last one of this run.
            assert all(size == batch_size for size in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        ledger = pd.concat([before, new], ignore_index=True)
        # Existing assignments never change and every key is in the ledger exactly once.
        pd.testing.assert_frame_equal(
            ledger.iloc[: len(before)].reset_index(drop=True),
            before.reset_index(drop=True),
            check_dtype=False,
        )
        assert not ledger.duplicated(["incident_id", "narrative_type"]).any()
        current_keys = {(str(i), t) for i in ids for t in ("cme", "le")}
        assert current_keys <= set(map(tuple, ledger[["incident_id", "narrative_type"]].values.tolist()))


# --------------------------------------------------------------------------- what an ingest changes


def versions(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """Stored narratives as `Store.read_narrative_versions` returns them (labels as floats, NaN)."""
    frame = pd.DataFrame(
        rows, columns=["incident_id", "narrative_type", "text_hash", "manual_flag_ind", "manual_flag", "batch_id"]
    )
    frame["manual_flag_ind"] = frame["manual_flag_ind"].astype("float64")
    frame["manual_flag"] = frame["manual_flag"].astype("float64")
    return frame


def test_compare_narratives_counts_each_kind_of_change() -> None:
    stored = versions(
        [
            ("1", "cme", "h1", 1, None, "b00000"),  # unchanged
            ("1", "le", "h2", 0, None, "b00000"),  # text changed
            ("2", "cme", "h3", None, None, "b00000"),  # label set: labels changed
            ("2", "le", "h4", 1, 1, "b00001"),  # incident label changed
            ("3", "cme", "h5", 0, None, "b00001"),  # text and label changed: counts as changed
            ("4", "le", "h6", 0, None, "b00001"),  # removed
        ]
    )
    new = versions(
        [
            ("1", "cme", "h1", 1, None, None),
            ("1", "le", "h2x", 0, None, None),
            ("2", "cme", "h3", 1, None, None),
            ("2", "le", "h4", 1, 0, None),
            ("3", "cme", "h5x", 1, None, None),
            ("5", "cme", "h7", None, None, None),  # added, removed by an earlier ingest
            ("6", "le", "h8", None, None, None),  # added
        ]
    )
    earlier = pd.DataFrame({"incident_id": ["5"], "narrative_type": ["cme"]})
    changes = compare_narratives(stored, new.drop(columns="batch_id"), earlier)
    assert changes.counts == {
        "added": 2,
        "changed": 2,
        "labels_changed": 2,
        "removed": 1,
        "unchanged": 1,
        "restored": 1,
    }
    assert changes.removed.to_dict("records") == [
        {"incident_id": "4", "narrative_type": "le", "text_hash": "h6", "batch_id": "b00001"}
    ]
    assert changes.stored == 6 and not changes.mass_removal


def test_compare_narratives_mass_removal_is_more_than_half() -> None:
    stored = versions([(str(i), "cme", f"h{i}", None, None, "b00000") for i in range(4)])
    assert not compare_narratives(stored, stored.iloc[:2]).mass_removal  # 2 of 4: half
    assert compare_narratives(stored, stored.iloc[:1]).mass_removal  # 3 of 4
    assert not compare_narratives(stored.iloc[:0], stored).mass_removal  # first ingest


def test_compare_narratives_missing_labels_compare_equal_across_dtypes() -> None:
    """Stored labels come back from DuckDB as floats with NaN, new ones as nullable Int64."""
    stored = versions([("1", "cme", "h1", None, None, "b00000"), ("1", "le", "h2", 1, None, "b00000")])
    new = stored.drop(columns="batch_id").astype({"manual_flag_ind": "Int64", "manual_flag": "Int64"})
    assert compare_narratives(stored, new).counts["unchanged"] == 2


def test_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("IncidentID,NarrativeCME,NarrativeLE,ipv_manualCME,ipv_manualLE\n")
    result = clean_narratives(read_source(path))
    assert result.narratives.empty and result.rejected.empty and result.conflicts.empty
    assert list(result.narratives.columns) == list(NARRATIVE_COLUMNS)
    assert result.stats["rows_read"] == 0 and result.stats["narratives"] == 0
    new = assign_batches(result.narratives, None)
    assert new.empty and list(new.columns) == ["incident_id", "narrative_type", "batch_id"]
