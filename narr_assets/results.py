"""An experiment's current results, read for evaluation, and their evaluation stored.

Plain functions over a `Store` (no Dagster here). "Current" is `store.CURRENT_ROW`: the row
for the experiment's current config and the narrative's current text, whatever parser
version produced it (see `Store.partition_status` for why evaluation ignores the parser
version while the batch-complete rule does not).
"""

from __future__ import annotations

import itertools
from typing import Any

import pandas as pd

from narr_assets import evaluation
from narr_assets.experiments import ExperimentConfig
from narr_assets.store import CURRENT_ROW, Store
from narr_assets.vocabulary import FAILED

#: What the leaderboard and the pairwise table say about each experiment's config, from
#: `ExperimentConfig.registry_row` (the same values as its `experiment_registry` row).
CONFIG_COLUMNS = ("model", "temperature", "prompt_version", "reasoning_effort")
#: The variant of the leaderboard's unprefixed figures (`f1`, `precision`, `recall`, `mcc`, ...):
#: unanswered rows count as wrong. The `answered_*` columns leave them out (the R system's F1).
HEADLINE_VARIANT = "strict"
_CONFIG_DTYPES: dict[str, Any] = {
    "model": "string",
    "temperature": "Float64",
    "prompt_version": "string",
    "reasoning_effort": "string",
}


def config_columns(cfg: ExperimentConfig) -> dict[str, Any]:
    """The `CONFIG_COLUMNS` of one experiment's current config.

    Args:
        cfg: The experiment.

    Returns:
        Column -> value (null where the backend has no such setting, e.g. `rules`).
    """
    row = cfg.registry_row()
    return {col: row[col] for col in CONFIG_COLUMNS}


def leaderboard_table(evals: list[dict[str, Any]], experiments: list[ExperimentConfig]) -> pd.DataFrame:
    """`evaluation.leaderboard` with each experiment's config and the variant of its headline figures.

    Args:
        evals: The current evaluations (`cross_experiment`).
        experiments: The experiments' configs (an evaluation without one gets null config columns).

    Returns:
        The leaderboard's columns, with `CONFIG_COLUMNS`, `config_hash` and `headline_variant`
        after `experiment`.
    """
    board = evaluation.leaderboard(evals)
    configs = {cfg.name: config_columns(cfg) for cfg in experiments}
    hashes = {ev["experiment"]: ev.get("config_hash") for ev in evals}
    names = list(board["experiment"])
    added: dict[str, Any] = {
        col: pd.array([configs.get(name, {}).get(col) for name in names], dtype=_CONFIG_DTYPES[col])
        for col in CONFIG_COLUMNS
    }
    added["config_hash"] = pd.array([hashes.get(name) for name in names], dtype="string")
    added["headline_variant"] = pd.array([HEADLINE_VARIANT] * len(names), dtype="string")
    at = list(board.columns).index("experiment") + 1
    for offset, (col, values) in enumerate(added.items()):
        board.insert(at + offset, col, values)
    return board


def pairwise_frame(pairwise: list[dict[str, Any]]) -> pd.DataFrame:
    """`evaluation.pairwise_table` with both experiments' config columns after `experiment_b`.

    Args:
        pairwise: The comparisons of `cross_experiment` (they carry `model_a`, `model_b`, ...).

    Returns:
        One row per pair: `experiment_a`, `experiment_b`, `model_a`, `model_b`,
        `temperature_a`, ..., then `evaluation.PAIRWISE_COLUMNS`.
    """
    table = evaluation.pairwise_table(pairwise)
    columns = [(f"{col}_{side}", _CONFIG_DTYPES[col]) for col in CONFIG_COLUMNS for side in ("a", "b")]
    at = list(table.columns).index("experiment_b") + 1
    for offset, (col, dtype) in enumerate(columns):
        table.insert(at + offset, col, pd.array([p.get(col) for p in pairwise], dtype=dtype))
    return table


def evaluation_rows(store: Store, cfg: ExperimentConfig) -> pd.DataFrame:
    """Every current narrative with this experiment's current answer, or status `failed`.

    A narrative without a row for the current config and text (never asked, failed, or
    stale after an edit) is kept as `failed`, so it stays in every denominator.
    """
    return store.query_df(
        f"""
        SELECT $experiment AS experiment, n.incident_id, n.narrative_type, n.narrative_text,
               n.manual_flag_ind, n.manual_flag, n.batch_id,
               coalesce(c.status, '{FAILED}') AS status, c.detected, c.confidence, c.latency_s,
               c.prompt_tokens, c.completion_tokens, c.reasoning_tokens, c.indicators, c.rationale
        FROM narratives n
        LEFT JOIN classification_rows c ON {CURRENT_ROW}
        ORDER BY n.incident_id, n.narrative_type
        """,
        {"experiment": cfg.name, "config_hash": cfg.config_hash},
    )


def evaluate_experiment(store: Store, cfg: ExperimentConfig) -> dict[str, Any]:
    """Evaluate the experiment's current rows and store the document and its tables.

    The config is recorded in `experiment_registry` first (its `first_seen` kept), so every
    configuration that was ever evaluated stays queryable next to its results.
    """
    store.register_experiment(cfg.registry_row())
    rows = evaluation_rows(store, cfg)
    ev = evaluation.evaluate(rows)
    ev["config_hash"] = cfg.config_hash
    tables = evaluation.evaluation_tables(ev)
    store.replace_evaluation(
        cfg.name,
        cfg.config_hash,
        {
            "experiment_metrics": tables["metrics"],
            "experiment_coverage": tables["coverage"],
            "experiment_prevalence": tables["prevalence"],
            "experiment_calibration": tables["calibration"],
        },
        ev,
    )
    return ev


def cross_experiment(
    store: Store, experiments: list[ExperimentConfig]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, pd.DataFrame]]:
    """Current evaluations, pairwise comparisons and disagreement tables of the experiments.

    An evaluation counts only if it was computed for the experiment's current config and
    has at least one answered row. Each comparison also carries both experiments' config
    columns (`model_a`, `model_b`, `temperature_a`, ...; see `CONFIG_COLUMNS`).
    """
    stored = store.read_evaluations()
    current = [cfg for cfg in experiments if cfg.name in stored and stored[cfg.name][0] == cfg.config_hash]
    evals = [stored[cfg.name][1] for cfg in current if stored[cfg.name][1]["coverage"]["n_answered"] > 0]
    names = {ev["experiment"] for ev in evals}
    rows = {cfg.name: evaluation_rows(store, cfg) for cfg in current if cfg.name in names}
    configs = {cfg.name: config_columns(cfg) for cfg in current}
    pairwise = [
        {
            **evaluation.paired_comparison(rows[a], rows[b], a, b),
            **{f"{col}_{side}": configs[name][col] for col in CONFIG_COLUMNS for side, name in (("a", a), ("b", b))},
        }
        for a, b in itertools.combinations(sorted(rows), 2)
    ]
    disagreements = {name: evaluation.disagreements(frame) for name, frame in rows.items()}
    return evals, pairwise, disagreements
