"""Property-based tests (hypothesis) for ingestion: the bad-input catalogue.

Every example writes a real .csv or .xlsx file into its own temporary folder and reads it
through :func:`read_source` and :func:`clean_narratives`. The properties:

1. any cell values in the three layouts load (a well-formed file) or raise ``IngestError``
   (a malformed one), never another exception, and cleaning never raises;
2. every input row is accounted for, and narrative text never reaches the rejected rows, the
   conflict report or an error message;
3. incident IDs: integer and float spellings agree, IDs are trimmed text, normalising twice
   changes nothing;
4. labels: the documented spellings map to 0/1/None, identically from CSV and from .xlsx;
5. narrative text survives exactly (apart from surrounding whitespace), control characters
   included (NUL has its own tests);
6. ``text_hash`` is deterministic and tells different texts apart;
7. the checksum is the MD5 of the file's bytes, and no text cell (even one starting with
   ``=``) is taken for a formula without a saved value;
8. ``compare_narratives`` accounts for every stored and every new narrative exactly once.

Known bugs are pinned as explicit ``@example`` / parametrised cases marked
``xfail(strict=True)``: when the module is fixed the mark must go (strict XPASS fails).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import openpyxl
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from narr_assets.ingest import (
    LABEL_NEGATIVE,
    LABEL_NULL,
    LABEL_POSITIVE,
    IngestError,
    RawLoad,
    normalise_incident_id,
    parse_label,
    read_source,
)
from narr_assets.narratives import REJECTED_COLUMNS, CleanResult, clean_narratives, compare_narratives, text_hash

# File-writing examples are slow-ish (an .xlsx save is ~10 ms), so they get a moderate budget;
# the whole module must stay well under 40 s on a shared 2-core machine.
FILES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PURE = settings(max_examples=200, deadline=None)

MAX_ECHO = 40  # longest cell value ingest may quote in an IngestError message
EXACT_FLOAT = 2**53  # larger integers cannot survive a trip through an Excel number cell
XLSX_MAX_CELL = 32_767  # characters in one Excel cell, as stored (escapes included)

WIDE_BASE = ["IncidentID", "NarrativeCME", "NarrativeLE"]
WIDE_LABELS = ["ipv_manualCME", "ipv_manualLE"]
LONG_BASE = ["incident_id", "narrative_type", "narrative_text"]
EXTRAS = ["IncidentYear", "SiteID"]
LAYOUTS = ("labelled", "unlabelled", "long")
ID_COLUMNS = {"IncidentID", "incident_id"}
TEXT_COLUMNS = {"NarrativeCME", "NarrativeLE", "narrative_text"}
LABEL_COLUMNS = {"ipv_manualCME", "ipv_manualLE", "ipv_manual", "manual_flag_ind", "manual_flag"}

# --------------------------------------------------------------------------- strategies

SPECIAL_TEXTS = [
    "",
    " ",
    " \t\n\r ",
    "\u00a0\u3000\u2003",
    "مات المتوفى في منزله.\u200f وكان زوجها السابق قد هدده مرارًا.",
    "\u202eRTL override\u202c and \u2066isolate\u2069",
    "הוא נמצא בביתו לאחר ויכוח עם בת זוגו",
    "👩\u200d❤️\u200d👨 🔪 🏳️\u200d🌈 emoji ZWJ sequences",
    "e\u0301 n\u0303 a\u030a\u0328 Z\u0351\u0352\u0353\u0354 combining marks",
    "\u0301 leading combining mark",
    "Need LE report.",
    "=SUM(A1:A2)",
    "+1 formula-looking",
    "@mention",
    '"quoted", comma; semicolon\ttab',
    "line1\nline2\r\nline3\rline4",
    "_x000D_ literal text that looks like an OOXML escape _x005F_",
    "nan",
    "NA",
    "#N/A",
    "\ufeffBOM inside",
    "zero\u200bwidth\u200cjoiners\u200d",
    "\u2028line separator\u2029",
    "\x1c\x1d\x1e\x1f separators Python strips",
    "bell\x07 vt\x0b ff\x0c esc\x1b del\x7f c1\x85\x9f",
]


def _repeat(chunk: str, size: int) -> str:
    """``chunk`` repeated to ``size`` characters, shortened until its .xlsx form fits one cell."""
    text = (chunk * (size // len(chunk) + 1))[:size]
    # In an .xlsx a control character takes 7 characters (_xHHHH_), and a cell holds 32,767.
    while len(excel_escape(text)) > XLSX_MAX_CELL:
        text = text[: len(text) * 9 // 10]
    return text


# Built by repetition: hypothesis drawing 30k characters one by one would be very slow.
long_texts = st.builds(_repeat, st.text(min_size=1, max_size=40), st.integers(20_000, 32_000))
narrative_texts = st.one_of(
    st.none(),
    st.sampled_from(SPECIAL_TEXTS),
    st.sampled_from(["Same text.", "Other text."]),  # so duplicates and conflicts occur
    st.text(max_size=120),
    st.text(st.characters(max_codepoint=0x9F), max_size=40),  # control characters, often
    long_texts,
)

incident_ids = st.one_of(
    st.sampled_from(["100", 100, 100.0, "100.0", " 100 ", "1E2", "101", 101]),  # collisions
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.integers(-(10**9), 10**9).map(lambda n: f"{n}.0"),
    st.integers(-(10**12), 10**12).map(lambda n: f"{Decimal(n):E}"),  # 7.27037E+5
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([727037.0, 7.27037e5, "727037.0", "7.27037E5", "00123", "A-17", True, ""]),
    st.text(max_size=30),
    st.none(),
)

DOCUMENTED_LABELS = sorted(LABEL_POSITIVE | LABEL_NEGATIVE | LABEL_NULL)
documented_label_texts = st.sampled_from(DOCUMENTED_LABELS).flatmap(
    lambda s: st.sampled_from([s, s.upper(), s.title(), f"  {s} ", s.replace(" ", "   ")])
)
label_values = st.one_of(
    st.none(),
    documented_label_texts,
    st.sampled_from([0, 1, 0.0, 1.0, True, False, 2, -1, 0.5]),
    st.sampled_from(["1.0", "0.00", "1e0", "+1", "01", "-0", "maybe", "#N/A", "unknown", "2", "ja"]),
    st.text(max_size=45),  # > 40 characters: must not be echoed
)
narrative_types = st.one_of(
    st.sampled_from(["cme", "le", "CME", " Le ", "NarrativeCME", "narrative_le", "", None, "ME", "police"]),
    st.text(max_size=30),
)
extra_values = st.one_of(st.none(), st.integers(1990, 2030), st.text(max_size=12))


@dataclass
class Sheet:
    """One generated sheet: canonical column names, their spelling in the file, the rows."""

    layout: str
    columns: list[str]
    header: list[str]
    rows: list[list[Any]]
    lead: int = 0  # blank rows above the header

    def column(self, name: str) -> int:
        return self.columns.index(name)


def _cell_strategy(column: str, ids: Any, texts: Any, labels: Any) -> Any:
    if column in ID_COLUMNS:
        return ids
    if column in TEXT_COLUMNS:
        return texts
    if column in LABEL_COLUMNS:
        return labels
    if column == "narrative_type":
        return narrative_types
    return extra_values


@st.composite
def sheets(
    draw: Any,
    layout: str,
    ids: Any = incident_ids,
    texts: Any = narrative_texts,
    labels: Any = label_values,
    max_rows: int = 6,
) -> Sheet:
    if layout == "labelled":
        columns = WIDE_BASE + WIDE_LABELS + draw(st.sampled_from([[], ["ipv_manual"]]))
    elif layout == "unlabelled":
        columns = list(WIDE_BASE)
    else:
        optional = draw(st.sampled_from([[], ["manual_flag_ind"], ["manual_flag_ind", "manual_flag"]]))
        columns = LONG_BASE + optional
    columns = list(draw(st.permutations(columns + draw(st.lists(st.sampled_from(EXTRAS), unique=True)))))
    header = [draw(st.sampled_from([c, c.lower(), c.upper(), f" {c} "])) for c in columns]
    lead = draw(st.sampled_from([0, 0, 0, 1, 2]))
    rows = []
    for _ in range(draw(st.integers(0, max_rows))):
        if draw(st.integers(0, 9)) == 0:
            rows.append([None] * len(columns))  # a blank row: skipped, but advances row numbers
        else:
            rows.append([draw(_cell_strategy(c, ids, texts, labels)) for c in columns])
    return Sheet(layout, columns, header, rows, lead)


# Few distinct values, so exact duplicates and conflicting duplicates are common.
_pooled = {
    "ids": st.sampled_from(["100", 100, 100.0, "100.0", " 100 ", "101"]),
    "texts": st.sampled_from(["Same text.", "Other text.", "  Same text.  ", "Need LE report.", None]),
    "labels": st.sampled_from([0, 1, None, "yes", "FALSE"]),
    "max_rows": 10,
}
any_sheet = st.one_of(
    st.sampled_from(LAYOUTS).flatmap(sheets),
    st.sampled_from(LAYOUTS).flatmap(lambda layout: sheets(layout, **_pooled)),
)

# --------------------------------------------------------------------------- writers

_LITERAL_ESCAPE_RE = re.compile(r"_(?=x[0-9A-Fa-f]{4}_)")
_EXCEL_ESCAPED_RE = re.compile("[\x00-\x08\x0b-\x0d\x0e-\x1f\ufffe\uffff]")
_LOOKS_ESCAPED_RE = re.compile(r"_x[0-9A-Fa-f]{4}_")


def excel_escape(text: str) -> str:
    """Encode text the way Excel stores it in sharedStrings.xml.

    XML cannot hold most control characters, so Excel writes them as ``_xHHHH_`` and protects
    a literal ``_xHHHH_`` by writing its underscore as ``_x005F_``. openpyxl's writer does
    neither (it refuses control characters and writes ``\\r`` raw, which XML turns into
    ``\\n``), so the test encodes first and hands openpyxl a plain string.
    """
    text = _LITERAL_ESCAPE_RE.sub("_x005F_", text)
    return _EXCEL_ESCAPED_RE.sub(lambda m: f"_x{ord(m.group()):04X}_", text)


def xlsx_storable(text: str) -> bool:
    """True if openpyxl can write ``text`` verbatim and both readers return it unchanged."""
    return not (
        ILLEGAL_CHARACTERS_RE.search(text)
        or "\r" in text
        or "\ufffe" in text
        or "\uffff" in text
        or _LOOKS_ESCAPED_RE.search(text)
    )


def write_xlsx(path: Path, rows: list[list[Any]], *, escape: bool = True) -> Path:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for r, row in enumerate(rows, start=1):
        for c, value in enumerate(row, start=1):
            if value is None:
                continue
            if isinstance(value, str):
                stored = excel_escape(value) if escape else value
                # openpyxl silently cuts strings to Excel's 32,767-character cell limit.
                assert len(stored) <= XLSX_MAX_CELL, "generated text too long for an .xlsx cell"
                cell = sheet.cell(row=r, column=c, value=stored)
                cell.data_type = "s"  # openpyxl would store "=SUM(...)" as a formula
            else:
                sheet.cell(row=r, column=c, value=value)
    workbook.save(path)
    return path


def csv_text(value: Any) -> str:
    """The text a spreadsheet program would export for a cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_csv(
    path: Path,
    rows: list[list[Any]],
    *,
    lineterminator: str = "\r\n",
    quoting: int = csv.QUOTE_MINIMAL,
    encoding: str = "utf-8",
) -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle, lineterminator=lineterminator, quoting=quoting)
        writer.writerows([[csv_text(v) for v in row] for row in rows])
    return path


# (line terminator, quoting) of the CSV writers people use. Not ("\n", QUOTE_MINIMAL): Python's
# writer then leaves a bare CR unquoted, which every reader (pandas, csv, Excel) takes as a
# line break, so that file is malformed rather than a test of ingestion.
csv_dialects = st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)])


def no_nul(value: Any) -> Any:
    return value.replace("\x00", "") if isinstance(value, str) else value


@contextmanager
def sheet_file(sheet: Sheet, fmt: str, **options: Any) -> Iterator[Path]:
    """Write the sheet as ``fmt`` into a fresh temporary folder (one per example)."""
    with tempfile.TemporaryDirectory() as folder:
        rows = [[None] * len(sheet.header)] * sheet.lead + [list(sheet.header), *sheet.rows]
        if fmt == "csv":
            # NUL makes a CSV a "binary" file: covered by the NUL tests below.
            yield write_csv(Path(folder) / "in.csv", [[no_nul(v) for v in row] for row in rows], **options)
        else:
            yield write_xlsx(Path(folder) / "in.xlsx", rows, **options)


def load_or_error(path: Path, **options: Any) -> RawLoad | IngestError:
    """read_source's result, or the IngestError it raised (any other exception propagates)."""
    try:
        return read_source(path, **options)
    except IngestError as exc:
        return exc


# --------------------------------------------------------------------------- expectations


def seen(value: Any, fmt: str) -> Any:
    """The cell value as the reader receives it."""
    if fmt == "csv":
        return csv_text(no_nul(value))
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > EXACT_FLOAT:
        return float(value)  # Excel number cells are doubles
    return value


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def trimmed(value: Any) -> str | None:
    return None if blank(value) else str(value).strip()


def exact_in_xlsx(value: Any) -> bool:
    """Whether an .xlsx number cell brings ``value`` back exactly.

    openpyxl writes floats with 16 significant digits, and calamine parses integers beyond
    2**53 through a double (not always to the nearest one): only these survive unchanged.
    """
    if isinstance(value, float):
        return float(f"{value:.16g}") == value and abs(value) < 1e300
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= EXACT_FLOAT
    return True


def as_list(series: pd.Series) -> list[Any]:
    return [None if v is None or v is pd.NA else v for v in series.tolist()]


def check_load(load: RawLoad, sheet: Sheet, fmt: str) -> None:
    """The frame holds one row per (non-blank source row, narrative type) with the right cells."""
    assert load.layout == sheet.layout
    kept = [
        (number, row)
        for number, row in enumerate(sheet.rows, start=sheet.lead + 2)
        if not all(blank(seen(v, fmt)) for v in row)
    ]
    assert load.rows_read == len(kept)
    frame = load.frame
    per_row = 1 if sheet.layout == "long" else 2
    assert len(frame) == per_row * len(kept)
    assert as_list(frame["source_row"]) == [number for number, _ in kept for _ in range(per_row)]

    if sheet.layout == "long":
        id_cells = [row[sheet.column("incident_id")] for _, row in kept]
        text_cells = [row[sheet.column("narrative_text")] for _, row in kept]
    else:
        id_cells = [row[sheet.column("IncidentID")] for _, row in kept for _ in range(2)]
        text_cells = [row[sheet.column(c)] for _, row in kept for c in ("NarrativeCME", "NarrativeLE")]
        assert as_list(frame["narrative_type"]) == ["cme", "le"] * len(kept)
    assert as_list(frame["narrative_text"]) == [trimmed(seen(v, fmt)) for v in text_cells]
    for got, cell in zip(as_list(frame["incident_id"]), id_cells, strict=True):
        assert got is None or (isinstance(got, str) and got == got.strip() and got)
        if fmt == "csv" or exact_in_xlsx(cell):
            assert got == normalise_incident_id(seen(cell, fmt)), cell

    label_pairs = (
        [("manual_flag_ind", "manual_flag_ind"), ("manual_flag", "manual_flag")]
        if sheet.layout == "long"
        else [("manual_flag_ind", "ipv_manualCME"), ("manual_flag", "ipv_manual")]
    )
    step = 1 if sheet.layout == "long" else 2  # the CME row of each wide pair
    for frame_column, sheet_column in label_pairs:
        got = as_list(frame[frame_column])[::step]
        if sheet_column in sheet.columns:
            cells = [row[sheet.column(sheet_column)] for _, row in kept]
            if fmt == "csv" or all(exact_in_xlsx(c) for c in cells):
                assert got == [parse_label(seen(c, fmt))[0] for c in cells]
        else:
            assert got == [None] * len(kept)


def check_clean(result: CleanResult, load: RawLoad) -> None:
    """Every row is accounted for and no narrative text leaks into rejected/conflicts."""
    stats, frame = result.stats, load.frame
    # Visible with --hypothesis-show-statistics: the generators do reach every outcome.
    for outcome in ("rejected", "duplicates_removed", "conflicts", "empty_dropped", "placeholders"):
        event(f"{outcome} > 0: {stats[outcome] > 0}")
    assert stats["rows_read"] == load.rows_read
    assert stats["input_rows"] == len(frame)
    assert stats["input_rows"] == (
        stats["narratives"]
        + stats["empty_dropped"]
        + stats["rejected"]
        + stats["duplicates_removed"]
        + stats["conflicts"]
    )
    assert stats["narratives"] == len(result.narratives) == stats["cme"] + stats["le"]
    assert stats["rejected"] == len(result.rejected)
    assert stats["empty_dropped"] == int(frame["narrative_text"].isna().sum())
    assert not result.narratives.duplicated(["incident_id", "narrative_type"]).any()
    assert set(result.narratives["narrative_type"]) <= {"cme", "le"}
    assert result.narratives["incident_id"].notna().all()
    assert list(result.rejected.columns) == list(REJECTED_COLUMNS)
    assert "narrative_text" not in result.conflicts.columns
    texts = set(frame["narrative_text"].dropna())
    assert set(result.narratives["narrative_text"]) <= texts
    hashes = [text_hash(t) for t in result.narratives["narrative_text"]]
    assert as_list(result.narratives["text_hash"]) == hashes
    long_texts = [t for t in texts if len(t) > MAX_ECHO]
    for table in (result.rejected, result.conflicts):
        for cell in table.astype(str).to_numpy().ravel():
            for text in long_texts:
                assert text not in cell, "narrative text copied into rejected/conflicts"


# --------------------------------------------------------------------------- 1 + 2: any cells


@FILES
@given(sheet=any_sheet, fmt=st.sampled_from(["csv", "xlsx"]))
def test_any_cells_in_a_well_formed_sheet_load_and_clean(sheet: Sheet, fmt: str) -> None:
    with sheet_file(sheet, fmt) as path:
        load = load_or_error(path)
        digest = hashlib.md5(path.read_bytes()).hexdigest()
    # The header is valid and the file well formed: refusing it would be a bug.
    assert isinstance(load, RawLoad), f"well-formed {fmt} refused: {load}"
    assert load.checksum == digest
    # Text cells only (the writer stores "=..." as text): nothing is a formula without a value.
    assert load.frame["text_error"].isna().all()
    check_load(load, sheet, fmt)
    check_clean(clean_narratives(load), load)
    assert clean_narratives(load, rows_read=7).stats["rows_read"] == 7


@FILES
@given(sheet=any_sheet, dialect=csv_dialects)
def test_csv_dialects_agree(sheet: Sheet, dialect: tuple[str, int]) -> None:
    lineterminator, quoting = dialect
    with sheet_file(sheet, "csv", lineterminator=lineterminator, quoting=quoting) as path:
        load = load_or_error(path)
    assert isinstance(load, RawLoad), f"well-formed CSV refused: {load}"
    check_load(load, sheet, "csv")


header_cells = st.one_of(
    st.sampled_from(WIDE_BASE + WIDE_LABELS + LONG_BASE + ["ipv_manual", "manual_flag_ind", "INCIDENTID"]),
    st.text(max_size=60),
    long_texts,
    st.none(),
)
any_cell = st.one_of(narrative_texts, incident_ids, label_values)
ragged_rows = st.lists(st.lists(any_cell, max_size=8), max_size=5)


@FILES
@given(header=st.lists(header_cells, max_size=8), rows=ragged_rows, fmt=st.sampled_from(["csv", "xlsx"]))
def test_arbitrary_header_and_ragged_rows_load_or_raise_ingest_error(
    header: list[Any], rows: list[list[Any]], fmt: str
) -> None:
    sheet = Sheet("?", [], header, rows)
    with sheet_file(sheet, fmt) as path:
        load = load_or_error(path)
    if isinstance(load, IngestError):
        message = str(load)
        for cell in [*header, *(v for row in rows for v in row)]:
            text = trimmed(seen(cell, fmt)) if isinstance(cell, str) else None
            if text is not None and len(text) > MAX_ECHO:
                assert text[: MAX_ECHO + 1] not in message, "cell text echoed in an IngestError"
    else:
        check_clean(clean_narratives(load), load)


csv_tokens = st.one_of(
    st.sampled_from([",", '"', '""', "\n", "\r\n", "\r", " ", "\t", ";", "\ufeff", "\x1a", "\\"]),
    st.sampled_from(["IncidentID", "NarrativeCME", "NarrativeLE", "ipv_manualCME", "ipv_manualLE"]),
    st.sampled_from(["incident_id", "narrative_type", "narrative_text", "manual_flag_ind"]),
    st.text(max_size=8),
)
csv_headers = st.sampled_from(
    ["IncidentID,NarrativeCME,NarrativeLE\n", "incident_id,narrative_type,narrative_text\n", ""]
)


@FILES
@given(
    head=csv_headers,
    body=st.one_of(st.lists(csv_tokens, max_size=60).map("".join).map(str.encode), st.binary(max_size=300)),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "cp1252"]),
)
@example(head="IncidentID,NarrativeCME,NarrativeLE\n", body=b'1,"unterminated\n2,x,y\n', encoding="utf-8")
@example(head="", body=b"\xff\xfeI\x00D\x00", encoding="utf-8")  # UTF-16 (Excel "Unicode text")
def test_arbitrary_csv_bytes_load_or_raise_ingest_error(head: str, body: bytes, encoding: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.csv"
        path.write_bytes(head.encode(encoding, errors="replace") + body)
        load = load_or_error(path)
    if isinstance(load, RawLoad):
        check_clean(clean_narratives(load), load)
    else:
        assert str(path.name) in str(load)  # the message names the file


# --------------------------------------------------------------------------- 3: incident IDs


@PURE
@given(n=st.integers(min_value=-(10**30), max_value=10**30), pad=st.sampled_from(["", " ", "\t", "\u00a0"]))
@example(n=727037, pad="")
def test_integer_and_float_spellings_of_an_id_agree(n: int, pad: str) -> None:
    expected = str(n)
    assert normalise_incident_id(n) == expected
    assert normalise_incident_id(f"{pad}{n}{pad}") == expected
    assert normalise_incident_id(f"{pad}{n}.0{pad}") == expected
    assert normalise_incident_id(f"{n}.000") == expected
    if abs(n) <= EXACT_FLOAT:
        assert normalise_incident_id(float(n)) == expected
        assert normalise_incident_id(f"{Decimal(n):E}") == expected  # 7.27037E+5
        assert normalise_incident_id(repr(float(n))) == expected  # 7.27037e+20 style


@PURE
@given(n=st.integers(min_value=10**30, max_value=10**60) | st.integers(min_value=-(10**60), max_value=-(10**30)))
@example(n=10**31)
def test_integer_and_float_spellings_agree_beyond_30_digits(n: int) -> None:
    assert normalise_incident_id(f"{n}.0") == normalise_incident_id(n)


@PURE
@given(digits=st.text(st.characters(categories=["Nd"]), min_size=1, max_size=8))
@example(digits="\u0661\u0662\u0663")  # Arabic-Indic 123
def test_non_ascii_digit_ids_are_not_rewritten(digits: str) -> None:
    # "١٢٣" is kept as typed, so "١٢٣.0" must not become the different ID "123" either.
    assert normalise_incident_id(digits) == digits
    assert normalise_incident_id(f"{digits}.0") in {digits, f"{digits}.0"}


id_values = st.one_of(
    incident_ids,
    st.text(),
    st.floats(),  # NaN and infinities too
    st.decimals(allow_nan=False).map(str),
    st.booleans(),
)


@PURE
@given(value=id_values)
def test_normalise_incident_id_is_idempotent_trimmed_text(value: Any) -> None:
    once = normalise_incident_id(value)
    assert once is None or (isinstance(once, str) and once and once == once.strip())
    assert normalise_incident_id(once) == once
    if isinstance(value, str):
        assert normalise_incident_id(f" \t{value}\n ") == once
        assert (once is None) == (not value.strip())


# --------------------------------------------------------------------------- 4: labels

LABEL_TABLE = (
    [(s, 1) for s in sorted(LABEL_POSITIVE)]
    + [(s, 0) for s in sorted(LABEL_NEGATIVE)]
    + [(s, None) for s in sorted(LABEL_NULL)]
)


@pytest.mark.parametrize(("spelling", "label"), LABEL_TABLE)
@pytest.mark.parametrize("variant", [str, str.upper, str.title, lambda s: f"  {s}\t", lambda s: s.replace(" ", "  ")])
def test_documented_label_spellings(spelling: str, label: int | None, variant: Any) -> None:
    assert parse_label(variant(spelling)) == (label, True)


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (1, 1),
        (0, 0),
        (1.0, 1),
        (0.0, 0),
        (True, 1),
        (False, 0),
        (None, None),
        ("1.000", 1),
        ("1e0", 1),
        ("+1", 1),
        ("01", 1),
        ("-0", 0),
        ("0e5", 0),
        (float("nan"), None),
    ],
)
def test_numeric_and_native_labels(value: Any, label: int | None) -> None:
    assert parse_label(value) == (label, True)


@PURE
@given(value=label_values | st.text() | st.floats() | st.integers())
def test_parse_label_is_total(value: Any) -> None:
    label, ok = parse_label(value)
    assert label in (0, 1, None)
    assert ok or label is None
    assert parse_label(value) == (label, ok)
    if isinstance(value, str) and ok:
        assert parse_label(value.upper()) == (label, ok)


# IDs and floats that an Excel number cell holds exactly, so both files carry the same value.
round_trip_ids = st.one_of(
    st.integers(-EXACT_FLOAT, EXACT_FLOAT),
    st.integers(-(10**12), 10**12).map(float),
    st.integers(-(10**9), 10**9).map(lambda n: n / 100),
    st.sampled_from([727037.0, 7.27037e5, "727037.0", "7.27037E5", "00123", " A-17 "]),
    st.text(max_size=20),
    st.none(),
)
round_trip_labels = st.one_of(
    st.none(),
    documented_label_texts,
    st.sampled_from([0, 1, 0.0, 1.0, True, False, 2, 0.5, -1]),
    st.text(max_size=45),
)
round_trip_texts = st.one_of(st.none(), st.sampled_from(SPECIAL_TEXTS), st.text(max_size=80), long_texts)
KEY_COLUMNS = [
    "incident_id",
    "narrative_type",
    "narrative_text",
    "manual_flag_ind",
    "manual_flag",
    "label_error",
    "attributes",
    "source_row",
]


@FILES
@given(
    sheet=st.sampled_from(LAYOUTS).flatmap(
        lambda layout: sheets(layout, ids=round_trip_ids, texts=round_trip_texts, labels=round_trip_labels)
    )
)
def test_csv_and_xlsx_of_the_same_rows_give_the_same_frame(sheet: Sheet) -> None:
    sheet.rows = [[no_nul(v) for v in row] for row in sheet.rows]  # NUL: see the NUL tests
    with sheet_file(sheet, "csv") as path:
        from_csv = read_source(path)
    with sheet_file(sheet, "xlsx") as path:
        from_xlsx = read_source(path)
    check_load(from_csv, sheet, "csv")
    check_load(from_xlsx, sheet, "xlsx")
    assert from_csv.rows_read == from_xlsx.rows_read
    pd.testing.assert_frame_equal(from_csv.frame[KEY_COLUMNS], from_xlsx.frame[KEY_COLUMNS])
    clean_csv, clean_xlsx = clean_narratives(from_csv), clean_narratives(from_xlsx)
    columns = [
        "incident_id",
        "narrative_type",
        "narrative_text",
        "text_hash",
        "manual_flag_ind",
        "is_placeholder",
    ]
    pd.testing.assert_frame_equal(clean_csv.narratives[columns], clean_xlsx.narratives[columns])
    assert clean_csv.stats == clean_xlsx.stats


# --------------------------------------------------------------------------- 5: text preserved


def _text_sheet(cme: str, le: str) -> Sheet:
    return Sheet("unlabelled", list(WIDE_BASE), list(WIDE_BASE), [["1", cme, le], ["2", le, cme]])


def check_text_preserved(load: RawLoad, cme: str, le: str) -> None:
    expected = [trimmed(cme), trimmed(le), trimmed(le), trimmed(cme)]
    assert as_list(load.frame["narrative_text"]) == expected
    kept = clean_narratives(load).narratives
    assert as_list(kept["narrative_text"]) == [t for t in expected if t is not None]


any_text = st.one_of(st.text(), st.sampled_from(SPECIAL_TEXTS), st.text(st.characters(max_codepoint=0x9F)), long_texts)


@FILES
@given(cme=any_text.map(no_nul), le=any_text.map(no_nul), dialect=csv_dialects)
@example(cme="a\rb\r\nc\n", le="\x1a\x0b\x0c\x7f\r", dialect=("\r\n", csv.QUOTE_MINIMAL))
def test_csv_preserves_text(cme: str, le: str, dialect: tuple[str, int]) -> None:
    lineterminator, quoting = dialect
    with sheet_file(_text_sheet(cme, le), "csv", lineterminator=lineterminator, quoting=quoting) as path:
        check_text_preserved(read_source(path), cme, le)


@pytest.mark.parametrize("engine", ["calamine", "openpyxl"])
@FILES
@given(cme=any_text.filter(xlsx_storable), le=any_text.filter(xlsx_storable))
def test_xlsx_preserves_text_openpyxl_can_store(engine: str, cme: str, le: str) -> None:
    with sheet_file(_text_sheet(cme, le), "xlsx", escape=False) as path:
        check_text_preserved(read_source(path, engine=engine), cme, le)


@pytest.mark.parametrize("engine", ["calamine", "openpyxl"])
@FILES
@given(cme=any_text, le=any_text)
@example(cme="first line\r\nsecond line", le="tab\there _x0041_ is literal")
def test_xlsx_preserves_any_text_stored_the_excel_way(engine: str, cme: str, le: str) -> None:
    # Excel stores control characters (CR from pasted Windows text, NUL...) as _xHHHH_ escapes.
    with sheet_file(_text_sheet(cme, le), "xlsx", escape=True) as path:
        check_text_preserved(read_source(path, engine=engine), cme, le)


cp1252_texts = st.text(st.characters(codec="cp1252", exclude_characters="\x00"), max_size=60)


@FILES
@given(cme=cp1252_texts, le=cp1252_texts)
def test_cp1252_csv_preserves_text(cme: str, le: str) -> None:
    # "é " is not valid UTF-8 once encoded as cp1252, so the reader must fall back to cp1252.
    cme = f"é {cme}"
    with sheet_file(_text_sheet(cme, le), "csv", encoding="cp1252") as path:
        load = read_source(path)
    assert load.encoding == "cp1252"
    check_text_preserved(load, cme, le)


# NUL: a CSV holding NUL bytes is not a text file (or is UTF-16). The right behaviour is to
# refuse it with an IngestError wherever the NUL is; silently cutting the text at the NUL
# would change a narrative (and its hash) without anyone noticing.
@pytest.mark.parametrize("filler_rows", [0, 1, 40])
@pytest.mark.parametrize("text", ["before\x00after", "\x00", "trailing\x00"])
def test_csv_with_nul_is_refused_wherever_the_nul_is(tmp_path: Path, filler_rows: int, text: str) -> None:
    rows = [list(WIDE_BASE)] + [[str(i), "x" * 2000, "y"] for i in range(filler_rows)] + [["999", text, "le"]]
    path = write_csv(tmp_path / "nul.csv", rows)
    assert (b"\x00" in path.read_bytes()[:65536]) == (filler_rows < 40)
    with pytest.raises(IngestError, match="NUL"):
        read_source(path)


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        ",,\r\n",
        "\r\n",
        "\r\n\r\n",
        "   \r\n",
    ],
)
def test_csv_blank_lines_above_the_header_are_skipped_like_in_xlsx(tmp_path: Path, prefix: str) -> None:
    lines = prefix.count("\n")
    body = [list(WIDE_BASE), ["1", "cme text", "le text"]]
    csv_path = tmp_path / "lead.csv"
    csv_path.write_bytes(prefix.encode() + write_csv(tmp_path / "body.csv", body).read_bytes())
    xlsx_path = write_xlsx(tmp_path / "lead.xlsx", [[None] * 3] * lines + body)
    for path in (csv_path, xlsx_path):
        load = read_source(path)
        assert as_list(load.frame["narrative_text"]) == ["cme text", "le text"]
        assert as_list(load.frame["source_row"]) == [lines + 2] * 2


def test_xlsx_nul_escape_is_kept_as_a_character(tmp_path: Path) -> None:
    # Excel writes NUL as _x0000_; calamine decodes it and ingest keeps it (DuckDB stores it).
    path = write_xlsx(tmp_path / "nul.xlsx", [list(WIDE_BASE), ["1", "before\x00after", "le"]])
    assert read_source(path, engine="calamine").frame["narrative_text"].tolist() == ["before\x00after", "le"]


# --------------------------------------------------------------------------- 6: text_hash


@FILES
@given(text=any_text)
def test_text_hash_is_deterministic(text: str) -> None:
    digest = text_hash(text)
    assert digest == text_hash(str(text))
    assert digest == hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    assert re.fullmatch(r"[0-9a-f]{16}", digest)


@PURE
@given(texts=st.lists(st.text(), min_size=2, max_size=50, unique=True))
@example(texts=["e\u0301", "\u00e9"])  # canonically equivalent, different code points
@example(texts=["a", "a ", " a"])
def test_text_hash_differs_for_different_texts(texts: list[str]) -> None:
    assert len({text_hash(t) for t in texts}) == len(texts)


def test_attributes_survive_as_json(tmp_path: Path) -> None:
    # Not a property, but the attribute JSON is where stray narrative-like text would land.
    path = write_csv(
        tmp_path / "a.csv",
        [["IncidentID", "NarrativeCME", "NarrativeLE", "SiteID", ""], ["7.0", "t", "", "12.0", "x\u200f"]],
    )
    attributes = [json.loads(a) for a in read_source(path).frame["attributes"]]
    assert attributes == [{"SiteID": "12", "column_E": "x\u200f"}] * 2


# --------------------------------------------------------------------------- 8: what an ingest changes

corpus_versions = st.dictionaries(
    st.tuples(st.sampled_from("123456"), st.sampled_from(["cme", "le"])),
    st.tuples(st.sampled_from(["h1", "h2"]), st.sampled_from([0, 1, None]), st.sampled_from([0, 1, None])),
    max_size=12,
)


def versions_frame(versions: dict[tuple[str, str], tuple[str, int | None, int | None]]) -> pd.DataFrame:
    rows = [(i, t, h, ind, inc, "b00000") for (i, t), (h, ind, inc) in versions.items()]
    frame = pd.DataFrame(
        rows, columns=["incident_id", "narrative_type", "text_hash", "manual_flag_ind", "manual_flag", "batch_id"]
    )
    return frame.astype({"incident_id": object, "manual_flag_ind": "Int64", "manual_flag": "Int64"})


@PURE
@given(stored=corpus_versions, new=corpus_versions)
def test_compare_narratives_accounts_for_every_narrative(
    stored: dict[tuple[str, str], tuple[str, int | None, int | None]],
    new: dict[tuple[str, str], tuple[str, int | None, int | None]],
) -> None:
    changes = compare_narratives(versions_frame(stored), versions_frame(new))
    counts = changes.counts
    assert counts["added"] + counts["changed"] + counts["labels_changed"] + counts["unchanged"] == len(new)
    assert counts["removed"] + len(new) - counts["added"] == len(stored)
    assert counts["added"] == len(new.keys() - stored.keys())
    assert set(zip(changes.removed["incident_id"], changes.removed["narrative_type"], strict=True)) == (
        stored.keys() - new.keys()
    )
    assert counts["unchanged"] == sum(new[k] == stored[k] for k in new.keys() & stored.keys())
    assert changes.mass_removal == (2 * len(stored.keys() - new.keys()) > len(stored))
    if stored == new:
        assert counts["unchanged"] == len(new) and counts["removed"] == counts["added"] == 0
