"""Clean the long narrative table and assign narratives to stable batches.

Rules applied by :func:`clean_narratives`, in this order:

1. **Empty narratives** (blank or whitespace only) are dropped and counted in
   ``empty_dropped``; they are not errors (most incidents lack one of the two narratives).
   A cell that only *reads* as empty because it holds a formula without a saved value
   (``text_error`` from ingestion) is not dropped: it is rejected (rule 2).
2. **Rejected rows**: a non-empty narrative without an incident ID, without a narrative type,
   with a narrative type other than ``cme``/``le``, or with an unreadable label
   (``label_error`` from ingestion), and an unreadable narrative cell (``text_error``) go to
   ``rejected`` with a reason. Rejected rows never crash the load and never carry narrative
   text.
3. **Duplicates**, by key ``(incident_id, narrative_type)``. Rows are ordered by
   ``source_row`` (file order; rows of several concatenated files keep their frame order on
   ties) and the **first occurrence is kept**:

   * an *exact duplicate* (same key, same text, same ``manual_flag_ind`` and ``manual_flag``)
     is removed and counted in ``duplicates_removed``;
   * a *conflicting duplicate* (same key, different text or labels) is also resolved in favour
     of the first occurrence; every row of such a key (the kept one included, exact copies
     included) is listed in ``conflicts`` with ``kept`` and a reason, and the dropped
     versions are counted in ``conflicts``.

   So ``input_rows == narratives + empty_dropped + rejected + duplicates_removed + conflicts``.
4. **Placeholders** ("Need LE report.", "N/A"...) are *kept* with ``is_placeholder = True``:
   deciding not to send them to the model belongs to the classification step. A pattern
   matches when it covers the whole trimmed text, case-insensitively.

Incident labels: ``manual_flag`` is kept as given by the sheet. When a sheet only has
per-narrative labels it stays null here; evaluation derives the incident label (positive if
either narrative is) where it needs one, so this table never holds a derived value that could
be mistaken for a manual one.

``text_hash`` identifies the narrative text exactly as stored; the batch ledger is keyed by
``(incident_id, narrative_type)`` only, so an edited text keeps its batch and is recognised as
stale by its hash.

:func:`compare_narratives` says what an ingest changes against the stored narratives: how many
are added, changed (text), changed in their labels only, removed and unchanged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import pandas as pd

from narr_assets.ingest import RawLoad, normalise_incident_id
from narr_assets.vocabulary import NARRATIVE_TYPES

__all__ = [
    "BATCH_PREFIX",
    "CHANGE_COUNTS",
    "DEFAULT_PLACEHOLDER_PATTERNS",
    "NARRATIVE_COLUMNS",
    "CleanResult",
    "CorpusChanges",
    "assign_batches",
    "batch_key",
    "batch_number",
    "clean_narratives",
    "compare_narratives",
    "placeholder_mask",
    "text_hash",
]

_SOURCES = r"(?:le|cme|c/me|me|law\s+enforcement|coroner|medical\s+examiner|police|autopsy|toxicology)"
_DOCS = r"(?:reports?|narratives?|records?|info(?:rmation)?|data)"
_END = r"[\s.!]*"

DEFAULT_PLACEHOLDER_PATTERNS: tuple[str, ...] = (
    # "Need LE report.", "Needs CME and LE reports", "Still need law enforcement report."
    rf"(?:still\s+)?need(?:s|ed)?\s+(?:the\s+)?{_SOURCES}\b.{{0,30}}?{_DOCS}{_END}",
    # "Awaiting LE report", "Waiting for CME report."
    rf"(?:await(?:ing)?|waiting\s+(?:for|on))\s+.{{0,30}}?{_DOCS}{_END}",
    # "LE report pending.", "CME report not yet received", "Coroner report requested"
    rf"{_SOURCES}\s+{_DOCS}\s+(?:is\s+)?(?:pending|requested|not\s+(?:yet\s+)?(?:received|available|provided)){_END}",
    # "No narrative.", "No narrative available", "No LE report", "No information provided."
    rf"no\s+(?:{_SOURCES}\s+)?(?:{_DOCS}|narrative\s+text)"
    rf"(?:\s+(?:is\s+)?(?:available|provided|given|received|on\s+file|yet))?{_END}",
    # "Narrative not available.", "Report unavailable", "Narrative pending."
    rf"(?:narrative|report)\s+(?:is\s+)?(?:(?:not\s+|un)available|pending){_END}",
    # "See LE narrative.", "See CME report"
    rf"see\s+(?:the\s+)?{_SOURCES}\s+{_DOCS}{_END}",
    # "Pending.", "Pending LE report", "Pending investigation"
    rf"pending(?:\s+.{{0,30}})?{_END}",
    r"n\s*/?\s*a\.?",
    r"(?:none|unknown|tbd|to\s+be\s+determined|not\s+(?:available|applicable|provided))[.!]*",
    # Lone punctuation typed to fill a mandatory cell.
    r"[-.?*_/]+",
)

NARRATIVE_COLUMNS: tuple[str, ...] = (
    "incident_id",
    "narrative_type",
    "narrative_text",
    "manual_flag_ind",
    "manual_flag",
    "is_placeholder",
    "text_hash",
    "attributes",
    "source_path",
    "source_row",
    "data_checksum",
    "loaded_at",
)
CONFLICT_COLUMNS: tuple[str, ...] = (
    "incident_id",
    "narrative_type",
    "source_row",
    "text_hash",
    "manual_flag_ind",
    "kept",
    "reason",
)
REJECTED_COLUMNS: tuple[str, ...] = ("source_path", "source_row", "incident_id", "narrative_type", "reason")
LEDGER_COLUMNS: tuple[str, ...] = ("incident_id", "narrative_type", "batch_id")
# What an ingest changes, in the order reports show it; `restored` counts the added narratives
# that had been removed by an earlier ingest.
CHANGE_COUNTS: tuple[str, ...] = ("added", "changed", "labels_changed", "removed", "unchanged", "restored")

BATCH_PREFIX = "b"
_BATCH_RE = re.compile(rf"{BATCH_PREFIX}(\d+)")
_KEY = ["incident_id", "narrative_type"]
_MAX_ECHO = 20


@dataclass
class CleanResult:
    """Output of :func:`clean_narratives`.

    Attributes:
        narratives: One row per kept narrative, columns ``NARRATIVE_COLUMNS``, file order.
        conflicts: Every row of a key with conflicting duplicates, columns ``CONFLICT_COLUMNS``.
        rejected: Rows that cannot be used, with a reason, columns ``REJECTED_COLUMNS``.
        stats: Counts (``rows_read``, ``input_rows``, ``narratives``, ``cme``, ``le``,
            ``empty_dropped``, ``duplicates_removed``, ``conflicts``, ``rejected``,
            ``placeholders``, ``labelled``, ``labelled_positive``), plain ints.
    """

    narratives: pd.DataFrame
    conflicts: pd.DataFrame
    rejected: pd.DataFrame
    stats: dict[str, int] = field(default_factory=dict)


def text_hash(text: str) -> str:
    """Return a short content hash of a narrative.

    Args:
        text: The narrative exactly as stored (already trimmed by ingestion).

    Returns:
        The first 16 hex characters of the sha256 of the UTF-8 bytes.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@lru_cache(maxsize=32)
def _compile_placeholders(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """Compile the patterns once into a single alternation (cached per pattern tuple)."""
    if not patterns:
        return None
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid placeholder pattern {pattern!r}: {exc}") from exc
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.DOTALL)


def placeholder_mask(texts: pd.Series, patterns: Sequence[str] = DEFAULT_PLACEHOLDER_PATTERNS) -> pd.Series:
    """Flag texts that are placeholders rather than narratives.

    Args:
        texts: Narrative texts (``None`` counts as not a placeholder).
        patterns: Regular expressions; one must match the whole trimmed text, ignoring case.

    Returns:
        A boolean series aligned with ``texts``.

    Raises:
        ValueError: A pattern is not a valid regular expression.
    """
    regex = _compile_placeholders(tuple(patterns))
    if regex is None:
        return pd.Series(False, index=texts.index, dtype=bool)
    fullmatch = regex.fullmatch
    flags = [isinstance(t, str) and fullmatch(t.strip()) is not None for t in texts]
    return pd.Series(flags, index=texts.index, dtype=bool)


def clean_narratives(
    raw: RawLoad | pd.DataFrame,
    placeholder_patterns: Sequence[str] = DEFAULT_PLACEHOLDER_PATTERNS,
    rows_read: int | None = None,
) -> CleanResult:
    """Drop empty narratives, reject unusable rows, resolve duplicates and flag placeholders.

    Args:
        raw: A :class:`~narr_assets.ingest.RawLoad` or its long frame. A bare frame needs
            ``incident_id``, ``narrative_type`` and ``narrative_text``; the other columns of
            ``RawLoad.frame`` are filled with nulls when absent.
        placeholder_patterns: Regular expressions for placeholder texts (see module docstring).
        rows_read: Source rows, for the stats. Defaults to ``raw.rows_read`` for a ``RawLoad``
            and to the number of distinct ``(source_path, source_row)`` for a frame.

    Returns:
        The cleaned narratives, the conflict report, the rejected rows and the counts.

    Raises:
        ValueError: A required column is missing or a pattern is invalid.
    """
    frame = raw.frame if isinstance(raw, RawLoad) else raw
    missing = [c for c in ("incident_id", "narrative_type", "narrative_text") if c not in frame.columns]
    if missing:
        raise ValueError(f"clean_narratives: input frame lacks columns {missing}")
    df = _with_defaults(frame)
    if rows_read is None:
        if isinstance(raw, RawLoad):
            rows_read = raw.rows_read
        else:
            rows_read = int(df[["source_path", "source_row"]].drop_duplicates().shape[0])

    df, empty = _drop_empty(df)  # 1. empty narratives
    df, rejected = _reject(df)  # 2. rejections
    dedup = _resolve_duplicates(df)  # 3. duplicates: first occurrence in file order wins

    # 4. Placeholders and output.
    narratives = dedup.kept.copy()
    narratives["is_placeholder"] = placeholder_mask(narratives["narrative_text"], placeholder_patterns)
    narratives = narratives.loc[:, list(NARRATIVE_COLUMNS)].reset_index(drop=True)
    rejected = rejected.loc[:, list(REJECTED_COLUMNS)].sort_values("source_row", kind="stable").reset_index(drop=True)

    stats = _stats(narratives, rejected, dedup, rows_read=int(rows_read), input_rows=len(frame), empty=empty)
    return CleanResult(narratives=narratives, conflicts=dedup.conflicts, rejected=rejected, stats=stats)


def _drop_empty(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Drop blank narratives (rule 1); the trimmed text replaces the original.

    Returns:
        The rows with text or a ``text_error``, and the mask of the dropped rows (aligned
        with ``df``).
    """
    text = df["narrative_text"].astype("string").str.strip()
    unreadable = df["text_error"].notna() & (df["text_error"] != "")
    empty = (text.isna() | (text == "")) & ~unreadable
    df = df.loc[~empty].copy()
    df["narrative_text"] = text[~empty].astype(object).where(text[~empty].notna(), None)  # type: ignore[call-overload]  # pandas-stubs omit None
    return df, empty


def _reject(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalise IDs and narrative types and set aside unusable rows (rule 2).

    Returns:
        The usable rows, and the rejected ones (provenance, key and the joined reasons).
    """
    df["incident_id"] = pd.Series([normalise_incident_id(v) for v in df["incident_id"]], index=df.index, dtype=object)
    df["narrative_type"] = _normalise_text(df["narrative_type"])
    ntype_key = df["narrative_type"].str.lower()
    known_type = ntype_key.isin(NARRATIVE_TYPES)
    df.loc[known_type, "narrative_type"] = ntype_key[known_type]
    reasons = pd.DataFrame(index=df.index)
    reasons["id"] = df["incident_id"].isna().map({True: "missing incident ID", False: None})
    reasons["type"] = None
    reasons.loc[df["narrative_type"].isna(), "type"] = "missing narrative_type"
    unknown = df["narrative_type"].notna() & ~known_type
    reasons.loc[unknown, "type"] = [f"unknown narrative_type {_echo(v)}" for v in df.loc[unknown, "narrative_type"]]
    text_error = df["text_error"].notna() & (df["text_error"] != "")
    reasons["text"] = df["text_error"].where(text_error, None)  # type: ignore[call-overload]  # pandas-stubs omit None
    label_error = df["label_error"].notna() & (df["label_error"] != "")
    reasons["label"] = df["label_error"].where(label_error, None)  # type: ignore[call-overload]  # pandas-stubs omit None
    reason = _join_reasons(reasons)
    bad = reason.notna()
    rejected = df.loc[bad, ["source_path", "source_row", "incident_id", "narrative_type"]].copy()
    rejected["reason"] = reason[bad]
    return df.loc[~bad], rejected


class _Dedup(NamedTuple):
    """What :func:`_resolve_duplicates` keeps and reports."""

    kept: pd.DataFrame  # the first row of each key, in file order
    conflicts: pd.DataFrame  # the conflict report, columns ``CONFLICT_COLUMNS``
    duplicates_removed: int  # exact copies dropped
    conflicts_dropped: int  # conflicting versions dropped


def _resolve_duplicates(df: pd.DataFrame) -> _Dedup:
    """Keep the first row of each ``(incident_id, narrative_type)`` in file order (rule 3)."""
    df = df.sort_values("source_row", kind="stable")
    df["text_hash"] = [text_hash(t) for t in df["narrative_text"]]
    label_ind = df["manual_flag_ind"].fillna(-1).astype("int64")
    label_inc = df["manual_flag"].fillna(-1).astype("int64")
    version = df[[*_KEY, "text_hash"]].assign(_ind=label_ind, _inc=label_inc)
    exact_dup = version.duplicated(keep="first")
    later_in_key = df.duplicated(_KEY, keep="first")
    distinct = version.loc[~exact_dup]
    conflict_key = distinct.duplicated(_KEY, keep=False)
    conflict_keys = distinct.loc[conflict_key, _KEY].drop_duplicates()
    conflicts = _conflict_report(df.assign(_ind=label_ind, _inc=label_inc), conflict_keys)
    duplicates_removed = int(exact_dup.sum())
    return _Dedup(df.loc[~later_in_key], conflicts, duplicates_removed, int(later_in_key.sum()) - duplicates_removed)


def _stats(
    narratives: pd.DataFrame,
    rejected: pd.DataFrame,
    dedup: _Dedup,
    *,
    rows_read: int,
    input_rows: int,
    empty: pd.Series,
) -> dict[str, int]:
    """The counts of :class:`CleanResult`, in their documented order."""
    return {
        "rows_read": rows_read,
        "input_rows": input_rows,
        "narratives": len(narratives),
        "cme": int((narratives["narrative_type"] == "cme").sum()),
        "le": int((narratives["narrative_type"] == "le").sum()),
        "empty_dropped": int(empty.sum()),
        "duplicates_removed": dedup.duplicates_removed,
        "conflicts": dedup.conflicts_dropped,
        "rejected": len(rejected),
        "placeholders": int(narratives["is_placeholder"].sum()),
        "labelled": int(narratives["manual_flag_ind"].notna().sum()),
        "labelled_positive": int((narratives["manual_flag_ind"] == 1).sum()),
    }


def _with_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """Copy the frame, adding optional columns as nulls so a bare frame can be cleaned."""
    df = frame.copy()
    for column in ("manual_flag_ind", "manual_flag"):
        df[column] = df[column].astype("Int64") if column in df else pd.Series(pd.NA, index=df.index, dtype="Int64")
    for column in ("label_error", "text_error", "source_path", "data_checksum"):
        if column not in df:
            df[column] = None
    df["attributes"] = df["attributes"].where(df["attributes"].notna(), "{}") if "attributes" in df else "{}"
    if "source_row" not in df:
        # Without provenance, the frame position stands in for the file order.
        df["source_row"] = pd.RangeIndex(2, len(df) + 2)
    if "loaded_at" not in df:
        df["loaded_at"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns, UTC]")
    return df


def _normalise_text(series: pd.Series) -> pd.Series:
    """Trim text; blank -> None (object dtype so DuckDB sees VARCHAR with NULLs)."""
    stripped = series.astype("string").str.strip()
    present = stripped.notna() & (stripped != "")
    return stripped.astype(object).where(present, None)  # type: ignore[call-overload]  # pandas-stubs omit None


def _join_reasons(reasons: pd.DataFrame) -> pd.Series:
    """Join the non-null reasons of each row with "; " (None when there is none)."""
    joined = [
        "; ".join(p for p in parts if isinstance(p, str) and p) or None for parts in reasons.itertuples(index=False)
    ]
    return pd.Series(joined, index=reasons.index, dtype=object)


def _echo(value: str) -> str:
    """Quote a value for a reason, without copying long (possibly narrative) text."""
    return f"'{value}'" if len(value) <= _MAX_ECHO else f"<text of {len(value)} characters>"


def _conflict_report(rows: pd.DataFrame, conflict_keys: pd.DataFrame) -> pd.DataFrame:
    """List every row of each conflicting key, comparing it with the kept (first) row."""
    if conflict_keys.empty:
        return pd.DataFrame(
            {
                "incident_id": pd.Series(dtype=object),
                "narrative_type": pd.Series(dtype=object),
                "source_row": pd.Series(dtype="int64"),
                "text_hash": pd.Series(dtype=object),
                "manual_flag_ind": pd.Series(dtype="Int64"),
                "kept": pd.Series(dtype=bool),
                "reason": pd.Series(dtype=object),
            }
        )
    involved = rows.reset_index(drop=True).merge(conflict_keys, on=_KEY, how="inner", sort=False)
    involved = involved.sort_values("source_row", kind="stable").reset_index(drop=True)
    first = ~involved.duplicated(_KEY, keep="first")
    reference = involved.loc[first, [*_KEY, "source_row", "text_hash", "_ind", "_inc"]].rename(
        columns={"source_row": "_ref_row", "text_hash": "_ref_hash", "_ind": "_ref_ind", "_inc": "_ref_inc"}
    )
    involved = involved.merge(reference, on=_KEY, how="left", sort=False)
    same_text = involved["text_hash"] == involved["_ref_hash"]
    same_labels = (involved["_ind"] == involved["_ref_ind"]) & (involved["_inc"] == involved["_ref_inc"])
    ref = involved["_ref_row"].astype(str)
    reason = pd.Series("", index=involved.index, dtype=object)
    reason[first] = "kept: first occurrence in file order"
    diff = ~first & ~(same_text & same_labels)
    what = pd.Series("text and labels", index=involved.index)
    what[same_text] = "labels"
    what[same_labels] = "text"
    reason[~first & same_text & same_labels] = "exact duplicate of kept row " + ref[~first & same_text & same_labels]
    reason[diff] = "differs from kept row " + ref[diff] + " in " + what[diff]
    involved["kept"] = first.to_numpy()
    involved["reason"] = reason
    return involved.loc[:, list(CONFLICT_COLUMNS)].reset_index(drop=True)


@dataclass
class CorpusChanges:
    """What replacing the stored narratives with new ones changes.

    Attributes:
        counts: ``CHANGE_COUNTS`` as plain ints. ``added + changed + labels_changed +
            unchanged`` is the number of new narratives; a narrative whose text and labels both
            changed counts as ``changed``.
        removed: The stored narratives absent from the new ones (``incident_id``,
            ``narrative_type``, ``text_hash``, ``batch_id``).
        stored: Narratives stored before the change.
    """

    counts: dict[str, int]
    removed: pd.DataFrame
    stored: int

    @property
    def mass_removal(self) -> bool:
        """More than half of the stored narratives would be removed."""
        return 2 * self.counts["removed"] > self.stored


def compare_narratives(
    stored: pd.DataFrame, new: pd.DataFrame, previously_removed: pd.DataFrame | None = None
) -> CorpusChanges:
    """Compare new narratives with the stored ones, key by key.

    Args:
        stored: The stored narratives: ``incident_id``, ``narrative_type``, ``text_hash``,
            ``manual_flag_ind``, ``manual_flag``, ``batch_id``.
        new: The new narratives (``NARRATIVE_COLUMNS``; ``batch_id`` not needed).
        previously_removed: Keys flagged as removed by earlier ingests, to count ``restored``.

    Returns:
        The counts and the removed narratives.
    """
    columns = [*_KEY, "text_hash", "manual_flag_ind", "manual_flag"]
    merged = new.loc[:, columns].merge(
        stored.loc[:, [*columns, "batch_id"]], on=_KEY, how="outer", suffixes=("", "_stored"), indicator=True
    )
    both = merged["_merge"] == "both"
    text_changed = both & (merged["text_hash"] != merged["text_hash_stored"])
    labels_changed = (
        both & ~text_changed & ~(_same_label(merged, "manual_flag_ind") & _same_label(merged, "manual_flag"))
    )
    added = merged.loc[merged["_merge"] == "left_only", _KEY]
    restored = 0
    if previously_removed is not None and not previously_removed.empty and not added.empty:
        restored = len(added.merge(previously_removed.loc[:, _KEY].drop_duplicates(), on=_KEY))
    gone = merged["_merge"] == "right_only"
    removed = merged.loc[gone, [*_KEY, "text_hash_stored", "batch_id"]].rename(
        columns={"text_hash_stored": "text_hash"}
    )
    counts = {
        "added": len(added),
        "changed": int(text_changed.sum()),
        "labels_changed": int(labels_changed.sum()),
        "removed": int(gone.sum()),
        "unchanged": int((both & ~text_changed & ~labels_changed).sum()),
        "restored": restored,
    }
    return CorpusChanges(counts=counts, removed=removed.reset_index(drop=True), stored=len(stored))


def _same_label(merged: pd.DataFrame, column: str) -> pd.Series:
    """New and stored label equal, two missing labels counting as equal."""
    new = pd.to_numeric(merged[column]).astype("Int64").fillna(-1)
    old = pd.to_numeric(merged[f"{column}_stored"]).astype("Int64").fillna(-1)
    return (new == old).astype(bool)


def batch_key(index: int) -> str:
    """Return the batch ID of a 0-based batch number (``0 -> "b00000"``).

    Args:
        index: Batch number, 0 or more.

    Returns:
        ``"b"`` followed by the number zero-padded to five digits (wider past 99,999).
    """
    if index < 0:
        raise ValueError(f"batch index must be >= 0, got {index}")
    return f"{BATCH_PREFIX}{index:05d}"


def batch_number(batch_id: str) -> int:
    """Inverse of :func:`batch_key` (``"b00012" -> 12``).

    Args:
        batch_id: A batch ID.

    Returns:
        The batch number.

    Raises:
        ValueError: ``batch_id`` was not produced by :func:`batch_key`.
    """
    match = _BATCH_RE.fullmatch(str(batch_id))
    if match is None:
        raise ValueError(f"not a batch ID: {batch_id!r} (expected e.g. {batch_key(0)!r})")
    return int(match.group(1))


def assign_batches(current: pd.DataFrame, ledger: pd.DataFrame | None, batch_size: int = 100) -> pd.DataFrame:
    """Assign narratives that are not in the ledger to new batches.

    A narrative keeps its batch forever: keys already in the ledger are left alone (even if
    their text changed or they left the input), and new keys, sorted by ``incident_id`` then
    ``narrative_type`` (plain text order), fill new batches numbered after the highest
    existing one. Old batches are never topped up, so a finished batch stays finished.

    Args:
        current: Narratives with ``incident_id`` and ``narrative_type``.
        ledger: Every assignment so far (``incident_id, narrative_type, batch_id``); ``None``
            or empty for the first run.
        batch_size: Narratives per new batch.

    Returns:
        Only the new ledger rows (``incident_id, narrative_type, batch_id``).

    Raises:
        ValueError: ``batch_size`` is not positive or the ledger holds a malformed batch ID.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = current.loc[:, _KEY].drop_duplicates()
    if ledger is None or ledger.empty:
        next_batch = 0
        new = keys
    else:
        next_batch = max(batch_number(b) for b in ledger["batch_id"].unique()) + 1
        known = ledger.loc[:, _KEY].drop_duplicates()
        merged = keys.merge(known, on=_KEY, how="left", indicator=True)
        new = merged.loc[merged["_merge"] == "left_only", _KEY]
    new = new.sort_values(_KEY, kind="stable").reset_index(drop=True)
    numbers = next_batch + new.index.to_numpy() // batch_size
    new["batch_id"] = [batch_key(int(n)) for n in numbers]
    return new.loc[:, list(LEDGER_COLUMNS)]
