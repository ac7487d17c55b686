"""The one entry point: merges the Dagster layer (`narr_assets/defs/`) into one `Definitions`.

Loaded lazily (`@dg.definitions`), so importing this module reads no environment variable,
opens no database and parses no YAML; Dagster calls `defs()` when it loads the code location.
"""

from __future__ import annotations

import warnings

import dagster as dg

from narr_assets.defs.comparison import build_comparison_defs
from narr_assets.defs.experiment import build_experiment_defs
from narr_assets.defs.ingest import ingest_defs
from narr_assets.defs.resources import NarrSettings, duckdb_resource
from narr_assets.experiments import ExperimentConfig, Experiments, load_experiments


def build_definitions(
    settings: NarrSettings | None = None, experiments: list[ExperimentConfig] | None = None
) -> dg.Definitions:
    """Every asset, check, sensor and resource of the project.

    Args:
        settings: The `settings` resource; built from the `NARR_*` variables when omitted.
        experiments: The experiments to define; the valid ones of `NARR_EXPERIMENTS` when
            omitted. Files left out (`Experiments.errors`) are named in the leaderboard's
            description, the place the UI compares experiments.
    """
    experiments = load_experiments() if experiments is None else experiments
    broken = experiments.errors if isinstance(experiments, Experiments) else []
    return dg.Definitions.merge(
        ingest_defs(),
        *_experiment_defs(experiments),
        build_comparison_defs(experiments, broken),
        dg.Definitions(
            # Steps of one run are a chain (ingest -> batches -> classify); a process per step
            # would re-import pandas/DuckDB/Dagster each time (seconds per step) for no
            # parallelism. Concurrency lives inside the classification step, in one work queue.
            executor=dg.in_process_executor,
            resources={"duckdb": duckdb_resource(), "settings": settings or NarrSettings.overridable_from_env()},
        ),
    )


def _experiment_defs(experiments: list[ExperimentConfig]) -> list[dg.Definitions]:
    """Each experiment's definitions, without the BetaWarning `backfill_policy` prints for each.

    Single-run backfills are deliberate (one work queue per run, see `experiment.py`); the
    warning, once per experiment at every code load, says nothing a user can act on. Only
    this warning is silenced, only while the assets are built.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Parameter `backfill_policy` of function `asset`", category=dg.BetaWarning
        )
        return [build_experiment_defs(cfg) for cfg in experiments]


@dg.definitions
def defs() -> dg.Definitions:
    from narr_assets.dagster_home import configured_home, ensure_dagster_yaml
    from narr_assets.defs.pools import patch_pool_wait

    patch_pool_wait()  # this location's run workers wait for an endpoint's slot without spinning
    home, log = configured_home(), dg.get_dagster_logger("narr")
    try:
        if home is not None and ensure_dagster_yaml(home):
            # Dagster read the instance's settings before loading this code: they apply from the next start.
            log.warning(
                "wrote %s (telemetry off, endpoint pools); restart `dagster dev` to apply it", home / "dagster.yaml"
            )
    except OSError as exc:  # a read-only DAGSTER_HOME must not take the code location down
        log.warning("could not write %s: %s", home / "dagster.yaml" if home else "dagster.yaml", exc)
    experiments = load_experiments()
    # A broken experiment file must not take the code location down with it: its assets are
    # left out and the file named where `dagster dev` logs (and in the leaderboard's description).
    for broken in experiments.errors:
        dg.get_dagster_logger("narr").warning("experiment file left out: %s", broken.message)
    return build_definitions(experiments=experiments)
