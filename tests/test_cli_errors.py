"""`narr` when things go wrong: a locked database, failing steps, internal errors.

Real `narr` subprocesses against a DuckDB file that another process holds, the way a
`duckdb data/narr.duckdb` shell left open holds it: one line per error, never a traceback
(unless --debug), a documented exit code, and a run that waits its turn instead of failing.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from conftest import write_experiment, write_long_csv
from test_cli import env_for, narr

from narr_assets import cli, settings
from narr_assets import store as store_module
from narr_assets.store import DatabaseLockedError, Store
from narr_assets.testing.server import serve_in_subprocess

# A process holding the database for writing, as a `duckdb` shell does from `.open` to exit.
# It takes turns with `narr` to get the file, then holds it for `hold_s` seconds.
HOLDER = """
import sys, time, duckdb
path, hold_s = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + 60
while True:
    try:
        con = duckdb.connect(path)
        break
    except duckdb.IOException:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.01)
print("locked", flush=True)
time.sleep(hold_s)
con.close()
"""


@contextlib.contextmanager
def holding(db: Path, hold_s: float = 600) -> Iterator[subprocess.Popen]:
    """Another process holds `db` for `hold_s` seconds (or until the block ends)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(hold_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def no_traceback(stderr: str) -> bool:
    return "Traceback" not in stderr and "Stack Trace" not in stderr and " - ERROR - " not in stderr


def narr_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


@pytest.fixture
def small_project(project):
    """A project whose source has 20 narratives (one batch at the default batch size)."""
    source = write_long_csv(project / "in.csv", 10)
    return project, env_for(project, source)


# --- the store's wait ------------------------------------------------------------------------


def test_store_waits_with_progress_lines_then_names_the_holder(project, monkeypatch):
    monkeypatch.setattr(store_module, "LOCK_NOTICE_AFTER_S", 0.2)
    monkeypatch.setattr(store_module, "LOCK_PROGRESS_EVERY_S", 0.5)
    db = project / "narr.duckdb"
    lines: list[str] = []
    with holding(db) as holder:
        started = time.monotonic()
        with pytest.raises(DatabaseLockedError) as err:
            Store(db, lock_wait_s=2.0, on_lock_wait=lines.append).query_rows("SELECT 1")
        waited = time.monotonic() - started
    assert 2.0 <= waited < 6
    # Said after 0.2 s, then every 0.5 s: at 0.2, 0.7, 1.2, 1.7 (give or take a poll).
    assert 3 <= len(lines) <= 5, lines
    assert all(line.startswith(f"waiting for {db}: locked by PID {holder.pid} (python") for line in lines)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{db} is locked by PID {holder.pid} (python")
    assert "close that session" in message and "NARR_DB_LOCK_WAIT" in message and "README" in message


def test_store_takes_the_lock_as_soon_as_it_is_freed(project):
    db = project / "narr.duckdb"
    lines: list[str] = []
    with holding(db, hold_s=1.5):
        started = time.monotonic()
        assert Store(db, lock_wait_s=30, on_lock_wait=lines.append).query_rows("SELECT 42") == [(42,)]
        waited = time.monotonic() - started
    # DuckDBResource's doubling back-off would have slept until 3.1 s here (0.1 + 0.2 + ... + 1.6).
    assert 1.0 < waited < 2.5
    assert len(lines) == 1


def test_other_open_errors_are_not_retried(project):
    folder = project / "a_folder.duckdb"
    folder.mkdir()
    started = time.monotonic()
    with pytest.raises(duckdb.Error):
        Store(folder, lock_wait_s=30).query_rows("SELECT 1")
    assert time.monotonic() - started < 5  # DuckDBResource retried any IOException for 102 s


@pytest.mark.parametrize(("raw", "wait"), [(None, 60.0), ("0", 0.0), ("2.5", 2.5)])
def test_lock_wait_setting(monkeypatch, raw, wait):
    if raw is None:
        monkeypatch.delenv("NARR_DB_LOCK_WAIT", raising=False)
    else:
        monkeypatch.setenv("NARR_DB_LOCK_WAIT", raw)
    assert settings.db_lock_wait_s() == wait


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf"])
def test_bad_lock_wait_setting_is_a_one_line_usage_error(project, monkeypatch, capsys, raw):
    monkeypatch.setenv("NARR_DB_LOCK_WAIT", raw)
    assert cli.main(["status"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"narr: NARR_DB_LOCK_WAIT must be a number of seconds >= 0, got {raw!r}\n"


# --- commands on a locked database -----------------------------------------------------------


def test_status_on_a_locked_database_waits_then_fails_in_one_line(small_project):
    project, env = small_project
    db = project / "narr.duckdb"
    with holding(db) as holder:
        started = time.monotonic()
        proc = narr({**env, "NARR_DB_LOCK_WAIT": "3"}, "status", check=False)
        elapsed = time.monotonic() - started
    assert proc.returncode == cli.EXIT_LOCKED == 75, proc.stderr
    assert no_traceback(proc.stderr), proc.stderr
    assert narr_lines(proc.stderr, f"narr: waiting for {db}: locked by PID {holder.pid} ")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"narr: {db} is locked by PID {holder.pid} (python") and "(waited 3 s)" in last
    assert 3 <= elapsed < 60


def test_status_goes_on_when_the_lock_is_released_during_the_wait(small_project):
    project, env = small_project
    narr(env, "ingest")
    db = project / "narr.duckdb"
    with holding(db) as holder:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "narr"), "status", "rules"],
            env={**env, "NARR_DB_LOCK_WAIT": "60"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the session is closed once narr says it waits for it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert first.startswith(f"narr: waiting for {db}: locked by PID {holder.pid} ")
    assert "batches done 0, missing 1" in out and no_traceback(err)


@pytest.mark.parametrize("command", [["ingest"], ["run", "rules"], ["materialize"], ["export", "rules"]])
def test_every_command_on_a_locked_database_fails_in_one_line(small_project, command):
    project, env = small_project
    db = project / "narr.duckdb"
    with holding(db) as holder:
        proc = narr({**env, "NARR_DB_LOCK_WAIT": "1"}, *command, check=False)
    assert proc.returncode == cli.EXIT_LOCKED, proc.stderr
    assert no_traceback(proc.stderr), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"narr: {db} is locked by PID {holder.pid} ")


# --- a run whose batch write meets the lock --------------------------------------------------


@pytest.fixture
def llm_run(project):
    source = write_long_csv(project / "input.csv", 100, placeholders=4)  # 200 narratives, 196 asked
    with serve_in_subprocess(latency_s=0.1) as server:
        write_experiment(project / "experiments", "llm", server.base_url, concurrency=4)
        env = env_for(project, source)
        narr(env, "ingest")
        yield project, env, server


def start_run(env: dict[str, str], server) -> subprocess.Popen:
    """`narr run llm`, returned once it is asking (its reads are done; writes are to come)."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "narr"), "run", "llm"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while server.stats()["completions_ok"] < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


@pytest.mark.slow
@pytest.mark.reliability
def test_batch_write_waits_for_the_lock_then_succeeds(llm_run):
    project, env, server = llm_run
    proc = start_run({**env, "NARR_DB_LOCK_WAIT": "60"}, server)
    # The first batch completes after ~25 answers (0.6 s); the hold outlasts it by seconds.
    with holding(project / "narr.duckdb", hold_s=4) as holder:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    waiting = [i for i, line in enumerate(err.splitlines()) if f"locked by PID {holder.pid}" in line]
    final_progress = next(i for i, line in enumerate(err.splitlines()) if "calls 196/196" in line)
    assert waiting and waiting[0] < final_progress  # it was the run's batch writer that waited
    rows = Store(project / "narr.duckdb").read_classifications("llm")
    assert len(rows) == 200 and not rows[["incident_id", "narrative_type"]].duplicated().any()
    assert server.stats()["completions_ok"] == 196 and no_traceback(err)


@pytest.mark.slow
@pytest.mark.reliability
def test_lock_outlasting_the_wait_fails_the_run_in_one_line_and_resume_pays_nothing(llm_run):
    project, env, server = llm_run
    db = project / "narr.duckdb"
    proc = start_run({**env, "NARR_DB_LOCK_WAIT": "2"}, server)
    with holding(db) as holder:
        _, err = proc.communicate(timeout=120)
    assert no_traceback(err), err[-3000:]
    step_lines = narr_lines(err, "narr: llm: ")
    assert len(step_lines) == 1 and step_lines[0].startswith(f"narr: llm: {db} is locked by PID {holder.pid} ")
    assert proc.returncode == cli.EXIT_LOCKED  # the status printed after the run met the lock too
    asked = server.stats()["completions_ok"]
    assert asked == 196  # every answer arrived and was journalled while the writes waited
    resumed = narr(env, "run", "llm")
    assert server.stats()["completions_ok"] == asked, resumed.stderr  # nothing paid twice
    rows = Store(db).read_classifications("llm")
    assert len(rows) == 200 and set(rows["status"]) == {"ok", "skipped"}


@pytest.mark.slow
def test_snapshot_and_one_shot_read_only_queries_during_a_run(llm_run):
    """The README's way to query during a run: it neither blocks the run nor sees half a batch."""
    project, env, server = llm_run
    db, snap = project / "narr.duckdb", project / "snapshot.duckdb"
    proc = start_run(env, server)
    snapshots, counts, refused = 0, [], 0
    while proc.poll() is None:
        try:
            with duckdb.connect(str(db), read_only=True) as con:  # duckdb -readonly FILE -c "..."
                counts.append(con.execute("SELECT count(*) FROM classification_rows").fetchone()[0])
            snap.unlink(missing_ok=True)
            with duckdb.connect() as con:  # duckdb -c "ATTACH ...; ATTACH ...; COPY FROM DATABASE ..."
                con.execute(f"ATTACH '{db}' AS src (READ_ONLY)")
                con.execute(f"ATTACH '{snap}' AS snap")
                con.execute("COPY FROM DATABASE src TO snap")
            with duckdb.connect(str(snap), read_only=True) as con:
                sizes = con.execute("SELECT count(*) FROM classifications GROUP BY batch_id").fetchall()
            assert all(n == 25 for (n,) in sizes)  # whole batches only
            snapshots += 1
        except duckdb.IOException as exc:  # narr was writing at that instant: try again
            assert "Could not set lock" in str(exc)
            refused += 1
        time.sleep(0.1)
    _, err = proc.communicate()
    assert proc.returncode == 0 and "waiting for" not in err, err[-3000:]
    assert snapshots >= 5 and counts == sorted(counts) and refused <= snapshots
    assert len(Store(db).read_classifications("llm")) == 200


# --- failing steps and internal errors -------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_failing_step_is_one_line_without_debug_and_a_traceback_with_it(small_project):
    project, env = small_project
    write_experiment(project / "experiments", "down", f"http://127.0.0.1:{closed_port()}/v1", retries=0)
    proc = narr(env, "run", "down", check=False)
    assert proc.returncode == cli.EXIT_FAILED
    assert no_traceback(proc.stderr), proc.stderr
    lines = narr_lines(proc.stderr, "narr: ")
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("narr: down: 1 of 1 batch(es) failed after retries") and "connection error" in lines[0]
    assert "dagster._core" not in proc.stderr and "STEP_FAILURE" not in proc.stderr
    for debug in (["--debug", "run", "down"], ["run", "down", "--debug"]):
        proc = narr(env, *debug, check=False)
        assert proc.returncode == cli.EXIT_FAILED
        assert "Stack Trace" in proc.stderr and "STEP_FAILURE" in proc.stderr
        assert narr_lines(proc.stderr, "narr: down: 1 of 1 batch(es) failed after retries")


def test_internal_error_is_one_line_and_debug_adds_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("no such\ncolumn")

    monkeypatch.setattr(cli, "cmd_status", broken)
    assert cli.main(["status"]) == cli.EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert err == "narr: internal error: RuntimeError: no such column (run with --debug for the traceback)\n"
    assert cli.main(["status", "--debug"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("(run with --debug for the traceback)\n")


def test_help_documents_the_exit_codes_and_debug():
    text = cli.build_parser().format_help()
    for code, meaning in [
        (0, "done"),
        (1, "finished with failures"),
        (2, "usage or configuration error"),
        (70, "internal error"),
        (75, "locked by another process"),
        (130, "interrupted"),
    ]:
        assert any(line.strip().startswith(str(code)) and meaning in line for line in text.splitlines()), code
    assert "--debug" in text


def test_failure_message_unwraps_dagster_and_keeps_the_type_of_unexpected_errors():
    from dagster._utils.error import SerializableErrorInfo

    def wrapped(cause: SerializableErrorInfo) -> SerializableErrorInfo:
        message = 'dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op "x":\n'
        return SerializableErrorInfo(message, [], "DagsterExecutionStepExecutionError", cause)

    unexpected = SerializableErrorInfo("KeyError: 'incident_id'\n", [], "KeyError")
    locked = SerializableErrorInfo(
        "narr_assets.store.DatabaseLockedError: db is locked\nby PID 7\n", [], "DatabaseLockedError"
    )
    failure = SerializableErrorInfo(
        "dagster._core.definitions.events.Failure: 2 of 8 batch(es) failed\n", [], "Failure"
    )
    assert cli.failure_message(wrapped(unexpected)) == "KeyError: 'incident_id'"
    assert cli.failure_message(wrapped(locked)) == "db is locked by PID 7"
    assert cli.failure_message(failure) == "2 of 8 batch(es) failed"


def test_a_run_failure_without_a_failed_step_is_one_line_too(capsys):
    from types import SimpleNamespace

    event = SimpleNamespace(
        is_step_failure=False, is_run_failure=True, event_specific_data=None, message="Execution of run failed."
    )
    cli.Runner._print_failures(SimpleNamespace(assets=[], checks=[]), [event])
    assert capsys.readouterr().err == "narr: run failed: Execution of run failed.\n"
