"""Evaluation assets: per-experiment metrics, then leaderboard, report and exports."""

import itertools

import dagster as dg
from dagster_duckdb import DuckDBResource

from narr_assets import evaluation, settings
from narr_assets.experiments import ExperimentConfig
from narr_assets.exports import export_frame, write_export
from narr_assets.pipeline import evaluation_rows
from narr_assets.report import render_report
from narr_assets.store import Store


def evaluate_experiment(store: Store, cfg: ExperimentConfig) -> dict:
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


def build_metrics_asset(cfg: ExperimentConfig, classifications: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`<experiment>/metrics`: reads every partition of the experiment's classifications."""

    @dg.asset(
        key=dg.AssetKey([cfg.name, "metrics"]),
        deps=[classifications],
        group_name="evaluation",
        kinds={"duckdb"},
        code_version=cfg.config_hash,
        description=f"{cfg.name}: confusion matrix, P/R/F1 with intervals, coverage, calibration, cost",
    )
    def metrics(duckdb: DuckDBResource) -> dg.MaterializeResult:
        ev = evaluate_experiment(Store(duckdb), cfg)
        summary = evaluation.summary_row(ev)
        scalar = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        return dg.MaterializeResult(
            metadata={
                **scalar,
                "metrics_strict": dg.MetadataValue.md(evaluation.metrics_markdown(ev, "strict")),
                "metrics_answered": dg.MetadataValue.md(evaluation.metrics_markdown(ev, "answered")),
                "coverage": dg.MetadataValue.json(ev["coverage"]),
            }
        )

    return metrics


def cross_experiment(store: Store, experiments: list[ExperimentConfig]) -> tuple[list[dict], list[dict], dict]:
    """Current evaluations, pairwise comparisons and disagreement tables of the experiments."""
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


def build_cross_experiment_assets(experiments: list[ExperimentConfig]) -> list[dg.AssetsDefinition]:
    metrics_keys = [dg.AssetKey([cfg.name, "metrics"]) for cfg in experiments]

    @dg.asset(deps=metrics_keys, group_name="evaluation", kinds={"duckdb"})
    def leaderboard(duckdb: DuckDBResource) -> dg.MaterializeResult:
        """Experiments ranked by strict F1 with intervals, coverage and pairwise tests."""
        store = Store(duckdb)
        evals, pairwise, disagreements = cross_experiment(store, experiments)
        board = evaluation.leaderboard(evals)
        # All three tables are replaced every time, empty ones included: a comparison with an
        # experiment that was removed or changed must not outlive it.
        store.replace_table("leaderboard", board)
        store.replace_table("pairwise_comparisons", evaluation.pairwise_table(pairwise))
        store.replace_table(
            "disagreements",
            evaluation.disagreement_table([frame.assign(experiment=name) for name, frame in disagreements.items()]),
        )
        shown = board[
            [
                c
                for c in ("rank", "experiment", "f1", "f1_ci_low", "f1_ci_high", "answered_f1", "answered_share")
                if c in board
            ]
        ]
        from narr_assets.assets import frame_to_md

        return dg.MaterializeResult(
            metadata={"experiments": len(board), "leaderboard": dg.MetadataValue.md(frame_to_md(shown))}
        )

    @dg.asset(deps=[leaderboard], group_name="evaluation", kinds={"html"})
    def report(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> dg.MaterializeResult:
        """One self-contained HTML report (plots, tables, disagreements) per run."""
        store = Store(duckdb)
        # Recomputed rather than read back from the tables `leaderboard` wrote: the evaluations
        # come from the metrics assets either way, and recomputing keeps every section of the
        # report from the same moment (about a second at production size).
        evals, pairwise, disagreements = cross_experiment(store, experiments)
        board = evaluation.leaderboard(evals)
        out = settings.reports_dir() / f"report-{context.run.run_id[:8]}.html"
        render_report(evals, board, disagreements, out, pairwise=pairwise)
        latest = settings.reports_dir() / "report.html"
        latest.write_bytes(out.read_bytes())
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "latest": dg.MetadataValue.path(str(latest)),
                "experiments": len(evals),
            }
        )

    @dg.asset(deps=metrics_keys, group_name="evaluation", kinds={"csv"})
    def exports(duckdb: DuckDBResource) -> dg.MaterializeResult:
        """CSV of each evaluated experiment's results joined with the narratives."""
        store = Store(duckdb)
        written = {}
        for cfg in experiments:
            frame = export_frame(store, cfg.name)
            if not frame.empty:
                written[cfg.name] = str(write_export(frame, settings.exports_dir() / f"{cfg.name}.csv", "csv"))
        return dg.MaterializeResult(metadata={"files": dg.MetadataValue.json(written)})

    return [leaderboard, report, exports]
