"""Dagster assets: thin wiring around `pipeline`, `classify` and `evaluation`.

Graph: source_file -> raw_narratives -> narratives -> narrative_batches
       -> <experiment>/classifications (partitioned by batch) -> <experiment>/metrics
       -> leaderboard -> report
"""

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from narr_assets import settings
from narr_assets.classify import ClassificationFailed, PartitionBusyError, classify_batches
from narr_assets.experiments import ExperimentConfig
from narr_assets.ingest import file_checksum
from narr_assets.llm import FatalError
from narr_assets.pipeline import build_narratives, ingest_raw
from narr_assets.store import Store

batch_partitions = dg.DynamicPartitionsDefinition(name="narrative_batches")


@dg.observable_source_asset(
    group_name="ingest", description="The input spreadsheet; its data version is the file's MD5."
)
def source_file() -> dg.ObserveResult:
    path = settings.source_path()
    if not path.is_file():
        raise dg.Failure(f"source file not found: {path} (set NARR_SOURCE)")
    return dg.ObserveResult(
        data_version=dg.DataVersion(file_checksum(path)),
        metadata={"path": dg.MetadataValue.path(str(path)), "bytes": path.stat().st_size},
    )


@dg.asset(deps=[source_file], group_name="ingest", kinds={"duckdb"})
def raw_narratives(duckdb: DuckDBResource) -> dg.MaterializeResult:
    """Every row of the source sheet in long form, with provenance (file, row, checksum)."""
    load = ingest_raw(Store(duckdb), settings.source_path(), settings.source_sheet())
    frame = load.frame
    return dg.MaterializeResult(
        data_version=dg.DataVersion(load.checksum),
        metadata={
            "source": dg.MetadataValue.path(load.source_path),
            "layout": load.layout,
            "rows_read": load.rows_read,
            "long_rows": len(frame),
            "data_checksum": load.checksum,
            "attribute_columns": ", ".join(load.attribute_columns) or "none",
        },
    )


@dg.asset(deps=[raw_narratives], group_name="ingest", kinds={"duckdb"})
def narratives(duckdb: DuckDBResource) -> dg.MaterializeResult:
    """One row per (incident_id, narrative_type): deduplicated, placeholder-flagged, batched."""
    # Partitions are registered by `narrative_batches` alone (it registers every batch the
    # instance lacks), so there is one place that keeps Dagster in step with the ledger.
    result, new_batches = build_narratives(Store(duckdb), batch_size=settings.batch_size())
    stats = dict(result.stats)
    table = "\n".join(["| count | value |", "|---|---|", *(f"| {k} | {v:,} |" for k, v in stats.items())])
    return dg.MaterializeResult(
        metadata={
            **{k: int(v) for k, v in stats.items()},
            "new_batches": len(new_batches),
            "counts": dg.MetadataValue.md(table),
        },
    )


@dg.asset(deps=[narratives], group_name="ingest", kinds={"duckdb"})
def narrative_batches(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> dg.MaterializeResult:
    """The stable batch ledger; every batch is a partition of the classification assets."""
    store = Store(duckdb)
    batches = store.batch_ids()
    existing = set(context.instance.get_dynamic_partitions(batch_partitions.name))
    missing = [b for b in batches if b not in existing]
    if missing:  # new batches, or a fresh DAGSTER_HOME over an existing database
        context.instance.add_dynamic_partitions(batch_partitions.name, missing)
    sizes = store.query_df("SELECT batch_id, count(*) AS n FROM narratives GROUP BY 1 ORDER BY 1")
    return dg.MaterializeResult(
        metadata={
            "batches": len(batches),
            "registered_now": len(missing),
            "narratives": int(sizes["n"].sum()) if not sizes.empty else 0,
            "smallest_batch": int(sizes["n"].min()) if not sizes.empty else 0,
            "largest_batch": int(sizes["n"].max()) if not sizes.empty else 0,
        }
    )


class ClassifyConfig(dg.Config):
    """Run options for a classification asset."""

    retry_errors: bool = False
    progress_every_s: float = 10.0


def build_classifications_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    """`<experiment>/classifications`: one partition per batch, many per run."""
    kinds = {"duckdb", "python" if cfg.backend == "rules" else "openai"}
    model = cfg.model.name if cfg.backend == "openai" else "rules"

    @dg.asset(
        key=dg.AssetKey([cfg.name, "classifications"]),
        deps=[narrative_batches],
        partitions_def=batch_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        code_version=cfg.config_hash,
        group_name="classification",
        kinds=kinds,
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
        context: dg.AssetExecutionContext, config: ClassifyConfig, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        store = Store(duckdb)
        try:
            summary = classify_batches(
                cfg,
                store,
                list(context.partition_keys),
                journal_dir=settings.journal_dir(),
                locks_dir=settings.locks_dir(),
                retry_errors=config.retry_errors,
                log=context.log.info,
                progress_every_s=config.progress_every_s,
            )
        except PartitionBusyError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        except FatalError as exc:
            raise dg.Failure(f"stopped: {exc}", allow_retries=False) from None
        except ClassificationFailed as exc:
            store.log_run(exc.summary)
            raise dg.Failure(str(exc), metadata=_summary_metadata(exc.summary, model)) from None
        store.log_run(summary)
        return dg.MaterializeResult(metadata=_summary_metadata(summary, model))

    return classifications


def _summary_metadata(summary, model: str) -> dict:
    """Metadata of one run. A run covers a range of partitions and Dagster attaches the same
    metadata to each, so every count says it is for the run, not for the one batch."""
    statuses = "\n".join(
        ["| status | rows |", "|---|---|", *(f"| {k} | {v:,} |" for k, v in sorted(summary.status_counts.items()))]
    )
    return {
        "model": model,
        "config_hash": summary.config_hash,
        "run_batches": len(summary.batches),
        "run_batches_up_to_date": len(summary.up_to_date_batches),
        "run_narratives": summary.narratives,
        "run_calls_ok": summary.calls_ok,
        "run_attempts": summary.attempts,
        "run_reused_from_journal": summary.reused,
        "run_skipped_placeholders": summary.skipped,
        "run_failed_batches": len(summary.failed_batches),
        "run_prompt_tokens": summary.prompt_tokens,
        "run_completion_tokens": summary.completion_tokens,
        "run_calls_per_second": round(summary.calls_per_second, 2),
        "run_statuses": dg.MetadataValue.md(statuses),
    }


def build_experiment_assets(cfg: ExperimentConfig) -> list[dg.AssetsDefinition]:
    """Every asset one experiment file yields (classifications, then metrics)."""
    from narr_assets.assets_eval import build_metrics_asset

    classifications = build_classifications_asset(cfg)
    return [classifications, build_metrics_asset(cfg, classifications)]


def frame_to_md(frame: pd.DataFrame, max_rows: int = 30) -> str:
    """A markdown table for Dagster metadata (the UI renders it)."""
    if frame.empty:
        return "_empty_"
    shown = frame.head(max_rows)
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    sep = "|" + "---|" * len(shown.columns)
    body = [
        "| " + " | ".join("" if pd.isna(v) else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row) + " |"
        for row in shown.itertuples(index=False)
    ]
    return "\n".join([header, sep, *body])
