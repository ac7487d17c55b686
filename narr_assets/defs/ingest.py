"""Ingest wiring: the source file, the ingest assets and their checks, and the source sensor.

Graph: source_file (observable) -> raw_narratives -> narratives -> narrative_batches.
`narrative_batches` registers one dynamic partition per batch of the ledger; every
experiment's classifications are partitioned by `batch_partitions`.

A source the library refuses (unreadable, no narrative, or a mass removal not allowed in the
`raw_narratives` run config) fails its step with the library's one-line message and leaves
every table as it was.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from narr_assets import quality
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.defs.metadata import counts_md
from narr_assets.defs.resources import NarrSettings
from narr_assets.ingest import IngestError
from narr_assets.narratives import CHANGE_COUNTS
from narr_assets.store import Store

BATCH_PARTITIONS = "narrative_batches"
batch_partitions = dg.DynamicPartitionsDefinition(name=BATCH_PARTITIONS)

KEYS_UNIQUE = "keys_unique"
TEXT_NOT_EMPTY = "text_not_empty"
LABELS_VALID = "labels_valid"
CHECKSUM_CURRENT = "checksum_matches_source_file"


@dg.observable_source_asset(
    group_name="ingest", description="The input spreadsheet; its data version is the file's MD5."
)
def source_file(settings: NarrSettings) -> dg.ObserveResult:
    checksum = settings.source_checksum()
    if checksum is None:
        raise dg.Failure(f"source file not found: {settings.source_path} (set NARR_SOURCE)")
    return dg.ObserveResult(
        data_version=dg.DataVersion(checksum),
        metadata={"path": dg.MetadataValue.path(settings.source), "bytes": settings.source_path.stat().st_size},
    )


class IngestConfig(dg.Config):
    """Run options for `raw_narratives`."""

    allow_mass_removal: bool = Field(
        default=False,
        description="Ingest a source file that removes more than half of the stored narratives "
        "(their results are kept and flagged in removed_narratives).",
    )


@dg.asset(deps=[source_file], group_name="ingest", kinds={"duckdb"})
def raw_narratives(
    context: dg.AssetExecutionContext, config: IngestConfig, settings: NarrSettings, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Every row of the source sheet in long form, with provenance (file, row, checksum)."""
    try:
        read = ingest_raw(
            Store(duckdb),
            settings.source_path,
            settings.sheet,
            allow_mass_removal=config.allow_mass_removal,
            locks_dir=settings.layout.locks,
            log=context.log.info,
        )
    except IngestError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from None
    load = read.load
    return dg.MaterializeResult(
        data_version=dg.DataVersion(load.checksum),
        metadata={
            "source": dg.MetadataValue.path(load.source_path),
            "layout": load.layout,
            "rows_read": load.rows_read,
            "long_rows": len(load.frame),
            "data_checksum": load.checksum,
            "attribute_columns": ", ".join(load.attribute_columns) or "none",
            **read.changes,
            "changes": counts_md(read.changes),
        },
    )


@dg.asset(deps=[raw_narratives], group_name="ingest", kinds={"duckdb"})
def narratives(
    context: dg.AssetExecutionContext, settings: NarrSettings, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """One row per (incident_id, narrative_type): deduplicated, placeholder-flagged, batched."""
    # Partitions are registered by `narrative_batches` alone (it registers every batch the
    # instance lacks), so there is one place that keeps Dagster in step with the ledger.
    try:
        result, new_batches = build_narratives(
            Store(duckdb), batch_size=settings.batch_size, locks_dir=settings.layout.locks, log=context.log.info
        )
    except IngestError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from None
    stats = {k: int(v) for k, v in result.stats.items()}
    changes = {k: stats[k] for k in CHANGE_COUNTS}
    return dg.MaterializeResult(
        metadata={
            **stats,
            "new_batches": len(new_batches),
            "counts": counts_md({k: v for k, v in stats.items() if k not in changes}),
            "changes": counts_md(changes),
        }
    )


@dg.asset(deps=[narratives], group_name="ingest", kinds={"duckdb"})
def narrative_batches(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> dg.MaterializeResult:
    """The stable batch ledger; every batch is a partition of the classification assets."""
    store = Store(duckdb)
    batches = store.batch_ids()
    existing = set(context.instance.get_dynamic_partitions(BATCH_PARTITIONS))
    missing = [b for b in batches if b not in existing]
    if missing:  # new batches, or a fresh DAGSTER_HOME over an existing database
        context.instance.add_dynamic_partitions(BATCH_PARTITIONS, missing)
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


# What "re-ingest" means everywhere (the sensor, `narr ingest`, tests): these three assets.
INGEST_ASSETS = (raw_narratives, narratives, narrative_batches)
INGEST_KEYS = [a.key for a in INGEST_ASSETS]
ingest_selection = dg.AssetSelection.assets(*INGEST_ASSETS)


def _check(outcome: tuple[bool, dict]) -> dg.AssetCheckResult:
    passed, metadata = outcome
    return dg.AssetCheckResult(passed=passed, metadata=metadata)


@dg.asset_check(asset=narratives, name=KEYS_UNIQUE, description="One row per (incident_id, narrative_type).")
def narratives_keys_unique(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _check(quality.narrative_keys_unique(Store(duckdb)))


@dg.asset_check(asset=narratives, name=TEXT_NOT_EMPTY, description="No empty or whitespace-only narrative.")
def narratives_text_not_empty(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _check(quality.narrative_text_not_empty(Store(duckdb)))


@dg.asset_check(asset=narratives, name=LABELS_VALID, description="Manual labels are 0, 1 or missing.")
def narratives_labels_valid(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _check(quality.labels_valid(Store(duckdb)))


@dg.asset_check(
    asset=narratives,
    name=CHECKSUM_CURRENT,
    description="The ingested data is from the source file as it is now; fails until a changed file is re-ingested.",
)
def narratives_checksum_current(settings: NarrSettings, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _check(quality.checksum_current(Store(duckdb), settings.source_checksum() or "missing file"))


def source_change_request(current: str | None, cursor: str | None, source: str) -> dg.RunRequest | dg.SkipReason:
    """Decide from the file's checksum and the last one seen; pure, so it is tested directly."""
    if current is None:
        return dg.SkipReason(f"source file not found: {source}")
    if current == cursor:
        return dg.SkipReason("source file unchanged")
    # The checksum is the run key: Dagster never launches two runs with one key, so a file
    # seen again (or a tick repeated) cannot re-trigger ingestion.
    return dg.RunRequest(run_key=current, asset_selection=INGEST_KEYS, tags={"narr/source_checksum": current})


@dg.sensor(
    name="source_file_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    target=ingest_selection,
    description="Requests re-ingestion when the MD5 of the source file changes.",
)
def source_file_sensor(context: dg.SensorEvaluationContext, settings: NarrSettings) -> dg.SensorResult:
    current = settings.source_checksum()
    decision = source_change_request(current, context.cursor, settings.source)
    if isinstance(decision, dg.RunRequest):
        return dg.SensorResult(run_requests=[decision], cursor=current)
    return dg.SensorResult(skip_reason=decision, cursor=context.cursor)


def ingest_defs() -> dg.Definitions:
    """The ingest assets, their checks and the source sensor."""
    return dg.Definitions(
        assets=[source_file, *INGEST_ASSETS],
        asset_checks=[
            narratives_keys_unique,
            narratives_text_not_empty,
            narratives_labels_valid,
            narratives_checksum_current,
        ],
        sensors=[source_file_sensor],
    )
