"""The stored corpus: the source file read into `raw_narratives`, then cleaned into batches.

Plain functions over a `Store` (no Dagster here). Each step replaces its tables in one
transaction, so a bad source file raises before anything is written and a batch exists in
the ledger exactly when its narratives do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from narr_assets.ingest import RawLoad, read_source
from narr_assets.narratives import DEFAULT_PLACEHOLDER_PATTERNS, CleanResult, assign_batches, clean_narratives
from narr_assets.store import Store


def ingest_raw(store: Store, path: Path, sheet: str | None = None) -> RawLoad:
    """Read the source file and replace `raw_narratives`; a bad file raises before any write."""
    load = read_source(path, sheet)
    store.replace_raw(load.frame)
    return load


def build_narratives(
    store: Store, placeholder_patterns: Sequence[str] = DEFAULT_PLACEHOLDER_PATTERNS, batch_size: int = 100
) -> tuple[CleanResult, list[str]]:
    """Clean `raw_narratives` into `narratives`, assign batches, return new batch keys.

    The cleaned tables and the new ledger rows are written in one transaction, so a batch
    exists in the ledger exactly when its narratives do.
    """
    raw = store.read_raw()
    rows_read = int(raw["source_row"].nunique()) if not raw.empty else 0
    result = clean_narratives(raw, placeholder_patterns, rows_read=rows_read)
    ledger = store.read_ledger()
    keys = result.narratives[["incident_id", "narrative_type"]]
    new_rows = assign_batches(keys, ledger, batch_size)
    full = pd.concat([ledger, new_rows[["incident_id", "narrative_type", "batch_id"]]], ignore_index=True)
    narratives = result.narratives.merge(full, on=["incident_id", "narrative_type"], how="left")
    checksum = str(raw["data_checksum"].iloc[0]) if not raw.empty else None
    for frame in (result.rejected, result.conflicts):
        frame["data_checksum"] = checksum
    ingest = {
        "data_checksum": checksum,
        "source_path": str(raw["source_path"].iloc[0]) if not raw.empty else None,
        **result.stats,
    }
    store.replace_narratives(narratives, result.rejected, result.conflicts, new_rows, ingest)
    return result, sorted(set(new_rows["batch_id"]))
