"""One experiment file -> its Dagster definitions.

Naming rule: experiment `<name>` (`configs/experiments/<name>.yaml`) yields the assets
`<name>/classifications` (one partition per batch, many partitions per run) and
`<name>/metrics`, and three checks on the classifications. Both assets' code version is the
experiment's config hash, so an edited prompt shows as a changed code version in the UI.
"""

from collections.abc import Callable

import dagster as dg
from dagster_duckdb import DuckDBResource

from narr_assets import evaluation, quality
from narr_assets.classify import (
    ClassificationFailed,
    PartitionBusyError,
    RunInterrupted,
    RunSummary,
    classify_batches,
)
from narr_assets.defs.ingest import batch_partitions, narrative_batches
from narr_assets.defs.metadata import metrics_md, run_summary_metadata
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import ExperimentConfig
from narr_assets.llm import FatalError
from narr_assets.results import evaluate_experiment
from narr_assets.store import Store

ONE_ROW_PER_NARRATIVE = "one_row_per_narrative"
ERROR_RATE = "error_rate_below_threshold"
CONFIDENCE_RANGE = "confidence_in_range"


class ClassifyConfig(dg.Config):
    """Run options for a classification asset."""

    retry_errors: bool = False
    progress_every_s: float = 10.0


def classifications_key(cfg: ExperimentConfig) -> dg.AssetKey:
    return dg.AssetKey([cfg.name, "classifications"])


def metrics_key(cfg: ExperimentConfig) -> dg.AssetKey:
    return dg.AssetKey([cfg.name, "metrics"])


def _model(cfg: ExperimentConfig) -> str:
    return cfg.model.name if cfg.backend == "openai" else "rules"


def _termination_requested(context: dg.AssetExecutionContext) -> str | None:
    """Why the run should stop, if someone asked: a termination from the UI or the API.

    A run launched by `narr` executes in the `narr` process, which Dagster's termination cannot
    reach (no code server to signal); it does mark the run CANCELING, or CANCELED when forced.
    """
    run = context.instance.get_run_by_id(context.run.run_id)
    if run is None:
        return None
    if run.status == dg.DagsterRunStatus.CANCELING:
        return "termination requested in Dagster"
    if run.status == dg.DagsterRunStatus.CANCELED:
        return "run marked canceled in Dagster"
    return None


def build_classifications(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    """`<experiment>/classifications`: one partition per batch, many per run."""
    model = _model(cfg)

    @dg.asset(
        key=classifications_key(cfg),
        deps=[narrative_batches],
        partitions_def=batch_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        code_version=cfg.config_hash,
        group_name="classification",
        kinds={"duckdb", "python" if cfg.backend == "rules" else "openai"},
        description=cfg.description or f"{cfg.name}: {cfg.backend} classifications by batch",
        metadata={
            "model": model,
            "config_hash": cfg.config_hash,
            "source_file": cfg.source_file,
            "effective_config": dg.MetadataValue.json(cfg.effective()),
        },
        automation_condition=dg.AutomationCondition.eager() if cfg.run.auto_materialize else None,
    )
    def classifications(
        context: dg.AssetExecutionContext, config: ClassifyConfig, settings: NarrSettings, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        store = Store(duckdb)
        try:
            summary = classify_batches(
                cfg,
                store,
                list(context.partition_keys),
                journal_dir=settings.layout.journal,
                locks_dir=settings.layout.locks,
                retry_errors=config.retry_errors,
                log=context.log.info,
                progress_every_s=config.progress_every_s,
                should_stop=lambda: _termination_requested(context),
            )
        except PartitionBusyError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        except FatalError as exc:
            raise dg.Failure(f"stopped: {exc}", allow_retries=False) from None
        except ClassificationFailed as exc:
            # When the batches failed on the database lock, logging the run meets the same lock
            # and its one-line DatabaseLockedError (exit 75 in `narr`: retry later) is what the
            # user sees; every answer is journalled either way.
            store.log_run(exc.summary)
            record_complete_partitions(context, store, exc.summary, check_rules(cfg))
            raise dg.Failure(str(exc), metadata=run_summary_metadata(exc.summary, model)) from None
        except RunInterrupted as exc:
            # Stopped on request with its answers journalled: say so, then let Dagster see the
            # interruption (a KeyboardInterrupt), which cancels the run rather than failing it.
            store.log_run(exc.summary)
            record_complete_partitions(context, store, exc.summary, check_rules(cfg))
            context.log.warning(str(exc))
            raise
        store.log_run(summary)
        return dg.MaterializeResult(metadata=run_summary_metadata(summary, model))

    return classifications


def build_metrics(cfg: ExperimentConfig, classifications: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`<experiment>/metrics`: reads every partition of the experiment's classifications."""

    @dg.asset(
        key=metrics_key(cfg),
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
                "metrics_strict": metrics_md(ev, "strict"),
                "metrics_answered": metrics_md(ev, "answered"),
                "coverage": dg.MetadataValue.json(ev["coverage"]),
            }
        )

    return metrics


Rule = Callable[[Store], tuple[bool, dict]]


def check_rules(cfg: ExperimentConfig) -> list[tuple[str, str, Rule]]:
    """(name, description, rule) of each check on the experiment's classifications."""
    max_rate = cfg.run.max_error_rate
    return [
        (
            ONE_ROW_PER_NARRATIVE,
            "Every narrative of a classified batch has exactly one current row.",
            lambda s: quality.one_row_per_narrative(s, cfg.name),
        ),
        (
            ERROR_RATE,
            f"Parse errors, refusals, truncations and rejected requests stay under {max_rate:.0%} of asked rows.",
            lambda s: quality.error_rate_below(s, cfg.name, max_rate),
        ),
        (
            CONFIDENCE_RANGE,
            "Every confidence is within [0, 1].",
            lambda s: quality.confidences_in_range(s, cfg.name),
        ),
    ]


def build_checks(cfg: ExperimentConfig, classifications: dg.AssetsDefinition) -> list[dg.AssetChecksDefinition]:
    """Checks over all written partitions of one experiment's classifications."""

    def make(name: str, description: str, rule: Rule) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=classifications, name=name, description=description)
        def _check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
            passed, metadata = rule(Store(duckdb))
            return dg.AssetCheckResult(passed=passed, metadata=metadata)

        return _check

    return [make(name, description, rule) for name, description, rule in check_rules(cfg)]


def record_complete_partitions(
    context: dg.AssetExecutionContext, store: Store, summary: RunSummary, rules: list[tuple[str, str, Rule]]
) -> None:
    """Record, partition by partition, what a failed or stopped run leaves complete in DuckDB.

    Dagster 1.13 cannot yield per-partition results from a single-run step (dagster-io/dagster
    issues 17836 and 21072): when the step fails, every partition of the run reads FAILED,
    the written ones included, and the checks are skipped. So before failing, each batch that
    is complete (written by this run, or already up to date) is reported as a materialization
    of its partition, stamped with the experiment's config hash as its code version, and the
    checks are evaluated on what was written. Dagster then shows exactly those partitions
    materialised and the others failed. On full success the step returns as usual instead.
    """
    complete = sorted(set(summary.written_batches) | set(summary.up_to_date_batches))
    for partition in complete:
        context.instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=context.asset_key,
                partition=partition,
                metadata={"recorded_by_run": context.run_id, "config_hash": summary.config_hash},
                tags={"dagster/code_version": summary.config_hash},
            )
        )
    if not complete:
        return
    for name, _description, rule in rules:
        passed, metadata = rule(store)
        context.instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=context.asset_key, check_name=name, passed=passed, metadata=metadata)
        )


def build_experiment_defs(cfg: ExperimentConfig) -> dg.Definitions:
    """Everything one experiment file yields: classifications, metrics and their checks."""
    classifications = build_classifications(cfg)
    return dg.Definitions(
        assets=[classifications, build_metrics(cfg, classifications)],
        asset_checks=build_checks(cfg, classifications),
    )
