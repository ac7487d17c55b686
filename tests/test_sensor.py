"""The source sensor: every change of the file observed and ingested once, a revert included."""

from __future__ import annotations

import logging
import sys
import time

import dagster as dg
import pytest
from conftest import write_long_csv
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster._daemon.sensor import execute_sensor_iteration

from narr_assets import settings
from narr_assets.defs.ingest import (
    SOURCE_CHANGE_TAG,
    SourceCursor,
    source_change_request,
    source_file,
    source_file_sensor,
)
from narr_assets.defs.resources import NarrSettings
from narr_assets.ingest import file_checksum
from narr_assets.store import Store

A, B = "a" * 32, "b" * 32
RAW = dg.AssetKey("raw_narratives")


def test_each_change_and_each_revert_is_requested_once():
    """A, A, B, A, A, (file gone), A, B: a run for each change - the revert to A too - and none
    for a tick that sees the file as it was, or no file."""
    cursor, keys = SourceCursor(), []
    for current in (A, A, B, A, A, None, A, B):
        decision, cursor = source_change_request(current, cursor, "in.csv")
        if isinstance(decision, dg.RunRequest):
            keys.append(decision.run_key)
            assert decision.tags["narr/source_checksum"] == current
        else:
            assert ("not found: in.csv" in str(decision.skip_message)) == (current is None)
    assert keys == [f"1-{A}", f"2-{B}", f"3-{A}", f"4-{B}"]
    assert cursor == SourceCursor(checksum=B, changes=4)


def test_a_tick_evaluated_twice_requests_the_same_run_key():
    """The decision depends on the cursor and the file only: a tick re-evaluated with the cursor
    of before (its update lost) asks for the same run key, which Dagster launches once."""
    before = SourceCursor(checksum=A, changes=7)
    first, _ = source_change_request(B, before, "in.csv")
    again, _ = source_change_request(B, before, "in.csv")
    assert isinstance(first, dg.RunRequest) and isinstance(again, dg.RunRequest)
    assert first.run_key == again.run_key == f"8-{B}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, SourceCursor()),
        ("", SourceCursor()),
        (SourceCursor(checksum=A, changes=3).dumps(), SourceCursor(checksum=A, changes=3)),
        (A, SourceCursor(checksum=A)),  # the cursor of an older narr: the bare checksum
        ("12345", SourceCursor(checksum="12345")),  # set by hand; valid JSON but no cursor
        ('{"checksum": "x"}', SourceCursor(checksum='{"checksum": "x"}')),
    ],
)
def test_cursor_reads_what_any_version_stored(raw, expected):
    assert SourceCursor.loads(raw) == expected


def _sensor_settings(project, source) -> NarrSettings:
    return NarrSettings(source=str(source), data_dir=str(project), batch_size=10)


def test_first_tick_and_a_deleted_cursor_never_reuse_a_run_key(project):
    """A cursor without a count starts after the sensor's latest run, since Dagster silently
    skips a run key it has launched before; an older narr's cursor (the checksum) still counts
    as seen."""
    source = write_long_csv(project / "input.csv", 3)
    current = file_checksum(source)
    resources = {"settings": _sensor_settings(project, source)}
    with dg.instance_for_test() as instance:
        result = source_file_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.run_key for r in result.run_requests] == [f"1-{current}"]
        assert result.run_requests[0].tags[SOURCE_CHANGE_TAG] == "1"
        instance.add_run(
            dg.DagsterRun(
                job_name="__ephemeral_asset_job__",
                tags={"dagster/sensor_name": "source_file_sensor", SOURCE_CHANGE_TAG: "5"},
            )
        )
        result = source_file_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.run_key for r in result.run_requests] == [f"6-{current}"]
        legacy = source_file_sensor(dg.build_sensor_context(instance=instance, cursor=current, resources=resources))
        assert not legacy.run_requests and not legacy.asset_events


def test_a_missing_file_is_skipped_without_observation(project):
    resources = {"settings": _sensor_settings(project, project / "gone.csv")}
    with dg.instance_for_test() as instance:
        cursor = SourceCursor(checksum=A, changes=2).dumps()
        result = source_file_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))
        assert not result.run_requests and not result.asset_events and result.cursor == cursor
        assert "source file not found" in str(result.skip_reason)


class _Daemon:
    """The sensor daemon and the run queue of `dagster dev`, one tick at a time, in this process.

    Runs execute in-process (`SyncInMemoryRunLauncher`) when dequeued, so the state between a
    tick and its run - observed, not yet ingested - can be checked.
    """

    def __init__(self, workspace, instance):
        self.workspace, self.instance = workspace, instance
        self.clock = time.time()
        self.queue = QueuedRunCoordinatorDaemon(interval_seconds=1)

    def tick(self) -> None:
        self.clock += 31  # past the sensor's minimum interval
        with freeze_time(self.clock):
            list(execute_sensor_iteration(self.workspace, logging.getLogger("sensor-test"), None, None))

    def run_queued(self) -> None:
        list(self.queue.run_iteration(self.workspace))

    def runs(self) -> list[dg.DagsterRun]:
        return list(reversed(self.instance.get_runs()))

    def raw_status(self) -> tuple[StaleStatus, list]:
        """What the UI reads for `raw_narratives`: its stale status and the causes."""
        resolver = self.workspace.create_request_context().stale_status_loader
        return resolver.get_status(RAW), resolver.get_stale_causes(RAW)

    def source_version(self) -> str | None:
        record = self.instance.get_latest_data_version_record(source_file.key, is_source=True)
        return None if record is None else record.asset_observation.data_version


@pytest.fixture
def daemon(project, monkeypatch):
    # Read when the code location loads, as `dagster dev` would.
    monkeypatch.setenv("NARR_SOURCE", str(project / "input.csv"))
    monkeypatch.setenv("NARR_BATCH_SIZE", "10")
    origin = InProcessCodeLocationOrigin(
        loadable_target_origin=LoadableTargetOrigin(
            executable_path=sys.executable, module_name="narr_assets.definitions", attribute="defs"
        ),
        location_name="narr_assets",
    )
    launcher = {"module": "dagster._core.launcher.sync_in_memory_run_launcher", "class": "SyncInMemoryRunLauncher"}
    with (
        dg.instance_for_test(overrides={"run_launcher": launcher}) as instance,
        create_test_daemon_workspace_context(InProcessWorkspaceLoadTarget(origin), instance) as workspace,
    ):
        yield _Daemon(workspace, instance)


@pytest.mark.filterwarnings("error::dagster.BetaWarning")  # nor any BetaWarning in a tick or a run
def test_sensor_observes_each_change_and_ingests_it_once(project, daemon):
    """Through the daemons of `dagster dev` on a real instance: A, A, B (one narrative edited),
    A again (the revert). Each change is observed at once (`raw_narratives` reads stale, because
    of `source_file`) and ingested by exactly one run, after which it reads fresh and the
    database holds that very file; a tick that sees the same file launches nothing."""
    source = project / "input.csv"  # NARR_SOURCE of the code location
    versions = {
        "A": write_long_csv(source, 15).read_bytes(),
        "B": write_long_csv(source, 15, special={(3, "cme"): "V was edited."}).read_bytes(),
    }
    store = Store(settings.db_path())
    expected_keys = []
    for step, name in enumerate(["A", "A", "B", "A", "A"]):
        source.write_bytes(versions[name])
        checksum = file_checksum(source)
        runs_before = len(daemon.runs())
        daemon.tick()
        assert daemon.source_version() == checksum
        if step in (1, 4):  # the file as the last tick saw it: nothing to do
            assert len(daemon.runs()) == runs_before
            assert daemon.raw_status()[0] == StaleStatus.FRESH
            continue
        expected_keys.append(f"{len(expected_keys) + 1}-{checksum}")
        queued = daemon.runs()[-1]
        assert queued.status == dg.DagsterRunStatus.QUEUED and len(daemon.runs()) == runs_before + 1
        status, causes = daemon.raw_status()
        if step == 0:
            assert status == StaleStatus.MISSING
        else:  # observed, not yet ingested: stale because of the new source data version
            assert status == StaleStatus.STALE
            assert [c.dependency.asset_key for c in causes] == [source_file.key]
            assert "new dependency data version" in causes[0].reason
        daemon.run_queued()
        assert daemon.instance.get_run_by_id(queued.run_id).status == dg.DagsterRunStatus.SUCCESS
        assert daemon.raw_status()[0] == StaleStatus.FRESH
        assert store.current_checksum() == checksum
    assert [r.tags["dagster/run_key"] for r in daemon.runs()] == expected_keys
    assert len(expected_keys) == 3  # A, B and the revert to A
    # The revert is in the database, not only in Dagster: the edited narrative has its old text.
    (text,) = store.query_row(
        "SELECT narrative_text FROM narratives WHERE incident_id = '1003' AND narrative_type = 'cme'"
    )
    assert text != "V was edited." and text.endswith("Case 3-cme.")
