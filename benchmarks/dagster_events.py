"""Dagster's own cost per partition: a no-op asset materialised over N partitions in one run.

    .venv/bin/python -m benchmarks.dagster_events                     # SQLite instance (the default)
    .venv/bin/python -m benchmarks.dagster_events --instance pg.yaml  # and an instance of your own

Dagster writes one `ASSET_MATERIALIZATION_PLANNED` event per partition when the run is
created and one `ASSET_MATERIALIZATION` per partition when the step ends, whatever the asset
does; this is that cost alone. Every run gets a new temporary `DAGSTER_HOME` (telemetry off)
whose `dagster.yaml` also holds the contents of the `--instance` file, if any (e.g. a
`storage: postgres:` block; that database is reused across runs, SQLite starts empty).
Storages take turns within each repetition; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import dagster as dg

from benchmarks.common import md_table

warnings.filterwarnings("ignore", category=dg.BetaWarning)


def materialize_noop(partitions: int, instance_yaml: str) -> float:
    """Seconds for one run materialising `partitions` partitions of a no-op asset."""
    home = tempfile.mkdtemp(prefix="narr-dagster-events-")
    Path(home, "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + instance_yaml)
    os.environ["DAGSTER_HOME"] = home
    parts = dg.DynamicPartitionsDefinition(name="batches")

    @dg.asset(partitions_def=parts, backfill_policy=dg.BackfillPolicy.single_run())
    def noop() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"rows": 0})

    instance = dg.DagsterInstance.get()
    keys = [f"b{i:05d}" for i in range(partitions)]
    instance.add_dynamic_partitions("batches", keys)
    started = time.perf_counter()
    result = dg.materialize(
        [noop],
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
    )
    seconds = time.perf_counter() - started
    materialized = len(result.get_asset_materialization_events())
    instance.dispose()
    if not result.success or materialized != partitions:
        raise RuntimeError(f"run failed or materialised {materialized} of {partitions} partitions")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=354, help="partitions per run (354 = production file)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per storage")
    parser.add_argument(
        "--instance",
        type=Path,
        action="append",
        default=[],
        help="dagster.yaml lines for another instance storage (repeatable)",
    )
    args = parser.parse_args(argv)
    storages = {"SQLite (default)": "", **{str(p): p.read_text() for p in args.instance}}
    seconds: dict[str, list[float]] = {name: [] for name in storages}
    for rep in range(args.reps):
        for name, extra in storages.items():
            seconds[name].append(materialize_noop(args.partitions, extra))
            print(f"rep {rep + 1}/{args.reps} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    rows = [
        [
            name,
            args.partitions,
            statistics.median(s),
            1000 * statistics.median(s) / args.partitions,
            ", ".join(f"{x:.2f}" for x in s),
        ]
        for name, s in seconds.items()
    ]
    print(md_table(["instance storage", "partitions", "run seconds (median)", "ms per partition", "all runs"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
