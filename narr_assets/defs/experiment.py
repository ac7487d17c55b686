"""One experiment file -> its Dagster definitions.

Naming rule: experiment `<name>` (`configs/experiments/<name>.yaml`) yields the assets
`<name>/classifications` (one partition per batch, many partitions per run) and
`<name>/metrics`, three checks on the classifications, and the job `experiment_<name>` over
both assets. Both assets' code version is the experiment's config hash, so an edited prompt
shows as a changed code version in the UI.
"""

from collections.abc import Callable, Sequence

import dagster as dg
from dagster._core.definitions.data_version import (  # the tag names Dagster's own steps write
    CODE_VERSION_TAG,
    extract_data_version_from_entry,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster_duckdb import DuckDBResource

from narr_assets import evaluation, quality
from narr_assets.classify import (
    ClassificationFailed,
    PartitionBusyError,
    RunInterrupted,
    RunSummary,
    classify_batches,
)
from narr_assets.defs.ingest import batch_partitions, narrative_batches, narratives
from narr_assets.defs.metadata import metrics_md, row_count, run_summary_metadata
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import ExperimentConfig
from narr_assets.llm import FatalError
from narr_assets.results import evaluate_experiment
from narr_assets.status import batch_of, partition_keys
from narr_assets.store import Store

ONE_ROW_PER_NARRATIVE = "one_row_per_narrative"
ERROR_RATE = "error_rate_below_threshold"
CONFIDENCE_RANGE = "confidence_in_range"
# Run tags naming the experiment and its config: runs can be filtered by them in the UI.
EXPERIMENT_TAG = "narr/experiment"
CONFIG_HASH_TAG = "narr/config_hash"


class ClassifyConfig(dg.Config):
    """Run options for a classification asset."""

    retry_errors: bool = False
    progress_every_s: float = 10.0


def classifications_key(cfg: ExperimentConfig) -> dg.AssetKey:
    return dg.AssetKey([cfg.name, "classifications"])


def metrics_key(cfg: ExperimentConfig) -> dg.AssetKey:
    return dg.AssetKey([cfg.name, "metrics"])


# The groups of the assets all experiments share (`ingest.py`, `comparison.py`).
SHARED_GROUPS = ("ingest", "evaluation")


def experiment_group(cfg: ExperimentConfig) -> str:
    """The asset group of one experiment's assets, so the graph draws each experiment as its own box.

    The experiment's name (already a valid group name: letters, digits, `_`), unless it is
    the name of a shared group.
    """
    return f"{cfg.name}_experiment" if cfg.name in SHARED_GROUPS else cfg.name


def _model(cfg: ExperimentConfig) -> str:
    return "rules" if cfg.backend == "rules" else cfg.model.name


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


def missing_batches_condition() -> dg.AutomationCondition:
    """The automation condition of an opted-in experiment: each missing batch, requested once.

    `eager()` does not fit a dynamic partition per batch: its first evaluation counts every
    partition as handled, so batches missing before automation was turned on were never asked
    for, and each materialisation of `narrative_batches` (every ingest, unchanged or not) made
    it request every partition again. Here a partition is requested when all of these hold:

    - `missing()`: never materialised. So a re-ingest leaves materialised batches alone (a new
      or edited batch gets a new key, which is missing), and a config edit is no trigger: it
      shows as a changed code version, re-run on purpose.
    - `~execution_failed()`: its latest run did not fail. A failed batch is one the engine's
      own retries (`run.max_retries`, with backoff) could not fix - an endpoint down, a
      rejected key, a locked database - so asking again at once fails the same way, and on
      a broken endpoint forever. It waits for the user ("Materialize > missing and failed",
      or `narr run`); its answers so far are journalled, so resuming pays nothing twice.
    - `~any_deps_in_progress()`: no ingest is running. A key the ingest is about to
      supersede is not worth a run (the step would refuse the whole run); what the ingest
      leaves missing is requested on the first evaluation after it.
    - not handled since it became missing: requested by this sensor, or taken up by a run or
      backfill (`narr run`, the UI). So each batch is requested once, never while a run is
      on it, and a run someone stops is not restarted behind their back (its batches wait
      for the user, like failed ones). Nothing else is remembered: a batch missing before
      automation was turned on, or during an ingest, is simply not handled yet. (Dagster
      stores this memory as ranges of keys and drops it when an ingest deletes a range's
      first or last key; the worst that does is request a stopped run's batches once more.)

    Returns:
        The condition, evaluated by the experiment's automation sensor (`automation_sensors`).
    """
    condition = dg.AutomationCondition
    taken_up = condition.newly_requested() | condition.in_progress()
    # A key that is new and already in a run (`narr run` between two evaluations) is handled.
    became_missing = condition.newly_missing() & ~condition.in_progress()
    handled = taken_up.since(became_missing).with_label("handled_since_missing")
    return (
        condition.missing() & ~condition.execution_failed() & ~condition.any_deps_in_progress() & ~handled
    ).with_label("missing_batches_once")


def build_classifications(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    """`<experiment>/classifications`: one partition per batch, many per run."""
    model = _model(cfg)

    @dg.asset(
        key=classifications_key(cfg),
        deps=[narrative_batches],
        partitions_def=batch_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=cfg.pool,  # one classification step per endpoint at a time, across runs
        code_version=cfg.config_hash,
        group_name=experiment_group(cfg),
        kinds={"duckdb", {"rules": "python", "imported": "sqlite"}.get(cfg.backend, "openai")},
        description=cfg.description or f"{cfg.name}: {cfg.backend} classifications by batch",
        metadata={
            "model": model,
            "config_hash": cfg.config_hash,
            "source_file": cfg.source_file,
            "effective_config": dg.MetadataValue.json(cfg.effective()),
        },
        automation_condition=missing_batches_condition() if cfg.run.auto_materialize else None,
    )
    def classifications(
        context: dg.AssetExecutionContext, config: ClassifyConfig, settings: NarrSettings, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        store = Store(duckdb)
        batches, outdated = split_keys(store, context.partition_keys)
        if not batches:
            raise dg.Failure(outdated_message(outdated), allow_retries=False)
        try:
            summary = classify_batches(
                cfg,
                store,
                batches,
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
        if outdated:  # the current keys are done: record them, and fail the outdated ones
            record_complete_partitions(context, store, summary, check_rules(cfg))
            raise dg.Failure(outdated_message(outdated), allow_retries=False)
        # The row count is the experiment's (its current rows in `classifications`): a run
        # attaches the same metadata to each of its partitions, so a run's count would mislead.
        row_metadata = row_count(store, "classifications", experiment=cfg.name)
        return dg.MaterializeResult(metadata={**run_summary_metadata(summary, model), **row_metadata})

    return classifications


def build_metrics(cfg: ExperimentConfig, classifications: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`<experiment>/metrics`: reads every partition of the experiment's classifications."""

    @dg.asset(
        key=metrics_key(cfg),
        # `narratives` for the labels: a label edit marks metrics stale, and no classification.
        deps=[classifications, narratives],
        group_name=experiment_group(cfg),
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
                **row_count(Store(duckdb), "experiment_metrics", experiment=cfg.name),
            }
        )

    return metrics


Rule = Callable[[Store], tuple[bool, dict]]


def split_keys(store: Store, keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """The batch ids of a run's current partition keys, and the keys of an older content version.

    A key goes out of date when a re-ingest edits its batch between the launch and the step
    (`narrative_batches` then deletes it and registers the new one). Classifying it would
    answer for texts the key does not stand for, so the step classifies the current keys only,
    records them, and fails naming the others.
    """
    current = partition_keys(store)
    outdated = [k for k in keys if current.get(batch_of(k)) != k]
    return [batch_of(k) for k in keys if k not in set(outdated)], outdated


def outdated_message(outdated: Sequence[str]) -> str:
    shown = ", ".join(outdated[:5]) + (f" and {len(outdated) - 5} more" if len(outdated) > 5 else "")
    return (
        f"partition(s) {shown} no longer match the narratives (re-ingested since the run was launched; "
        "their batches have new keys): materialise the missing partitions"
    )


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
    complete = set(summary.written_batches) | set(summary.up_to_date_batches)
    current = set(partition_keys(store).values())  # an outdated key is never recorded
    keys = sorted(k for k in context.partition_keys if batch_of(k) in complete and k in current)
    tags = _provenance_tags(context.instance, summary.config_hash)
    for partition in keys:
        context.instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=context.asset_key,
                partition=partition,
                metadata={"recorded_by_run": context.run.run_id, "config_hash": summary.config_hash},
                tags=tags,
            )
        )
    if not complete:
        return
    for name, _description, rule in rules:
        passed, metadata = rule(store)
        context.instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=context.asset_key, check_name=name, passed=passed, metadata=metadata)
        )


def _provenance_tags(instance: dg.DagsterInstance, config_hash: str) -> dict[str, str]:
    """The provenance tags Dagster writes on a step's own materialisations.

    Without them a reported materialisation reads stale as soon as `narrative_batches` is
    materialised again (Dagster then compares timestamps instead of data versions).
    """
    tags = {CODE_VERSION_TAG: config_hash}
    record = instance.get_latest_data_version_record(narrative_batches.key)
    if record is not None:
        version = extract_data_version_from_entry(record.event_log_entry)
        if version is not None:
            tags[get_input_data_version_tag(narrative_batches.key)] = version.value
            tags[get_input_event_pointer_tag(narrative_batches.key)] = str(record.storage_id)
    return tags


def automation_sensors(cfg: ExperimentConfig, classifications: dg.AssetsDefinition) -> list[dg.SensorDefinition]:
    """`<experiment>_automation`, running from the start, when the experiment opts in.

    Dagster's own `default_automation_condition_sensor` starts stopped, so opting in in the
    YAML file alone would do nothing until someone switched it on in the UI. One sensor per
    experiment: each can be paused on its own (Automation tab). It emits a backfill when it
    requests several batches, which `BackfillPolicy.single_run()` runs as one run per
    contiguous stretch of keys; new and edited batches get keys at the end, so one run.
    """
    if not cfg.run.auto_materialize:
        return []
    return [
        dg.AutomationConditionSensorDefinition(
            f"{cfg.name}_automation",
            target=dg.AssetSelection.assets(classifications),
            default_status=dg.DefaultSensorStatus.RUNNING,
            description=f"{cfg.name}: classifies each missing batch once (run.auto_materialize in {cfg.source_file})",
            # Its runs (through a backfill, so not the experiment's job) get the job's tags too.
            run_tags={EXPERIMENT_TAG: cfg.name, CONFIG_HASH_TAG: cfg.config_hash},
        )
    ]


def experiment_job_name(cfg: ExperimentConfig) -> str:
    """`experiment_<name>`: a valid job name, since an experiment name is letters, digits and `_`.

    The prefix keeps it apart from the project's other jobs (`ingest`, `compare`), whatever
    the experiment is called.
    """
    return f"experiment_{cfg.name}"


def build_experiment_defs(cfg: ExperimentConfig) -> dg.Definitions:
    """Everything one experiment file yields: classifications, metrics, their checks and job.

    The job `experiment_<name>` selects both assets; `narr` launches it with one of them
    selected, so a run shows the job, the asset it materialises and the experiment's tags, and
    the UI can re-execute it. Mixing the partitioned classifications with the unpartitioned
    metrics in one job is allowed: a run selecting metrics alone takes no partition.
    """
    classifications = build_classifications(cfg)
    metrics = build_metrics(cfg, classifications)
    job = dg.define_asset_job(
        experiment_job_name(cfg),
        selection=dg.AssetSelection.assets(classifications, metrics),
        description=f"{cfg.name}: classify batches ({cfg.source_file}) and evaluate them.",
        # Copied onto every run of this job: narr's, launches and backfills of the job in the UI,
        # re-executions. (An asset backfill from the asset's page runs Dagster's own asset job.)
        tags={EXPERIMENT_TAG: cfg.name, CONFIG_HASH_TAG: cfg.config_hash},
    )
    return dg.Definitions(
        assets=[classifications, metrics],
        asset_checks=build_checks(cfg, classifications),
        sensors=automation_sensors(cfg, classifications),
        jobs=[job],
    )
