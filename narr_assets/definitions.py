"""The one entry point: assembles `Definitions` from the modules and the experiment files.

Loaded lazily (`@dg.definitions`), so importing this module reads no environment variable,
opens no database and parses no YAML; Dagster calls `defs()` when it loads the code location.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from narr_assets import settings
from narr_assets.assets import build_experiment_assets, narrative_batches, narratives, raw_narratives, source_file
from narr_assets.assets_eval import build_cross_experiment_assets
from narr_assets.checks import build_experiment_checks, ingest_checks
from narr_assets.experiments import load_experiments
from narr_assets.sensors import source_file_sensor


def build_definitions() -> dg.Definitions:
    experiments = load_experiments()
    assets: list = [source_file, raw_narratives, narratives, narrative_batches]
    checks: list = list(ingest_checks)
    for cfg in experiments:
        classifications, metrics = build_experiment_assets(cfg)
        assets += [classifications, metrics]
        checks += build_experiment_checks(cfg, classifications)
    assets += build_cross_experiment_assets(experiments)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        sensors=[source_file_sensor],
        # Steps of one run are a chain (ingest -> batches -> classify); a process per step
        # would re-import pandas/DuckDB/Dagster each time (seconds per step) for no parallelism.
        # Concurrency lives inside the classification step, in one async work queue.
        executor=dg.in_process_executor,
        resources={"duckdb": DuckDBResource(database=str(settings.db_path()))},
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
