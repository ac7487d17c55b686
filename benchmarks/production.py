"""Production-size benchmarks: generation, ingestion, the `rules` backend and `narr` end to end.

All on the 20,946-row generated file (smaller in `--quick`), in a temporary folder: no
setting ever points at the repository's `data/`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from benchmarks.common import (
    LATENCY_S,
    PROJECT_ROOT,
    BatchWriter,
    Timed,
    bare_loop,
    loadavg,
    median,
    write_experiment,
)
from narr_assets.classify import run_engine, work_items
from narr_assets.corpus import build_narratives
from narr_assets.experiments import ExperimentConfig, load_experiment
from narr_assets.ingest import read_source
from narr_assets.llm import RulesBackend
from narr_assets.narratives import assign_batches, clean_narratives
from narr_assets.rules import classify, load_lexicon
from narr_assets.store import Store
from narr_assets.testing.generate import generate_production
from narr_assets.testing.server import ServerHandle, serve_in_subprocess

RULES_EXPERIMENT = PROJECT_ROOT / "configs" / "experiments" / "rules.yaml"
TIME_BIN = Path("/usr/bin/time")


def generate(workdir: Path, n_incidents: int) -> dict[str, Any]:
    """Write the production-shaped xlsx with `narr_assets.testing.generate` (seed 0) and time it."""
    path = workdir / f"production_{n_incidents}.xlsx"
    with Timed() as t:
        stats = generate_production(path, n_incidents=n_incidents, seed=0)
    keep = ("rows", "incidents", "duplicate_rows", "narratives_cme", "narratives_le", "placeholders", "mean_chars")
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": t.wall_s, **{k: stats[k] for k in keep}}


def run_ingestion(source: Path, workdir: Path, reps: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time each ingestion stage on a fresh store, `reps` times; medians per stage.

    Stages: `read_source` (calamine) -> `Store.replace_raw` -> `build_narratives` (read raw,
    clean, assign batches, write in one transaction). The clean and batch-assignment steps
    are also timed on their own (same inputs, results discarded) to split `build_narratives`.
    One extra `read_source` with openpyxl shows what the calamine reader saves.
    """
    runs: list[dict[str, float]] = []
    counts: dict[str, Any] = {}
    for rep in range(reps):
        store = Store(workdir / f"ingest_r{rep}.duckdb")
        store.query_df("SELECT 1")
        times: dict[str, float] = {}
        with Timed() as t:
            load = read_source(source)
        times["read_source"] = t.wall_s
        with Timed() as t:
            store.replace_raw(load.frame)
        times["replace_raw (DuckDB write)"] = t.wall_s
        with Timed() as t:
            result, batches = build_narratives(store)
        times["build_narratives (total)"] = t.wall_s
        with Timed() as t:
            raw = store.read_raw()
        times["  read raw_narratives"] = t.wall_s
        with Timed() as t:
            clean = clean_narratives(raw, rows_read=int(raw["source_row"].nunique()))
        times["  clean_narratives"] = t.wall_s
        with Timed() as t:
            assign_batches(clean.narratives[["incident_id", "narrative_type"]], None, 100)
        times["  assign_batches"] = t.wall_s
        times["  rest (ledger read, merge, write)"] = (
            times["build_narratives (total)"]
            - times["  read raw_narratives"]
            - times["  clean_narratives"]
            - times["  assign_batches"]
        )
        times["total (read_source + replace_raw + build_narratives)"] = (
            times["read_source"] + times["replace_raw (DuckDB write)"] + times["build_narratives (total)"]
        )
        runs.append(times)
        counts = {
            "rows_read": load.rows_read,
            "long_rows": len(load.frame),
            "reader": load.reader,
            "batches": len(batches),
            **{k: int(v) for k, v in result.stats.items()},
        }
        total = times["total (read_source + replace_raw + build_narratives)"]
        log(f"  ingestion rep {rep + 1}/{reps}: total {total:.2f} s")
    with Timed() as t:
        read_source(source, engine="openpyxl")
    stages = {k: median([r[k] for r in runs]) for k in runs[0]}
    return {"reps": reps, "stages_s": stages, "read_source_openpyxl_s": t.wall_s, "counts": counts, "raw": runs}


def run_rules(db: Path, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`rules.classify` in a plain loop over every narrative, then the same through the engine."""
    store = Store(db)
    narratives = store.read_narratives()
    lexicon = load_lexicon(PROJECT_ROOT / "configs" / "lexicon.yaml")
    texts = list(narratives["narrative_text"])
    with Timed() as loop:
        for text in texts:
            classify(text, lexicon)
    cfg = load_experiment(RULES_EXPERIMENT)
    items = work_items(narratives)
    out = Store(workdir / "rules_engine.duckdb")
    out.query_df("SELECT 1")
    writer = BatchWriter(out, cfg.name)
    with Timed() as eng:
        summary = asyncio.run(run_engine(cfg, items, RulesBackend(cfg), None, writer.write))
    rows = int(out.query_df("SELECT count(*) AS n FROM classification_rows")["n"].iloc[0])
    if rows != len(texts) or summary.failed_batches:
        raise RuntimeError(f"rules engine wrote {rows} of {len(texts)} rows")
    engine = {
        "seconds": eng.wall_s,
        "rate": len(texts) / eng.wall_s,
        "classified": summary.calls_ok,
        "skipped_placeholders": summary.skipped,
        "transactions": writer.transactions,
    }
    log(f"  rules: engine {len(texts) / eng.wall_s:,.0f}/s")
    log(f"  rules: loop {len(texts) / loop.wall_s:,.0f}/s")
    return {
        "narratives": len(texts),
        "loop_s": loop.wall_s,
        "loop_rate": len(texts) / loop.wall_s,
        "engine": engine,
        "engine_batches": len(items),
        "engine_concurrency": cfg.run.concurrency,
    }


def _run_cli(args: list[str], env: dict[str, str], logfile: Path) -> dict[str, Any]:
    """Run `narr ARGS` under `/usr/bin/time -v`; wall seconds, exit code, peak RSS."""
    narr = str(Path(sys.executable).parent / "narr")
    timefile = logfile.with_suffix(".time")
    cmd = [str(TIME_BIN), "-v", "-o", str(timefile), narr, *args] if TIME_BIN.exists() else [narr, *args]
    with open(logfile, "wb") as out, Timed() as t:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    peak_kib, cpu_s = None, None
    if timefile.exists():
        text = timefile.read_text()
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        peak_kib = int(match.group(1)) if match else None
        times = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
        cpu_s = sum(times) if len(times) == 2 else None
    else:  # no GNU time: the largest child so far (an upper bound for this command)
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"narr {' '.join(args)} exited {proc.returncode}; log {logfile}:\n" + "\n".join(tail))
    return {
        "wall_s": t.wall_s,
        "cpu_s": cpu_s,
        "exit_code": proc.returncode,
        "peak_rss_mib": peak_kib / 1024 if peak_kib else None,
    }


def _dagster_runs(home: Path) -> list[dict[str, Any]]:
    """Every run of the temporary instance: status, durations, steps, per-partition events.

    `created_to_end_s` runs from the run's creation, so it includes the
    `ASSET_MATERIALIZATION_PLANNED` events Dagster writes (one per partition) before the run
    starts; `events` gives the count and time span of those and of the materialisations.
    """
    from dagster import DagsterEventType, DagsterInstance

    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.get()
        out = []
        for record in sorted(instance.get_run_records(), key=lambda r: r.create_timestamp.timestamp()):
            run = record.dagster_run
            steps = {
                s.step_key: (s.end_time - s.start_time) if s.start_time and s.end_time else None
                for s in instance.get_run_step_stats(run.run_id)
            }
            spans: dict[str, list[float]] = {}
            for entry in instance.all_logs(run.run_id):
                kind = entry.dagster_event_type
                if kind in (DagsterEventType.ASSET_MATERIALIZATION_PLANNED, DagsterEventType.ASSET_MATERIALIZATION):
                    spans.setdefault(kind.value, []).append(entry.timestamp)
            ended = record.end_time
            out.append(
                {
                    "run_id": run.run_id[:8],
                    "tags": {k: v for k, v in run.tags.items() if "partition_range" in k},
                    "status": run.status.value,
                    "duration_s": (ended - record.start_time) if record.start_time and ended else None,
                    "created_to_end_s": (ended - record.create_timestamp.timestamp()) if ended else None,
                    "steps_s": steps,
                    "events": {k: {"count": len(v), "span_s": max(v) - min(v)} for k, v in spans.items()},
                }
            )
        if len(out) != len(instance.get_runs()):
            raise RuntimeError("run records and runs disagree")
        instance.dispose()
        return out
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous


def run_end_to_end(
    source: Path,
    workdir: Path,
    concurrency: int,
    log: Callable[[str], None] = print,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`narr ingest` then `narr run` (LLM experiment) through the real CLI, and the bare loop.

    The test server runs in its own process with `LATENCY_S`. Two bare `AsyncOpenAI` loops (the
    reference one and the fastest one, see `bare_loop`) send the same requests (the
    non-placeholder narratives, i.e. what `narr run` asks) at the same concurrency to the same
    server: the first half just before `narr run`, the second half just after, so a change in
    the shared machine's load during the long run hits all of them.

    Args:
        source: The input file.
        workdir: Temporary folder (`e2e/` is created inside).
        concurrency: `run.concurrency` of the experiment and of the bare loop.
        log: Progress sink.
        extra_env: Extra environment for the `narr` processes (e.g. `NARR_BATCH_SIZE`).
    """
    root = workdir / "e2e"
    env = _e2e_env(root, source, extra_env)
    name = "bench_llm"
    server = serve_in_subprocess(latency_s=LATENCY_S)
    try:
        measured = _e2e_measure(server, root, env, name, concurrency, log)
    finally:
        server.stop()
    finished = re.search(r"narr: finished in ([\d.]+) s", (root / "run.log").read_text())
    narratives, statuses, active = _e2e_store_facts(root / "narr.duckdb", name)
    runs = _dagster_runs(root / "dagster_home")
    by_kind = _runs_by_kind(runs)
    if len(by_kind.get("classification", [])) != 1:
        raise RuntimeError(f"expected one classification run, got {[list(r['steps_s']) for r in runs]}")
    class_run = by_kind["classification"][0]
    stats, run = measured["stats"], measured["run"]
    calls = stats["chat_requests"]
    if calls != measured["requests"]:
        raise RuntimeError(f"narr run made {calls} calls, the bare loop {measured['requests']}")
    events = class_run["events"]
    return {
        "concurrency": concurrency,
        "latency_s": LATENCY_S,
        "extra_env": extra_env or {},
        "narratives": narratives[0],
        "placeholders": narratives[1],
        "batches": narratives[2],
        "calls": calls,
        "completions_ok": stats["completions_ok"],
        "max_in_flight": stats["max_in_flight"],
        "statuses": statuses,
        "startup_cli": measured["startup"],
        "ingest_cli": measured["ingest"],
        "run_cli": {**run, "reported_finished_s": float(finished.group(1)) if finished else None},
        "loadavg_during_run": measured["loadavg"],
        "dagster_runs": runs,
        "dagster_run_count": len(runs),
        "classification_stage_s": class_run["created_to_end_s"],
        "classification_run_s": class_run["duration_s"],
        "planned_events": events.get("ASSET_MATERIALIZATION_PLANNED", {"count": 0, "span_s": 0.0}),
        "materialization_events": events.get("ASSET_MATERIALIZATION", {"count": 0, "span_s": 0.0}),
        "engine_active_s": active,
        "metrics_run_s": sum(r["duration_s"] or 0 for r in by_kind.get("metrics", [])),
        "bare_parts": measured["bare_parts"],
        **_e2e_rates(measured, calls, concurrency, class_run["created_to_end_s"], active),
    }


def _e2e_env(root: Path, source: Path, extra_env: dict[str, str] | None) -> dict[str, str]:
    """A fresh `root` (with its `dagster_home/`) and the environment of the `narr` processes."""
    if root.exists():
        shutil.rmtree(root)
    (root / "dagster_home").mkdir(parents=True)
    return {
        **os.environ,
        "NARR_SOURCE": str(source),
        "NARR_DB": str(root / "narr.duckdb"),
        "NARR_DATA_DIR": str(root),
        "NARR_EXPERIMENTS": str(root / "experiments"),
        "DAGSTER_HOME": str(root / "dagster_home"),
        **(extra_env or {}),
    }


def _e2e_measure(
    server: ServerHandle, root: Path, env: dict[str, str], name: str, concurrency: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """`narr experiments`, `narr ingest`, then the bare loops around `narr run` (half before, half after)."""
    write_experiment(root / "experiments", name, server.base_url, concurrency)
    cfg = load_experiment(root / "experiments" / f"{name}.yaml")
    startup = _run_cli(["experiments"], env, root / "experiments.log")
    log(f"  e2e: narr experiments (start-up only) {startup['wall_s']:.1f} s; narr ingest ...")
    ingest = _run_cli(["ingest"], env, root / "ingest.log")
    texts = _texts_to_send(root / "narr.duckdb")
    half = len(texts) // 2
    log(f"  e2e: narr ingest {ingest['wall_s']:.1f} s; bare loops, first {half:,} requests ...")
    bare_parts = _bare_parts(server, cfg, texts[:half], concurrency)
    log(f"  e2e: narr run {name} (concurrency {concurrency}) ...")
    load_before = loadavg()
    server.reset()
    run = _run_cli(["run", name], env, root / "run.log")
    stats = server.stats()
    load_after = loadavg()
    log(
        f"  e2e: narr run {run['wall_s']:.1f} s, {stats['completions_ok']:,} calls; "
        f"bare loops, last {len(texts) - half:,} requests ..."
    )
    bare_parts += _bare_parts(server, cfg, texts[half:], concurrency)
    return {
        "startup": startup,
        "ingest": ingest,
        "run": run,
        "stats": stats,
        "loadavg": [load_before, load_after],
        "bare_parts": bare_parts,
        "requests": len(texts),
    }


def _texts_to_send(db: Path) -> list[str]:
    """The non-placeholder narratives, i.e. what `narr run` asks, in batch order."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return [
            r[0]
            for r in con.execute(
                "SELECT narrative_text FROM narratives WHERE NOT is_placeholder "
                "ORDER BY batch_id, incident_id, narrative_type"
            ).fetchall()
        ]
    finally:
        con.close()


def _bare_parts(
    server: ServerHandle, cfg: ExperimentConfig, texts: list[str], concurrency: int
) -> list[dict[str, Any]]:
    """The reference bare loop, then the fastest one, over `texts` (the server's counters reset before each)."""
    parts = []
    for fast in (False, True):
        server.reset()
        with Timed() as t:
            answered = asyncio.run(bare_loop(cfg, texts, concurrency, post=fast, aiohttp=fast))
        if answered != len(texts):
            raise RuntimeError(f"bare loop answered {answered} of {len(texts)}")
        parts.append({"n": len(texts), "fast": fast, "wall_s": t.wall_s, "cpu_s": t.cpu_s})
    return parts


def _e2e_store_facts(db: Path, name: str) -> tuple[tuple[Any, ...], dict[str, int], float]:
    """(narratives, placeholders, batches), rows by status, and the engine's active seconds."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        narratives = _one_row(
            con, "SELECT count(*), count(*) FILTER (WHERE is_placeholder), count(DISTINCT batch_id) FROM narratives"
        )
        statuses = dict(con.execute("SELECT status, count(*) FROM classification_rows GROUP BY 1").fetchall())
        active = _one_row(con, "SELECT sum(active_seconds) FROM run_log WHERE experiment = ?", [name])[0]
    finally:
        con.close()
    return narratives, statuses, active


def _one_row(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> tuple[Any, ...]:
    """The single row of an aggregate query."""
    row = con.execute(sql, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {sql!r}")
    return row


def _runs_by_kind(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Dagster runs grouped as "classification", "metrics" or "ingest"."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        # `dg.materialize` runs carry no asset selection: their step keys tell what they did.
        steps = list(r["steps_s"])
        kind = (
            "classification"
            if any(s.endswith("__classifications") for s in steps)
            else "metrics"
            if any(s.endswith("__metrics") for s in steps)
            else "ingest"
        )
        by_kind.setdefault(kind, []).append(r)
    return by_kind


def _e2e_rates(measured: dict[str, Any], calls: int, concurrency: int, stage: float, active: float) -> dict[str, Any]:
    """Rates and overheads of the classification stage against the bare loops and the ideal."""
    bare_parts, run, n = measured["bare_parts"], measured["run"], measured["requests"]
    bare_s = sum(p["wall_s"] for p in bare_parts if not p["fast"])
    bare_cpu = sum(p["cpu_s"] for p in bare_parts if not p["fast"])
    fast_s = sum(p["wall_s"] for p in bare_parts if p["fast"])
    ideal = calls * LATENCY_S / concurrency
    return {
        "bare_s": bare_s,
        "bare_cpu_s": bare_cpu,
        "bare_rate": n / bare_s,
        "pipeline_rate": calls / stage,
        "ideal_s": ideal,
        "overhead_vs_ideal": (stage - ideal) / stage,
        "overhead_vs_bare": (stage - bare_s) / stage,
        "bare_fast_s": fast_s,
        "overhead_vs_bare_fast": (stage - fast_s) / stage,
        "engine_overhead_vs_bare": (active - bare_s) / active,
        "narr_run_overhead_vs_bare": (run["wall_s"] - bare_s) / run["wall_s"],
        "cpu_overhead_vs_bare": (run["cpu_s"] - bare_cpu) / run["cpu_s"] if run["cpu_s"] else None,
    }
