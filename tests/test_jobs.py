"""Runs `narr` launches are runs of named jobs, which the UI can re-execute (issue 10, item 7).

Through a real instance: `narr` in this process, then `dagster dev` (the README's command)
re-executing its runs through the GraphQL mutation the UI's "Re-execute" menu sends.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tomllib
import warnings

import dagster as dg
import pytest
from conftest import ROOT, write_experiment, write_long_csv

from narr_assets import cli
from narr_assets.definitions import build_definitions
from narr_assets.defs.experiment import CONFIG_HASH_TAG, EXPERIMENT_TAG
from narr_assets.defs.ingest import BATCH_PARTITIONS, batch_partitions
from narr_assets.experiments import load_experiments
from narr_assets.store import Store

warnings.filterwarnings("ignore", category=dg.BetaWarning)

INGEST = ["narrative_batches", "narratives", "raw_narratives"]


def narr(*args: str) -> int:
    """`narr ARGS` in this process (it installs a SIGTERM handler: put back afterwards)."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return cli.main(list(args))
    finally:
        signal.signal(signal.SIGTERM, previous)


def selection(run: dg.DagsterRun) -> list[str]:
    return sorted(k.to_user_string() for k in run.asset_selection or [])


@pytest.fixture
def small(project, monkeypatch):
    """The project reading a 60-narrative CSV in batches of 10 (6 partitions)."""
    monkeypatch.setenv("NARR_SOURCE", str(write_long_csv(project / "input.csv", 30)))
    monkeypatch.setenv("NARR_BATCH_SIZE", "10")
    return project


def test_the_code_location_defines_a_job_for_each_kind_of_narr_run(project):
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    jobs = {job.name: sorted(k.to_user_string() for k in job.selection.resolve(graph)) for job in defs.jobs or []}
    assert jobs == {
        "ingest": INGEST,
        "experiment_rules": ["rules/classifications", "rules/metrics"],
        "compare": ["exports", "leaderboard", "report", "rules/metrics"],
    }
    (cfg,) = load_experiments()
    job = defs.resolve_job_def("experiment_rules")
    assert job.run_tags == {EXPERIMENT_TAG: "rules", CONFIG_HASH_TAG: cfg.config_hash}
    assert job.partitions_def == batch_partitions
    # `narr` runs each selection as the smallest job holding it.
    runner = cli.Runner()
    assert runner.job_for([dg.AssetKey("narrative_batches")]) == "ingest"
    assert runner.job_for([dg.AssetKey(["rules", "metrics"])]) == "experiment_rules"
    assert runner.job_for([dg.AssetKey(["rules", "metrics"]), dg.AssetKey("report")]) == "compare"
    with pytest.raises(ValueError, match="no job of the definitions holds narratives, report"):
        runner.job_for([dg.AssetKey("narratives"), dg.AssetKey("report")])


def test_a_ui_reexecution_of_a_narr_run_is_not_taken_for_an_orphan(project):
    """A re-execution copies the parent's tags, `narr/pid` of a finished narr process included."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    tags = {"narr/launched_by": "narr-cli", "narr/pid": str(dead.pid), "narr/host": socket.gethostname()}

    @dg.op
    def step() -> None:
        pass

    @dg.job
    def some_job():
        step()

    instance = cli._dagster_instance()
    started = dg.DagsterRunStatus.STARTED
    orphan = instance.create_run_for_job(some_job, tags=tags, status=started)
    reexecution = instance.create_run_for_job(
        some_job, tags=tags, status=started, parent_run_id=orphan.run_id, root_run_id=orphan.run_id
    )
    cli.Runner()
    assert instance.get_run_by_id(orphan.run_id).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(reexecution.run_id).status == started


def assert_named_runs(instance: dg.DagsterInstance, experiment: str) -> dict[str, dg.DagsterRun]:
    """`narr materialize -e EXPERIMENT` ran one run of each of the project's jobs, as the UI would have."""
    runs = {run.job_name: run for run in instance.get_runs()}
    job = f"experiment_{experiment}"
    assert set(runs) == {"ingest", job, "compare"}, "one run of each job, no ephemeral job"
    assert selection(runs["ingest"]) == INGEST
    assert selection(runs[job]) == [f"{experiment}/classifications"]
    assert selection(runs["compare"]) == sorted(["leaderboard", "report", f"{experiment}/metrics"])
    cfg = next(c for c in load_experiments() if c.name == experiment)
    assert runs[job].tags[EXPERIMENT_TAG] == experiment and runs[job].tags[CONFIG_HASH_TAG] == cfg.config_hash
    keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
    assert runs[job].tags["dagster/asset_partition_range_start"] == keys[0]
    assert runs[job].tags["dagster/asset_partition_range_end"] == keys[-1]
    # The origin of a run launched from the code location the README's `dagster dev` loads
    # (pyproject.toml): the UI's re-execution looks the job up by it.
    location = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]["code_location_name"]
    for run in runs.values():
        assert run.remote_job_origin is not None and run.remote_job_origin.location_name == location
        assert run.remote_job_origin.repository_origin.repository_name == "__repository__"
        assert run.job_code_origin is not None and run.job_code_origin.job_name == run.job_name
        assert run.tags["narr/launched_by"] == "narr-cli"
    return runs


@pytest.mark.slow
def test_narr_runs_named_jobs_that_the_ui_reexecutes_from_failure_and_all_steps(small, server, dagster_ui):
    """A partly failed `narr materialize`: its runs are named; the UI re-executes the failed one."""
    write_experiment(small / "experiments", "llm", server.base_url, retries=1)
    dagster_ui.start()  # its start-up overlaps narr's run
    server.configure(fail_text="Case 7-cme.")  # one narrative fails whatever the retries
    assert narr("materialize", "-e", "llm") == 1
    instance = dg.DagsterInstance.get()
    parent = assert_named_runs(instance, "llm")["experiment_llm"]
    assert parent.status == dg.DagsterRunStatus.FAILURE
    # The checks ran with their asset: the selection names assets only.
    key = dg.AssetKey(["llm", "classifications"])
    keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)

    def statuses() -> list[str]:
        found = instance.get_status_by_partition(key, keys, batch_partitions) or {}
        return [found[k].value if k in found else "MISSING" for k in keys]

    assert "FAILED" in statuses()

    # The fault is gone: "Re-execute from failure" in the UI.
    server.configure(fail_text=None)
    server.reset()
    child_id = dagster_ui.reexecute(parent.run_id, "FROM_FAILURE")
    assert dagster_ui.wait_for_run(child_id) == "SUCCESS", dagster_ui.log_tail()
    child = instance.get_run_by_id(child_id)
    assert child.job_name == "experiment_llm" and child.parent_run_id == parent.run_id
    assert child.tags["dagster/is_resume_retry"] == "true" and selection(child) == ["llm/classifications"]
    assert child.tags[EXPERIMENT_TAG] == "llm"
    checks = instance.all_logs(child_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    assert len(checks) == 3, "the checks skipped in the failed run ran in its re-execution"
    assert statuses() == ["MATERIALIZED"] * len(keys)
    rows = Store(small / "narr.duckdb").read_classifications("llm")
    assert len(rows) == 60 and set(rows["status"]) == {"ok"}
    assert server.stats()["completions_ok"] == 1, "only the narrative that failed is asked again"

    # "Re-execute all": every step again; the batches are complete, so nothing is asked.
    again_id = dagster_ui.reexecute(parent.run_id, "ALL_STEPS")
    assert dagster_ui.wait_for_run(again_id) == "SUCCESS", dagster_ui.log_tail()
    again = instance.get_run_by_id(again_id)
    assert again.parent_run_id == parent.run_id and "dagster/is_resume_retry" not in again.tags
    assert statuses() == ["MATERIALIZED"] * len(keys)
    assert server.stats()["completions_ok"] == 1
