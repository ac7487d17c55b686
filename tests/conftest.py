"""Shared fixtures: an isolated project (database, journal, Dagster home) and the test server."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import pytest

from narr_assets.testing.server import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample_labelled.xlsx"

POSITIVE = (
    "V was a 30 year old female. Her boyfriend had assaulted her many times and she had a restraining "
    "order against him."
)
NEGATIVE = (
    "V was a 52 year old male who died by suicide after losing his job. No history of domestic violence was reported."
)

LLM_EXPERIMENT = """
description: test experiment against the local test server
backend: openai
model:
  name: test-model
  base_url: {base_url}
  temperature: 0.0
prompt:
  version: {version}
  system: You decide whether the decedent was a victim of intimate partner violence (IPV).
  user_template: "<narrative>\\n<<TEXT>>\\n</narrative>\\nAnswer in JSON."
output:
  mode: {mode}
run:
  concurrency: {concurrency}
  timeout_s: {timeout}
  max_retries: {retries}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Point every setting at a temporary folder; returns that folder."""
    monkeypatch.setenv("NARR_DB", str(tmp_path / "narr.duckdb"))
    monkeypatch.setenv("NARR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NARR_EXPERIMENTS", str(tmp_path / "experiments"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("NARR_SOURCE", str(SAMPLE))
    (tmp_path / "experiments").mkdir()
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "experiments" / "rules.yaml").write_text((ROOT / "configs" / "experiments" / "rules.yaml").read_text())
    return tmp_path


def write_long_csv(
    path: Path, n_incidents: int, placeholders: int = 0, special: dict[tuple[int, str], str] | None = None
) -> Path:
    """A long-layout CSV with alternating positive/negative narratives over both types.

    The first `placeholders` incidents get a placeholder LE narrative; `special` replaces the
    texts of some (incident index, type) pairs.
    """
    special = special or {}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["incident_id", "narrative_type", "narrative_text", "manual_flag_ind"])
        for i in range(n_incidents):
            for t in ("cme", "le"):
                positive = (i + (t == "le")) % 4 == 0
                text = (POSITIVE if positive else NEGATIVE) + f" Case {i}-{t}."
                if i < placeholders and t == "le":
                    text = "Need LE report."
                text = special.get((i, t), text)
                writer.writerow([f"{1000 + i}", t, text, int(positive)])
    return path


def write_experiment(
    folder: Path,
    name: str,
    base_url: str,
    *,
    version: str = "v1",
    mode: str = "json_schema",
    concurrency: int = 8,
    timeout: float = 5,
    retries: int = 6,
) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        LLM_EXPERIMENT.format(
            base_url=base_url, version=version, mode=mode, concurrency=concurrency, timeout=timeout, retries=retries
        )
    )
    return path


@pytest.fixture
def server():
    handle = serve_in_thread()
    try:
        yield handle
    finally:
        handle.stop()


def outage_after(server, completions: int, down_s: float) -> threading.Thread:
    """A started thread that takes `server` down for `down_s` once it has answered `completions` requests."""

    def outage() -> None:
        while server.stats()["completions_ok"] < completions:
            time.sleep(0.01)
        server.down(down_s)

    thread = threading.Thread(target=outage)
    thread.start()
    return thread


def materialize(defs, instance, keys, partition_range=None, run_config=None):
    """Materialise `keys` of a project's definitions on `instance`, as one run (checks included).

    `partition_range` is (first, last) of the batch partitions, like a single-run backfill;
    a batch id (`b00000`) stands for its current partition key (`b00000-<content version>`).
    """
    import dagster as dg

    tags = {}
    if partition_range:
        tags = {
            "dagster/asset_partition_range_start": partition_key_of(instance, partition_range[0]),
            "dagster/asset_partition_range_end": partition_key_of(instance, partition_range[1]),
        }
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    return dg.materialize(
        [*assets, *defs.asset_checks],
        selection=keys,
        instance=instance,
        resources=defs.resources,
        tags=tags,
        run_config=run_config,
        raise_on_error=False,
    )


def partition_key_of(instance, batch_or_key: str) -> str:
    """The registered partition key of a batch id (a full key is returned as is)."""
    from narr_assets.status import batch_of

    if batch_of(batch_or_key) != batch_or_key:
        return batch_or_key
    matches = [k for k in instance.get_dynamic_partitions("narrative_batches") if batch_of(k) == batch_or_key]
    assert len(matches) == 1, f"batch {batch_or_key}: registered keys {matches}"
    return matches[0]


def registered_batches(instance) -> list[str]:
    """The batch ids of the instance's registered partition keys, in registration order."""
    from narr_assets.status import batch_of

    return [batch_of(k) for k in instance.get_dynamic_partitions("narrative_batches")]


_WATCHED = ("NARR_", "DAGSTER_HOME")


@pytest.fixture(autouse=True)
def _no_leaked_settings():
    """A test may change settings only through `monkeypatch` (undone first) or a resource."""
    before = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED)}
    assert after == before, f"the test leaked settings into the environment: {set(after.items()) ^ set(before.items())}"


# --- `dagster dev` on a test project, and the GraphQL API the UI uses -----------------------------

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries { name loadStatus locationOrLoadError { __typename ... on PythonError { message } } }
    }
    ... on PythonError { message }
  }
}
"""

# The mutation the UI's "Re-execute" menu sends (dagster-webserver 1.13), with its strategy:
# FROM_FAILURE ("Re-execute from failure"), ALL_STEPS ("Re-execute all"), FROM_ASSET_FAILURE.
REEXECUTE_MUTATION = """
mutation LaunchPipelineReexecution($reexecutionParams: ReexecutionParams) {
  launchPipelineReexecution(reexecutionParams: $reexecutionParams) {
    __typename
    ... on LaunchRunSuccess { run { id pipelineName rootRunId parentRunId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

RUN_STATUS_QUERY = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } }
}
"""

RUN_ENDED = ("SUCCESS", "FAILURE", "CANCELED")


class DagsterUI:
    """`dagster dev` as the README starts it (project folder, pyproject's code location) and a GraphQL client.

    `start(env)` launches it without waiting, so its start-up (seconds) overlaps what the test
    does meanwhile; the first `query` waits until the code location is loaded. With no `env`,
    the test's own environment is used (`project` points it at the test's folder), read when
    it starts: write the source and experiment files, and set `NARR_*`, before. `stop` ends the
    whole process group (webserver, daemon, code server, run workers). Its sensors run, as for
    a user: `source_file_sensor` requests an ingestion at its first tick.
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = None
        self.url = ""
        self._loaded = False

    def start(self, env=None) -> DagsterUI:
        import socket
        import subprocess
        import sys

        if self.proc is None:
            env = dict(os.environ if env is None else env)
            self._create_instance(env["DAGSTER_HOME"])
            with socket.socket() as sock:  # a free port; dagster dev binds it a moment later
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, ended as one at teardown
                )
            self.url = f"http://127.0.0.1:{port}/graphql"
        return self

    @staticmethod
    def _create_instance(home: str) -> None:
        """Create the instance's home and storage as `narr` does, before `dagster dev` opens it.

        Two processes creating the SQLite storage of an empty `DAGSTER_HOME` at once leave two
        alembic heads, and every later open fails: `narr` serialises its own processes, not
        `dagster dev`, which a test starts while `narr` runs.
        """
        from narr_assets import cli

        before = os.environ.get("DAGSTER_HOME")
        os.environ["DAGSTER_HOME"] = home
        try:
            cli._dagster_instance().dispose()
        finally:
            if before is None:
                del os.environ["DAGSTER_HOME"]
            else:
                os.environ["DAGSTER_HOME"] = before

    def query(self, document: str, variables: dict | None = None) -> dict:
        """POST a GraphQL document to the webserver; its `data` (AssertionError on GraphQL errors)."""
        self.start()
        if not self._loaded:
            self.wait_loaded()
        return self._post(document, variables)

    def _post(self, document: str, variables: dict | None = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        body = json.dumps({"query": document, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # a PythonError in `data` comes with status 500
            answer = json.loads(exc.read() or b"{}")
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def wait_loaded(self, timeout: float = 120) -> None:
        """Wait until the webserver answers and the code location is loaded (AssertionError on a load error)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"dagster dev exited:\n{self.log_tail()}"
            try:
                workspace = self._post(WORKSPACE_QUERY)["workspaceOrError"]
            except OSError:  # not listening yet
                workspace = {}
            entries = [e for e in workspace.get("locationEntries", []) if e["loadStatus"] == "LOADED"]
            if entries:
                location = entries[0]["locationOrLoadError"]
                assert location["__typename"] != "PythonError", f"code location failed to load: {location}"
                self._loaded = True
                return
            assert time.monotonic() < deadline, f"dagster dev not ready after {timeout} s:\n{self.log_tail()}"
            time.sleep(0.2)

    def reexecute(self, run_id: str, strategy: str = "FROM_FAILURE") -> str:
        """Re-execute a run as the UI's "Re-execute" menu does; the new run's id."""
        params = {"parentRunId": run_id, "strategy": strategy}
        launched = self.query(REEXECUTE_MUTATION, {"reexecutionParams": params})["launchPipelineReexecution"]
        assert launched["__typename"] == "LaunchRunSuccess", f"re-execution {strategy} of {run_id} refused: {launched}"
        return launched["run"]["id"]

    def wait_for_run(self, run_id: str, timeout: float = 180) -> str:
        """Wait until a run ends; its status (SUCCESS, FAILURE or CANCELED)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            status = self.query(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"].get("status")
            if status in RUN_ENDED:
                return status
            assert time.monotonic() < deadline, f"run {run_id} still {status} after {timeout} s:\n{self.log_tail()}"
            time.sleep(0.3)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        import contextlib
        import signal
        import subprocess

        if self.proc is None:
            return
        # `dagster dev` alone: it shuts its services down in order (signalled at once, the
        # daemon would restart the code server it sees exit).
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):  # then killed below
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # whatever outlived dagster dev (a run worker)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


@pytest.fixture
def dagster_ui(project):
    """A `DagsterUI` on the test project's instance, started on first use (or `dagster_ui.start(env)`).

    For one `dagster dev` shared by a module's tests, create `DagsterUI(log)` in a module-scoped
    fixture over a module-scoped project, `start(env)` it and `stop()` it there.
    """
    ui = DagsterUI(project / "dagster_dev.log")
    try:
        yield ui
    finally:
        ui.stop()
