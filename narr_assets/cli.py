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
    home = _dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # Restricted-use data: nothing about runs leaves the machine unless a user opts in;
        # and no sign-up pop-up over the UI of an offline machine.
        config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or settings.PROJECT_ROOT / ".dagster_home")


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
        tags = {"narr/launched_by": "narr-cli", "narr/pid": str(os.getpid()), "narr/host": socket.gethostname()}
        if partition_range:
            tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"] = partition_range
        dg = self.dg
        # What `dg.materialize` does, plus our console logger: without --debug it leaves out
        # Dagster's failure events (each prints a stack trace); narr prints one line per failure.
        job_name = "__ephemeral_asset_job__"  # `dg.materialize`'s: the UI lists these runs by asset
        defs = dg.Definitions(
            jobs=[dg.define_asset_job(job_name, selection=list(keys))],
            assets=[*self.assets, *self.checks],
            resources=self.defs.resources,
            loggers=None if _debug else {"console": _quiet_console_logger()},
        )
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=self.instance,
            tags=tags,
            # INFO, not DEBUG: progress lines stay readable in the terminal; the UI keeps all.
            run_config={**(run_config or {}), "loggers": {"console": {"config": {"log_level": "INFO"}}}},
            raise_on_error=False,
        )
        if not result.success:
            self._print_failures(result.all_events)
        return result.success

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
                print(f"narr: run failed: {failure_message(error) if error else event.message}", file=sys.stderr)


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
        logger.addFilter(lambda record: not engine_error(record))
        return logger

    return dg.LoggerDefinition(build, config_schema=base.config_schema, description=base.description)


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
    by_name = {c.name: c for c in configs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"narr: unknown experiment(s) {', '.join(unknown)}; known: {', '.join(sorted(by_name))}")
    return [by_name[n] for n in names]


def _store():
    from narr_assets.store import Store

    return Store(settings.db_path())


def ingest_if_needed(runner: Runner, force: bool = False, allow_removal: bool = False) -> bool:
    """Re-ingest when the source file is not what the database was built from.

    `allow_removal` lets an ingest remove more than half of the stored narratives (refused
    otherwise, so a truncated file cannot silently empty the corpus).
    """
    from narr_assets.defs.ingest import INGEST_KEYS, raw_narratives

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
        run_config = {"ops": {runner.op_name(raw_narratives.key): {"config": {"allow_mass_removal": allow_removal}}}}
        return runner.materialize(INGEST_KEYS, run_config=run_config)


def _register_batches(runner: Runner) -> bool:
    """Register with Dagster every batch of the database it lacks (a new `DAGSTER_HOME`)."""
    from narr_assets.defs.ingest import BATCH_PARTITIONS

    known = set(runner.instance.get_dynamic_partitions(BATCH_PARTITIONS))
    if set(_store().batch_ids()) <= known:
        return True
    print("narr: registering the database's batches with this Dagster instance")
    return runner.materialize([_key("narrative_batches")])


def run_experiment(runner: Runner, cfg, retry_errors: bool = False, partitions: Sequence[str] | None = None) -> bool:
    """Materialise the missing (and with --retry-errors, erroneous) partitions in one run."""
    from narr_assets.status import partition_state

    state = partition_state(_store(), cfg)
    key = _key(cfg.name, "classifications")
    run_config = {"ops": {runner.op_name(key): {"config": {"retry_errors": retry_errors, "progress_every_s": 5.0}}}}
    if partitions:
        # Exactly these partitions: one run per contiguous stretch, so no run touches (or
        # locks) a batch that was not asked for - other processes may be working on those.
        known = set(state.table["batch_id"])
        unknown = sorted(set(partitions) - known)
        if unknown:
            raise SystemExit(f"narr: unknown partition(s) {', '.join(unknown)}; see `narr status {cfg.name}`")
        ok = True
        for start, end in contiguous_ranges(sorted(partitions), sorted(known)):
            print(f"narr: {cfg.name}: running partitions {start} .. {end}, config {cfg.config_hash}")
            ok = runner.materialize([key], partition_range=(start, end), run_config=run_config) and ok
        return ok
    todo = state.to_run(retry_errors)
    if not todo:
        print(
            f"narr: {cfg.name}: all {len(state.done)} batch(es) are complete for config {cfg.config_hash}; "
            "nothing to do"
        )
        return True
    # One run over the range spanning every batch to do keeps the endpoint busy across
    # batches; complete batches inside the range are skipped by the asset, not re-asked.
    print(f"narr: {cfg.name}: {len(todo)} batch(es) to run ({todo[0]} .. {todo[-1]}), config {cfg.config_hash}")
    return runner.materialize([key], partition_range=(todo[0], todo[-1]), run_config=run_config)


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
    (cfg,) = _experiments([args.experiment])  # a typo fails here, before anything starts
    runner = Runner()
    if not ingest_if_needed(runner):
        return 1
    partitions = [p.strip() for p in args.partitions.split(",")] if args.partitions else None
    ok = run_experiment(runner, cfg, retry_errors=args.retry_errors, partitions=partitions)
    if runner.interrupted:
        return EXIT_INTERRUPTED
    if ok and not args.no_metrics:
        ok = runner.materialize([_key(cfg.name, "metrics")])
    _print_status([cfg])
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
    from narr_assets.status import experiment_status

    store = _store()
    print(f"database: {store.path}")
    failed_by_exp = _dagster_failed_partitions(configs)
    for cfg in configs:
        st = experiment_status(store, cfg)
        failed = [b for b in failed_by_exp.get(cfg.name, []) if b in st["missing"]]
        print(
            f"\n{cfg.name} ({cfg.backend}, config {cfg.config_hash}): batches done {st['batches_done']}, "
            f"missing {st['batches_missing']} (of which failed in Dagster {len(failed)}), "
            f"with error rows {st['batches_with_errors']}"
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


def _dagster_failed_partitions(configs) -> dict[str, list[str]]:
    import dagster as dg

    from narr_assets.defs.ingest import BATCH_PARTITIONS, batch_partitions

    out: dict[str, list[str]] = {}
    try:
        instance = _dagster_instance()
        keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        for cfg in configs:
            statuses = instance.get_status_by_partition(_key(cfg.name, "classifications"), keys, batch_partitions)
            out[cfg.name] = [k for k, s in (statuses or {}).items() if s == dg.AssetPartitionStatus.FAILED]
    except Exception:  # status is informative only; a missing instance must not break it
        return {}
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from narr_assets.exports import export_frame, write_export

    (cfg,) = _experiments([args.experiment])
    frame = export_frame(_store(), cfg.name)
    if frame.empty:
        print(f"narr: {cfg.name} has no results yet; run `narr run {cfg.name}` first", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else settings.exports_dir() / f"{cfg.name}.{args.format}"
    write_export(frame, out, args.format)
    print(f"narr: wrote {len(frame):,} rows to {out}")
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from narr_assets.experiments import load_experiments

    configs = load_experiments()  # broken files are listed below, not warned about
    for cfg in configs:
        model = cfg.model.name if cfg.backend == "openai" else "lexicon"
        flag = " (default)" if cfg.run_by_default else ""
        print(f"{cfg.name:24s} {cfg.backend:7s} {model:24s} config {cfg.config_hash}{flag}  {cfg.source_file}")
    for broken in configs.errors:
        print(f"{broken.name:24s} INVALID  {broken.message}")
    return 1 if configs.errors else 0  # a broken file is worth a failing exit in a script


def _print_where() -> None:
    import pandas as pd

    try:
        board = _store().query_df(
            "SELECT rank, experiment, f1, f1_ci_low, f1_ci_high, answered_share, n_rows FROM leaderboard ORDER BY rank"
        )
    except Exception:  # no leaderboard yet (e.g. nothing evaluated): just say where things are
        board = None
    if board is not None and not board.empty:
        print("\nleaderboard (strict F1, unanswered counted as wrong, 95% bootstrap interval):")
        for r in board.itertuples():
            f1 = "n/a (no labels)" if pd.isna(r.f1) else f"{r.f1:.3f} [{r.f1_ci_low:.3f}, {r.f1_ci_high:.3f}]"
            print(f"  {r.rank}. {r.experiment:24s} F1 {f1}  answered {r.answered_share:.1%} of {r.n_rows:,}")
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
