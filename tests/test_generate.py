"""Tests of the synthetic data: `narr_assets.testing.generate` and `scripts.make_sample`."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import openpyxl
import pandas as pd
import pytest

from narr_assets.rules import classify, load_lexicon
from narr_assets.testing import generate
from narr_assets.testing.generate import (
    LABEL_COLUMNS,
    PLACEHOLDERS_CME,
    PLACEHOLDERS_LE,
    UNLABELLED_COLUMNS,
    generate_production,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample_labelled.xlsx"
PLACEHOLDERS = set(PLACEHOLDERS_LE) | set(PLACEHOLDERS_CME)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "scripts" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_sample = _load_script()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[dict, pd.DataFrame]:
    """2,000 labelled rows as .xlsx, read back with pandas."""
    path = tmp_path_factory.mktemp("gen") / "small.xlsx"
    stats = generate_production(path, n_incidents=2000, seed=1, labelled=True)
    return stats, pd.read_excel(path)


def _shape(row) -> str:
    cme, le = pd.notna(row["NarrativeCME"]), pd.notna(row["NarrativeLE"])
    return {(True, True): "both", (True, False): "cme_only", (False, True): "le_only", (False, False): "no_narrative"}[
        (cme, le)
    ]


# --------------------------------------------------------------------------- production


def test_small_file_has_the_scaled_production_proportions(small):
    stats, df = small
    scale = 2000 / 20946
    assert list(df.columns) == list(UNLABELLED_COLUMNS + LABEL_COLUMNS)
    assert len(df) == stats["rows"] == 2000
    assert df.duplicated().sum() == stats["duplicate_rows"] == 1
    unique = df.drop_duplicates()
    assert unique["IncidentID"].is_unique
    assert len(unique) == stats["incidents"] == 1999
    shapes = unique.apply(_shape, axis=1).value_counts().to_dict()
    for key, full in (("both", 15327), ("cme_only", 4222), ("le_only", 436)):
        assert shapes[key] == stats[key] == round(full * scale)
    assert shapes["no_narrative"] == stats["no_narrative"] == 1999 - 1463 - 403 - 42
    cells = pd.concat([unique["NarrativeCME"], unique["NarrativeLE"]]).dropna()
    placeholders = cells[cells.isin(PLACEHOLDERS)]
    assert len(placeholders) == stats["placeholders"] == round(1500 * scale)
    assert unique["NarrativeLE"].isin(PLACEHOLDERS).sum() > unique["NarrativeCME"].isin(PLACEHOLDERS).sum()
    real = cells[~cells.isin(PLACEHOLDERS)].str.len()
    assert real.min() >= 500 and real.max() <= 1800
    assert 900 <= real.mean() <= 1250
    assert real.between(600, 1500).mean() > 0.9


def test_small_file_labels_are_consistent(small):
    stats, df = small
    unique = df.drop_duplicates()
    with_text = unique[unique.apply(_shape, axis=1) != "no_narrative"]
    rate = with_text["ipv_manual"].sum() / len(with_text)
    assert rate == pytest.approx(0.084, abs=0.012)
    assert unique["ipv_manual"].sum() == stats["positive_incidents"]
    assert unique[["ipv_manualCME", "ipv_manualLE"]].sum().sum() == stats["positive_narratives"]
    for kind in ("CME", "LE"):
        text, label = unique[f"Narrative{kind}"], unique[f"ipv_manual{kind}"]
        # a label exactly where there is a real narrative
        assert (label.notna() == (text.notna() & ~text.isin(PLACEHOLDERS))).all()
    either = unique[["ipv_manualCME", "ipv_manualLE"]].max(axis=1)
    assert (either.fillna(-1) == unique["ipv_manual"].fillna(-1)).all()
    # the positive narratives carry IPV content that the lexicon finds most of the time
    lexicon = load_lexicon(ROOT / "configs" / "lexicon.yaml")
    positives = unique.loc[unique["ipv_manualLE"] == 1, "NarrativeLE"].tolist()
    found = sum(classify(t, lexicon).detected for t in positives) / len(positives)
    assert 0.6 < found < 0.95


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_same_seed_same_bytes_other_seed_other_content(tmp_path, suffix):
    a, b, c = (tmp_path / f"{name}{suffix}" for name in "abc")
    generate_production(a, n_incidents=300, seed=5)
    generate_production(b, n_incidents=300, seed=5)
    generate_production(c, n_incidents=300, seed=6)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_csv_and_xlsx_hold_the_same_table(tmp_path):
    csv_stats = generate_production(tmp_path / "p.csv", n_incidents=400, seed=3, labelled=True)
    xlsx_stats = generate_production(tmp_path / "p.xlsx", n_incidents=400, seed=3, labelled=True)
    from_csv = pd.read_csv(tmp_path / "p.csv")
    from_xlsx = pd.read_excel(tmp_path / "p.xlsx")
    assert list(from_csv.columns) == list(UNLABELLED_COLUMNS + LABEL_COLUMNS)
    pd.testing.assert_frame_equal(from_csv, from_xlsx, check_dtype=False)
    assert {k: v for k, v in csv_stats.items() if k not in ("path", "seconds")} == {
        k: v for k, v in xlsx_stats.items() if k not in ("path", "seconds")
    }


def test_unlabelled_layout_by_default(tmp_path):
    generate_production(tmp_path / "u.xlsx", n_incidents=150, seed=0)
    df = pd.read_excel(tmp_path / "u.xlsx")
    assert list(df.columns) == list(UNLABELLED_COLUMNS)
    assert len(df) == 150


@pytest.mark.parametrize("rows", [1, 7, 99])
def test_tiny_files(tmp_path, rows):
    stats = generate_production(tmp_path / "t.csv", n_incidents=rows, seed=0)
    df = pd.read_csv(tmp_path / "t.csv")
    assert len(df) == stats["rows"] == rows
    assert stats["duplicate_rows"] == 0
    assert stats["both"] + stats["cme_only"] + stats["le_only"] + stats["no_narrative"] == rows


@pytest.mark.parametrize(
    ("args", "problem"),
    [({"path": "x.parquet"}, "unsupported extension"), ({"path": "x.csv", "n_incidents": 0}, "positive")],
)
def test_bad_arguments(tmp_path, args, problem):
    args = {**args, "path": tmp_path / args["path"]}
    with pytest.raises(ValueError, match=problem):
        generate_production(**args)


def test_cli_prints_the_counts(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.xlsx"
    assert generate.main(["--out", str(out), "--incidents", "250", "--seed", "2", "--labelled"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\s+rows: 250$", printed, re.MULTILINE)
    assert re.search(r"^\s+seconds: [\d.]+$", printed, re.MULTILINE)
    assert list(pd.read_excel(out).columns)[-3:] == list(LABEL_COLUMNS)
    assert generate.main(["--out", str(tmp_path / "x.txt")]) == 2
    assert "unsupported extension" in capsys.readouterr().err


def test_narratives_never_leave_a_placeholder_unfilled():
    rng = random.Random(0)
    for _ in range(200):
        incident = generate.Incident(rng, female_rate=0.5)
        special = [generate.positive_template(rng), generate.hard_negative_template(rng)]
        for kind in ("cme", "le"):
            text = incident.narrative(kind, special=special, sentences=(3, 6))
            assert "{" not in text and "}" not in text


# --------------------------------------------------------------------------- bundled sample


def _sample_rows() -> list[list]:
    workbook = openpyxl.load_workbook(SAMPLE, read_only=True)
    sheet = workbook.worksheets[0]
    header = next(sheet.iter_rows(max_row=1, max_col=8, values_only=True))
    assert header == UNLABELLED_COLUMNS + LABEL_COLUMNS
    return [list(r) for r in sheet.iter_rows(min_row=2, max_col=8, values_only=True)]


def test_committed_sample_matches_expected_counts():
    assert make_sample.count(_sample_rows()) == make_sample.EXPECTED


def test_committed_sample_is_what_the_script_builds():
    built = make_sample.build_rows()
    read = _sample_rows()
    assert len(read) == len(built) == make_sample.EXPECTED["rows"]
    for got, want in zip(read, built, strict=True):
        # the float ID comes back as an int: Excel keeps numbers, not their Python type
        assert got == want


def test_script_rebuild_gives_the_same_bytes(tmp_path):
    assert make_sample.main(["--out", str(tmp_path / "s.xlsx")]) == 0
    assert (tmp_path / "s.xlsx").read_bytes() == SAMPLE.read_bytes()


def test_sample_has_the_promised_mix():
    rows = _sample_rows()
    expected = make_sample.EXPECTED
    forms = {repr(v) for r in rows for v in r[5:8] if v is not None}
    assert {"1", "0", "True", "False", "'yes'", "'no'", "'TRUE'", "'FALSE'"} <= forms
    assert 0.15 <= expected["positives"] / expected["narratives"] <= 0.25
    assert expected["incidents"] >= 40 and expected["narratives"] >= 70
    ids = [r[0] for r in rows]
    assert ids.count(None) == 1
    assert [i for i in ids if i is not None and not isinstance(i, str)] == [make_sample.FLOAT_ID]
    texts = [t for r in rows for t in r[3:5] if isinstance(t, str)]
    assert texts.count(make_sample.PLACEHOLDER_LE) == 1
    assert texts.count(make_sample.PLACEHOLDER_CME) == 1
    # CME and LE disagree in some incidents
    assert any(str(r[5]) != str(r[6]) and r[5] is not None and r[6] is not None for r in rows)


def test_rules_baseline_on_sample_is_credible_but_imperfect():
    lexicon = load_lexicon(ROOT / "configs" / "lexicon.yaml")
    truthy = {"1", "true", "yes"}
    seen, tp, fp, fn = set(), 0, 0, 0
    for r in _sample_rows():
        if r[0] is None or str(r[0]) in seen:
            continue
        seen.add(str(r[0]))
        for text, label in ((r[3], r[5]), (r[4], r[6])):
            if label is None or not isinstance(text, str) or not text.strip():
                continue
            truth = str(label).lower() in truthy
            predicted = classify(text, lexicon).detected
            tp += predicted and truth
            fp += predicted and not truth
            fn += truth and not predicted
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert tp + fn == make_sample.EXPECTED["positives"]
    assert 0.6 <= f1 <= 0.9, (tp, fp, fn)
    assert fp > 0 and fn > 0
