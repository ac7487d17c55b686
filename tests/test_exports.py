"""Exports: formula injection neutralised, UTF-8 that Excel opens, all three formats."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from narr_assets.exports import FORMATS, neutralise_formulas, write_export


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tcmd", "'\tcmd"),
        ("plain text", "plain text"),
        ("café – naïve", "café – naïve"),
    ],
)
def test_formula_cells_are_neutralised(cell, expected):
    frame = pd.DataFrame({"rationale": [cell], "n": [1]})
    assert neutralise_formulas(frame)["rationale"].item() == expected
    assert neutralise_formulas(frame)["n"].item() == 1  # numbers untouched


def test_csv_has_bom_and_roundtrips_unicode(tmp_path):
    frame = pd.DataFrame({"narrative_text": ["Décès à domicile – 日本"], "rationale": ["=cmd"]})
    path = write_export(frame, tmp_path / "out.csv", "csv")
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    back = pd.read_csv(path, encoding="utf-8-sig")
    assert back["narrative_text"].item() == "Décès à domicile – 日本"
    assert back["rationale"].item() == "'=cmd"


def test_parquet_and_jsonl_keep_values_exact(tmp_path):
    frame = pd.DataFrame({"incident_id": ["727037"], "confidence": [0.9], "rationale": ["=not a formula here"]})
    assert pd.read_parquet(write_export(frame, tmp_path / "o.parquet", "parquet")).equals(frame)
    line = (write_export(frame, tmp_path / "o.jsonl", "jsonl")).read_text().strip()
    assert json.loads(line) == {"incident_id": "727037", "confidence": 0.9, "rationale": "=not a formula here"}


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'xls'"):
        write_export(pd.DataFrame({"a": [1]}), tmp_path / "o.xls", "xls")


def test_exports_are_owner_only_and_replace_looser_files(tmp_path):
    old_umask = os.umask(0o022)  # the common umask: the modes must come from the code
    try:
        frame = pd.DataFrame({"narrative_text": ["V was found."]})
        for fmt in FORMATS:
            path = write_export(frame, tmp_path / "new" / f"o.{fmt}", fmt)
            assert oct(path.stat().st_mode & 0o777) == "0o600", fmt
        assert oct((tmp_path / "new").stat().st_mode & 0o777) == "0o700"  # created by the export
        loose = tmp_path / "mine"
        loose.mkdir()
        loose.chmod(0o755)
        (loose / "o.csv").write_text("old")
        (loose / "o.csv").chmod(0o644)
        write_export(frame, loose / "o.csv", "csv")  # `narr export -o mine/o.csv`
        assert oct((loose / "o.csv").stat().st_mode & 0o777) == "0o600"  # tightened when written again
        assert oct(loose.stat().st_mode & 0o777) == "0o755"  # a folder the user chose is theirs
        write_export(frame, loose / "o.csv", "csv", tighten_folder=True)  # the data folder's exports/
        assert oct(loose.stat().st_mode & 0o777) == "0o700"
        assert sorted(p.name for p in loose.iterdir()) == ["o.csv"]  # no temporary file left
    finally:
        os.umask(old_umask)
