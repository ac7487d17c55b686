"""The steps the assets run, as plain functions over a `Store` (no Dagster here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from narr_assets.experiments import ExperimentConfig
from narr_assets.ingest import RawLoad, read_source
from narr_assets.narratives import DEFAULT_PLACEHOLDER_PATTERNS, CleanResult, assign_batches, clean_narratives
from narr_assets.store import Store


def ingest_raw(store: Store, path: Path, sheet: str | None = None) -> RawLoad:
    """Read the source file and replace `raw_narratives`; a bad file raises before any write."""
    load = read_source(path, sheet)
    store.replace_raw(load.frame)
    return load


def build_narratives(
    store: Store, placeholder_patterns=DEFAULT_PLACEHOLDER_PATTERNS, batch_size: int = 100
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


def evaluation_rows(store: Store, cfg: ExperimentConfig) -> pd.DataFrame:
    """Every current narrative with this experiment's current answer, or status `failed`.

    A narrative without a row for the current config and text (never asked, failed, or
    stale after an edit) is kept as `failed`, so it stays in every denominator.
    """
    return store.query_df(
        """
        SELECT ? AS experiment, n.incident_id, n.narrative_type, n.narrative_text,
               n.manual_flag_ind, n.manual_flag, n.batch_id,
               coalesce(c.status, 'failed') AS status, c.detected, c.confidence, c.latency_s,
               c.prompt_tokens, c.completion_tokens, c.reasoning_tokens, c.indicators, c.rationale
        FROM narratives n
        LEFT JOIN classification_rows c
          ON c.experiment = ? AND c.incident_id = n.incident_id AND c.narrative_type = n.narrative_type
         AND c.config_hash = ? AND c.text_hash = n.text_hash
        ORDER BY n.incident_id, n.narrative_type
        """,
        [cfg.name, cfg.name, cfg.config_hash],
    )


@dataclass
class PartitionState:
    done: list[str]
    missing: list[str]
    with_errors: list[str]
    table: pd.DataFrame

    def to_run(self, retry_errors: bool = False) -> list[str]:
        return sorted(set(self.missing) | (set(self.with_errors) if retry_errors else set()))


def partition_state(store: Store, cfg: ExperimentConfig) -> PartitionState:
    """Which batches are complete for the current config and texts, and which are not."""
    table = store.partition_status(cfg.name, cfg.config_hash)
    complete = table["current_rows"] == table["narratives"]
    return PartitionState(
        done=list(table.loc[complete, "batch_id"]),
        missing=list(table.loc[~complete, "batch_id"]),
        with_errors=list(table.loc[table["error_rows"] > 0, "batch_id"]),
        table=table,
    )


def summarise_statuses(store: Store, cfg: ExperimentConfig) -> dict[str, Any]:
    df = store.query_df(
        """
        SELECT status, count(*) AS n, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens
        FROM classification_rows WHERE experiment = ? AND config_hash = ? GROUP BY status ORDER BY status
        """,
        [cfg.name, cfg.config_hash],
    )
    return {
        "by_status": {r.status: int(r.n) for r in df.itertuples()},
        "prompt_tokens": int(df["prompt_tokens"].fillna(0).sum()),
        "completion_tokens": int(df["completion_tokens"].fillna(0).sum()),
    }


def experiment_status(store: Store, cfg: ExperimentConfig) -> dict[str, Any]:
    """Progress of one experiment: batches, rows, tokens, and an ETA from active run time.

    The rate is calls per second of *active* run time summed over recorded runs (`run_log`),
    so hours between a crash and its resume do not drag the ETA out (a defect of the old
    pipeline, whose rate counted wall time since the first start).
    """
    state = partition_state(store, cfg)
    statuses = summarise_statuses(store, cfg)
    remaining = store.query_df(
        """
        SELECT count(*) AS n FROM narratives n
        LEFT JOIN classification_rows c
          ON c.experiment = ? AND c.incident_id = n.incident_id AND c.narrative_type = n.narrative_type
         AND c.config_hash = ? AND c.text_hash = n.text_hash
        WHERE c.status IS NULL AND NOT (n.is_placeholder AND ?)
        """,
        [cfg.name, cfg.config_hash, cfg.run.skip_placeholders],
    ).iloc[0, 0]
    runs = store.query_df(
        "SELECT coalesce(sum(calls_ok), 0) AS calls, coalesce(sum(active_seconds), 0) AS secs, count(*) AS runs "
        "FROM run_log WHERE experiment = ? AND calls_ok > 0",
        [cfg.name],
    ).iloc[0]
    calls, secs = int(runs["calls"]), float(runs["secs"])
    rate = calls / secs if calls and secs > 0 else None
    remaining = int(remaining)
    return {
        "batches_done": len(state.done),
        "batches_missing": len(state.missing),
        "batches_with_errors": len(state.with_errors),
        "missing": state.missing,
        "remaining_calls": remaining,
        "rate_per_s": rate,
        "eta_s": (remaining / rate) if rate and remaining else (0.0 if not remaining else None),
        **statuses,
    }
