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
    """Evaluate the experiment's current rows and store the document and its tables."""
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
    has at least one answered row.
    """
    stored = store.read_evaluations()
    current = [cfg for cfg in experiments if cfg.name in stored and stored[cfg.name][0] == cfg.config_hash]
    evals = [stored[cfg.name][1] for cfg in current if stored[cfg.name][1]["coverage"]["n_answered"] > 0]
    names = {ev["experiment"] for ev in evals}
    rows = {cfg.name: evaluation_rows(store, cfg) for cfg in current if cfg.name in names}
    pairwise = [
        evaluation.paired_comparison(rows[a], rows[b], a, b) for a, b in itertools.combinations(sorted(rows), 2)
    ]
    disagreements = {name: evaluation.disagreements(frame) for name, frame in rows.items()}
    return evals, pairwise, disagreements
