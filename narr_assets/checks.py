"""Asset checks: thin wrappers over the rules in `quality.py`."""

from collections.abc import Callable

import dagster as dg
from dagster_duckdb import DuckDBResource

from narr_assets import quality, settings
from narr_assets.assets import narratives
from narr_assets.experiments import ExperimentConfig
from narr_assets.ingest import file_checksum
from narr_assets.store import Store

KEYS_UNIQUE = "keys_unique"
TEXT_NOT_EMPTY = "text_not_empty"
LABELS_VALID = "labels_valid"
CHECKSUM_CURRENT = "checksum_matches_source_file"
ONE_ROW_PER_NARRATIVE = "one_row_per_narrative"
ERROR_RATE = "error_rate_below_threshold"
CONFIDENCE_RANGE = "confidence_in_range"


def _result(outcome: tuple[bool, dict]) -> dg.AssetCheckResult:
    passed, metadata = outcome
    return dg.AssetCheckResult(passed=passed, metadata=metadata)


@dg.asset_check(asset=narratives, name=KEYS_UNIQUE, description="One row per (incident_id, narrative_type).")
def narratives_keys_unique(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _result(quality.narrative_keys_unique(Store(duckdb)))


@dg.asset_check(asset=narratives, name=TEXT_NOT_EMPTY, description="No empty or whitespace-only narrative.")
def narratives_text_not_empty(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _result(quality.narrative_text_not_empty(Store(duckdb)))


@dg.asset_check(asset=narratives, name=LABELS_VALID, description="Manual labels are 0, 1 or missing.")
def narratives_labels_valid(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return _result(quality.labels_valid(Store(duckdb)))


@dg.asset_check(
    asset=narratives,
    name=CHECKSUM_CURRENT,
    description="The ingested data is from the source file as it is now; fails until a changed file is re-ingested.",
)
def narratives_checksum_current(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    path = settings.source_path()
    current = file_checksum(path) if path.is_file() else "missing file"
    return _result(quality.checksum_current(Store(duckdb), current))


def build_experiment_checks(
    cfg: ExperimentConfig, classifications: dg.AssetsDefinition
) -> list[dg.AssetChecksDefinition]:
    """Checks over all written partitions of one experiment's classifications."""

    def make(name: str, description: str, rule: Callable[[Store], tuple[bool, dict]]) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=classifications, name=name, description=description)
        def _check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
            return _result(rule(Store(duckdb)))

        return _check

    return [
        make(
            ONE_ROW_PER_NARRATIVE,
            "Every narrative of a classified batch has exactly one current row.",
            lambda s: quality.one_row_per_narrative(s, cfg.name),
        ),
        make(
            ERROR_RATE,
            f"Parse errors, refusals and truncations stay under {cfg.run.max_error_rate:.0%} of asked rows.",
            lambda s: quality.error_rate_below(s, cfg.name, cfg.run.max_error_rate),
        ),
        make(
            CONFIDENCE_RANGE, "Every confidence is within [0, 1].", lambda s: quality.confidences_in_range(s, cfg.name)
        ),
    ]


ingest_checks = [
    narratives_keys_unique,
    narratives_text_not_empty,
    narratives_labels_valid,
    narratives_checksum_current,
]
