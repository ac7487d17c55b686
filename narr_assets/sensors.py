"""Sensors: re-ingest when the source file's content changes."""

import dagster as dg

from narr_assets import settings
from narr_assets.assets import narrative_batches, narratives, raw_narratives
from narr_assets.ingest import file_checksum

INGEST_SELECTION = dg.AssetSelection.assets(raw_narratives, narratives, narrative_batches)


def source_change_request(current: str | None, cursor: str | None) -> dg.RunRequest | dg.SkipReason:
    """Decide from the file's checksum and the last one seen; pure, so it is tested directly."""
    if current is None:
        return dg.SkipReason(f"source file not found: {settings.source_path()}")
    if current == cursor:
        return dg.SkipReason("source file unchanged")
    # The checksum is the run key: Dagster never launches two runs with one key, so a file
    # seen again (or a tick repeated) cannot re-trigger ingestion.
    return dg.RunRequest(
        run_key=current,
        asset_selection=[raw_narratives.key, narratives.key, narrative_batches.key],
        tags={"narr/source_checksum": current},
    )


@dg.sensor(
    name="source_file_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    target=INGEST_SELECTION,
    description="Requests re-ingestion when the MD5 of NARR_SOURCE changes.",
)
def source_file_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    path = settings.source_path()
    current = file_checksum(path) if path.is_file() else None
    decision = source_change_request(current, context.cursor)
    if isinstance(decision, dg.RunRequest):
        return dg.SensorResult(run_requests=[decision], cursor=current)
    return dg.SensorResult(skip_reason=decision, cursor=context.cursor)
