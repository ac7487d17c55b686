"""Opt-in automation (`run.auto_materialize`): each missing batch is requested once.

The condition is evaluated with Dagster's own harness (`evaluate_automation_conditions`, the
evaluation the automation sensor makes each tick, minus launching runs) on a real instance,
over the project's definitions and partitions. Partition keys are read from the instance.
"""

from __future__ import annotations

import threading
import time
import warnings

import dagster as dg
from conftest import materialize, write_experiment, write_long_csv

from narr_assets.corpus import ingestion_lock
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import BATCH_PARTITIONS, INGEST_ASSETS, batch_partitions
from narr_assets.defs.resources import NarrSettings

warnings.filterwarnings("ignore", category=dg.BetaWarning)

KEY = dg.AssetKey(["auto", "classifications"])
STARTED = dg.DagsterRunStatus.STARTED
MANUAL_KEY = dg.AssetKey(["manual", "classifications"])


def auto_project(project, server, incidents: int = 15):
    """`auto` (opted in) and `manual` experiments over a 2 x `incidents`-row CSV, batches of 10."""
    source = write_long_csv(project / "input.csv", incidents)
    write_experiment(project / "experiments", "manual", server.base_url, retries=0)
    auto = write_experiment(project / "experiments", "auto", server.base_url, retries=0)
    auto.write_text(auto.read_text().replace("run:\n", "run:\n  auto_materialize: true\n"))
    settings = NarrSettings(source=str(source), data_dir=str(project), batch_size=10)
    return source, build_definitions(settings=settings)


def ingest(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Materialise the ingest assets (their checks left out: not what is tested here); the keys after."""
    result = dg.materialize(list(INGEST_ASSETS), instance=instance, resources=defs.resources, raise_on_error=False)
    assert result.success
    return instance.get_dynamic_partitions(BATCH_PARTITIONS)


class Ticks:
    """Consecutive evaluations of the automation conditions, the cursor carried like the sensor's."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance):
        self.defs, self.instance, self.cursor = defs, instance, None

    def requested(self) -> set[str | None]:
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        assert result.get_num_requested(MANUAL_KEY) == 0  # not opted in: never requested
        return set(result.get_requested_partitions(KEY))


def test_only_opted_in_experiments_get_a_running_automation_sensor(project, server):
    _source, defs = auto_project(project, server)
    repo = defs.get_repository_def()
    sensors = {s.name: s for s in repo.sensor_defs}
    # Dagster's default sensor starts stopped; it is not created, since ours covers the asset.
    assert "default_automation_condition_sensor" not in sensors
    sensor = sensors["auto_automation"]
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.asset_selection is not None
    assert sensor.asset_selection.resolve(repo.asset_graph) == {KEY}
    config_hash = defs.get_assets_def(KEY).code_versions_by_key[KEY]
    assert sensor.run_tags == {"narr/experiment": "auto", "narr/config_hash": config_hash}  # as the job's runs
    assert not any(name.startswith("manual") for name in sensors)


def test_batches_missing_before_automation_was_on_are_requested_once_then_left_alone(project, server):
    """Issue 10: `eager()` requested none of them at first, then all of them after every ingest."""
    _source, defs = auto_project(project, server)
    with dg.instance_for_test() as instance:
        keys = ingest(defs, instance)
        assert len(keys) == 3
        ticks = Ticks(defs, instance)
        # All of them, on the very first evaluation: one contiguous stretch of keys, so one run.
        assert ticks.requested() == set(keys)
        # Requested: not again while the request stands (the harness launches no run).
        assert ticks.requested() == set()
        assert materialize(defs, instance, [KEY], (keys[0], keys[-1])).success  # the sensor's run
        assert ticks.requested() == set()
        # `narrative_batches` is materialised again (what the source sensor's first tick does
        # when `dagster dev` starts): same keys, and nothing is requested.
        assert ingest(defs, instance) == keys
        assert ticks.requested() == set()
        assert ticks.requested() == set()
    assert server.stats()["chat_requests"] == 30


def test_each_new_or_edited_batch_is_requested_exactly_once(project, server):
    source, defs = auto_project(project, server)
    with dg.instance_for_test() as instance:
        keys = ingest(defs, instance)
        ticks = Ticks(defs, instance)
        assert ticks.requested() == set(keys)
        assert materialize(defs, instance, [KEY], (keys[0], keys[-1])).success  # the sensor's run
        # Five more incidents (a new batch) and one edited narrative (its batch gets a new key).
        write_long_csv(source, 20, special={(3, "cme"): "V was found at home; the partner was not involved."})
        after = ingest(defs, instance)
        new = set(after) - set(keys)
        assert len(new) == 2 and len(after) == 4
        assert ticks.requested() == new
        assert set(after[-2:]) == new  # new keys come last: one contiguous stretch, one run
        assert ticks.requested() == set()
        assert ticks.requested() == set()


def test_a_failed_batch_waits_for_the_user(project, server):
    """Failed batches (the engine's retries spent) are not retried by automation, before or after it is on."""
    source, defs = auto_project(project, server)
    with dg.instance_for_test() as instance:
        keys = ingest(defs, instance)
        server.configure(fail_text="Case 4-cme.")  # one narrative fails on every request
        assert not materialize(defs, instance, [KEY], (keys[0], keys[-1])).success
        failed = _with_status(instance, keys, dg.AssetPartitionStatus.FAILED)
        assert len(failed) == 1 and len(_with_status(instance, keys, dg.AssetPartitionStatus.MATERIALIZED)) == 2
        write_long_csv(source, 20)  # a new batch
        (new,) = set(ingest(defs, instance)) - set(keys)
        ticks = Ticks(defs, instance)
        assert ticks.requested() == {new}  # missing before automation: yes; failed: no
        server.configure(fail_text=None, server_error=1.0)  # the endpoint is down for the sensor's run
        assert not materialize(defs, instance, [KEY], (new, new)).success
        assert ticks.requested() == set()
        assert ticks.requested() == set()
        assert _with_status(instance, [*keys, new], dg.AssetPartitionStatus.FAILED) == {*failed, new}


def test_a_batch_taken_up_by_another_run_is_left_to_it_even_when_stopped(project, server):
    _source, defs = auto_project(project, server)
    with dg.instance_for_test() as instance:
        keys = ingest(defs, instance)
        server.configure(latency_s=1.0)  # 20 narratives at concurrency 8: ~3 s of run, stopped after ~1
        outcome: list[object] = []

        def manual_run() -> None:
            try:
                outcome.append(materialize(defs, instance, [KEY], (keys[0], keys[1])))
            except BaseException as exc:  # the stop surfaces as a KeyboardInterrupt
                outcome.append(exc)

        thread = threading.Thread(target=manual_run)
        thread.start()
        try:
            _wait_for(lambda: len(_with_status(instance, keys, dg.AssetPartitionStatus.IN_PROGRESS)) == 2)
            ticks = Ticks(defs, instance)
            assert ticks.requested() == {keys[2]}  # the run has the other two
            (run,) = instance.get_run_records(filters=dg.RunsFilter(statuses=[STARTED]))
            instance.report_run_canceling(run.dagster_run)  # Terminate in the UI
        finally:
            thread.join(timeout=60)
        assert outcome and not thread.is_alive()
        stopped = instance.get_run_by_id(run.dagster_run.run_id)
        assert stopped is not None and stopped.status == dg.DagsterRunStatus.CANCELED
        assert server.stats()["completions_ok"] < 20
        # Whatever the stopped run left missing is not restarted behind the user's back.
        assert _with_status(instance, keys[:2], dg.AssetPartitionStatus.MATERIALIZED) != set(keys[:2])
        assert ticks.requested() == set()


def test_nothing_is_requested_while_an_ingest_runs(project, server):
    """A key an ingest is about to supersede gets no run; what the ingest leaves missing comes next."""
    source, defs = auto_project(project, server)
    with dg.instance_for_test() as instance:
        keys = ingest(defs, instance)
        write_long_csv(source, 15, special={(3, "cme"): "V was found at home; the partner was not involved."})
        outcome: list[object] = []
        with ingestion_lock(defs.resources["settings"].layout.locks):  # the ingest run waits for it
            thread = threading.Thread(target=lambda: outcome.append(ingest(defs, instance)))
            thread.start()
            _wait_for(lambda: bool(instance.get_run_records(filters=dg.RunsFilter(statuses=[STARTED]))))
            ticks = Ticks(defs, instance)
            assert ticks.requested() == set()  # all three are missing, but an ingest is running
        thread.join(timeout=60)
        (after,) = outcome
        assert len(set(after) - set(keys)) == 1 and len(after) == 3  # the edited batch's new key
        assert ticks.requested() == set(after)
        assert ticks.requested() == set()


def _with_status(instance: dg.DagsterInstance, keys: list[str], status: dg.AssetPartitionStatus) -> set[str]:
    statuses = instance.get_status_by_partition(KEY, keys, batch_partitions) or {}
    return {k for k, s in statuses.items() if s == status}


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
