"""Ingest wiring: the source file, the ingest assets and their checks, and the source sensor.

Graph: source_file (observable) -> raw_narratives -> narratives -> narrative_batches.
`narrative_batches` registers one dynamic partition per batch of the ledger; every
experiment's classifications are partitioned by `batch_partitions`.

A source the library refuses (unreadable, no narrative, or a mass removal not allowed in the
`raw_narratives` run config) fails its step with the library's one-line message and leaves
every table as it was.
"""

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from narr_assets import quality
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.defs.metadata import counts_md, table_metadata
from narr_assets.defs.resources import NarrSettings
from narr_assets.ingest import IngestError
from narr_assets.narratives import CHANGE_COUNTS
from narr_assets.status import partition_keys
from narr_assets.store import Store

BATCH_PARTITIONS = "narrative_batches"
batch_partitions = dg.DynamicPartitionsDefinition(name=BATCH_PARTITIONS)

KEYS_UNIQUE = "keys_unique"
TEXT_NOT_EMPTY = "text_not_empty"
LABELS_VALID = "labels_valid"
CHECKSUM_CURRENT = "checksum_matches_source_file"


def _observable_source_asset(**kwargs: Any) -> Callable[[Callable[..., Any]], dg.SourceAsset]:
    """`dg.observable_source_asset`, without the BetaWarning it prints at every code load.

    It is Dagster 1.13's one way to observe a source with a data version (`SourceAsset`'s
    `observe_fn` is deprecated), and its warning says nothing a user can act on; only this
    warning is silenced, only while the decorator is built.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Function `observable_source_asset`", category=dg.BetaWarning)
        return dg.observable_source_asset(**kwargs)


def _source_metadata(settings: NarrSettings) -> dict[str, Any]:
    return {"path": dg.MetadataValue.path(settings.source), "bytes": settings.source_path.stat().st_size}


@_observable_source_asset(
    group_name="ingest",
    description="The input spreadsheet; its data version is the file's MD5, observed by `source_file_sensor`.",
)
def source_file(settings: NarrSettings) -> dg.ObserveResult:
    checksum = settings.source_checksum()
    if checksum is None:
        raise dg.Failure(f"source file not found: {settings.source_path} (set NARR_SOURCE)")
    return dg.ObserveResult(data_version=dg.DataVersion(checksum), metadata=_source_metadata(settings))


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
            **table_metadata(Store(duckdb), "raw_narratives"),
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
    store = Store(duckdb)
    return dg.MaterializeResult(
        # A content version (keys, texts and labels): an unchanged re-ingest leaves `metrics`
        # fresh, a label edit marks it stale.
        data_version=dg.DataVersion(store.narratives_version()),
        metadata={
            **stats,
            "new_batches": len(new_batches),
            "counts": counts_md({k: v for k, v in stats.items() if k not in changes}),
            "changes": counts_md(changes),
            **table_metadata(Store(duckdb), "narratives"),
        },
    )


# `narrative_batches`' data version never changes: what a batch holds is in its partition key
# (`status.partition_key`), so a re-ingest, even one that edits a narrative, must not mark the
# other partitions of every experiment stale ("new dependency data version").
LEDGER_VERSION = "partition-keys-carry-content-versions"


@dg.asset(deps=[narratives], group_name="ingest", kinds={"duckdb"})
def narrative_batches(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> dg.MaterializeResult:
    """The stable batch ledger; each batch, at its content version, is a partition of the classifications."""
    store = Store(duckdb)
    sync = sync_partitions(context.instance, partition_keys(store))
    sizes = store.query_df("SELECT batch_id, count(*) AS n FROM narratives GROUP BY 1 ORDER BY 1")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(LEDGER_VERSION),
        metadata={
            "batches": len(sync.current),
            "registered_now": len(sync.added),
            "superseded_removed": len(sync.removed),
            "narratives": int(sizes["n"].sum()) if not sizes.empty else 0,
            "smallest_batch": int(sizes["n"].min()) if not sizes.empty else 0,
            "largest_batch": int(sizes["n"].max()) if not sizes.empty else 0,
            **table_metadata(store, "batch_ledger"),
        },
    )


@dataclass
class PartitionSync:
    current: list[str]
    added: list[str]
    removed: list[str]


def sync_partitions(instance: dg.DagsterInstance, current: dict[str, str]) -> PartitionSync:
    """Make the instance's batch partitions exactly the current keys (`batch id -> key`).

    Keys of edited batches (an older content version) and of batches with no narrative left
    are deleted, so the UI never offers a partition whose data is gone (their events stay in
    the event log; a key is never reused, see `status.partition_key`).
    """
    registered = instance.get_dynamic_partitions(BATCH_PARTITIONS)
    wanted = sorted(current.values())
    known, current_keys = set(registered), set(wanted)
    added = [k for k in wanted if k not in known]
    removed = [k for k in registered if k not in current_keys]
    if added:  # new or edited batches, or a fresh DAGSTER_HOME over an existing database
        instance.add_dynamic_partitions(BATCH_PARTITIONS, added)
    for key in removed:
        instance.delete_dynamic_partition(BATCH_PARTITIONS, key)
    return PartitionSync(current=wanted, added=added, removed=removed)


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


SOURCE_SENSOR = "source_file_sensor"
SOURCE_CHANGE_TAG = "narr/source_change"  # the change count of a run the sensor requested
# The tag Dagster reads an observation's data version from (no public constant in 1.13).
DATA_VERSION_TAG = "dagster/data_version"


@dataclass(frozen=True)
class SourceCursor:
    """What the source sensor remembers between ticks: the file's checksum and the changes seen."""

    checksum: str | None = None
    changes: int = 0

    def dumps(self) -> str:
        return json.dumps({"checksum": self.checksum, "changes": self.changes})

    @classmethod
    def loads(cls, raw: str | None) -> "SourceCursor":
        """The stored cursor; an empty one on the sensor's first tick."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            return cls(checksum=data["checksum"], changes=int(data["changes"]))
        except (ValueError, KeyError, TypeError):
            # A cursor of an older narr (the bare checksum) or one set by hand: a checksum.
            return cls(checksum=raw)


def source_change_request(
    current: str | None, cursor: SourceCursor, source: str
) -> tuple[dg.RunRequest | dg.SkipReason, SourceCursor]:
    """One tick of the source sensor: the file's checksum against the cursor; pure, so tested directly.

    Args:
        current: The checksum of the file now; None when there is no file.
        cursor: What the sensor saw last (a fresh `SourceCursor` on its first tick).
        source: The file's path, for the skip reason.

    Returns:
        The ingest run to request for a changed file, or why none; and the cursor to store.
    """
    if current is None:
        return dg.SkipReason(f"source file not found: {source} (set NARR_SOURCE)"), cursor
    if current == cursor.checksum:
        return dg.SkipReason("source file unchanged since the sensor last saw it change"), cursor
    seen = SourceCursor(checksum=current, changes=cursor.changes + 1)
    # The run key names the change, not the content: Dagster launches one run per key, so a
    # tick evaluated twice (a cursor update lost) launches once, while a file changed back to
    # a version seen before (A -> B -> A) is a new change, ingested again.
    request = dg.RunRequest(
        run_key=f"{seen.changes}-{current}",
        asset_selection=INGEST_KEYS,
        tags={"narr/source_checksum": current, SOURCE_CHANGE_TAG: str(seen.changes)},
    )
    return request, seen


def source_observation(settings: NarrSettings, checksum: str) -> dg.AssetObservation:
    """An observation of `source_file` with the file's checksum as its data version.

    What an ingest should record first (the sensor does; `narr` may), so `raw_narratives`
    takes this version as its input and reads fresh, not stale, once it has ingested the file.
    """
    return dg.AssetObservation(
        asset_key=source_file.key, tags={DATA_VERSION_TAG: checksum}, metadata=_source_metadata(settings)
    )


def _changes_seen(instance: dg.DagsterInstance) -> int:
    """The change count of the sensor's latest run (0 if none).

    A cursor without a count starts from it rather than 0, so a sensor whose cursor was
    deleted (`dagster sensor cursor --delete`) or set by hand never reuses a run key: Dagster
    would skip that run silently.
    """
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": SOURCE_SENSOR}), limit=1)
    count = runs[0].tags.get(SOURCE_CHANGE_TAG, "") if runs else ""
    return int(count) if count.isdigit() else 0


@dg.sensor(
    name=SOURCE_SENSOR,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    target=ingest_selection,
    description="On every change of the source file (its MD5), records an observation of `source_file` "
    "and requests one re-ingestion.",
)
def source_file_sensor(context: dg.SensorEvaluationContext, settings: NarrSettings) -> dg.SensorResult:
    current = settings.source_checksum()
    cursor = SourceCursor.loads(context.cursor)
    if cursor.changes == 0:  # no count stored: the first tick, or a cursor set by hand
        cursor = replace(cursor, changes=_changes_seen(context.instance))
    decision, seen = source_change_request(current, cursor, settings.source)
    if isinstance(decision, dg.SkipReason):
        return dg.SensorResult(skip_reason=decision, cursor=context.cursor)
    assert current is not None  # a run is requested only for a file that is there
    # The observation gives `source_file` the new data version at once, so the graph shows
    # `raw_narratives` stale until the requested run has ingested this very file. On the first
    # tick (no cursor) the file is ingested even if the database already holds it: that run
    # changes no row and no partition, and it records this observation as `raw_narratives`'
    # input, which an ingest by `narr` (no observation) would otherwise leave reading stale.
    observation = source_observation(settings, current)
    return dg.SensorResult(run_requests=[decision], asset_events=[observation], cursor=seen.dumps())


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
        jobs=[ingest_job],
    )


INGEST_JOB = "ingest"
# The job `narr` launches to ingest (or only to register batches), so its runs are named and
# can be re-executed from the UI.
ingest_job = dg.define_asset_job(
    INGEST_JOB,
    selection=ingest_selection,
    description="Ingest the source file: raw_narratives -> narratives -> narrative_batches, with their checks.",
)
