"""End to end through the real CLIs (`narr`, `dagster`), in subprocesses, against the test server."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_experiment, write_long_csv

from narr_assets.journal import Journal
from narr_assets.status import partition_keys
from narr_assets.store import Store
from narr_assets.testing.server import serve_in_subprocess

BIN = Path(sys.executable).parent


def env_for(project: Path, source: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARR_")}
    env.update(
        NARR_DB=str(project / "narr.duckdb"),
        NARR_DATA_DIR=str(project),
        NARR_SOURCE=str(source),
        NARR_EXPERIMENTS=str(project / "experiments"),
        DAGSTER_HOME=str(project / "dagster_home"),
        NARR_BATCH_SIZE="25",
        **extra,
    )
    return env


def narr(env, *args, timeout=240, check=True):
    proc = subprocess.run([str(BIN / "narr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"narr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture
def llm_project(project):
    source = write_long_csv(project / "input.csv", 100, placeholders=4)  # 200 narratives, 196 asked
    with serve_in_subprocess(latency_s=0.05) as server:
        write_experiment(project / "experiments", "llm", server.base_url, concurrency=4)
        yield project, env_for(project, source), server


@pytest.mark.slow
def test_narr_run_status_export_and_rerun(llm_project):
    project, env, server = llm_project
    out = narr(env, "run", "llm")
    assert "calls 196/196" in out.stderr + out.stdout
    assert server.stats()["completions_ok"] == 196
    status = narr(env, "status", "llm").stdout
    assert "batches done 8, missing 0" in status and "ok 196" in status and "skipped 4" in status
    again = narr(env, "run", "llm")
    assert "nothing to do" in again.stdout
    assert server.stats()["chat_requests"] == 196
    exported = narr(env, "export", "llm", "--format", "csv").stdout
    path = project / "exports" / "llm.csv"
    assert f"wrote 200 rows to {path}" in exported
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # BOM: Excel opens UTF-8 intact
    rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    assert len(rows) == 200 and {r["status"] for r in rows} == {"ok", "skipped"}


@pytest.mark.slow
@pytest.mark.reliability
@pytest.mark.parametrize("kill_after_s", [0.9, 1.6, 2.3])
def test_sigkill_mid_run_then_resume(llm_project, kill_after_s):
    project, env, server = llm_project
    narr(env, "ingest")
    proc = subprocess.Popen(
        [str(BIN / "narr"), "run", "llm"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while server.stats()["completions_ok"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(kill_after_s - 0.9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = server.stats()["completions_ok"]
    assert 0 < killed_at < 196, "the kill should land mid-run"
    resumed = narr(env, "run", "llm")
    assert "died" in resumed.stderr and "marked failed" in resumed.stderr  # the orphaned run
    rows = Store(project / "narr.duckdb").read_classifications("llm")
    assert len(rows) == 200 and not rows[["incident_id", "narrative_type"]].duplicated().any()
    assert set(rows["status"]) == {"ok", "skipped"}
    import dagster as dg

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        statuses = [r.status for r in instance.get_runs()]
    assert dg.DagsterRunStatus.STARTED not in statuses and dg.DagsterRunStatus.FAILURE in statuses
    stats = server.stats()
    # No journalled answer is asked again; at most the requests in flight at the kill (<= concurrency 4)
    # can be paid twice (answered by the server, never read by the killed client).
    journal = Journal(next((project / "journal" / "llm").iterdir()))
    assert len(journal.latest()) == 196 == len(list(journal.iter_records()))
    assert 196 <= stats["completions_ok"] <= 196 + 4
    assert max(stats["ok_by_text"].values()) <= 2


@pytest.mark.slow
@pytest.mark.reliability
def test_parallel_processes_different_and_same_partitions(llm_project):
    project, env, server = llm_project
    narr(env, "ingest")
    batches = [f"b{i:05d}" for i in range(8)]
    groups = [",".join(batches[i::4]) for i in range(4)]
    procs = [
        subprocess.Popen(
            [str(BIN / "narr"), "run", "llm", "--no-metrics", "--partitions", g],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for g in groups
    ]
    # Two more processes on one and the same partition as the first group.
    same = [
        subprocess.Popen(
            [str(BIN / "narr"), "run", "llm", "--no-metrics", "--partitions", "b00000"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs + same]
    codes = [p.returncode for p in procs + same]
    rows = Store(project / "narr.duckdb").read_classifications("llm")
    assert len(rows) == 200 and not rows[["incident_id", "narrative_type"]].duplicated().any()
    assert max(server.stats()["ok_by_text"].values()) == 1  # no narrative paid twice
    # b00000 was requested by three processes at once. Whichever did not get it either failed
    # fast saying why, or (starting after the winner finished) found it up to date.
    losers = [out for code, out in zip(codes, outputs, strict=True) if code != 0]
    assert all("being classified by another run" in out for out in losers), outputs
    assert codes[1:4] == [0, 0, 0]  # groups not involving b00000 never wait or fail
    for code, out in zip(codes[4:], outputs[4:], strict=True):
        assert code != 0 or "up to date" in out or "calls " in out


@pytest.mark.slow
def test_dagster_cli_materializes_ingestion_and_a_partition(project):
    source = write_long_csv(project / "input.csv", 10)
    env = env_for(project, source)
    base = [str(BIN / "dagster"), "asset", "materialize", "-m", "narr_assets.definitions"]
    proc = subprocess.run(
        [*base, "--select", "raw_narratives,narratives,narrative_batches"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [
            *base,
            "--select",
            "rules/classifications",
            "--partition",
            partition_keys(Store(project / "narr.duckdb"))["b00000"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = Store(project / "narr.duckdb").read_classifications("rules")
    assert len(rows) == 20 and set(rows["batch_id"]) == {"b00000"}


def test_unknown_experiment_and_bad_source_are_clear(project):
    env = env_for(project, project / "missing.xlsx")
    proc = narr(env, "run", "nope", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("narr: unknown experiment(s) nope")
    proc = narr(env, "run", "rules", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("narr: source file not found")
    assert "missing.xlsx" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.reliability
def test_concurrent_first_runs_on_a_fresh_instance_all_succeed(project):
    """Three `narr run`s started at once on an empty DAGSTER_HOME (twice over) all succeed.

    Before the instance set-up and the ingestion were serialised, 3 of 6 such starts had a
    process die: creating the SQLite run storage at once ("table ... already exists", a second
    alembic head), or running on batches another process had not yet registered.
    """
    source = write_long_csv(project / "input.csv", 10)
    rules = (project / "experiments" / "rules.yaml").read_text()
    for rep in range(2):
        folder = project / f"first_run_{rep}"
        (folder / "experiments").mkdir(parents=True)
        for name in ("a", "b", "c"):
            (folder / "experiments" / f"rules_{name}.yaml").write_text(rules)
        env = env_for(folder, source)
        assert not Path(env["DAGSTER_HOME"]).exists()
        procs = [
            subprocess.Popen(
                [str(BIN / "narr"), "run", f"rules_{name}", "--no-metrics"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in ("a", "b", "c")
        ]
        outputs = [p.communicate(timeout=240)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        store = Store(folder / "narr.duckdb")
        for name in ("a", "b", "c"):
            assert len(store.read_classifications(f"rules_{name}")) == 20


@pytest.mark.slow
def test_run_on_a_new_dagster_home_over_an_existing_database(project):
    """The database's batches are registered with a new instance, and what is done is recorded there."""
    source = write_long_csv(project / "input.csv", 10)
    narr(env_for(project, source), "run", "rules", "--no-metrics")
    env = {**env_for(project, source), "DAGSTER_HOME": str(project / "another_dagster_home")}
    assert "missing 1 of 1 partitions" in narr(env, "status", "rules").stdout  # Dagster knows nothing yet
    out = narr(env, "run", "rules").stdout
    assert "in line with the database's batches" in out and "ingesting" not in out
    assert "1 complete in the database, recorded in Dagster now" in out
    assert "Dagster: materialized 1, failed 0, in progress 0, missing 0 of 1 partitions" in out
    assert len(Store(project / "narr.duckdb").read_classifications("rules")) == 20


def test_ingest_refuses_a_mass_removal_until_allowed(project):
    full = write_long_csv(project / "full.csv", 20)  # 40 narratives
    env = env_for(project, full)
    narr(env, "ingest")
    short = write_long_csv(project / "short.csv", 5)  # would remove 30 of 40
    env = env_for(project, short)
    refused = narr(env, "ingest", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--allow-removal" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert len(Store(project / "narr.duckdb").read_narratives()) == 40  # nothing changed
    narr(env, "ingest", "--allow-removal")
    assert len(Store(project / "narr.duckdb").read_narratives()) == 10


@pytest.mark.slow
def test_narr_runs_after_dagster_stopped_at_narratives_and_after_an_edit(project):
    """Ingestion stopped before `narrative_batches` (UI selection, kill -9): `narr` registers the keys."""
    source = write_long_csv(project / "input.csv", 30)  # 60 narratives, 3 batches of 25 or fewer
    env = env_for(project, source)
    base = [str(BIN / "dagster"), "asset", "materialize", "-m", "narr_assets.definitions"]
    proc = subprocess.run([*base, "--select", "*narratives"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = narr(env, "run", "rules", "--no-metrics")
    assert "Traceback" not in out.stdout + out.stderr
    assert "in line with the database's batches" in out.stdout
    assert "Dagster: materialized 3, failed 0, in progress 0, missing 0 of 3 partitions" in out.stdout
    # One narrative edited: `narr run` re-ingests, and only its batch runs, under a new key.
    keys = partition_keys(Store(project / "narr.duckdb"))
    write_long_csv(source, 30, special={(3, "le"): "Case 3-le. Edited."})
    out = narr(env, "run", "rules", "--no-metrics")
    new_keys = partition_keys(Store(project / "narr.duckdb"))
    assert [b for b in keys if keys[b] != new_keys[b]] == ["b00000"]
    assert f"1 batch(es) to run ({new_keys['b00000']} .. {new_keys['b00000']})" in out.stdout
    assert "Dagster: materialized 3, failed 0, in progress 0, missing 0 of 3 partitions" in out.stdout
    # The experiment file edited: `narr status` says what the UI shows (stale, code version changed).
    path = project / "experiments" / "rules.yaml"
    path.write_text(path.read_text().replace("skip_placeholders: true", "skip_placeholders: false"))
    out = narr(env, "status", "rules").stdout
    (config,) = [line for line in out.splitlines() if line.startswith("rules (")]
    assert "batches done 0, missing 3" in config
    assert "config changed: 3 batch(es) were classified under an older config; the UI shows them stale" in out
