"""Where an experiment stands: which batches are complete, what is left, how fast it goes.

The batch-complete rule lives here, once (`partition_state`), and both the engine (which
batches a run leaves alone) and `narr status` / `narr run` (what is missing) read it.
A batch is complete when every one of its narratives has a current row (`store.CURRENT_ROW`)
parsed by the current parser; `Store.partition_status` explains why the parser version counts
here but not in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from narr_assets.experiments import ExperimentConfig
from narr_assets.store import CURRENT_ROW, Store

# Partition keys carry the batch's content version (`Store.batch_versions`): `b00005-3fa2c1d0`.
# Editing a narrative gives its batch a new key, which Dagster shows as missing for every
# experiment while the other keys keep their state. A key is never handed out twice (reverting
# an edit is one more revision), so an old materialisation cannot come back to describe rows a
# run since replaced. Classification rows keep the stable batch id (`b00005`).
_VERSION_SEP = "-"


def partition_key(batch_id: str, version: str) -> str:
    """The Dagster partition key of a batch at a content version."""
    return f"{batch_id}{_VERSION_SEP}{version}"


def batch_of(key: str) -> str:
    """The batch id of a partition key (`b00005-3fa2c1d0` -> `b00005`); a bare batch id is returned as is."""
    return key.split(_VERSION_SEP, 1)[0]


def partition_keys(store: Store) -> dict[str, str]:
    """Batch id -> its current partition key, for every batch holding a current narrative."""
    return {batch: partition_key(batch, version) for batch, version in store.batch_versions().items()}


@dataclass
class PartitionState:
    """The batches of `narratives` for one experiment, sorted into complete and not.

    `done` and `missing` split the batches by the batch-complete rule; `with_errors` holds the
    batches with at least one answer-error row (current or not), which `--retry-errors` asks
    again. `table` is `Store.partition_status` as read.
    """

    done: list[str]
    missing: list[str]
    with_errors: list[str]
    table: pd.DataFrame

    def to_run(self, retry_errors: bool = False) -> list[str]:
        """Batches a run has work in: the missing ones, and with `retry_errors` the erroneous ones."""
        return sorted(set(self.missing) | (set(self.with_errors) if retry_errors else set()))

    def up_to_date(self, retry_errors: bool = False) -> list[str]:
        """Batches a run leaves alone (not locked, not rewritten): every other batch of `table`."""
        work = set(self.to_run(retry_errors))
        return sorted(b for b in self.table["batch_id"] if b not in work)


def partition_state(store: Store, cfg: ExperimentConfig) -> PartitionState:
    """Which batches are complete for the current config, texts and parser, and which are not.

    The batch-complete rule: every narrative of the batch has a current row parsed by the
    current parser (`current_rows == narratives` in `Store.partition_status`).
    """
    table = store.partition_status(cfg.name, cfg.config_hash)
    complete = table["current_rows"] == table["narratives"]
    return PartitionState(
        done=list(table.loc[complete, "batch_id"]),
        missing=list(table.loc[~complete, "batch_id"]),
        with_errors=list(table.loc[table["error_rows"] > 0, "batch_id"]),
        table=table,
    )


def summarise_statuses(store: Store, cfg: ExperimentConfig) -> dict[str, Any]:
    """Rows and tokens by status over the stored rows of the current config, for current narratives.

    A row whose narrative was since edited still counts here (its tokens were spent on the
    corpus as it is). A row whose narrative was removed from the source does not: it is kept,
    flagged in the `removed_classifications` view, and only counted in `removed_rows`.
    """
    rows = store.query_rows(
        """
        SELECT status, count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
        FROM classification_rows c
        WHERE experiment = ? AND config_hash = ?
          AND EXISTS (SELECT 1 FROM narratives n
                      WHERE n.incident_id = c.incident_id AND n.narrative_type = c.narrative_type)
        GROUP BY status ORDER BY status
        """,
        [cfg.name, cfg.config_hash],
    )
    (removed,) = store.query_row(
        "SELECT count(*) FROM removed_classifications WHERE experiment = ? AND config_hash = ?",
        [cfg.name, cfg.config_hash],
    )
    return {
        "by_status": {status: int(n) for status, n, _, _ in rows},
        "prompt_tokens": sum(int(prompt) for _, _, prompt, _ in rows),
        "completion_tokens": sum(int(completion) for _, _, _, completion in rows),
        "removed_rows": int(removed),
    }


def remaining_calls(store: Store, cfg: ExperimentConfig) -> int:
    """Narratives without a current row, placeholders excluded when the experiment skips them.

    Rows from an older parser are current here: re-parsing them costs no call.
    """
    (remaining,) = store.query_row(
        f"""
        SELECT count(*) FROM narratives n
        LEFT JOIN classification_rows c ON {CURRENT_ROW}
        WHERE c.status IS NULL AND NOT (n.is_placeholder AND $skip_placeholders)
        """,
        {"experiment": cfg.name, "config_hash": cfg.config_hash, "skip_placeholders": cfg.run.skip_placeholders},
    )
    return int(remaining)


def older_config_batches(store: Store, cfg: ExperimentConfig, missing: list[str]) -> list[str]:
    """Missing batches with rows written under another config of the experiment.

    Dagster shows these partitions materialised but stale ("code version changed", the code
    version being the config hash): the experiment file was edited since they ran.
    """
    rows = store.query_rows(
        "SELECT DISTINCT batch_id FROM classification_rows WHERE experiment = ? AND config_hash <> ? ORDER BY 1",
        [cfg.name, cfg.config_hash],
    )
    wanted = set(missing)
    return [str(batch) for (batch,) in rows if batch in wanted]


def experiment_status(store: Store, cfg: ExperimentConfig) -> dict[str, Any]:
    """Progress of one experiment: batches, rows, tokens, and an ETA from active run time.

    The rate is calls per second of *active* run time summed over recorded runs (`run_log`),
    so hours between a crash and its resume do not drag the ETA out (a defect of the old
    pipeline, whose rate counted wall time since the first start).
    """
    state = partition_state(store, cfg)
    statuses = summarise_statuses(store, cfg)
    remaining = remaining_calls(store, cfg)
    calls, secs = store.query_row(
        "SELECT coalesce(sum(calls_ok), 0), coalesce(sum(active_seconds), 0) "
        "FROM run_log WHERE experiment = ? AND calls_ok > 0",
        [cfg.name],
    )
    calls, secs = int(calls), float(secs)
    rate = calls / secs if calls and secs > 0 else None
    return {
        "batches_done": len(state.done),
        "batches_missing": len(state.missing),
        "batches_with_errors": len(state.with_errors),
        "missing": state.missing,
        "done": state.done,
        "older_config_batches": len(older_config_batches(store, cfg, state.missing)),
        "remaining_calls": remaining,
        "rate_per_s": rate,
        "eta_s": (remaining / rate) if rate and remaining else (0.0 if not remaining else None),
        **statuses,
    }
