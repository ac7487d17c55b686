"""The benchmarks still run: every section once at tiny sizes (`--smoke`), results complete.

Numbers from this run mean nothing (tiny sizes, a busy test machine); only the shape of the
results is checked. The real measurements are in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_section_runs(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "smoke"
    assert {"throughput", "breakdown", "ingestion", "rules", "e2e"} <= set(res)
    assert [p["concurrency"] for p in res["throughput"]["points"]] == [1, 8, 32, 64]
    assert all(p["engine_rate"] > 0 and p["bare_fast_rate"] > 0 for p in res["throughput"]["points"])
    assert len(res["breakdown"]["rows"]) == 6
    e2e = res["e2e"]
    assert e2e["calls"] == e2e["completions_ok"] > 0
    assert e2e["dagster_run_count"] == 3 and e2e["planned_events"]["count"] == e2e["batches"]
    assert set(res["targets"]) == {"engine_over_bare_c32", "pipeline_overhead", "peak_rss"}
    md = out.with_suffix(".md").read_text()
    for heading in (
        "## Classification throughput",
        "## Engine cost breakdown",
        "## Ingestion",
        "## `rules` backend",
        "## End to end",
        "## Targets",
    ):
        assert heading in md


def test_dagster_events_benchmark_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dagster_events", "--partitions", "5", "--reps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| SQLite (default) | 5 |" in proc.stdout
    assert "STEP_SUCCESS" not in proc.stderr  # Dagster's debug lines stay out of the output
