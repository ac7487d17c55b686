"""Endpoint budgets across runs: Dagster pools per endpoint, and the `dagster.yaml` that sets them up."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml
from conftest import materialize, write_experiment, write_long_csv
from dagster._core.definitions.op_definition import VALID_POOL_NAME_REGEX
from test_cli import BIN, env_for, narr

from narr_assets import cli
from narr_assets.dagster_home import DAGSTER_YAML, ensure_dagster_yaml
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS
from narr_assets.defs.pools import (
    _DAGSTER_INTERVAL,
    _interval_to_next_pending_claim_check,
    ensure_pool_limits,
    free_slots_of_ended_runs,
    patch_pool_wait,
    pools_of,
)
from narr_assets.experiments import endpoint_pool, load_experiments
from narr_assets.store import Store
from narr_assets.testing.server import serve_in_subprocess

POOL = endpoint_pool("http://127.0.0.1:1/v1")


@pytest.mark.parametrize(
    ("url", "pool"),
    [
        ("http://localhost:1234/v1", "narr-endpoint-localhost-1234-v1"),
        ("http://LocalHost:1234/v1/", "narr-endpoint-localhost-1234-v1"),
        ("https://api.openai.com/v1", "narr-endpoint-api.openai.com-443-v1"),
        ("https://api.openai.com:443/v1", "narr-endpoint-api.openai.com-443-v1"),
        ("http://10.0.0.5/openai/deployments/gpt 4/v1", "narr-endpoint-10.0.0.5-80-openai-deployments-gpt-4-v1"),
        ("http://host:notaport/v1", "narr-endpoint-host--v1"),
    ],
)
def test_endpoint_pool_names(url, pool):
    assert endpoint_pool(url) == pool
    assert VALID_POOL_NAME_REGEX.match(pool) and re.fullmatch(r"[A-Za-z0-9._-]+", pool)


def test_endpoint_pool_names_stay_short_and_distinct():
    long_a, long_b = (endpoint_pool(f"http://h/{'x' * 300}{end}") for end in "ab")
    assert len(long_a) == len(long_b) == 200 and long_a != long_b
    assert endpoint_pool("http://h:1/v1") != endpoint_pool("http://h:2/v1") != endpoint_pool("http://h:1/v2")


def test_each_endpoint_experiment_claims_its_endpoint_pool_and_rules_none(project):
    write_experiment(project / "experiments", "a", "http://127.0.0.1:1/v1")
    write_experiment(project / "experiments", "b", "http://127.0.0.1:1/v1/")  # the same endpoint
    write_experiment(project / "experiments", "c", "http://127.0.0.1:2/v1")
    configs = {cfg.name: cfg for cfg in load_experiments()}
    assert configs["rules"].pool is None
    defs = build_definitions()
    pools = {
        key.to_user_string(): defs.get_assets_def(key).op.pool
        for key in defs.resolve_asset_graph().get_all_asset_keys()
        if key.path[-1] == "classifications"
    }
    assert pools == {
        "a/classifications": POOL,
        "b/classifications": POOL,
        "c/classifications": endpoint_pool("http://127.0.0.1:2/v1"),
        "rules/classifications": None,
    }
    assert pools_of(defs.assets or []) == sorted({POOL, endpoint_pool("http://127.0.0.1:2/v1")})


def test_pool_limits_are_set_once_and_a_users_limit_is_kept(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert ensure_pool_limits(instance, [POOL, "narr-endpoint-other"]) == [POOL, "narr-endpoint-other"]
        instance.event_log_storage.set_concurrency_slots("narr-endpoint-other", 3)  # the user's choice
        assert ensure_pool_limits(instance, [POOL, "narr-endpoint-other"]) == []
        limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
        assert limits == {POOL: 1, "narr-endpoint-other": 3}


def _claim(instance, run_id: str) -> None:
    status = instance.event_log_storage.claim_concurrency_slot(POOL, run_id, "classifications")
    assert status.is_claimed


def test_slots_of_ended_runs_are_freed_unless_their_process_still_works(tmp_path):
    """Claimed slots and places in the queue alike: a dead run that was waiting must not get the next slot."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        ensure_pool_limits(instance, [POOL])
        instance.event_log_storage.set_concurrency_slots(POOL, 3)
        running, ended, draining, queued = (instance.create_run_for_job(_job(), tags={"n": str(i)}) for i in range(4))
        for run in (running, ended, draining):
            _claim(instance, run.run_id)
        assert not instance.event_log_storage.claim_concurrency_slot(POOL, queued.run_id, "step").is_claimed
        for run in (ended, draining, queued):
            instance.report_run_failed(run, message="the process died")
        freed = free_slots_of_ended_runs(instance, still_working=lambda run: run.run_id == draining.run_id)
        assert sorted(freed) == sorted([ended.run_id, queued.run_id])
        info = instance.event_log_storage.get_concurrency_info(POOL)
        assert info.active_run_ids == {running.run_id, draining.run_id} and info.pending_step_count == 0
        assert free_slots_of_ended_runs(instance, still_working=lambda run: False) == [draining.run_id]


def _job():
    @dg.op
    def noop() -> None:
        pass

    @dg.job
    def job() -> None:
        noop()

    return job


def test_a_blocked_claim_waits_for_its_next_try_instead_of_spinning():
    blocked = SimpleNamespace(
        _pending_claims={"classifications"}, _pending_timeouts={"classifications": time.time() + 1.5}
    )
    assert 1.0 < _interval_to_next_pending_claim_check(blocked) <= 1.5  # type: ignore[arg-type]
    # Dagster's own never exceeds 0 (so its executor never sleeps); when this fails, Dagster
    # fixed it and `patch_pool_wait` can go.
    assert _DAGSTER_INTERVAL(blocked) <= 0  # type: ignore[arg-type]
    blocked._pending_timeouts = {"classifications": time.time() - 1}  # due: try now
    assert _interval_to_next_pending_claim_check(blocked) == 0.0  # type: ignore[arg-type]


RUN_ENDS = ("PIPELINE_FAILURE", "PIPELINE_CANCELED")


def _wait_for_pending_claim(instance, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if instance.event_log_storage.get_concurrency_info(POOL).pending_step_count:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stop", ["signal", "termination"])
def test_a_run_waiting_for_a_slot_stops_at_once_when_asked(tmp_path, stop):
    """Ctrl-C / SIGTERM, or Terminate in the UI, end a run that waits for its endpoint's slot.

    Dagster holds both until the step starts, which could be hours later; if that came back,
    the holder's slot is freed after 15 s and the elapsed time fails the test instead of a hang.
    """
    patch_pool_wait()

    @dg.asset(pool=POOL)
    def classify() -> None:
        pass

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        ensure_pool_limits(instance, [POOL])
        holder = instance.create_run_for_job(_job(), status=dg.DagsterRunStatus.STARTED)
        _claim(instance, holder.run_id)

        def stop_the_waiting_run() -> None:
            if _wait_for_pending_claim(instance):
                if stop == "signal":
                    os.kill(os.getpid(), signal.SIGINT)  # Dagster's handler holds it, the wait raises it
                else:
                    waiting = next(r for r in instance.get_runs() if r.run_id != holder.run_id)
                    instance.report_run_canceling(waiting)
            time.sleep(15)
            instance.event_log_storage.free_concurrency_slots_for_run(holder.run_id)

        threading.Thread(target=stop_the_waiting_run, daemon=True).start()
        started = time.monotonic()
        result = dg.materialize([classify], instance=instance, raise_on_error=False)
        elapsed = time.monotonic() - started
        assert not result.success and elapsed < 10, f"stopped after {elapsed:.1f} s"
        errors = [e.event_specific_data.error for e in result.all_events if e.event_type_value in RUN_ENDS]
        why = "interrupted" if stop == "signal" else "terminated"
        assert f"{why} while waiting for pool {POOL} (another run holds its slot)" in errors[0].message
        status = instance.get_run_by_id(result.run_id).status
        assert status == (dg.DagsterRunStatus.FAILURE if stop == "signal" else dg.DagsterRunStatus.CANCELED)
        assert not result.get_step_success_events() and not result.get_step_failure_events()
        assert instance.event_log_storage.get_concurrency_info(POOL).pending_step_count == 0


# ------------------------------------------------------------------- dagster.yaml


def test_code_location_load_writes_dagster_yaml_with_telemetry_off(project, caplog):
    from narr_assets.definitions import defs

    home = project / "dagster_home"
    assert not (home / "dagster.yaml").exists()
    with caplog.at_level("WARNING"):
        defs()
    written = home / "dagster.yaml"
    assert written.read_text() == DAGSTER_YAML
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert "restart `dagster dev`" in caplog.text
    config = yaml.safe_load(written.read_text())
    assert config["telemetry"] == {"enabled": False} and config["nux"] == {"enabled": False}
    with dg.DagsterInstance.from_config(str(home)) as instance:  # Dagster accepts the file as it is
        assert instance.global_op_concurrency_default_limit == 1
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30
        assert not instance.telemetry_enabled


def test_a_users_dagster_yaml_is_kept_and_narrs_old_one_updated(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    assert not ensure_dagster_yaml(mine)
    assert (mine / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"
    old = tmp_path / "old"
    old.mkdir()
    (old / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")  # narr before pools
    assert ensure_dagster_yaml(old)
    assert (old / "dagster.yaml").read_text() == DAGSTER_YAML
    assert not ensure_dagster_yaml(tmp_path / "absent")  # Dagster's home is not ours to create here
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dagster.yaml", "dagster.yaml", "mine", "old"]


def test_narr_writes_the_same_dagster_yaml(project, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(project / "new_home"))
    assert cli._ensure_dagster_home() == project / "new_home"
    assert (project / "new_home" / "dagster.yaml").read_text() == DAGSTER_YAML


def test_a_dagster_home_narr_cannot_write_does_not_stop_the_code_location(project, caplog):
    from narr_assets.definitions import defs

    (project / "dagster_home" / "dagster.yaml").mkdir()  # any OSError (root ignores a read-only folder)
    with caplog.at_level("WARNING"):
        loaded = defs()
    assert loaded.resolve_asset_graph().get_all_asset_keys()
    assert "could not write" in caplog.text and "dagster.yaml" in caplog.text


# ------------------------------------------------------------------- across processes


def _runs_blocked_on(instance, pool: str) -> list[dg.DagsterRun]:
    """Runs whose log says a step waits for `pool` (what the UI's run log shows)."""
    blocked = []
    for run in instance.get_runs():
        if any(f"blocked by limit for pool {pool}" in (e.message or "") for e in instance.all_logs(run.run_id)):
            blocked.append(run)
    return blocked


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ingest(project: Path, source: Path, monkeypatch, batch_size: int) -> None:
    """Ingest in this process (quicker than a `narr ingest`) onto the project's instance."""
    monkeypatch.setenv("NARR_SOURCE", str(source))
    monkeypatch.setenv("NARR_BATCH_SIZE", str(batch_size))
    with dg.DagsterInstance.from_config(str(project / "dagster_home")) as instance:
        assert materialize(build_definitions(), instance, INGEST_KEYS).success


@pytest.mark.reliability
def test_two_runs_on_one_endpoint_never_exceed_its_concurrency(project, monkeypatch):
    """Two `narr run`s on disjoint batches of one endpoint take turns: in flight <= concurrency.

    The first requests are held at the server (latency 5 s) until the second run's step has
    either said it waits for the endpoint's pool or sent requests of its own, so without the
    pool the server sees both runs' requests at once (4 in flight for concurrency 2).
    """
    source = write_long_csv(project / "input.csv", 10)  # 20 narratives, 2 batches of 10
    _ingest(project, source, monkeypatch, batch_size=10)
    with serve_in_subprocess(latency_s=5.0) as server:
        write_experiment(project / "experiments", "llm", server.base_url, concurrency=2, timeout=60)
        pool = endpoint_pool(server.base_url)
        env = {**env_for(project, source), "NARR_BATCH_SIZE": "10"}
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            procs = [
                subprocess.Popen(
                    [str(BIN / "narr"), "run", "llm", "--no-metrics", "--partitions", key],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for key in instance.get_dynamic_partitions("narrative_batches")
            ]
            deadline, blocked = time.monotonic() + 60, []
            while not blocked and server.stats()["in_flight"] <= 2 and time.monotonic() < deadline:
                time.sleep(0.2)
                blocked = _runs_blocked_on(instance, pool)
            # While one waits for the slot it sleeps between tries: no core spinning.
            waiting = [p for p in procs if blocked and blocked[0].tags.get("narr/pid") == str(p.pid)]
            cpu_before = _cpu_seconds(waiting[0].pid) if waiting else 0.0
            time.sleep(1.0)
            cpu_waiting = _cpu_seconds(waiting[0].pid) - cpu_before if waiting else 0.0
            server.configure(latency_s=0.02)
            outputs = [p.communicate(timeout=120)[0] for p in procs]
            stats = server.stats()
            assert stats["max_in_flight"] <= 2, f"{stats['max_in_flight']} requests in flight for concurrency 2"
            assert [p.returncode for p in procs] == [0, 0], outputs
            assert len(blocked) == 1 and len(waiting) == 1
            # The waiting `narr` says why it waits (Dagster logs it at DEBUG; narr shows it).
            assert sum(f"Step blocked by limit for pool {pool}" in out for out in outputs) == 1, outputs
            assert cpu_waiting < 0.3, f"the waiting run used {cpu_waiting:.2f} s of CPU in 1 s"
            assert stats["completions_ok"] == 20
            assert len(Store(project / "narr.duckdb").read_classifications("llm")) == 20
            assert instance.event_log_storage.get_concurrency_info(pool).active_slot_count == 0


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_slot_left_by_a_killed_narr_is_freed_by_the_next(project, monkeypatch, server):
    """What `kill -9` leaves (a STARTED run of a dead narr holding the endpoint's slot) blocks nobody.

    tests/test_cli.py::test_sigkill_mid_run_then_resume kills a real `narr run` and resumes it.
    """
    source = write_long_csv(project / "input.csv", 5)
    _ingest(project, source, monkeypatch, batch_size=25)
    write_experiment(project / "experiments", "llm", server.base_url, concurrency=2)
    pool = endpoint_pool(server.base_url)
    with dg.DagsterInstance.from_config(str(project / "dagster_home")) as instance:
        ensure_pool_limits(instance, [pool])
        tags = {"narr/launched_by": "narr-cli", "narr/pid": str(_dead_pid()), "narr/host": socket.gethostname()}
        orphan = instance.create_run_for_job(_job(), status=dg.DagsterRunStatus.STARTED, tags=tags)
        assert instance.event_log_storage.claim_concurrency_slot(pool, orphan.run_id, "llm__classifications")
        assert instance.event_log_storage.get_concurrency_info(pool).active_run_ids == {orphan.run_id}
        out = narr(env_for(project, source), "run", "llm", "--no-metrics", timeout=60)
        assert "died" in out.stderr and "marked failed" in out.stderr
        assert len(Store(project / "narr.duckdb").read_classifications("llm")) == 10
        assert instance.event_log_storage.get_concurrency_info(pool).active_slot_count == 0
