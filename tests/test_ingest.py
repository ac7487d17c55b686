"""Tests for narr_assets.ingest: layouts, normalisation, provenance and every bad input."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import openpyxl
import pandas as pd
import pytest

from narr_assets import ingest as ingest_module
from narr_assets.ingest import (
    FRAME_COLUMNS,
    IngestError,
    file_checksum,
    normalise_incident_id,
    parse_label,
    read_source,
)

LOADED_AT = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
LABELLED_HEADER = [
    "IncidentID",
    "IncidentYear",
    "NarrativeCME",
    "NarrativeLE",
    "ipv_manualCME",
    "ipv_manualLE",
    "ipv_manual",
]


def _engines() -> list[Any]:
    engines: list[Any] = ["openpyxl"]
    try:
        import python_calamine  # noqa: F401

        engines.insert(0, "calamine")
    except ImportError:
        engines.insert(0, pytest.param("calamine", marks=pytest.mark.skip(reason="python-calamine not installed")))
    return engines


ENGINES = _engines()


def write_xlsx(
    path: Path, rows: list[list[Any]], title: str = "Sheet1", extra: dict[str, list[list[Any]]] | None = None
) -> Path:
    """Write rows (the first one is the header) to an .xlsx, cell by cell from A1."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = title
    for row in rows:
        sheet.append(row)
    for name, extra_rows in (extra or {}).items():
        other = workbook.create_sheet(name)
        for row in extra_rows:
            other.append(row)
    workbook.save(path)
    return path


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def rows_of(frame: pd.DataFrame, *columns: str) -> list[tuple[Any, ...]]:
    """Rows as plain tuples, pandas NA -> None, for exact comparisons."""
    out = []
    for values in frame.loc[:, list(columns)].itertuples(index=False):
        out.append(tuple(None if (v is pd.NA or v is None) else v for v in values))
    return out


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("engine", ENGINES)
def test_labelled_xlsx_full_frame(tmp_path: Path, engine: str) -> None:
    path = write_xlsx(
        tmp_path / "labelled.xlsx",
        [
            LABELLED_HEADER,
            [727037.0, 2019, "  CME text one. ", "LE text one.", 1, 0, 1],
            [727038, 2020.0, "CME text two.", None, "FALSE", None, "no"],
        ],
    )
    raw = read_source(path, loaded_at=LOADED_AT, engine=engine)

    assert raw.layout == "labelled"
    assert raw.rows_read == 2
    assert raw.sheet == "Sheet1"
    assert raw.reader == engine
    assert raw.source_path == str(path.resolve())
    assert raw.checksum == hashlib.md5(path.read_bytes()).hexdigest()
    assert raw.attribute_columns == ["IncidentYear"]
    assert list(raw.frame.columns) == list(FRAME_COLUMNS)
    assert rows_of(
        raw.frame,
        "incident_id",
        "narrative_type",
        "narrative_text",
        "manual_flag_ind",
        "manual_flag",
        "source_row",
    ) == [
        ("727037", "cme", "CME text one.", 1, 1, 2),
        ("727037", "le", "LE text one.", 0, 1, 2),
        ("727038", "cme", "CME text two.", 0, 0, 3),
        ("727038", "le", None, None, 0, 3),
    ]
    assert raw.frame["label_error"].isna().all()
    assert [json.loads(a) for a in raw.frame["attributes"]] == [{"IncidentYear": "2019"}] * 2 + [
        {"IncidentYear": "2020"}
    ] * 2
    assert str(raw.frame["manual_flag_ind"].dtype) == "Int64"
    assert str(raw.frame["manual_flag"].dtype) == "Int64"
    assert (raw.frame["source_path"] == str(path.resolve())).all()
    assert (raw.frame["source_sheet"] == "Sheet1").all()
    assert (raw.frame["data_checksum"] == raw.checksum).all()
    assert (raw.frame["loaded_at"] == pd.Timestamp(LOADED_AT)).all()
    assert str(raw.frame["loaded_at"].dtype) == "datetime64[ns, UTC]"


@pytest.mark.parametrize("engine", ENGINES)
def test_unlabelled_xlsx(tmp_path: Path, engine: str) -> None:
    path = write_xlsx(
        tmp_path / "prod.xlsx",
        [["IncidentID", "NarrativeCME", "NarrativeLE", "SiteID"], ["A1", "cme", "le", 12]],
    )
    raw = read_source(path, engine=engine)
    assert raw.layout == "unlabelled"
    assert rows_of(raw.frame, "incident_id", "narrative_type", "manual_flag_ind", "manual_flag") == [
        ("A1", "cme", None, None),
        ("A1", "le", None, None),
    ]
    assert json.loads(raw.frame["attributes"].iloc[0]) == {"SiteID": "12"}


@pytest.mark.parametrize(
    "header",
    [
        ["IncidentID", "NarrativeCME", "NarrativeLE", "ipv_manualCME", "ipv_manualLE"],
        [" incidentid ", "NARRATIVECME", "narrativele", "IPV_MANUALcme", " ipv_manualle"],
        ["ipv_manualLE", "NarrativeLE", "ipv_manualCME", "IncidentID", "NarrativeCME"],
    ],
    ids=["canonical", "case-and-spaces", "shuffled"],
)
def test_labelled_detected_before_unlabelled(tmp_path: Path, header: list[str]) -> None:
    values = {"incidentid": 5, "narrativecme": "c", "narrativele": "l", "ipv_manualcme": 1, "ipv_manualle": 0}
    row = [values[h.strip().lower()] for h in header]
    raw = read_source(write_xlsx(tmp_path / "l.xlsx", [header, row]))
    assert raw.layout == "labelled"
    assert rows_of(raw.frame, "narrative_type", "manual_flag_ind", "manual_flag") == [
        ("cme", 1, None),
        ("le", 0, None),
    ]
    # Label columns are layout columns, never attributes.
    assert raw.attribute_columns == []


@pytest.mark.parametrize(
    ("labels", "missing"),
    [
        (["ipv_manualCME"], "ipv_manualLE"),
        (["ipv_manualLE"], "ipv_manualCME"),
        (["ipv_manual"], "ipv_manualCME, ipv_manualLE"),
        (["ipv_manual", "ipv_manualCME"], "ipv_manualLE"),
    ],
)
def test_partial_label_columns_are_an_error(tmp_path: Path, labels: list[str], missing: str) -> None:
    path = write_xlsx(
        tmp_path / "partial.xlsx",
        [["IncidentID", "NarrativeCME", "NarrativeLE", *labels], [1, "a", "b", *[1] * len(labels)]],
    )
    with pytest.raises(IngestError) as info:
        read_source(path)
    message = str(info.value)
    assert str(path.resolve()) in message
    assert f"missing {missing}" in message
    assert "incomplete label columns" in message


@pytest.mark.parametrize("engine", ENGINES)
def test_long_layout_xlsx(tmp_path: Path, engine: str) -> None:
    path = write_xlsx(
        tmp_path / "long.xlsx",
        [
            ["Incident_ID", "Narrative_Type", "Narrative_Text", "manual_flag_ind", "Source"],
            [101.0, "CME", "text a", "yes", "x"],
            [101, " le ", "text b", "n", None],
            [102, "NarrativeLE", "text c", None, "y"],
            [103, "xx", "text d", "1.0", None],
        ],
    )
    raw = read_source(path, engine=engine)
    assert raw.layout == "long"
    assert raw.rows_read == 4
    assert raw.attribute_columns == ["Source"]
    assert rows_of(
        raw.frame,
        "incident_id",
        "narrative_type",
        "narrative_text",
        "manual_flag_ind",
        "manual_flag",
        "source_row",
    ) == [
        ("101", "cme", "text a", 1, None, 2),
        ("101", "le", "text b", 0, None, 3),
        ("102", "le", "text c", None, None, 4),
        ("103", "xx", "text d", 1, None, 5),
    ]
    assert json.loads(raw.frame["attributes"].iloc[1]) == {"Source": None}


def test_long_layout_csv_with_incident_label(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "long.csv",
        "incident_id,narrative_type,narrative_text,manual_flag_ind,manual_flag\n"
        "7.0,cme,hello,TRUE,1\n"
        "7.0,le,world,false,maybe\n",
    )
    raw = read_source(path)
    assert raw.layout == "long"
    assert raw.sheet is None and raw.encoding == "utf-8" and raw.reader == "csv"
    assert rows_of(raw.frame, "incident_id", "narrative_type", "manual_flag_ind", "manual_flag", "label_error") == [
        ("7", "cme", 1, 1, None),
        ("7", "le", 0, None, "unrecognised label 'maybe' in column manual_flag"),
    ]


def test_wide_csv_with_bom_and_text_floats(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "wide.csv",
        "IncidentID,NarrativeCME,NarrativeLE,ipv_manualCME,ipv_manualLE,IncidentYear\n727037.0,a,b,1.0,0.0,2019.0\n",
        encoding="utf-8-sig",
    )
    raw = read_source(path)
    assert raw.layout == "labelled"  # the BOM must not hide the first column name
    assert rows_of(raw.frame, "incident_id", "manual_flag_ind") == [("727037", 1), ("727037", 0)]
    assert json.loads(raw.frame["attributes"].iloc[0]) == {"IncidentYear": "2019"}


def test_csv_cp1252_fallback(tmp_path: Path) -> None:
    path = tmp_path / "win.csv"
    # 0xe9 = e-acute and 0x92 = right quote in cp1252; 0x81 is undefined and must not crash.
    path.write_bytes(b"IncidentID,NarrativeCME,NarrativeLE\r\n1,Caf\xe9 owner\x92s car,x\x81y\r\n")
    raw = read_source(path)
    assert raw.encoding == "cp1252"
    assert raw.frame["narrative_text"].tolist() == ["Caf\u00e9 owner\u2019s car", "x\ufffdy"]


def test_named_sheet(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "two.xlsx",
        [["notes"], ["nothing here"]],
        title="Readme",
        extra={"Data": [["IncidentID", "NarrativeCME", "NarrativeLE"], [9, "c", "l"]]},
    )
    raw = read_source(path, sheet="Data")
    assert raw.sheet == "Data"
    assert raw.frame["incident_id"].tolist() == ["9", "9"]
    assert (raw.frame["source_sheet"] == "Data").all()


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_agree(tmp_path: Path, engine: str) -> None:
    rows = [
        [*LABELLED_HEADER, "Date", None, None],
        [1.0, 2019, "a\nmultiline  text", "b", True, False, "yes", dt.datetime(2020, 3, 4), None, "x"],
        [2, None, None, "  ", "", "n", 0, dt.datetime(2020, 3, 4, 5, 6, 7), None, None],
    ]
    path = write_xlsx(tmp_path / "mixed.xlsx", rows)
    raw = read_source(path, engine=engine, loaded_at=LOADED_AT)
    reference = read_source(path, engine="openpyxl", loaded_at=LOADED_AT)
    pd.testing.assert_frame_equal(raw.frame, reference.frame)
    assert raw.attribute_columns == ["IncidentYear", "Date", "column_J"]
    assert json.loads(raw.frame["attributes"].iloc[0]) == {
        "IncidentYear": "2019",
        "Date": "2020-03-04",
        "column_J": "x",
    }
    assert json.loads(raw.frame["attributes"].iloc[2]) == {
        "IncidentYear": None,
        "Date": "2020-03-04T05:06:07",
        "column_J": None,
    }
    assert rows_of(raw.frame, "narrative_text", "manual_flag_ind", "manual_flag") == [
        ("a\nmultiline  text", 1, 1),
        ("b", 0, 1),
        (None, None, 0),
        (None, 0, 0),
    ]


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (727037.0, "727037"),
        ("727037.0", "727037"),
        (" 727037 ", "727037"),
        ("7.27037E5", "727037"),
        ("7.27037e+05", "727037"),
        (727037, "727037"),
        ("00123", "00123"),
        ("727037.5", "727037.5"),
        (727037.5, "727037.5"),
        ("AB-12.0", "AB-12.0"),
        ("1e999999", "1e999999"),
        ("1e31", "1e31"),
        ("1e30", "1" + "0" * 30),
        ("-0.0", "0"),
        ("1" * 5000 + ".0", "1" * 5000),  # longer than int()'s 4,300-digit string limit
        ("\u0661\u0662.0", "\u0661\u0662.0"),  # Arabic-Indic digits are not rewritten
        ("\uff11\uff12.0", "\uff11\uff12.0"),  # nor fullwidth ones
        ("", None),
        ("   ", None),
        (None, None),
        (float("nan"), None),
    ],
)
def test_normalise_incident_id(value: Any, expected: str | None) -> None:
    assert normalise_incident_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[
            (v, 1)
            for v in (
                1,
                1.0,
                "1",
                "1.0",
                "1.00",
                " TRUE ",
                "True",
                "true",
                "t",
                True,
                "yes",
                "Y",
                "positive",
                "POS",
                "IPV",
            )
        ],
        *[
            (v, 0)
            for v in (
                0,
                0.0,
                "0",
                "0.0",
                "FALSE",
                "False",
                "f",
                False,
                "no",
                "N",
                "negative",
                "neg",
                "no ipv",
                "Not  IPV",
                "non-ipv",
            )
        ],
        *[(v, None) for v in (None, "", "  ", "NA", "n/a", "nan", "NULL", float("nan"))],
    ],
)
def test_parse_label_table(value: Any, expected: int | None) -> None:
    assert parse_label(value) == (expected, True)


@pytest.mark.parametrize("value", ["maybe", "2", "-1", "0.5", "#N/A", "unknown", "yes no", "\u0661", "\uff10"])
def test_parse_label_rejects(value: str) -> None:
    assert parse_label(value) == (None, False)


@pytest.mark.parametrize("engine", ENGINES)
def test_label_errors_point_at_column(tmp_path: Path, engine: str) -> None:
    long_garbage = "The decedent was found " * 5
    path = write_xlsx(
        tmp_path / "bad.xlsx",
        [
            LABELLED_HEADER,
            [1, 2019, "c", "l", 1, "maybe", 1],
            [2, 2019, "c", "l", 0, 0, long_garbage],
        ],
    )
    frame = read_source(path, engine=engine).frame
    assert frame["label_error"].tolist() == [
        None,
        "unrecognised label 'maybe' in column ipv_manualLE",
        f"unrecognised label <text of {len(long_garbage.strip())} characters> in column ipv_manual",
        f"unrecognised label <text of {len(long_garbage.strip())} characters> in column ipv_manual",
    ]
    assert frame["manual_flag_ind"].isna().tolist() == [False, True, False, False]


# --------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("engine", ENGINES)
def test_row_numbers_skip_blank_rows_and_leading_rows(tmp_path: Path, engine: str) -> None:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    # Header on row 3, starting at column B; blank row 5; data rows 4, 6 and 8.
    for col, name in enumerate(["IncidentID", "NarrativeCME", "NarrativeLE"], start=2):
        sheet.cell(row=3, column=col, value=name)
    for row, ident in ((4, 1), (6, 2), (8, 3)):
        sheet.cell(row=row, column=2, value=ident)
        sheet.cell(row=row, column=3, value=f"cme {ident}")
    path = tmp_path / "offset.xlsx"
    workbook.save(path)

    raw = read_source(path, engine=engine)
    assert raw.rows_read == 3
    assert rows_of(raw.frame, "incident_id", "narrative_type", "source_row") == [
        ("1", "cme", 4),
        ("1", "le", 4),
        ("2", "cme", 6),
        ("2", "le", 6),
        ("3", "cme", 8),
        ("3", "le", 8),
    ]


def test_csv_row_numbers_count_records_not_lines(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "multi.csv",
        'IncidentID,NarrativeCME,NarrativeLE\n1,"line one\nline two",x\n\n2,y,z\n',
    )
    raw = read_source(path)
    assert raw.rows_read == 2
    assert rows_of(raw.frame, "incident_id", "narrative_type", "narrative_text", "source_row") == [
        ("1", "cme", "line one\nline two", 2),
        ("1", "le", "x", 2),
        ("2", "cme", "y", 4),
        ("2", "le", "z", 4),
    ]


def test_missing_id_is_kept_as_none(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "noid.csv", "IncidentID,NarrativeCME,NarrativeLE\n ,text,\n")
    raw = read_source(path)
    assert raw.frame["incident_id"].tolist() == [None, None]
    assert raw.frame["narrative_text"].tolist() == ["text", None]


def test_naive_loaded_at_is_utc(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", "IncidentID,NarrativeCME,NarrativeLE\n1,a,b\n")
    raw = read_source(path, loaded_at=dt.datetime(2024, 5, 1, 12, 30))
    assert raw.frame["loaded_at"].iloc[0] == pd.Timestamp("2024-05-01 12:30", tz="UTC")


def test_file_checksum_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert file_checksum(path, chunk_size=1000) == hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- bad inputs


def _assert_ingest_error(path: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(IngestError) as info:
        read_source(path, **kwargs)
    message = str(info.value)
    assert str(path.resolve()) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _assert_ingest_error(tmp_path / "nope.xlsx", "file not found")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.xlsx"
    folder.mkdir()
    _assert_ingest_error(folder, "is a directory")


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "a PNG image"),
        (bytes(range(256)) * 4, "not a zip archive"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, "legacy .xls or a password-protected"),
        (b"", "an empty file"),
    ],
    ids=["png", "random", "ole2", "empty"],
)
def test_not_a_workbook(tmp_path: Path, content: bytes, found: str) -> None:
    path = tmp_path / "fake.xlsx"
    path.write_bytes(content)
    _assert_ingest_error(path, "not a readable .xlsx workbook", found)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".xls", ""])
def test_unsupported_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text("IncidentID,NarrativeCME,NarrativeLE\n")
    _assert_ingest_error(path, "unsupported file type", ".xlsx", ".csv")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_xlsx(tmp_path: Path, engine: str, keep: float) -> None:
    path = write_xlsx(
        tmp_path / "whole.xlsx",
        [["IncidentID", "NarrativeCME", "NarrativeLE"]] + [[i, "x" * 50, "y"] for i in range(200)],
    )
    data = path.read_bytes()
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(data[: int(len(data) * keep)])
    _assert_ingest_error(broken, "xlsx", engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_zip_that_is_not_a_workbook(tmp_path: Path, engine: str) -> None:
    import zipfile

    path = tmp_path / "archive.xlsx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "not a workbook")
    _assert_ingest_error(path, "cannot read the workbook", engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_sheet_is_an_error(tmp_path: Path, engine: str) -> None:
    path = write_xlsx(tmp_path / "empty.xlsx", [])
    _assert_ingest_error(path, "sheet 'Sheet1'", "the sheet is empty", "IncidentID", engine=engine)


@pytest.mark.parametrize("content", ["", "\n\n", "\ufeff"])
def test_empty_csv_is_an_error(tmp_path: Path, content: str) -> None:
    path = write_csv(tmp_path / "empty.csv", content)
    _assert_ingest_error(path, "the file is empty", "IncidentID")


@pytest.mark.parametrize("engine", ENGINES)
def test_header_only_is_valid_and_empty(tmp_path: Path, engine: str) -> None:
    path = write_xlsx(tmp_path / "header.xlsx", [LABELLED_HEADER])
    raw = read_source(path, engine=engine)
    assert raw.layout == "labelled"
    assert raw.rows_read == 0
    assert raw.frame.empty
    assert list(raw.frame.columns) == list(FRAME_COLUMNS)
    assert str(raw.frame["manual_flag_ind"].dtype) == "Int64"
    assert str(raw.frame["source_row"].dtype) == "int64"


def test_missing_required_columns(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "cols.xlsx", [["IncidentID", "Narrative_CME", "NarrativeLE", "Year"], [1, "a", "b", 2019]]
    )
    message = _assert_ingest_error(
        path,
        "does not match any known layout",
        "Columns found: 'IncidentID', 'Narrative_CME', 'NarrativeLE', 'Year'",
        "labelled = IncidentID, NarrativeCME, NarrativeLE, ipv_manualCME, ipv_manualLE",
        "unlabelled = IncidentID, NarrativeCME, NarrativeLE",
        "long = incident_id, narrative_type, narrative_text",
    )
    assert message.endswith("Closest layout 'unlabelled' is missing: NarrativeCME")


def test_headerless_csv_does_not_echo_narrative(tmp_path: Path) -> None:
    narrative = "The victim was found by her ex-boyfriend who had threatened her repeatedly"
    path = write_csv(tmp_path / "nohead.csv", f"727037,{narrative},short\n")
    message = _assert_ingest_error(path, "Columns found: '727037', <text of")
    assert narrative not in message


def test_unknown_sheet_lists_available(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "s.xlsx", [["IncidentID"]], title="Main", extra={"Other": []})
    _assert_ingest_error(path, "no sheet named 'Data'", "available sheets: 'Main', 'Other'", sheet="Data")


def test_sheet_given_for_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", "IncidentID,NarrativeCME,NarrativeLE\n")
    _assert_ingest_error(path, "CSV file has no sheets", sheet="Sheet1")


def test_binary_csv(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    _assert_ingest_error(path, "not a text CSV file")


def test_ragged_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ragged.csv", "IncidentID,NarrativeCME,NarrativeLE\n1,a,b\n2,a,b,c,d\n")
    _assert_ingest_error(path, "malformed CSV", "line 3", "the row has 5 fields but the header has 3")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # Blank and header lines count; a quoted line break makes the line differ from the row.
        ('\nIncidentID,NarrativeCME,NarrativeLE\n1,"a\nb",c\n2,a,b,c\n', ["line 5 (row 4)", "4 fields"]),
        # An unclosed quote would otherwise swallow the rest of the file into one cell.
        (
            'IncidentID,NarrativeCME,NarrativeLE\n1,"never closed,x\n2,y,z\n',
            ["line 2", "unexpected end of data"],
        ),
        ('IncidentID,NarrativeCME,NarrativeLE\n1,"quoted" tail,x\n', ["line 2", "expected after"]),
    ],
)
def test_malformed_csv_names_the_line(tmp_path: Path, text: str, fragments: list[str]) -> None:
    _assert_ingest_error(write_csv(tmp_path / "bad.csv", text), "malformed CSV", *fragments)


@pytest.mark.parametrize(("filler", "line"), [(0, 2), (3, 5)])
def test_csv_nul_names_the_line(tmp_path: Path, filler: int, line: int) -> None:
    rows = "".join(f"{i},a,b\n" for i in range(filler))
    path = write_csv(tmp_path / "nul.csv", f"IncidentID,NarrativeCME,NarrativeLE\n{rows}9,x\x00y,z\n")
    _assert_ingest_error(path, "not a text CSV file", f"NUL byte on line {line}")


def test_csv_field_longer_than_the_csv_module_default_limit(tmp_path: Path) -> None:
    text = "word " * 40_000  # 200,000 characters; the csv module's default limit is 131,072
    path = write_csv(tmp_path / "long.csv", f'IncidentID,NarrativeCME,NarrativeLE\n1,"{text}",x\n')
    assert read_source(path).frame["narrative_text"].tolist() == [text.strip(), "x"]


@pytest.mark.parametrize(("lead", "row"), [("", 2), ("\n", 3), ("  \n\n", 4), (",,,\r\n", 3), ("\ufeff\n", 3)])
def test_csv_blank_lines_above_header(tmp_path: Path, lead: str, row: int) -> None:
    path = write_csv(tmp_path / "lead.csv", f"{lead}IncidentID,NarrativeCME,NarrativeLE\n1,a,\n")
    raw = read_source(path)
    assert rows_of(raw.frame, "incident_id", "narrative_text", "source_row") == [
        ("1", "a", row),
        ("1", None, row),
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_xlsx_excel_escapes_are_decoded(tmp_path: Path, engine: str) -> None:
    # What Excel writes for "a\r\nb" and for the literal text "_x0041_".
    rows = [["IncidentID", "NarrativeCME", "NarrativeLE"], [1, "a_x000D_\nb", "_x005F_x0041_"]]
    path = write_xlsx(tmp_path / "esc.xlsx", rows)
    assert read_source(path, engine=engine).frame["narrative_text"].tolist() == ["a\r\nb", "_x0041_"]


def test_duplicate_layout_column(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "dup.xlsx",
        [["IncidentID", "NarrativeCME", "NarrativeLE", "narrativecme"], [1, "a", "b", "c"]],
    )
    _assert_ingest_error(path, "column 'narrativecme' appears twice (columns B and D)")


def test_duplicate_attribute_columns_are_kept(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "dupattr.xlsx",
        [["IncidentID", "NarrativeCME", "NarrativeLE", "Note", "Note"], [1, "a", "b", "x", "y"]],
    )
    raw = read_source(path)
    assert raw.attribute_columns == ["Note", "Note (E)"]
    assert json.loads(raw.frame["attributes"].iloc[0]) == {"Note": "x", "Note (E)": "y"}


def test_ambiguous_layout(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "amb.csv",
        "IncidentID,NarrativeCME,NarrativeLE,incident_id,narrative_type,narrative_text\n",
    )
    _assert_ingest_error(path, "ambiguous layout")


def test_unknown_engine(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "e.xlsx", [["IncidentID", "NarrativeCME", "NarrativeLE"]])
    with pytest.raises(ValueError, match="unknown engine"):
        read_source(path, engine="xlrd")  # type: ignore[arg-type]


def test_csv_short_rows_are_padded(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "short.csv", "IncidentID,NarrativeCME,NarrativeLE,SiteID\n1,a\n2,b,c,4\n")
    raw = read_source(path)
    assert rows_of(raw.frame, "incident_id", "narrative_type", "narrative_text", "source_row") == [
        ("1", "cme", "a", 2),
        ("1", "le", None, 2),
        ("2", "cme", "b", 3),
        ("2", "le", "c", 3),
    ]
    assert [json.loads(a) for a in raw.frame["attributes"]] == [{"SiteID": None}] * 2 + [{"SiteID": "4"}] * 2


def test_auto_engine_falls_back_to_openpyxl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_xlsx(tmp_path / "a.xlsx", [["IncidentID", "NarrativeCME", "NarrativeLE"], [1.0, "a", "b"]])
    # A None entry in sys.modules makes `import python_calamine` raise ImportError.
    monkeypatch.setitem(sys.modules, "python_calamine", None)
    raw = read_source(path)
    assert raw.reader == "openpyxl"
    assert raw.frame["incident_id"].tolist() == ["1", "1"]


# --------------------------------------------------------------------------- formulas without values

FORMULA_REASON = (
    "column {} holds a formula without a saved value; open and save the file in Excel "
    "(or paste the cells as values) so the text is stored"
)


@pytest.mark.parametrize("engine", ENGINES)
def test_formula_without_saved_value_is_flagged_not_empty(tmp_path: Path, engine: str) -> None:
    """openpyxl writes formulas without computing them: the cell reads as empty but is not."""
    path = write_xlsx(
        tmp_path / "formulas.xlsx",
        [
            ["IncidentID", "NarrativeCME", "NarrativeLE", "Link"],
            ["1", '=HYPERLINK("https://example.org/1", "case 1")', "le text", None],
            ["2", "cme text", None, '=HYPERLINK("https://example.org/2")'],
            ["3", None, '=CONCATENATE("a", "b")', None],
        ],
    )
    raw = read_source(path, engine=engine)
    assert rows_of(raw.frame, "incident_id", "narrative_type", "narrative_text", "text_error") == [
        ("1", "cme", None, FORMULA_REASON.format("NarrativeCME")),
        ("1", "le", "le text", None),
        ("2", "cme", "cme text", None),
        ("2", "le", None, None),  # empty: the formula is in another column
        ("3", "cme", None, None),
        ("3", "le", None, FORMULA_REASON.format("NarrativeLE")),
    ]


def test_formula_without_saved_value_in_the_long_layout(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "long.xlsx",
        [["incident_id", "narrative_type", "narrative_text"], ["1", "cme", "=A2"], ["1", "le", "text"]],
    )
    assert read_source(path).frame["text_error"].tolist() == [FORMULA_REASON.format("narrative_text"), None]


def test_formula_with_a_saved_value_reads_its_value(tmp_path: Path) -> None:
    """A formula Excel computed keeps its value: neither empty nor flagged."""
    path = write_xlsx(tmp_path / "saved.xlsx", [["IncidentID", "NarrativeCME", "NarrativeLE"], ["1", "=B5", "x"]])
    # Give the formula the saved string value Excel would have written.
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    sheet = parts["xl/worksheets/sheet1.xml"]
    assert sheet.count(b'<c r="B2"><f>B5</f><v /></c>') == 1
    parts["xl/worksheets/sheet1.xml"] = sheet.replace(
        b'<c r="B2"><f>B5</f><v /></c>', b'<c r="B2" t="str"><f>B5</f><v>computed text</v></c>'
    )
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    raw = read_source(path)
    assert raw.frame["narrative_text"].tolist() == ["computed text", "x"]
    assert raw.frame["text_error"].isna().all()


def test_formula_check_reads_the_workbook_again_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No empty narrative cell, or no formula anywhere: the openpyxl pass is skipped."""
    calls: list[set[tuple[int, int]]] = []
    real = ingest_module._formula_cells

    def counted(data: bytes, where: str, sheet: str, candidates: set[tuple[int, int]]) -> set[tuple[int, int]]:
        calls.append(candidates)
        return real(data, where, sheet, candidates)

    monkeypatch.setattr(ingest_module, "_formula_cells", counted)
    header = ["IncidentID", "NarrativeCME", "NarrativeLE", "Year"]
    read_source(write_xlsx(tmp_path / "full.xlsx", [header, ["1", "a", "b", "=2000+24"]]))
    read_source(write_xlsx(tmp_path / "plain.xlsx", [header, ["1", "a", None, "2024"]]))
    assert calls == []
    raw = read_source(write_xlsx(tmp_path / "both.xlsx", [header, ["1", "a", None, "=2000+24"]]))
    assert calls == [{(2, 2)}]  # only the empty narrative cell (row 2, column C) is looked at
    assert raw.frame["text_error"].isna().all()
