"""The stored corpus: the source file read into `raw_narratives`, then cleaned into batches.

Plain functions over a `Store` (no Dagster here). Ingestion never destroys:

- a file that yields no narrative is refused before any table is written;
- a file that would remove more than half of the stored narratives is refused unless the
  caller allows it (`allow_mass_removal`); removed narratives are flagged in
  `removed_narratives`, and their classification rows are kept;
- each step holds an exclusive `flock` on `<locks_dir>/ingest.lock` around its reads and
  writes, so two processes ingesting at once take turns (the second waits, with one log
  line naming the holder) instead of racing on the batch ledger;
- each step replaces its tables in one transaction, so a batch exists in the ledger exactly
  when its narratives do.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from narr_assets.ingest import IngestError, RawLoad, read_source
from narr_assets.narratives import (
    DEFAULT_PLACEHOLDER_PATTERNS,
    CleanResult,
    CorpusChanges,
    assign_batches,
    clean_narratives,
    compare_narratives,
)
from narr_assets.private import open_private, private_dir
from narr_assets.store import Store

LOCK_FILE = "ingest.lock"
_LOG = logging.getLogger(__name__)
Log = Callable[[str], None]


class IngestRefused(IngestError):
    """The source file was read, but ingesting it would destroy stored data; nothing was written."""


@dataclass
class RawIngest:
    """What `ingest_raw` stored.

    Attributes:
        load: The source file as read.
        stats: The counts cleaning will give (`CleanResult.stats`).
        changes: What the ingest changes against the stored narratives (`CHANGE_COUNTS`).
    """

    load: RawLoad
    stats: dict[str, int]
    changes: dict[str, int]


@contextlib.contextmanager
def ingestion_lock(locks_dir: Path, log: Log | None = None) -> Iterator[None]:
    """Hold the exclusive ingestion lock, waiting while another process (or thread) holds it.

    Args:
        locks_dir: Folder of the lock file (the data folder's `locks/`).
        log: Where the one "waiting for another ingestion" line goes (default: this module's logger).

    Yields:
        Nothing; the lock is held inside the `with` block. `flock` locks die with their
        process, so a `kill -9` never leaves a stale lock behind.
    """
    private_dir(locks_dir)
    fd = open_private(locks_dir / LOCK_FILE, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "holder unknown"
            (log or _LOG.info)(f"waiting for another ingestion ({holder})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def ingest_raw(
    store: Store,
    path: Path,
    sheet: str | None = None,
    *,
    allow_mass_removal: bool = False,
    locks_dir: Path | None = None,
    log: Log | None = None,
) -> RawIngest:
    """Read the source file and replace `raw_narratives`, unless that would destroy stored data.

    Args:
        store: The database.
        path: The source file.
        sheet: Worksheet of a workbook (``None``: the first one).
        allow_mass_removal: Accept a file that removes more than half of the stored narratives.
        locks_dir: Folder of the ingestion lock; default ``locks/`` beside the database.
        log: Receives the line logged while waiting for another ingestion.

    Returns:
        The file as read, the counts cleaning will give and the changes against the stored
        narratives.

    Raises:
        IngestError: The file cannot be read (nothing was written).
        IngestRefused: The file yields no narrative, or would remove more than half of the
            stored narratives without `allow_mass_removal` (nothing was written).
    """
    with ingestion_lock(_locks_dir(store, locks_dir), log):
        load = read_source(path, sheet)
        # Cleaned here too, before anything is written: the refusals need the narratives.
        clean = clean_narratives(load)
        where = f"{load.source_path} (sheet '{load.sheet}')" if load.sheet else load.source_path
        if clean.narratives.empty:
            raise IngestRefused(f"{where}: {_nothing_to_ingest(load.rows_read, clean)}")
        changes = _changes(store, clean)
        if changes.mass_removal and not allow_mass_removal:
            raise IngestRefused(f"{where}: {_mass_removal(changes)}")
        store.replace_raw(load.frame)
    return RawIngest(load=load, stats=dict(clean.stats), changes=changes.counts)


def build_narratives(
    store: Store,
    placeholder_patterns: Sequence[str] = DEFAULT_PLACEHOLDER_PATTERNS,
    batch_size: int = 100,
    *,
    locks_dir: Path | None = None,
    log: Log | None = None,
) -> tuple[CleanResult, list[str]]:
    """Clean `raw_narratives` into `narratives`, assign batches, return new batch keys.

    The cleaned tables, the new ledger rows and the removed-narrative flags are written in one
    transaction, so a batch exists in the ledger exactly when its narratives do. The ledger is
    read and extended under the ingestion lock, so two processes never assign one key twice.

    Args:
        store: The database.
        placeholder_patterns: Regular expressions of placeholder texts.
        batch_size: Narratives per new batch.
        locks_dir: Folder of the ingestion lock; default ``locks/`` beside the database.
        log: Receives the line logged while waiting for another ingestion.

    Returns:
        The cleaning result, whose ``stats`` also hold the ``CHANGE_COUNTS``, and the new
        batch IDs.

    Raises:
        IngestRefused: `raw_narratives` yields no narrative (nothing was written).
    """
    with ingestion_lock(_locks_dir(store, locks_dir), log):
        raw = store.read_raw()
        rows_read = int(raw["source_row"].nunique()) if not raw.empty else 0
        result = clean_narratives(raw, placeholder_patterns, rows_read=rows_read)
        if result.narratives.empty:
            # `ingest_raw` refuses such a file; this catches an empty or never-filled table.
            raise IngestRefused(f"raw_narratives: {_nothing_to_ingest(rows_read, result)}; ingest a source file")
        changes = _changes(store, result)
        ledger = store.read_ledger()
        keys = result.narratives[["incident_id", "narrative_type"]]
        new_rows = assign_batches(keys, ledger, batch_size)
        full = pd.concat([ledger, new_rows[["incident_id", "narrative_type", "batch_id"]]], ignore_index=True)
        narratives = result.narratives.merge(full, on=["incident_id", "narrative_type"], how="left")
        checksum = str(raw["data_checksum"].iloc[0])
        for frame in (result.rejected, result.conflicts):
            frame["data_checksum"] = checksum
        result.stats.update(changes.counts)
        ingest = {"data_checksum": checksum, "source_path": str(raw["source_path"].iloc[0]), **result.stats}
        store.replace_narratives(narratives, result.rejected, result.conflicts, new_rows, ingest, changes.removed)
    return result, sorted(set(new_rows["batch_id"]))


def _locks_dir(store: Store, locks_dir: Path | None) -> Path:
    # The default is the data folder's `locks/` when NARR_DATA_DIR is left at its default.
    return Path(locks_dir) if locks_dir is not None else store.path.parent / "locks"


def _changes(store: Store, clean: CleanResult) -> CorpusChanges:
    return compare_narratives(store.read_narrative_versions(), clean.narratives, store.read_removed())


def _nothing_to_ingest(rows_read: int, clean: CleanResult) -> str:
    """The one-line refusal of a source that yields no narrative (no narrative text in it)."""
    if rows_read == 0:
        found = "a header and no data rows"
    else:
        stats = clean.stats
        found = (
            f"{rows_read} data row(s) but no usable narrative ({stats['empty_dropped']} empty narrative cell(s), "
            f"{stats['rejected']} rejected row(s)"
        )
        if not clean.rejected.empty:
            first = clean.rejected.iloc[0]
            found += f"; first rejected: row {first['source_row']}: {first['reason']}"
        found += ")"
    return f"nothing to ingest, found {found}; nothing was changed (check the source file and sheet)"


def _mass_removal(changes: CorpusChanges) -> str:
    """The one-line refusal of a source that would remove more than half of the narratives."""
    counts = changes.counts
    return (
        f"this file would remove {counts['removed']} of the {changes.stored} stored narratives "
        f"(more than half; {counts['added']} added, {counts['changed']} changed, "
        f"{counts['labels_changed']} with new labels, {counts['unchanged']} unchanged); "
        "nothing was changed. If the file is right, ingest again allowing mass removal "
        "(`narr ingest --allow-removal`, or run config allow_mass_removal: true on raw_narratives); "
        "the removed narratives' results are kept and flagged"
    )
