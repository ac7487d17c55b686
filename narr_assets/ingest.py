"""Read narrative spreadsheets (.xlsx / .csv) into one long table, with provenance.

Three input layouts are recognised by their column names (case-insensitive, trimmed):

* **labelled**: ``IncidentID, NarrativeCME, NarrativeLE, ipv_manualCME, ipv_manualLE``
  (+ optional ``ipv_manual``, the incident-level label);
* **unlabelled**: ``IncidentID, NarrativeCME, NarrativeLE``;
* **long**: ``incident_id, narrative_type, narrative_text`` (+ optional ``manual_flag_ind``,
  ``manual_flag``).

The labelled layout is tested *before* the unlabelled one: the unlabelled column set is a
subset of the labelled one, and the previous system, which tested them the other way round,
silently dropped every manual label. A sheet with only some of the label columns is an error
rather than a downgrade to "unlabelled".

Every cell is read as text so incident IDs and labels are never mangled; Excel numbers that
arrive as floats (``727037.0``) are turned back into the integers the user typed.

Label values are mapped with this table (case-insensitive, after trimming):

============  ==============================================================================
value         accepted spellings
============  ==============================================================================
1             ``1``, ``1.0`` (any number equal to 1), ``true``, ``t``, ``yes``, ``y``,
              ``positive``, ``pos``, ``ipv``
0             ``0``, ``0.0`` (any number equal to 0), ``false``, ``f``, ``no``, ``n``,
              ``negative``, ``neg``, ``no ipv``, ``not ipv``, ``non-ipv``, ``non ipv``
null          blank, ``na``, ``n/a``, ``nan``, ``null`` (R and pandas write missing values
              as ``NA`` / ``nan``)
============  ==============================================================================

Anything else (``maybe``, ``2``, ``#N/A``, ``unknown``...) becomes null with ``label_error`` set,
so the row can be routed to the rejected rows instead of silently counting as unlabelled.

A narrative cell that holds a formula without a saved value (a workbook written by a program
that does not compute formulas, such as openpyxl) reads as empty; it is not taken for an empty
narrative: its row gets ``text_error``, so cleaning routes it to the rejected rows with what to do.

The file is read once: the checksum is the MD5 of the very bytes that were parsed, so a file
replaced while it is read can never pair its new checksum with its old rows.

Row numbers (``source_row``) are the numbers a person sees when opening the file in Excel: the
header is row 1 and the first data row is row 2 (for a CSV, a record spanning several lines
because of a quoted newline still counts as one row). Fully blank rows are skipped and are not
counted in ``rows_read``, but they still advance the row numbers.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pandas as pd

__all__ = [
    "FRAME_COLUMNS",
    "LABEL_NEGATIVE",
    "LABEL_NULL",
    "LABEL_POSITIVE",
    "IngestError",
    "RawLoad",
    "file_checksum",
    "normalise_incident_id",
    "parse_label",
    "read_source",
]

FRAME_COLUMNS: tuple[str, ...] = (
    "incident_id",
    "narrative_type",
    "narrative_text",
    "manual_flag_ind",
    "manual_flag",
    "label_error",
    "text_error",
    "attributes",
    "source_path",
    "source_sheet",
    "source_row",
    "data_checksum",
    "loaded_at",
)

LABEL_POSITIVE: frozenset[str] = frozenset({"1", "true", "t", "yes", "y", "positive", "pos", "ipv"})
LABEL_NEGATIVE: frozenset[str] = frozenset(
    {"0", "false", "f", "no", "n", "negative", "neg", "no ipv", "not ipv", "non-ipv", "non ipv"}
)
LABEL_NULL: frozenset[str] = frozenset({"", "na", "n/a", "nan", "null"})

XLSX_SUFFIXES = (".xlsx", ".xlsm")
CSV_SUFFIXES = (".csv",)

# Canonical column names per layout, spelled as users see them in their spreadsheets.
_WIDE_REQUIRED = ("IncidentID", "NarrativeCME", "NarrativeLE")
_WIDE_LABELS = ("ipv_manualCME", "ipv_manualLE")
_WIDE_INCIDENT_LABEL = "ipv_manual"
_LONG_REQUIRED = ("incident_id", "narrative_type", "narrative_text")
_LONG_OPTIONAL = ("manual_flag_ind", "manual_flag")

_NARRATIVE_TYPE_ALIASES = {
    "cme": "cme",
    "narrativecme": "cme",
    "narrative_cme": "cme",
    "le": "le",
    "narrativele": "le",
    "narrative_le": "le",
}

# [0-9], not \d: \d also matches Arabic-Indic, fullwidth... digits, which Decimal() accepts, so
# "١٢٣.0" would silently become the different ID "123".
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE](?P<exponent>[+-]?[0-9]+))?")
# Largest written exponent expanded into integer digits ("7.27037E5" -> "727037").
_MAX_EXPONENT = 30
# The csv module refuses fields longer than 131,072 characters by default.
_CSV_FIELD_LIMIT = 2**31 - 1
# A formula element in a worksheet's XML (``<f>``, ``<f t="shared" .../>``, ``<x:f>``), not
# ``<formula>`` or ``<filterColumn>``: the cheap test that keeps the openpyxl pass off normal files.
_FORMULA_TAG_RE = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?f[\s>/]")
_FORMULA_SCAN_CHUNK = 1 << 22
# Longest header / label value echoed in an error message; anything longer is probably
# narrative text in the wrong place and must not be copied into logs.
_MAX_ECHO = 40

Engine = Literal["auto", "calamine", "openpyxl"]
# Rows of cells as a reader returns them, sheet row 1 first (read-only: readers differ in
# their row and list types).
_Rows: TypeAlias = Sequence[Sequence[Any]]


class IngestError(ValueError):
    """An input file cannot be read; the message names the file and what was expected."""


@dataclass
class RawLoad:
    """One source sheet read into the long form.

    Attributes:
        frame: One row per (source row, narrative type), columns ``FRAME_COLUMNS``.
        layout: ``"labelled"``, ``"unlabelled"`` or ``"long"``.
        rows_read: Non-blank data rows in the sheet (header excluded).
        checksum: md5 hex digest of the bytes that were parsed.
        source_path: Absolute path of the file.
        sheet: Sheet name for workbooks, ``None`` for CSV.
        attribute_columns: Extra columns kept as JSON in ``frame["attributes"]``.
        encoding: Text encoding used for a CSV (``None`` for workbooks).
        reader: Which reader produced the rows (``calamine``, ``openpyxl`` or ``csv``).
    """

    frame: pd.DataFrame
    layout: str
    rows_read: int
    checksum: str
    source_path: str
    sheet: str | None
    attribute_columns: list[str] = field(default_factory=list)
    encoding: str | None = None
    reader: str = ""


def file_checksum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the md5 hex digest of a file, read in chunks.

    Args:
        path: File to hash.
        chunk_size: Bytes read at a time (keeps memory flat on large workbooks).

    Returns:
        32-character lowercase hex digest.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_incident_id(value: Any) -> str | None:
    """Normalise an incident ID (or any integer-like cell) to the text the user typed.

    ``" 727037.0 "`` and ``"7.27037E5"`` become ``"727037"``; non-integral or non-numeric
    values are only trimmed (``"00123"`` keeps its leading zeros); blank becomes ``None``.

    Args:
        value: Cell value (text, number or ``None``).

    Returns:
        The normalised text, or ``None`` for a blank cell.
    """
    text = _cell_text(value)
    if text is None:
        return None
    return _integral_text(text)


def parse_label(value: Any) -> tuple[int | None, bool]:
    """Map one label cell to 0/1/None using the module's label table.

    Args:
        value: Cell value (text, number, bool or ``None``).

    Returns:
        ``(label, ok)``: ``ok`` is ``False`` when the value is not in the table, in which case
        ``label`` is ``None``.
    """
    text = _cell_text(value)
    key = "" if text is None else " ".join(text.lower().split())
    if key in LABEL_NULL:
        return None, True
    if key in LABEL_POSITIVE:
        return 1, True
    if key in LABEL_NEGATIVE:
        return 0, True
    if _NUMBER_RE.fullmatch(key):
        number = Decimal(key)
        if number == 1:
            return 1, True
        if number == 0:
            return 0, True
    return None, False


def read_source(
    path: str | Path,
    sheet: str | None = None,
    loaded_at: dt.datetime | None = None,
    *,
    engine: Engine = "auto",
) -> RawLoad:
    """Read an .xlsx/.xlsm workbook or a .csv file into the long narrative form.

    Args:
        path: The input file.
        sheet: Worksheet name (workbooks only); ``None`` reads the first worksheet.
        loaded_at: Load timestamp stored on every row (naive values are taken as UTC);
            defaults to now.
        engine: Workbook reader. ``"auto"`` uses python-calamine when installed (about five
            times faster) and openpyxl otherwise.

    Returns:
        The long-form rows with layout, counts and provenance.

    Raises:
        IngestError: The file is missing, unreadable, of an unsupported type, has no header,
            or does not match any layout. The message names the file (and sheet, row and
            column where relevant).
    """
    source = Path(path).expanduser().resolve()
    data = _read_bytes(source, sheet)
    sheet_name, rows, reader, encoding = _parse_rows(source, data, sheet, engine)
    where = f"{source} (sheet '{sheet_name}')" if sheet_name else str(source)

    header_index, header = _find_header(rows, where, "sheet" if sheet_name else "file")
    data_rows, row_numbers = _data_rows(rows, header, header_index)
    layout, columns = _detect_layout(header, where)

    # The hash of the bytes parsed above, not of the path: the file may have been replaced since.
    checksum = hashlib.md5(data, usedforsecurity=False).hexdigest()
    stamp = _utc_timestamp(loaded_at)
    build = _build_long if layout == "long" else _build_wide
    frame, attribute_names = build(header, columns, data_rows, row_numbers)
    frame["text_error"] = None
    if sheet_name is not None:
        _flag_formulas_without_values(frame, data, where, sheet_name, header, columns)
    frame["source_path"] = str(source)
    frame["source_sheet"] = sheet_name
    frame["data_checksum"] = checksum
    frame["loaded_at"] = pd.Series([stamp] * len(frame), dtype="datetime64[ns, UTC]")
    frame = frame.loc[:, list(FRAME_COLUMNS)].reset_index(drop=True)
    return RawLoad(
        frame=frame,
        layout=layout,
        rows_read=len(data_rows),
        checksum=checksum,
        source_path=str(source),
        sheet=sheet_name,
        attribute_columns=attribute_names,
        encoding=encoding,
        reader=reader,
    )


def _read_bytes(source: Path, sheet: str | None) -> bytes:
    """The whole file, read once (what is parsed and what is hashed are the same bytes).

    Everything that can be refused without the content is refused before it is read.
    """
    if not source.exists():
        raise IngestError(f"{source}: file not found")
    if source.is_dir():
        raise IngestError(f"{source}: is a directory, expected an .xlsx or .csv file")
    suffix = source.suffix.lower()
    if suffix not in XLSX_SUFFIXES + CSV_SUFFIXES:
        raise IngestError(
            f"{source}: unsupported file type '{source.suffix or '(none)'}'; expected one of "
            f"{', '.join(XLSX_SUFFIXES + CSV_SUFFIXES)}"
        )
    if suffix in CSV_SUFFIXES and sheet is not None:
        raise IngestError(
            f"{source}: a sheet ('{sheet}') was given but a CSV file has no sheets; remove the sheet setting"
        )
    try:
        return source.read_bytes()
    except OSError as exc:
        raise IngestError(f"{source}: cannot read the file ({exc.strerror}); check that it is readable") from None


def _parse_rows(
    source: Path, data: bytes, sheet: str | None, engine: Engine
) -> tuple[str | None, _Rows, str, str | None]:
    """Return (sheet name or None for a CSV, rows from row 1, reader name, CSV encoding).

    The suffix was checked by `_read_bytes`: anything but a workbook is a CSV here.
    """
    if source.suffix.lower() in XLSX_SUFFIXES:
        sheet_name, rows, reader = _read_workbook(source, data, sheet, engine)
        return sheet_name, rows, reader, None
    rows, encoding = _read_csv_rows(source, data)
    return None, rows, "csv", encoding


# --------------------------------------------------------------------------- file readers


def _read_workbook(path: Path, data: bytes, sheet: str | None, engine: Engine) -> tuple[str, _Rows, str]:
    """Return (sheet name, rows from sheet row 1, reader name) for a workbook's bytes."""
    _check_zip_container(path, data)
    if engine == "auto":
        engine = "calamine" if _calamine_available() else "openpyxl"
    readers: dict[str, Callable[[Path, bytes, str | None], tuple[str, _Rows]]] = {
        "calamine": _read_calamine,
        "openpyxl": _read_openpyxl,
    }
    if engine not in readers:
        raise ValueError(f"unknown engine {engine!r}; expected 'auto', 'calamine' or 'openpyxl'")
    try:
        sheet_name, rows = readers[engine](path, data, sheet)
    except IngestError:
        raise
    # Third-party readers raise a zoo of exception types on malformed files (zip, XML, key
    # and value errors); all of them mean the same thing to the user: this file is damaged.
    except Exception as exc:
        # Only a short excerpt of the reader's message: some quote the XML they choked on.
        detail = str(exc)[:120]
        raise IngestError(
            f"{path}: cannot read the workbook, it is corrupt or not a valid .xlsx ({type(exc).__name__}: {detail})"
        ) from exc
    return sheet_name, rows, engine


def _calamine_available() -> bool:
    try:
        import python_calamine  # noqa: F401
    except ImportError:
        return False
    return True


def _check_zip_container(path: Path, data: bytes) -> None:
    """Fail early, with a helpful description, on files that are not zip-based workbooks."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        return
    head = data[:8]
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        found = "an OLE2 container (a legacy .xls or a password-protected workbook)"
    elif head.startswith(b"\x89PNG"):
        found = "a PNG image"
    elif head.startswith(b"%PDF"):
        found = "a PDF document"
    elif head.startswith(b"PK"):
        found = "a truncated or corrupt zip archive"
    elif not head:
        found = "an empty file"
    else:
        found = "bytes that are not a zip archive (corrupt, truncated or not a workbook)"
    raise IngestError(
        f"{path}: not a readable .xlsx workbook: expected a zip-based Office Open XML file, "
        f"found {found}; save the file as .xlsx (or export it as CSV)"
    )


def _read_calamine(path: Path, data: bytes, sheet: str | None) -> tuple[str, _Rows]:
    from python_calamine import CalamineWorkbook, SheetTypeEnum

    with CalamineWorkbook.from_filelike(io.BytesIO(data)) as workbook:
        worksheets = [m.name for m in workbook.sheets_metadata if m.typ == SheetTypeEnum.WorkSheet]
        name = _choose_sheet(path, sheet, worksheets)
        # skip_empty_area=False keeps leading blank rows/columns so list index = Excel row - 1.
        rows = workbook.get_sheet_by_name(name).to_python(skip_empty_area=False)
    return name, rows


def _read_openpyxl(path: Path, data: bytes, sheet: str | None) -> tuple[str, _Rows]:
    import openpyxl
    from openpyxl.utils.escape import unescape

    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        name = _choose_sheet(path, sheet, [ws.title for ws in workbook.worksheets])
        # Excel stores control characters as _xHHHH_ (and a literal "_x" as "_x005F_x");
        # calamine decodes them but openpyxl's reader does not.
        rows = [
            tuple(unescape(v) if isinstance(v, str) and "_x" in v else v for v in row)
            for row in workbook[name].iter_rows(values_only=True)
        ]
    finally:
        workbook.close()
    return name, rows


def _choose_sheet(path: Path, sheet: str | None, available: list[str]) -> str:
    if not available:
        raise IngestError(f"{path}: the workbook has no worksheets")
    if sheet is None:
        return available[0]
    if sheet not in available:
        listed = ", ".join(f"'{name}'" for name in available)
        raise IngestError(f"{path}: no sheet named '{sheet}'; available sheets: {listed}")
    return sheet


def _read_csv_rows(path: Path, data: bytes) -> tuple[_Rows, str]:
    """Return (rows including the header, encoding used) for a CSV file's bytes.

    A blank line comes back as an empty row, so it is skipped but still advances the row
    numbers, exactly like a blank row above or inside an .xlsx sheet.
    """
    # Anywhere in the file, not just near the start: a late NUL used to cut a cell short.
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise IngestError(
            f"{path}: not a text CSV file (contains a NUL byte on line {line}; binary data, or "
            "a UTF-16 'Unicode text' export? save it as CSV UTF-8)"
        )
    try:
        text, encoding = data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        # Files saved by Excel on Windows are often cp1252; undefined bytes are replaced
        # rather than crashing the load.
        text, encoding = data.decode("cp1252", errors="replace"), "cp1252"
    # A process-wide setting, only ever raised: a very long narrative is still one valid field.
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    # strict: an unclosed quote must not swallow the rest of the file into one cell, and a
    # stray character after a closing quote is refused rather than guessed at.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[Sequence[Any]] = []
    header_width: int | None = None
    start = 1  # physical line on which the next record starts
    try:
        for row in reader:
            if header_width is None:
                if any(cell.strip() for cell in row):
                    header_width = len(row)
            elif len(row) > header_width:
                raise IngestError(
                    f"{path}: malformed CSV, line {start}{_row_note(start, len(rows) + 1)}: "
                    f"the row has {len(row)} fields but the header has {header_width}"
                )
            rows.append(row)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise IngestError(f"{path}: malformed CSV, line {start}{_row_note(start, len(rows) + 1)}: {exc}") from exc
    return rows, encoding


def _row_note(line: int, row: int) -> str:
    """`` (row N)`` when quoted line breaks make the spreadsheet row differ from the line."""
    return "" if line == row else f" (row {row})"


# --------------------------------------------------------------------------- formulas without values


def _flag_formulas_without_values(
    frame: pd.DataFrame, data: bytes, where: str, sheet: str, header: list[str | None], columns: dict[str, int]
) -> None:
    """Set ``text_error`` where a narrative cell is a formula without a saved value.

    Such a cell reads as empty. Two cheap tests keep normal files on the fast path: a narrative
    cell must be empty and the workbook must hold a formula at all; only then is the sheet read
    a second time, with openpyxl, for its formulas.
    """
    empty = frame["narrative_text"].isna()
    if not empty.any() or not _has_formulas(data):
        return
    if "narrative_text" in columns:
        text_column = pd.Series(columns["narrative_text"], index=frame.index)
    else:
        text_column = frame["narrative_type"].map({"cme": columns["NarrativeCME"], "le": columns["NarrativeLE"]})
    cells = [(int(row), int(col)) for row, col in zip(frame["source_row"], text_column, strict=True)]
    found = _formula_cells(data, where, sheet, {cell for cell, blank in zip(cells, empty, strict=True) if blank})
    if not found:
        return
    hit = pd.Series([cell in found for cell in cells], index=frame.index) & empty
    frame.loc[hit, "text_error"] = [
        f"column {header[col] or _column_letter(col)} holds a formula without a saved value; open and save "
        "the file in Excel (or paste the cells as values) so the text is stored"
        for col in text_column[hit]
    ]


def _has_formulas(data: bytes) -> bool:
    """Whether any part of the workbook holds a formula element: a byte scan, no XML parse.

    Every XML part but the shared strings (where narrative text lives, always escaped): a sheet
    part need not be called ``sheetN.xml``, and a chart's formula only costs the slow path.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = info.filename.lower()
            if not name.endswith(".xml") or "sharedstrings" in name:
                continue
            with archive.open(info) as part:
                tail = b""
                while chunk := part.read(_FORMULA_SCAN_CHUNK):
                    # The tail of the previous chunk catches a tag cut in two.
                    if _FORMULA_TAG_RE.search(tail + chunk):
                        return True
                    tail = chunk[-64:]
    return False


def _formula_cells(data: bytes, where: str, sheet: str, candidates: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of the (Excel row, 0-based column) ``candidates`` hold a formula, read by openpyxl."""
    import openpyxl

    rows = [row for row, _ in candidates]
    cols = [col for _, col in candidates]
    found: set[tuple[int, int]] = set()
    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=False)
        try:
            cells = workbook[sheet].iter_rows(
                min_row=min(rows), max_row=max(rows), min_col=min(cols) + 1, max_col=max(cols) + 1
            )
            for row in cells:
                for cell in row:
                    # data_only=False: a formula cell has data type "f" whether or not a value was saved.
                    if getattr(cell, "data_type", None) == "f" and (cell.row, cell.column - 1) in candidates:
                        found.add((cell.row, cell.column - 1))
        finally:
            workbook.close()
    # Same zoo of reader exceptions as in `_read_workbook`.
    except Exception as exc:
        raise IngestError(
            f"{where}: cannot check the empty narrative cells for formulas "
            f"({type(exc).__name__}: {str(exc)[:120]}); save the file again in Excel"
        ) from exc
    return found


# --------------------------------------------------------------------------- cell handling


def _cell_text(value: Any) -> str | None:
    """Convert one cell to trimmed text; blank -> None. Integral floats lose their ``.0``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        return text or None
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):  # a missing value handed over by pandas
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0) and value.tzinfo is None:
            return value.date().isoformat()
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    text = str(value).strip()
    return text or None


def _integral_text(text: str) -> str:
    """``"727037.0"`` / ``"7.27037E5"`` -> ``"727037"``; other text is returned unchanged."""
    if "." not in text and "e" not in text and "E" not in text:
        return text
    match = _NUMBER_RE.fullmatch(text)
    if not match:
        return text
    # Only a written exponent is bounded: it keeps "1e999999" from building a million-digit
    # integer, while "<digits>.0" yields no more digits than the text has, however long.
    # Decimal, not int(): int() refuses strings of more than 4,300 digits.
    exponent = match.group("exponent")
    if exponent is not None and abs(Decimal(exponent)) > _MAX_EXPONENT:
        return text
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    integral = number.to_integral_value()
    if number != integral:
        return text
    # format "f" writes every digit exactly (no exponent); "-0.0" is the ID "0".
    return "0" if integral.is_zero() else format(integral, "f")


def _echo(text: str) -> str:
    """Quote a cell value for an error message, without copying long (narrative) text."""
    if len(text) > _MAX_ECHO:
        return f"<text of {len(text)} characters>"
    return f"'{text}'"


def _column_letter(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


# --------------------------------------------------------------------------- layout


def _find_header(rows: _Rows, where: str, kind: str) -> tuple[int, list[str | None]]:
    """Return (index, header cells) of the first non-blank row; ``kind`` is "sheet" or "file"."""
    for index, row in enumerate(rows):
        cells = [_cell_text(v) for v in row]
        if any(c is not None for c in cells):
            return index, cells
    raise IngestError(
        f"{where}: the {kind} is empty; expected a header row with columns such as "
        f"{', '.join(_WIDE_REQUIRED)} (or {', '.join(_LONG_REQUIRED)})"
    )


def _data_rows(rows: _Rows, header: list[str | None], header_index: int) -> tuple[list[list[str | None]], list[int]]:
    """Convert the rows below the header to text, dropping fully blank rows.

    Short rows are padded; the header is padded (in place) with unnamed cells when data rows
    are wider, so data under an unnamed column is not lost. Returns the rows and their
    1-based spreadsheet row numbers.
    """
    body = rows[header_index + 1 :]
    width = max([len(header), *(len(row) for row in body)])
    header.extend([None] * (width - len(header)))
    data: list[list[str | None]] = []
    numbers: list[int] = []
    for offset, row in enumerate(body):
        cells = [_cell_text(v) for v in row]
        if any(c is not None for c in cells):
            cells.extend([None] * (width - len(cells)))
            data.append(cells)
            numbers.append(header_index + offset + 2)
    return data, numbers


def _detect_layout(header: list[str | None], where: str) -> tuple[str, dict[str, int]]:
    """Pick the layout from the header; return it and the index of each canonical column."""
    layout_names = {
        n.lower() for n in (*_WIDE_REQUIRED, *_WIDE_LABELS, _WIDE_INCIDENT_LABEL, *_LONG_REQUIRED, *_LONG_OPTIONAL)
    }
    positions: dict[str, int] = {}
    for index, name in enumerate(header):
        if name is None:
            continue
        key = name.lower()
        if key in positions and key in layout_names:
            # Two candidate label or text columns: guessing one would silently drop the other.
            raise IngestError(
                f"{where}: column '{name}' appears twice (columns {_column_letter(positions[key])} "
                f"and {_column_letter(index)}); layout column names must be unique ignoring case"
            )
        positions.setdefault(key, index)

    def has(names: Sequence[str]) -> list[str]:
        return [n for n in names if n.lower() not in positions]

    wide_missing, long_missing = has(_WIDE_REQUIRED), has(_LONG_REQUIRED)
    if not wide_missing and not long_missing:
        raise IngestError(
            f"{where}: ambiguous layout, the header has both the wide columns "
            f"({', '.join(_WIDE_REQUIRED)}) and the long ones ({', '.join(_LONG_REQUIRED)})"
        )
    if not wide_missing:
        label_columns = (*_WIDE_LABELS, _WIDE_INCIDENT_LABEL)
        present = [n for n in label_columns if n.lower() in positions]
        missing_labels = has(_WIDE_LABELS)
        # Labelled before unlabelled: the old system's worst bug was the reverse order.
        if present and missing_labels:
            raise IngestError(
                f"{where}: incomplete label columns: found {', '.join(present)} but missing "
                f"{', '.join(missing_labels)}; a labelled sheet needs {', '.join(_WIDE_LABELS)} "
                f"(and optionally {_WIDE_INCIDENT_LABEL}), an unlabelled sheet none of them"
            )
        layout = "labelled" if present else "unlabelled"
        wanted = (*_WIDE_REQUIRED, *present)
    elif not long_missing:
        layout = "long"
        wanted = (*_LONG_REQUIRED, *[n for n in _LONG_OPTIONAL if n in positions])
    else:
        found = ", ".join(_echo(n) for n in header if n is not None) or "(none)"
        closest = "unlabelled" if len(wide_missing) <= len(long_missing) else "long"
        missing = wide_missing if closest == "unlabelled" else long_missing
        raise IngestError(
            f"{where}: the header does not match any known layout. Columns found: {found}. "
            f"Expected: labelled = {', '.join(_WIDE_REQUIRED + _WIDE_LABELS)} "
            f"[+ {_WIDE_INCIDENT_LABEL}]; unlabelled = {', '.join(_WIDE_REQUIRED)}; "
            f"long = {', '.join(_LONG_REQUIRED)} [+ {', '.join(_LONG_OPTIONAL)}]. "
            f"Closest layout '{closest}' is missing: {', '.join(missing)}"
        )
    return layout, {name: positions[name.lower()] for name in wanted}


def _attribute_columns(header: list[str | None], used: set[int], data: list[list[str | None]]) -> list[tuple[str, int]]:
    """Name the non-layout columns; unnamed columns are kept only when they hold data."""
    result: list[tuple[str, int]] = []
    taken: set[str] = set()
    for index, name in enumerate(header):
        if index in used:
            continue
        if name is None and not any(row[index] is not None for row in data):
            continue
        label = name if name is not None else f"column_{_column_letter(index)}"
        if label in taken:
            label = f"{label} ({_column_letter(index)})"
        taken.add(label)
        result.append((label, index))
    return result


def _attributes_json(attributes: list[tuple[str, int]], data: list[list[str | None]]) -> list[str]:
    if not attributes:
        return ["{}"] * len(data)
    names = [name for name, _ in attributes]
    indexes = [index for _, index in attributes]
    out = []
    for row in data:
        cells = [row[i] for i in indexes]
        values = [None if cell is None else _integral_text(cell) for cell in cells]
        out.append(json.dumps(dict(zip(names, values, strict=True)), ensure_ascii=False))
    return out


def _labels(values: list[str | None], column: str) -> tuple[pd.Series, list[str | None]]:
    """Parse a label column: (Int64 series, per-row error message or None)."""
    cache: dict[str | None, tuple[int | None, str | None]] = {}
    labels: list[int | None] = []
    errors: list[str | None] = []
    for value in values:
        if value not in cache:
            label, ok = parse_label(value)
            message = None if ok else f"unrecognised label {_echo(value or '')} in column {column}"
            cache[value] = (label, message)
        label, message = cache[value]
        labels.append(label)
        errors.append(message)
    return pd.Series(labels, dtype="Int64"), errors


def _join_errors(*columns: list[str | None]) -> list[str | None]:
    joined = []
    for messages in zip(*columns, strict=True):
        present = [m for m in messages if m]
        joined.append("; ".join(present) if present else None)
    return joined


def _column(data: list[list[str | None]], index: int) -> list[str | None]:
    return [row[index] for row in data]


def _build_wide(
    header: list[str | None],
    columns: dict[str, int],
    data: list[list[str | None]],
    row_numbers: list[int],
) -> tuple[pd.DataFrame, list[str]]:
    """One row per (source row, narrative type), CME before LE."""
    attributes = _attribute_columns(header, set(columns.values()), data)
    attrs_json = _attributes_json(attributes, data)
    ids = [None if v is None else _integral_text(v) for v in _column(data, columns["IncidentID"])]
    n = len(data)
    if _WIDE_INCIDENT_LABEL in columns:
        col = header[columns[_WIDE_INCIDENT_LABEL]] or _WIDE_INCIDENT_LABEL
        incident_label, incident_errors = _labels(_column(data, columns[_WIDE_INCIDENT_LABEL]), col)
    else:
        incident_label, incident_errors = pd.Series([None] * n, dtype="Int64"), [None] * n

    parts = []
    for ntype, text_col, label_col in (
        ("cme", "NarrativeCME", "ipv_manualCME"),
        ("le", "NarrativeLE", "ipv_manualLE"),
    ):
        if label_col in columns:
            label, errors = _labels(_column(data, columns[label_col]), header[columns[label_col]] or label_col)
        else:
            label, errors = pd.Series([None] * n, dtype="Int64"), [None] * n
        parts.append(
            pd.DataFrame(
                {
                    "incident_id": pd.Series(ids, dtype=object),
                    "narrative_type": ntype,
                    "narrative_text": pd.Series(_column(data, columns[text_col]), dtype=object),
                    "manual_flag_ind": label,
                    "manual_flag": incident_label,
                    "label_error": pd.Series(_join_errors(errors, incident_errors), dtype=object),
                    "attributes": pd.Series(attrs_json, dtype=object),
                    "source_row": pd.Series(row_numbers, dtype="int64"),
                    "_order": 0 if ntype == "cme" else 1,
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.sort_values(["source_row", "_order"], kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True), [name for name, _ in attributes]


def _build_long(
    header: list[str | None],
    columns: dict[str, int],
    data: list[list[str | None]],
    row_numbers: list[int],
) -> tuple[pd.DataFrame, list[str]]:
    """Long layout: one row per source row; narrative_type normalised where recognised."""
    attributes = _attribute_columns(header, set(columns.values()), data)
    n = len(data)
    ids = [None if v is None else _integral_text(v) for v in _column(data, columns["incident_id"])]
    types = [
        None if v is None else _NARRATIVE_TYPE_ALIASES.get(v.lower(), v)
        for v in _column(data, columns["narrative_type"])
    ]
    label_parts: dict[str, tuple[pd.Series, list[str | None]]] = {}
    for name in _LONG_OPTIONAL:
        if name in columns:
            label_parts[name] = _labels(_column(data, columns[name]), header[columns[name]] or name)
        else:
            label_parts[name] = (pd.Series([None] * n, dtype="Int64"), [None] * n)
    frame = pd.DataFrame(
        {
            "incident_id": pd.Series(ids, dtype=object),
            "narrative_type": pd.Series(types, dtype=object),
            "narrative_text": pd.Series(_column(data, columns["narrative_text"]), dtype=object),
            "manual_flag_ind": label_parts["manual_flag_ind"][0],
            "manual_flag": label_parts["manual_flag"][0],
            "label_error": pd.Series(
                _join_errors(label_parts["manual_flag_ind"][1], label_parts["manual_flag"][1]),
                dtype=object,
            ),
            "attributes": pd.Series(_attributes_json(attributes, data), dtype=object),
            "source_row": pd.Series(row_numbers, dtype="int64"),
        }
    )
    return frame, [name for name, _ in attributes]


def _utc_timestamp(loaded_at: dt.datetime | None) -> pd.Timestamp:
    if loaded_at is None:
        return pd.Timestamp.now(tz="UTC")
    stamp = pd.Timestamp(loaded_at)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
