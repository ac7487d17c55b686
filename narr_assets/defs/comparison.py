"""Across experiments: the leaderboard (with pairwise tests), the HTML report and the exports."""

from collections.abc import Sequence

import dagster as dg
from dagster_duckdb import DuckDBResource

from narr_assets import evaluation
from narr_assets.defs.experiment import metrics_key
from narr_assets.defs.metadata import ROW_COUNT, frame_md, row_count
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import BrokenExperiment, ExperimentConfig
from narr_assets.exports import export_frame, write_export
from narr_assets.private import private_dir, write_private_bytes
from narr_assets.report import REPORT_COPIES, prune_report_copies, render_report
from narr_assets.results import cross_experiment, leaderboard_table, pairwise_frame
from narr_assets.store import Store

COMPARE_JOB = "compare"
LEADERBOARD_SHOWN = (
    "rank",
    "experiment",
    "model",
    "temperature",
    "prompt_version",
    "reasoning_effort",
    "f1",
    "f1_ci_low",
    "f1_ci_high",
    "answered_f1",
    "answered_share",
)
LEADERBOARD_DESCRIPTION = (
    "Experiments ranked by strict F1 (unanswered counted as wrong; answered F1, the R system's F1, beside it) "
    "with intervals, coverage, config (model, temperature, prompt version, reasoning effort) and pairwise tests."
)
# The UI's table names the variant of each F1: the table's `f1` is strict (see results.HEADLINE_VARIANT).
SHOWN_NAMES = {"f1": "strict_f1", "f1_ci_low": "strict_f1_ci_low", "f1_ci_high": "strict_f1_ci_high"}


def build_comparison_defs(
    experiments: list[ExperimentConfig], broken: Sequence[BrokenExperiment] = ()
) -> dg.Definitions:
    """`leaderboard` -> `report`, and `exports`, over every experiment's metrics.

    Experiment files that failed to load (`broken`) are named in the leaderboard's
    description, so the UI says why an experiment is missing from the comparison.
    """
    metrics_keys = [metrics_key(cfg) for cfg in experiments]
    left_out = "".join(f"\n\nLeft out, invalid experiment file: {b.message}" for b in broken)

    @dg.asset(
        deps=metrics_keys,
        group_name="evaluation",
        kinds={"duckdb"},
        description=LEADERBOARD_DESCRIPTION + left_out,
    )
    def leaderboard(duckdb: DuckDBResource) -> dg.MaterializeResult:
        store = Store(duckdb)
        evals, pairwise, disagreements = cross_experiment(store, experiments)
        board = leaderboard_table(evals, experiments)
        # All three tables are replaced every time, empty ones included: a comparison with an
        # experiment that was removed or changed must not outlive it.
        store.replace_table("leaderboard", board)
        store.replace_table("pairwise_comparisons", pairwise_frame(pairwise))
        store.replace_table(
            "disagreements",
            evaluation.disagreement_table([frame.assign(experiment=name) for name, frame in disagreements.items()]),
        )
        shown = board[[c for c in LEADERBOARD_SHOWN if c in board]].rename(columns=SHOWN_NAMES)
        return dg.MaterializeResult(
            metadata={"experiments": len(board), "leaderboard": frame_md(shown), **row_count(store, "leaderboard")}
        )

    @dg.asset(deps=[leaderboard], group_name="evaluation", kinds={"html"})
    def report(
        context: dg.AssetExecutionContext, settings: NarrSettings, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        """One self-contained HTML report per run, owner-only; older per-run copies are pruned."""
        # Recomputed rather than read back from the tables `leaderboard` wrote: the evaluations
        # come from the metrics assets either way, and recomputing keeps every section of the
        # report from the same moment (about a second at production size).
        evals, pairwise, disagreements = cross_experiment(Store(duckdb), experiments)
        board = leaderboard_table(evals, experiments)
        reports = private_dir(settings.layout.reports)
        out = reports / f"report-{context.run.run_id[:8]}.html"
        render_report(evals, board, disagreements, out, pairwise=pairwise)
        latest = write_private_bytes(reports / "report.html", out.read_bytes())
        pruned = prune_report_copies(reports, REPORT_COPIES, current=out)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "latest": dg.MetadataValue.path(str(latest)),
                "experiments": len(evals),
                "old_copies_deleted": len(pruned),
            }
        )

    @dg.asset(deps=metrics_keys, group_name="evaluation", kinds={"csv"})
    def exports(settings: NarrSettings, duckdb: DuckDBResource) -> dg.MaterializeResult:
        """CSV of each evaluated experiment's results joined with the narratives."""
        store = Store(duckdb)
        written = {}
        rows = 0
        for cfg in experiments:
            frame = export_frame(store, cfg.name)
            if not frame.empty:
                path = settings.layout.exports / f"{cfg.name}.csv"
                written[cfg.name] = str(write_export(frame, path, "csv", tighten_folder=True))
                rows += len(frame)
        # The row count is over every file written: one CSV per experiment, one table in all.
        return dg.MaterializeResult(metadata={"files": dg.MetadataValue.json(written), ROW_COUNT: rows})

    compare_job = dg.define_asset_job(
        COMPARE_JOB,
        # Every experiment's metrics too: `narr materialize` refreshes them and the comparison in one run.
        selection=dg.AssetSelection.assets(*metrics_keys, leaderboard, report, exports),
        description="Compare the experiments: their metrics, the leaderboard, the report and the exports.",
    )
    return dg.Definitions(assets=[leaderboard, report, exports], jobs=[compare_job])
