"""`narr`: run, resume, inspect and export experiments from the shell, through Dagster.

Every command that computes something launches real Dagster runs on the project's instance
(`DAGSTER_HOME`, default `.dagster_home/` in the project), so the runs, partitions and
metadata are the same ones the UI shows.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from narr_assets import settings


def _ensure_dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or settings.PROJECT_ROOT / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # Restricted-use data: nothing about runs leaves the machine unless a user opts in;
        # and no sign-up pop-up over the UI of an offline machine.
        config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


class Runner:
    """Launches Dagster runs of the project's definitions on the persistent instance."""

    def __init__(self) -> None:
        import dagster as dg

        from narr_assets.definitions import build_definitions
        from narr_assets.defs.resources import NarrSettings

        _ensure_dagster_home()
        self.dg = dg
        self.settings = NarrSettings.from_env()
        self.defs = build_definitions(settings=self.settings)
        self.instance = dg.DagsterInstance.get()
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
        result = self.dg.materialize(
            [*self.assets, *self.checks],
            selection=list(keys),
            instance=self.instance,
            resources=self.defs.resources,
            tags=tags,
            # INFO, not DEBUG: progress lines stay readable in the terminal; the UI keeps all.
            run_config={**(run_config or {}), "loggers": {"console": {"config": {"log_level": "INFO"}}}},
            raise_on_error=False,
        )
        if not result.success:
            for event in result.all_events:
                if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                    err = event.step_failure_data.error
                    message = (
                        err.cause.message if err.cause is not None and "Failure" not in err.message else err.message
                    )
                    print(f"narr: step {event.step_key} failed: {message.strip()}", file=sys.stderr)
        return result.success


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
    from narr_assets.experiments import load_experiments

    configs = load_experiments()
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


def ingest_if_needed(runner: Runner, force: bool = False) -> bool:
    """Re-ingest when the source file is not what the database was built from."""
    from narr_assets.defs.ingest import INGEST_KEYS

    path = runner.settings.source_path
    current = runner.settings.source_checksum()
    if current is None:
        raise SystemExit(f"narr: source file not found: {path} (set NARR_SOURCE)")
    stored = _store().current_checksum()
    if not force and current == stored:
        return True
    why = (
        "first ingestion"
        if stored is None
        else ("forced" if force else "the source file changed since the last ingestion")
    )
    print(f"narr: ingesting {path} ({why})")
    return runner.materialize(INGEST_KEYS)


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
    keys = [_key(cfg.name, "metrics") for cfg in experiments] + [_key("leaderboard"), _key("report")]
    ok = runner.materialize(keys) and ok
    _print_where()
    return 0 if ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    return 0 if ingest_if_needed(Runner(), force=True) else 1


def cmd_run(args: argparse.Namespace) -> int:
    (cfg,) = _experiments([args.experiment])  # a typo fails here, before anything starts
    runner = Runner()
    if not ingest_if_needed(runner):
        return 1
    partitions = [p.strip() for p in args.partitions.split(",")] if args.partitions else None
    ok = run_experiment(runner, cfg, retry_errors=args.retry_errors, partitions=partitions)
    if ok and not args.no_metrics:
        ok = runner.materialize([_key(cfg.name, "metrics")])
    _print_status([cfg])
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    _ensure_dagster_home()
    _print_status(_experiments(args.experiment) if args.experiment else _all_experiments())
    return 0


def _all_experiments():
    from narr_assets.experiments import load_experiments

    return load_experiments()


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
        instance = dg.DagsterInstance.get()
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
    for cfg in _all_experiments():
        model = cfg.model.name if cfg.backend == "openai" else "lexicon"
        flag = " (default)" if cfg.run_by_default else ""
        print(f"{cfg.name:24s} {cfg.backend:7s} {model:24s} config {cfg.config_hash}{flag}  {cfg.source_file}")
    return 0


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
    parser = argparse.ArgumentParser(prog="narr", description=__doc__.splitlines()[0])
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
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("run", help="classify the missing and failed batches of one experiment (resume)")
    p.add_argument("experiment")
    p.add_argument(
        "--retry-errors", action="store_true", help="also re-ask rows whose status is parse_error, refusal or truncated"
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from dagster import BetaWarning

    # We rely on two beta APIs on purpose (observable source assets, single-run backfill
    # policy); their warnings say nothing a researcher running `narr` can act on.
    warnings.filterwarnings("ignore", category=BetaWarning)
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("\nnarr: interrupted; completed answers are journalled - run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors (bad experiment file, bad input) without a traceback
        from narr_assets.experiments import ExperimentError
        from narr_assets.ingest import IngestError

        if isinstance(exc, (ExperimentError, IngestError)):
            print(f"narr: {exc}", file=sys.stderr)
            return 2
        raise
    if args.command in ("materialize", "run"):
        print(f"narr: finished in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
