"""`narr`: run, resume, inspect and export experiments from the shell, through Dagster.

Every command that computes something launches real Dagster runs on the project's instance
(`DAGSTER_HOME`, default `.dagster_home/` in the project), so the runs, partitions and
metadata are the same ones the UI shows.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from narr_assets import settings

# Exit codes (listed in `narr --help`). 70 and 75 are sysexits.h's EX_SOFTWARE and
# EX_TEMPFAIL: a locked database is the one failure where running the same command later,
# unchanged, is the fix, so a wrapper script can tell it apart and retry.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 70, 75, 130
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    done
  {EXIT_FAILED}    finished with failures (a failed step is one `narr: <experiment>: <message>` line)
  {EXIT_USAGE}    usage or configuration error (bad option, experiment file, input file, NARR_* value)
  {EXIT_INTERNAL}   internal error in narr (a bug): run again with --debug and report the traceback
  {EXIT_LOCKED}   the database stayed locked by another process for NARR_DB_LOCK_WAIT seconds: retry later
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); completed answers are journalled - run the same command to resume

--debug (anywhere on the line) shows Dagster's full log with tracebacks."""

# Set by `main` from --debug: whether Dagster's failure events (with their stack traces) and
# tracebacks of narr's own errors are shown.
_debug = False


def _ensure_dagster_home() -> Path:
    from narr_assets.dagster_home import ensure_dagster_yaml

    home = _dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    # Telemetry off, endpoint pools limited (see the module); a file of the user's is kept.
    ensure_dagster_yaml(home)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _dagster_home() -> Path:
    from narr_assets.dagster_home import configured_home

    return configured_home() or settings.PROJECT_ROOT / ".dagster_home"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`, waiting for other processes; the kernel frees it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _dagster_instance():
    """The project's Dagster instance, its home and storage created if need be.

    One `narr` process at a time: on an empty `DAGSTER_HOME` the first `DagsterInstance.get()`
    creates the SQLite storage, and two processes doing it at once fail ("table runs already
    exists") or leave a second alembic head behind.
    """
    import dagster as dg

    with _flock(_dagster_home() / ".narr-setup.lock"):
        _ensure_dagster_home()
        return dg.DagsterInstance.get()


class Runner:
    """Launches Dagster runs of the project's definitions on the persistent instance."""

    def __init__(self) -> None:
        import dagster as dg

        from narr_assets.definitions import build_definitions
        from narr_assets.defs.resources import NarrSettings

        self.instance = _dagster_instance()
        self.dg = dg
        self.settings = NarrSettings.from_env()
        self.interrupted = False  # a step of this process's runs stopped on a signal or termination
        self.defs = build_definitions(settings=self.settings)
        self.assets = [a for a in self.defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
        self.checks = list(self.defs.asset_checks or [])
        self.fail_orphaned_runs()
        self.ensure_pools()

    def ensure_pools(self) -> None:
        """Limit each endpoint pool to one step, and free the slots runs that died still hold.

        Runs after `fail_orphaned_runs`, which marks the runs of dead narr processes failed:
        their slots are freed here, so a killed run never blocks its endpoint for good.
        """
        from narr_assets.defs.pools import ensure_pool_limits, free_slots_of_ended_runs, patch_pool_wait, pools_of

        patch_pool_wait()
        pools = pools_of(self.assets)
        if ensure_pool_limits(self.instance, pools) is None and pools:
            print(
                f"narr: warning: the Dagster instance in {_dagster_home()} cannot limit pools (its storage predates "
                "them): overlapping runs on one endpoint are not held to one run's concurrency; run "
                "`dagster instance migrate` with this DAGSTER_HOME to fix it",
                file=sys.stderr,
            )
        host = socket.gethostname()

        def still_working(run) -> bool:  # a run ended in Dagster while its narr process drains it
            pid = run.tags.get("narr/pid")
            return run.tags.get("narr/host") == host and bool(pid) and _alive(int(pid))

        free_slots_of_ended_runs(self.instance, still_working)

    def op_name(self, key) -> str:
        """The op that materialises `key` (run config is keyed by op name)."""
        return self.defs.get_assets_def(key).op.name

    def fail_orphaned_runs(self) -> None:
        """Mark runs of `narr` processes that died (kill -9, power cut) as failed.

        Such runs stay STARTED forever otherwise, and the UI would show their partitions as
        in progress instead of failed (resumable).
        """
        dg = self.dg
        runs = self.instance.get_runs(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={"narr/launched_by": "narr-cli"})
        )
        for run in runs:
            if run.parent_run_id:  # a re-execution from the UI: it copies narr's tags but runs in dagster dev
                continue
            pid, host = run.tags.get("narr/pid"), run.tags.get("narr/host")
            if not pid or host != socket.gethostname() or _alive(int(pid)):
                continue
            self.instance.report_run_failed(
                run, message=f"the narr process (pid {pid}) ended without finishing the run"
            )
            print(
                f"narr: run {run.run_id[:8]} of a narr process that died (pid {pid}) is marked failed; resuming",
                file=sys.stderr,
            )

    def materialize(
        self, keys: Sequence, partition_range: tuple[str, str] | None = None, run_config: dict | None = None
    ) -> bool:
        """Materialise `keys` (and their checks) in this process, as one run of the job holding them.

        The run belongs to a job of the code location (`ingest`, `experiment_<name>`, `compare`)
        with `keys` as its asset selection, and carries the origins a run launched from the UI
        has, so the UI names it and can re-execute it. (`execute_in_process` leaves the origins
        empty, and "Re-execute" then fails with `CheckError: Expected non-None value`.)
        """
        from dagster._core.definitions.job_base import InMemoryJob
        from dagster._core.execution.api import execute_run

        tags = {"narr/launched_by": "narr-cli", "narr/pid": str(os.getpid()), "narr/host": socket.gethostname()}
        if partition_range:
            tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"] = partition_range
        dg = self.dg
        job_name = self.job_for(keys)
        # The project's definitions plus our console logger: without --debug it leaves out
        # Dagster's failure events (each prints a stack trace); narr prints one line per failure.
        loggers = dg.Definitions(loggers=None if _debug else {"console": _quiet_console_logger()})
        job = dg.Definitions.merge(self.defs, loggers).resolve_job_def(job_name)
        run = self.instance.create_run_for_job(
            job_def=job,
            # INFO, not DEBUG: progress lines stay readable in the terminal; the UI keeps all.
            run_config={**(run_config or {}), "loggers": {"console": {"config": {"log_level": "INFO"}}}},
            tags={**job.run_tags, **tags},
            asset_selection=set(keys),
            **code_location_origins(job_name),
        )
        result = execute_run(InMemoryJob(job), run, self.instance, raise_on_error=False)
        if not result.success:
            self._print_failures(result.all_events)
        return result.success

    def job_for(self, keys: Sequence) -> str:
        """The smallest job of the project's definitions that holds every one of `keys`."""
        graph = self.defs.resolve_asset_graph()
        wanted = set(keys)
        holding = sorted(
            (len(selected), job.name)
            for job in self.defs.jobs or []
            if hasattr(job, "selection") and wanted <= (selected := job.selection.resolve(graph))
        )
        if not holding:
            raise ValueError(f"no job of the definitions holds {', '.join(sorted(k.to_user_string() for k in wanted))}")
        return holding[0][1]

    def _print_failures(self, events) -> None:
        """One line per failed step, `narr: <experiment or asset>: <message>`; else the run's."""
        labels = {a.op.name: _label(next(iter(a.keys))) for a in self.assets}
        labels.update({c.op.name: _label(next(iter(c.check_keys)).asset_key) for c in self.checks})
        printed = False
        for event in events:
            if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                label = labels.get(event.step_key or "", event.step_key)
                error = event.step_failure_data.error
                print(f"narr: {label}: {failure_message(error)}", file=sys.stderr)
                printed = True
                self.interrupted = self.interrupted or _raised(error).cls_name in _INTERRUPTIONS
        for event in events:
            if event.is_run_failure and not printed:
                error = getattr(event.event_specific_data, "error", None)
                if error is not None and _raised(error).cls_name in _INTERRUPTIONS:
                    # Stopped before any step ran (Ctrl-C while it waited for an endpoint's pool): exit 130.
                    self.interrupted = True
                    text = failure_message(error).removeprefix(f"{_raised(error).cls_name}: ")
                    print(f"narr: run stopped: {text if ' ' in text else 'interrupted'}", file=sys.stderr)
                    continue
                print(f"narr: run failed: {failure_message(error) if error else event.message}", file=sys.stderr)


# The code location as the README starts the UI (`dagster dev` in the project folder reads
# `[tool.dagster]` of pyproject.toml): the UI finds a run's job for re-execution by this name.
CODE_LOCATION = "narr_assets"
DEFINITIONS_MODULE = "narr_assets.definitions"


def code_location_origins(job_name: str) -> dict:
    """The origins of a run of `job_name` launched from that code location (`remote_job_origin`, `job_code_origin`)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    root = str(settings.PROJECT_ROOT)
    target = LoadableTargetOrigin(
        executable_path=sys.executable, module_name=DEFINITIONS_MODULE, working_directory=root
    )
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, location_name=CODE_LOCATION)
    repository = RemoteRepositoryOrigin(code_location_origin=location, repository_name=SINGLETON_REPOSITORY_NAME)
    code = ReconstructableRepository.for_module(DEFINITIONS_MODULE, "defs", working_directory=root)
    return {
        "remote_job_origin": RemoteJobOrigin(repository_origin=repository, job_name=job_name),
        "job_code_origin": code.get_reconstructable_job(job_name).get_python_origin(),
    }


def _raised(error):
    """The error an asset raised, under Dagster's wrappers (a `SerializableErrorInfo`).

    Any exception other than a `dg.Failure` is wrapped by Dagster in a
    `DagsterExecutionStepExecutionError` whose cause is the real error.
    """
    while error.cause is not None and error.cls_name in (
        "DagsterExecutionStepExecutionError",
        "DagsterUserCodeExecutionError",
    ):
        error = error.cause
    return error


def _label(key) -> str:
    """How a failure names its asset: the experiment for `<experiment>/...`, else the asset."""
    return key.path[0] if len(key.path) > 1 else key.to_user_string()


# Errors whose message says everything: printed without their class name.
_USER_ERRORS = {"Failure", "DatabaseLockedError", "ExperimentError", "IngestError", "SettingError", "RunInterrupted"}
# A step that stopped on Ctrl-C, SIGTERM or a Dagster termination: the command exits 130.
_INTERRUPTIONS = {"RunInterrupted", "KeyboardInterrupt", "DagsterExecutionInterruptedError"}


def failure_message(error) -> str:
    """One line from a Dagster `SerializableErrorInfo`: the asset's own error, not the wrapper."""
    error = _raised(error)
    text = " ".join(error.message.split())
    qualified, sep, rest = text.partition(": ")
    if sep and (qualified == error.cls_name or qualified.endswith("." + str(error.cls_name))):
        text = rest
    return text if error.cls_name in _USER_ERRORS else f"{error.cls_name}: {text}"


_SKIPPED_STEP = "Dependencies for step "


def _quiet_console_logger():
    """Dagster's coloured console logger without its ERROR-level engine events.

    Those are the step and run failures (each with a stack trace) and the steps skipped
    because of them; `Runner` prints one line per failure instead. Errors logged by an
    asset itself (no Dagster event) still show.
    """
    import dagster as dg

    base = dg.colored_console_logger

    def engine_error(record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", None)
        if record.levelno < logging.ERROR or not isinstance(meta, dict):
            return False
        # The skipped steps are logged as plain errors, not as events.
        return meta.get("dagster_event") is not None or str(meta.get("orig_message")).startswith(_SKIPPED_STEP)

    def build(init_context):
        logger = base.logger_fn(init_context)
        threshold = logger.level
        # Dagster logs a step that waits for another run's endpoint (its pool's slot) at
        # DEBUG; it is shown at INFO, so a run that seems idle says why.
        logger.setLevel(min(threshold, logging.DEBUG))
        for handler in logger.handlers:
            handler.setLevel(min(handler.level, logging.DEBUG))
        logger.addFilter(lambda record: _shown(record, threshold) and not engine_error(record))
        return logger

    return dg.LoggerDefinition(build, config_schema=base.config_schema, description=base.description)


_POOL_WAIT = ("Step blocked by limit for pool ", "Step still blocked by limit for pool ")


def _shown(record: logging.LogRecord, threshold: int) -> bool:
    """Whether the console shows a record: at or above `threshold`, or a wait for a pool (made INFO)."""
    if record.levelno >= threshold:
        return True
    meta = getattr(record, "dagster_meta", None)
    if isinstance(meta, dict) and str(meta.get("orig_message")).startswith(_POOL_WAIT):
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _key(*parts: str):
    import dagster as dg

    return dg.AssetKey(list(parts))


def _experiments(names: Sequence[str] | None):
    from narr_assets.experiments import ExperimentError

    configs = _all_experiments(quiet=names or ())
    named_broken = [b for b in configs.errors if b.name in (names or ())]
    if named_broken:  # `narr run BROKEN`: why it cannot run (exit 2), not "unknown experiment"
        raise ExperimentError(named_broken[0].message)
    if not names:
        return [c for c in configs if c.run_by_default]
    # A name selects its experiment; a grid's name (its file stem) selects all of its members.
    by_name = {c.name: [c] for c in configs}
    for cfg in configs:
        if cfg.grid_name and cfg.grid_name not in by_name:
            by_name[cfg.grid_name] = [c for c in configs if c.grid_name == cfg.grid_name]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"narr: unknown experiment(s) {', '.join(unknown)}; known: {', '.join(sorted(by_name))}")
    selected = {cfg.name: cfg for n in names for cfg in by_name[n]}  # a member named twice runs once
    return list(selected.values())


def _store():
    from narr_assets.store import Store

    return Store(settings.db_path())


def ingest_if_needed(runner: Runner, force: bool = False, allow_removal: bool = False) -> bool:
    """Re-ingest when the source file is not what the database was built from.

    `allow_removal` lets an ingest remove more than half of the stored narratives (refused
    otherwise, so a truncated file cannot silently empty the corpus).
    """
    from narr_assets.defs.ingest import INGEST_KEYS, raw_narratives, source_observation

    path = runner.settings.source_path
    current = runner.settings.source_checksum()
    if current is None:
        raise SystemExit(f"narr: source file not found: {path} (set NARR_SOURCE)")
    # One narr process at a time decides and ingests: another started at the same moment waits,
    # then finds the ingestion complete - its batches registered with Dagster - instead of
    # running on batches Dagster does not know yet ("Nonexistent partition keys").
    with _flock(_dagster_home() / ".narr-ingest.lock"):
        stored = _store().current_checksum()
        if not force and current == stored:
            return _register_batches(runner)
        why = (
            "first ingestion"
            if stored is None
            else ("forced" if force else "the source file changed since the last ingestion")
        )
        print(f"narr: ingesting {path} ({why})")
        # Observe the file first, as the sensor does: `raw_narratives` then records this version
        # as its input, and the graph shows `source_file` with the file's checksum.
        runner.instance.report_runless_asset_event(source_observation(runner.settings, current))
        run_config = {"ops": {runner.op_name(raw_narratives.key): {"config": {"allow_mass_removal": allow_removal}}}}
        return runner.materialize(INGEST_KEYS, run_config=run_config)


def _register_batches(runner: Runner) -> bool:
    """Make Dagster's batch partitions the database's (a new `DAGSTER_HOME`, an interrupted ingest)."""
    from narr_assets.defs.ingest import BATCH_PARTITIONS
    from narr_assets.status import partition_keys

    registered = set(runner.instance.get_dynamic_partitions(BATCH_PARTITIONS))
    if set(partition_keys(_store()).values()) == registered:
        return True
    print("narr: bringing this Dagster instance's partitions in line with the database's batches")
    return runner.materialize([_key("narrative_batches")])


def run_experiment(runner: Runner, cfg, retry_errors: bool = False, partitions: Sequence[str] | None = None) -> bool:
    """Materialise the missing (and with --retry-errors, erroneous) partitions.

    Batches complete in DuckDB that Dagster does not show materialised (a new instance, a
    batch whose only change was a removed narrative) go into the same run: the step finds them
    complete, asks nothing, and Dagster records them, so the UI and the database agree.
    """
    from narr_assets.defs.ingest import BATCH_PARTITIONS
    from narr_assets.status import batch_of, partition_keys, partition_state

    store = _store()
    state, keys = partition_state(store, cfg), partition_keys(store)
    registered = runner.instance.get_dynamic_partitions(BATCH_PARTITIONS)
    key = _key(cfg.name, "classifications")
    run_config = {"ops": {runner.op_name(key): {"config": {"retry_errors": retry_errors, "progress_every_s": 5.0}}}}
    if partitions:
        # Exactly these partitions: one run per contiguous stretch, so no run touches (or
        # locks) a batch that was not asked for - other processes may be working on those.
        # A batch id (`b00005`) names its current key; a key of an older content version is refused.
        unknown = sorted(p for p in partitions if batch_of(p) not in keys or p not in (batch_of(p), keys[batch_of(p)]))
        if unknown:
            raise SystemExit(
                f"narr: unknown or outdated partition(s) {', '.join(unknown)}; see `narr status {cfg.name}`"
            )
        ok = True
        for start, end in contiguous_ranges(sorted({keys[batch_of(p)] for p in partitions}), registered):
            print(f"narr: {cfg.name}: running partitions {start} .. {end}, config {cfg.config_hash}")
            ok = runner.materialize([key], partition_range=(start, end), run_config=run_config) and ok
        return ok
    done_keys = [keys[b] for b in state.done]
    unrecorded = _unrecorded(_partition_statuses(runner.instance, cfg.name, done_keys), state.done)
    position = {k: i for i, k in enumerate(registered)}  # a range follows Dagster's order of keys
    todo = sorted({keys[b] for b in state.to_run(retry_errors)} | set(unrecorded), key=position.__getitem__)
    if not todo:
        print(
            f"narr: {cfg.name}: all {len(state.done)} batch(es) are complete for config {cfg.config_hash}; "
            "nothing to do"
        )
        return True
    note = f"; {len(unrecorded)} complete in the database, recorded in Dagster now" if unrecorded else ""
    # One run over the range spanning every batch to do keeps the endpoint busy across
    # batches; complete batches inside the range are skipped by the asset, not re-asked.
    print(f"narr: {cfg.name}: {len(todo)} batch(es) to run ({todo[0]} .. {todo[-1]}{note}), config {cfg.config_hash}")
    return runner.materialize([key], partition_range=(todo[0], todo[-1]), run_config=run_config)


def _partition_statuses(instance, experiment: str, keys: Sequence[str]) -> dict[str, str]:
    """Partition key -> Dagster's status of the experiment's classifications there.

    MATERIALIZED, FAILED, IN_PROGRESS, or MISSING (never materialised, or not registered with
    this instance yet).
    """
    from narr_assets.defs.ingest import BATCH_PARTITIONS, batch_partitions

    registered = set(instance.get_dynamic_partitions(BATCH_PARTITIONS))
    known = [k for k in keys if k in registered]
    found = (
        (instance.get_status_by_partition(_key(experiment, "classifications"), known, batch_partitions) or {})
        if known
        else {}
    )
    return {k: found[k].value if found.get(k) else "MISSING" for k in keys}


def _unrecorded(statuses: dict[str, str], done: Sequence[str]) -> list[str]:
    """Keys of batches complete in DuckDB (`done`: batch ids) that Dagster does not show materialised."""
    from narr_assets.status import batch_of

    complete = set(done)
    return [k for k, status in statuses.items() if batch_of(k) in complete and status != "MATERIALIZED"]


def contiguous_ranges(selected: Sequence[str], ordered: Sequence[str]) -> list[tuple[str, str]]:
    """Group `selected` keys into (first, last) stretches that are contiguous in `ordered`."""
    position = {k: i for i, k in enumerate(ordered)}
    ranges: list[tuple[str, str]] = []
    for key in sorted(selected, key=position.__getitem__):
        if ranges and position[key] == position[ranges[-1][1]] + 1:
            ranges[-1] = (ranges[-1][0], key)
        else:
            ranges.append((key, key))
    return ranges


def cmd_materialize(args: argparse.Namespace) -> int:
    runner = Runner()
    if not ingest_if_needed(runner, force=args.reingest):
        return 1
    experiments = _experiments(args.experiment)
    ok = True
    for cfg in experiments:
        ok = run_experiment(runner, cfg) and ok
        if runner.interrupted:
            return EXIT_INTERRUPTED
    keys = [_key(cfg.name, "metrics") for cfg in experiments] + [_key("leaderboard"), _key("report")]
    ok = runner.materialize(keys) and ok
    _print_where()
    return 0 if ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    return 0 if ingest_if_needed(Runner(), force=True, allow_removal=args.allow_removal) else 1


def cmd_run(args: argparse.Namespace) -> int:
    # A typo fails here, before anything starts; a grid's file stem gives all of its members.
    configs = _experiments([args.experiment])
    runner = Runner()
    if not ingest_if_needed(runner):
        return 1
    partitions = [p.strip() for p in args.partitions.split(",")] if args.partitions else None
    ok = True
    for cfg in configs:
        ok = run_experiment(runner, cfg, retry_errors=args.retry_errors, partitions=partitions) and ok
        if runner.interrupted:
            return EXIT_INTERRUPTED
    if ok and not args.no_metrics:
        ok = runner.materialize([_key(cfg.name, "metrics") for cfg in configs])
    _print_status(configs)
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(_experiments(args.experiment) if args.experiment else _all_experiments())
    return 0


def _all_experiments(quiet: Sequence[str] = ()):
    """The valid experiments; each broken file (except those named in `quiet`) gets a warning line."""
    from narr_assets.experiments import load_experiments

    configs = load_experiments()
    for broken in configs.errors:
        if broken.name not in quiet:
            print(f"narr: warning: {broken.message} (left out; the other experiments work)", file=sys.stderr)
    return configs


def _print_status(configs) -> None:
    from narr_assets.classify import format_duration
    from narr_assets.status import experiment_status, partition_keys

    store = _store()
    print(f"database: {store.path}")
    dagster = _dagster_partition_statuses(configs, list(partition_keys(store).values()))
    for cfg in configs:
        st = experiment_status(store, cfg)
        print(
            f"\n{cfg.name} ({cfg.backend}, config {cfg.config_hash}): batches done {st['batches_done']}, "
            f"missing {st['batches_missing']}, with error rows {st['batches_with_errors']}"
        )
        if cfg.name in dagster:
            print(f"  {_dagster_line(dagster[cfg.name], st)}")
        if st["older_config_batches"]:
            print(
                f"  config changed: {st['older_config_batches']} batch(es) were classified under an older config; "
                f"the UI shows them stale (code version is now {cfg.config_hash}) - re-run with `narr run {cfg.name}` "
                "or Materialize > All partitions"
            )
        by_status = ", ".join(f"{k} {v:,}" for k, v in st["by_status"].items()) or "none"
        print(f"  rows: {by_status}")
        print(f"  tokens: prompt {st['prompt_tokens']:,}, completion {st['completion_tokens']:,}")
        if st["eta_s"] == 0.0:
            eta = "done"
        elif st["eta_s"] is None:
            eta = "unknown until a run has measured the rate"
        else:
            eta = f"{format_duration(st['eta_s'])} at {st['rate_per_s']:.2f}/s (rate over active run time)"
        print(f"  remaining calls {st['remaining_calls']:,}; ETA {eta}")
    report = settings.reports_dir() / "report.html"
    if report.exists():
        print(f"\nreport: {report}")


def _dagster_line(statuses: dict[str, str], st: dict) -> str:
    """What Dagster shows for the experiment's partitions, and where it differs from the database."""
    counts = {s: sum(1 for v in statuses.values() if v == s) for s in ("MATERIALIZED", "FAILED", "IN_PROGRESS")}
    line = (
        f"Dagster: materialized {counts['MATERIALIZED']}, failed {counts['FAILED']}, "
        f"in progress {counts['IN_PROGRESS']}, missing {len(statuses) - sum(counts.values())} "
        f"of {len(statuses)} partitions"
    )
    unrecorded = _unrecorded(statuses, st["done"])
    if unrecorded:
        line += f"; {len(unrecorded)} complete here but not in Dagster (`narr run` records them, no calls)"
    return line


def _dagster_partition_statuses(configs, keys: list[str]) -> dict[str, dict[str, str]]:
    """Experiment -> the database's partition keys -> Dagster's status of each (`_partition_statuses`)."""
    try:
        instance = _dagster_instance()
        return {cfg.name: _partition_statuses(instance, cfg.name, keys) for cfg in configs}
    except Exception:  # status is informative only; a missing instance must not break it
        return {}


def cmd_export(args: argparse.Namespace) -> int:
    from narr_assets.exports import export_frame, write_export

    configs = _experiments([args.experiment])
    if len(configs) > 1:
        names = ", ".join(c.name for c in configs)
        raise SystemExit(f"narr: {args.experiment} is a grid of {len(configs)} experiments; export one of: {names}")
    (cfg,) = configs
    frame = export_frame(_store(), cfg.name)
    if frame.empty:
        print(f"narr: {cfg.name} has no results yet; run `narr run {cfg.name}` first", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else settings.exports_dir() / f"{cfg.name}.{args.format}"
    write_export(frame, out, args.format)
    print(f"narr: wrote {len(frame):,} rows to {out}")
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from narr_assets.experiments import format_grid_values, load_experiments

    configs = load_experiments()  # broken files are listed below, not warned about
    for cfg in configs:
        model = "lexicon" if cfg.backend == "rules" else cfg.model.name
        flag = " (default)" if cfg.run_by_default else ""
        print(f"{cfg.name:24s} {cfg.backend:8s} {model:24s} config {cfg.config_hash}{flag}  {cfg.source_file}")
        if cfg.grid_name:
            print(f"{'':24s} grid {cfg.grid_name}: {format_grid_values(cfg.grid_values)}")
    for broken in configs.errors:
        print(f"{broken.name:24s} INVALID  {broken.message}")
    return 1 if configs.errors else 0  # a broken file is worth a failing exit in a script


def cmd_import_legacy(args: argparse.Namespace) -> int:
    from narr_assets.legacy import import_legacy

    out = Path(args.narratives_out) if args.narratives_out else None
    result = import_legacy(Path(args.database), settings.experiments_dir(), out, args.experiment)
    for path, line in zip(result.files, result.lines, strict=True):
        print(f"narr: wrote {path}: {line}")
    if result.narratives_file is not None:
        print(
            f"narr: wrote {result.narratives:,} narratives to {result.narratives_file} "
            f"(use it as NARR_SOURCE, then `narr run <experiment>` for each imported experiment)"
        )
    # A stored metric the rows do not reproduce is worth a failing exit in a script.
    return 1 if any(exp.differences() for exp in result.experiments) else 0


def cmd_convert_legacy_config(args: argparse.Namespace) -> int:
    from narr_assets.experiments import ExperimentError, load_experiment
    from narr_assets.legacy import CONVERT_MARKER, convert_legacy_config

    given = Path(args.path)
    paths = sorted([*given.glob("*.yaml"), *given.glob("*.yml")]) if given.is_dir() else [given]
    if not paths:
        raise ExperimentError(f"{given}: no .yaml or .yml files in this folder")
    out_dir = Path(args.out_dir) if args.out_dir else settings.experiments_dir()
    failed = 0
    for path in paths:
        try:
            name, text = convert_legacy_config(path)
        except ExperimentError as exc:  # one unreadable file spoils no other
            print(f"narr: {exc}", file=sys.stderr)
            failed += 1
            continue
        out = out_dir / f"{name}.yaml"
        if out.exists() and not out.read_text(encoding="utf-8", errors="replace").startswith(CONVERT_MARKER):
            print(f"narr: {out}: exists and was not converted by narr; move it away to convert {path}", file=sys.stderr)
            failed += 1
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        notes = text.count("\n# Not mapped - ")
        print(f"narr: wrote {out} (from {path}; {notes} key(s) not mapped, listed at its top)")
        try:
            load_experiment(out)
        except ExperimentError as exc:
            print(f"narr: {exc}; edit the converted file", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _print_where() -> None:
    import pandas as pd

    try:
        board = _store().query_df("SELECT * FROM leaderboard ORDER BY rank")
    except Exception:  # no leaderboard yet (e.g. nothing evaluated): just say where things are
        board = None
    if board is not None and not board.empty:
        # Both variants, named: the R system's F1 is the answered one, ours ranks by strict.
        answered = "answered_f1" in board
        print(
            "\nleaderboard (strict F1: unanswered counted as wrong, 95% bootstrap interval"
            + ("; answered F1: unanswered left out, the R system's F1):" if answered else "):")
        )
        for r in board.itertuples():
            f1 = "n/a (no labels)" if pd.isna(r.f1) else f"{r.f1:.3f} [{r.f1_ci_low:.3f}, {r.f1_ci_high:.3f}]"
            line = f"  {r.rank}. {r.experiment:24s} strict F1 {f1}"
            if answered:
                line += "  answered F1 " + ("n/a" if pd.isna(r.answered_f1) else f"{r.answered_f1:.3f}")
            print(f"{line}  (answered {r.answered_share:.1%} of {r.n_rows:,})")
    print("\nresults:")
    print(
        f"  database: {settings.db_path()}  (tables narratives, classifications, experiment_metrics, leaderboard, ...)"
    )
    report = settings.reports_dir() / "report.html"
    if report.exists():
        print(f"  report:   {report}")
    print(f"  Dagster instance: {os.environ.get('DAGSTER_HOME')}  (DAGSTER_HOME=... dagster dev  to browse)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="narr",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "materialize", help="ingest, run the default (or named) experiments, metrics, leaderboard and report"
    )
    p.add_argument(
        "--experiment", "-e", action="append", help="experiment to run (repeatable); default: those with run_by_default"
    )
    p.add_argument("--reingest", action="store_true", help="re-read the source file even if unchanged")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("ingest", help="(re-)ingest the source file")
    p.add_argument(
        "--allow-removal",
        action="store_true",
        help="allow an ingest that removes more than half of the stored narratives (refused otherwise)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("run", help="classify the missing and failed batches of one experiment (resume)")
    p.add_argument("experiment")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="also re-ask rows whose status is parse_error, refusal, truncated or rejected",
    )
    p.add_argument("--partitions", help="comma-separated batch keys to run instead of the missing ones")
    p.add_argument("--no-metrics", action="store_true", help="do not recompute the experiment's metrics afterwards")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="done/missing/failed batches, rows by status, tokens and ETA per experiment")
    p.add_argument("experiment", nargs="*")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write an experiment's results joined with the narratives")
    p.add_argument("experiment")
    p.add_argument("--format", "-f", choices=["csv", "parquet", "jsonl"], default="csv")
    p.add_argument("--out", "-o", help="output file (default data/exports/<experiment>.<format>)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-legacy", help="import the R system's SQLite results as `imported` experiments")
    p.add_argument("database", help="the R system's results file (.sqlite)")
    p.add_argument("--narratives-out", help="also write its narratives as a long-layout CSV (usable as NARR_SOURCE)")
    p.add_argument(
        "--experiment", type=int, nargs="+", action="extend", help="legacy experiment ids (default: all)", metavar="ID"
    )
    p.set_defaults(func=cmd_import_legacy)

    p = sub.add_parser("convert-legacy-config", help="convert R system experiment YAML files into experiment files")
    p.add_argument("path", help="an R experiment file, or a folder of them")
    p.add_argument("--out-dir", help="where to write them (default: NARR_EXPERIMENTS)")
    p.set_defaults(func=cmd_convert_legacy_config)

    p = sub.add_parser("experiments", help="list experiment files with their config hashes")
    p.set_defaults(func=cmd_experiments)
    for p in sub.choices.values():  # `narr run x --debug` as well as `narr --debug run x`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


DEBUG_HELP = "show Dagster's full log and tracebacks (failures are otherwise one line each)"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from dagster import BetaWarning

    # We rely on two beta APIs on purpose (observable source assets, single-run backfill
    # policy); their warnings say nothing a researcher running `narr` can act on.
    warnings.filterwarnings("ignore", category=BetaWarning)
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. `kill`, a job scheduler) ends narr like Ctrl-C: the engine stops taking
    # work, journals what is in flight, and the command exits 130 with the resume hint.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    global _debug
    _debug = args.debug
    started = time.monotonic()
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("\nnarr: interrupted; completed answers are journalled - run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # `raise SystemExit("narr: ...")`: a usage error, already one line
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        return _report_error(exc)
    if args.command in ("materialize", "run"):
        print(f"narr: finished in {time.monotonic() - started:.1f} s")
    return code


def _report_error(exc: Exception) -> int:
    """One line for an error that ended a command (a traceback too with --debug); its exit code."""
    from narr_assets.experiments import ExperimentError
    from narr_assets.ingest import IngestError
    from narr_assets.store import DatabaseLockedError

    if _debug:
        traceback.print_exc()
    message = " ".join(str(exc).split())
    if isinstance(exc, DatabaseLockedError):
        print(f"narr: {message}", file=sys.stderr)
        return EXIT_LOCKED
    if isinstance(exc, (ExperimentError, IngestError, settings.SettingError)):
        print(f"narr: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"narr: internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr
    )
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
