"""Run every benchmark, print markdown tables and write `benchmarks/results/latest.json`.

    .venv/bin/python -m benchmarks.run            # full: 8-12 minutes on 2 cores
    .venv/bin/python -m benchmarks.run --quick    # reduced sizes: about 1 minute

Sections: classification throughput (bare `AsyncOpenAI` loop vs the engine at several
concurrencies against the test server in a subprocess, fixed latency 0.1 s), a breakdown
of the engine's cost at concurrency 32, ingestion of the production-size file, the `rules`
backend, and `narr ingest` + `narr run` end to end through the real CLI. Every setting points
into a temporary folder; nothing touches the repository's `data/`. The machine is shared,
so every comparison is between measurements taken in the same run, medians of repetitions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import LATENCY_S, PROJECT_ROOT, loadavg, machine_facts, md_table
from benchmarks.production import generate, run_end_to_end, run_ingestion, run_rules
from benchmarks.throughput import run_breakdown, run_throughput

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("throughput", "breakdown", "ingestion", "rules", "e2e")
MIB_PER_GIB = 1024.0


class Sizes(TypedDict):
    """How much each section measures."""

    points: list[tuple[int, int]]  # (concurrency, narratives) per throughput point
    reps: int
    breakdown_n: int
    breakdown_reps: int
    incidents: int  # rows of the generated production-shaped file
    ingest_reps: int


# (concurrency, narratives) per point: about 4-5 s per measurement at full size on 2 cores.
FULL: Sizes = {
    "points": [(1, 40), (8, 400), (32, 1000), (64, 1200)],
    "reps": 3,
    "breakdown_n": 800,
    "breakdown_reps": 3,
    "incidents": 20946,
    "ingest_reps": 3,
}
QUICK: Sizes = {
    "points": [(1, 15), (8, 120), (32, 300), (64, 400)],
    "reps": 2,
    "breakdown_n": 300,
    "breakdown_reps": 1,
    "incidents": 1000,
    "ingest_reps": 2,
}
# Every code path once, tiny sizes: a test runs this so the benchmarks cannot rot unseen.
SMOKE: Sizes = {
    "points": [(1, 4), (8, 24), (32, 64), (64, 96)],
    "reps": 1,
    "breakdown_n": 64,
    "breakdown_reps": 1,
    "incidents": 150,
    "ingest_reps": 1,
}

TARGETS = {"engine_over_bare_c32": 0.90, "pipeline_overhead": 0.10, "peak_rss_gib": 2.0}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+uncommitted changes" if dirty else "")


# --- tables ------------------------------------------------------------------------------


def throughput_table(res: dict[str, Any]) -> str:
    rows = [
        [
            p["concurrency"],
            p["narratives"],
            p["ideal_rate"],
            p["bare_rate"],
            p["bare_fast_rate"],
            p["engine_rate"],
            f"{p['engine_over_bare']:.0%}",
            f"{p['engine_over_bare_fast']:.0%}",
            f"{p['engine_speedup_vs_one_at_a_time']:.1f}x",
            p["bare_cpu_ms_per_req"],
            p["bare_fast_cpu_ms_per_req"],
            p["engine_cpu_ms_per_req"],
            p["max_in_flight"],
        ]
        for p in res["points"]
    ]
    return md_table(
        [
            "concurrency",
            "narratives/point",
            "ideal/s",
            "bare loop/s",
            "fastest bare loop/s",
            "engine/s",
            "engine/bare",
            "engine/fastest bare",
            "engine vs one-at-a-time",
            "bare CPU ms/req",
            "fastest bare CPU ms/req",
            "engine CPU ms/req",
            "max in flight",
        ],
        rows,
    )


def breakdown_table(res: dict[str, Any]) -> str:
    rows = [
        [
            r["variant"],
            r["rate"],
            f"{r['over_bare']:.0%}",
            r["cpu_ms_per_req"],
            f"{r['bare_cpu_over_cpu']:.0%}",
            int(r["transactions"]),
        ]
        for r in res["rows"]
    ]
    return md_table(
        [
            "variant",
            "narratives/s",
            "rate vs bare (same rep)",
            "client CPU ms/req",
            "bare CPU / variant CPU",
            "DuckDB transactions",
        ],
        rows,
    )


def ingestion_table(res: dict[str, Any], gen: dict[str, Any]) -> str:
    rows = [[stage, secs] for stage, secs in res["stages_s"].items()]
    rows.append(["(read_source with openpyxl instead of calamine, once)", res["read_source_openpyxl_s"]])
    rows.append(["(generating the file, once)", gen["seconds"]])
    return md_table(["stage", "seconds (median)"], rows)


def rules_table(res: dict[str, Any]) -> str:
    eng = res["engine"]
    return md_table(
        ["path", "narratives", "DuckDB transactions", "seconds", "narratives/s"],
        [
            ["`rules.classify` loop", res["narratives"], "-", res["loop_s"], res["loop_rate"]],
            [
                f"engine, {res['engine_batches']} batches, writes as shipped (`Store.replace_partitions` per group of "
                "finished batches)",
                res["narratives"],
                eng["transactions"],
                eng["seconds"],
                eng["rate"],
            ],
        ],
    )


def e2e_tables(res: dict[str, Any]) -> str:
    planned, mats = res["planned_events"], res["materialization_events"]
    stages = md_table(
        ["stage", "wall seconds"],
        [
            ["`narr experiments` (process start-up only: Python, Dagster import)", res["startup_cli"]["wall_s"]],
            ["`narr ingest` (whole process)", res["ingest_cli"]["wall_s"]],
            ["`narr run` (whole process: start-up, classification, metrics, status)", res["run_cli"]["wall_s"]],
            ["  classification stage (run created -> run finished)", res["classification_stage_s"]],
            [
                f"    {planned['count']:,} `ASSET_MATERIALIZATION_PLANNED` events (before the run starts)",
                planned["span_s"],
            ],
            ["    classification run (start -> end)", res["classification_run_s"]],
            ["      engine active time (`run_log`)", res["engine_active_s"]],
            [f"      {mats['count']:,} `ASSET_MATERIALIZATION` events (after the engine)", mats["span_s"]],
            ["  metrics Dagster run", res["metrics_run_s"]],
            [
                f"bare loop, same {res['calls']:,} requests, concurrency {res['concurrency']} "
                "(half before, half after)",
                res["bare_s"],
            ],
            [
                "fastest bare loop (`client.post` + aiohttp), same requests (half before, half after)",
                res["bare_fast_s"],
            ],
            [f"ideal: calls x {res['latency_s']} s / {res['concurrency']}", res["ideal_s"]],
        ],
    )
    cpu = res["run_cli"]["cpu_s"]
    facts = md_table(
        ["measure", "value"],
        [
            ["narratives (placeholders)", f"{res['narratives']:,} ({res['placeholders']:,})"],
            ["batches (Dagster partitions)", res["batches"]],
            ["calls made (server)", res["calls"]],
            ["rows by status", ", ".join(f"{k} {v:,}" for k, v in sorted(res["statuses"].items()))],
            ["Dagster runs", res["dagster_run_count"]],
            ["pipeline rate (calls / classification stage)", f"{res['pipeline_rate']:.1f}/s"],
            ["bare loop rate", f"{res['bare_rate']:.1f}/s"],
            ["peak RSS `narr ingest`", f"{res['ingest_cli']['peak_rss_mib']:,.0f} MiB"],
            ["peak RSS `narr run`", f"{res['run_cli']['peak_rss_mib']:,.0f} MiB"],
            [
                "**overhead vs bare loop** = (classification stage - bare) / classification stage",
                f"**{res['overhead_vs_bare']:.1%}**",
            ],
            [
                "overhead vs the fastest bare loop = (classification stage - fastest bare) / classification stage",
                f"{res['overhead_vs_bare_fast']:.1%}",
            ],
            [
                "overhead vs ideal = (classification stage - ideal) / classification stage",
                f"{res['overhead_vs_ideal']:.1%}",
            ],
            ["engine only vs bare = (engine active - bare) / engine active", f"{res['engine_overhead_vs_bare']:.1%}"],
            ["whole `narr run` process vs bare", f"{res['narr_run_overhead_vs_bare']:.1%}"],
            [
                "CPU seconds `narr run` / bare loop (overhead in CPU)",
                f"{cpu:.1f} / {res['bare_cpu_s']:.1f} ({res['cpu_overhead_vs_bare']:.1%})" if cpu else "n/a",
            ],
            [
                "load average before / after `narr run`",
                f"{res['loadavg_during_run'][0]} / {res['loadavg_during_run'][1]}",
            ],
        ],
    )
    return stages + "\n\n" + facts


def targets(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rows, verdicts = [], {}
    tp = results.get("throughput")
    if tp:
        c32 = next((p for p in tp["points"] if p["concurrency"] == 32), None)
        if c32:
            ok = c32["engine_over_bare"] >= TARGETS["engine_over_bare_c32"]
            verdicts["engine_over_bare_c32"] = ok
            rows.append(
                [
                    "engine >= 90% of bare loop at concurrency 32",
                    f"{c32['engine_over_bare']:.0%}",
                    "met" if ok else "MISSED",
                ]
            )
            rows.append(
                [
                    "(stricter, ours) engine >= 90% of the fastest bare loop at concurrency 32",
                    f"{c32['engine_over_bare_fast']:.0%}",
                    "met" if c32["engine_over_bare_fast"] >= TARGETS["engine_over_bare_c32"] else "MISSED",
                ]
            )
    e2e = results.get("e2e")
    if e2e:
        ok = e2e["overhead_vs_bare"] < TARGETS["pipeline_overhead"]
        verdicts["pipeline_overhead"] = ok
        rows.append(
            [
                "pipeline overhead < 10% of the classification stage (vs bare loop, same run)",
                f"{e2e['overhead_vs_bare']:.1%}",
                "met" if ok else "MISSED",
            ]
        )
        peak = max(e2e["ingest_cli"]["peak_rss_mib"] or 0, e2e["run_cli"]["peak_rss_mib"] or 0) / MIB_PER_GIB
        ok = peak < TARGETS["peak_rss_gib"]
        verdicts["peak_rss"] = ok
        rows.append(["peak memory of the narr process < 2 GiB", f"{peak:.2f} GiB", "met" if ok else "MISSED"])
    return md_table(["target", "measured", "verdict"], rows), verdicts


# --- main --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes and repetitions (about 1 minute)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one repetition: checks the benchmarks run (numbers are meaningless)",
    )
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    parser.add_argument("--incidents", type=int, help="rows of the generated file (default 20,946; 1,000 with --quick)")
    parser.add_argument("--e2e-concurrency", type=int, default=32, help="run.concurrency of the end-to-end run")
    parser.add_argument(
        "--e2e-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the narr processes, e.g. NARR_BATCH_SIZE=500 (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    return parser


class _Laps:
    """Wall seconds per section since the previous lap, kept in `results["section_seconds"]`."""

    def __init__(self, results: dict[str, Any]):
        self.seconds: dict[str, float] = {}
        results["section_seconds"] = self.seconds
        self.mark = time.monotonic()

    def __call__(self, name: str) -> None:
        self.seconds[name] = round(time.monotonic() - self.mark, 1)
        self.mark = time.monotonic()


def _llm_sections(sections: list[str], sizes: Sizes, workdir: Path, results: dict[str, Any], lap: _Laps) -> list[str]:
    """The throughput and breakdown sections (against the test server): their markdown."""
    out = []
    if "throughput" in sections:
        log("throughput: bare loop vs engine ...")
        results["throughput"] = run_throughput(workdir / "throughput", sizes["points"], sizes["reps"], log)
        out.append(
            f"## Classification throughput (test server in a subprocess, latency {LATENCY_S} s, "
            f"median of {sizes['reps']})\n\n" + throughput_table(results["throughput"])
        )
        lap("throughput")
    if "breakdown" in sections:
        log("breakdown: engine variants at concurrency 32 ...")
        results["breakdown"] = run_breakdown(
            workdir / "breakdown", 32, sizes["breakdown_n"], sizes["breakdown_reps"], log
        )
        out.append(
            f"## Engine cost breakdown (concurrency 32, {sizes['breakdown_n']} narratives, "
            f"median of {sizes['breakdown_reps']})\n\n" + breakdown_table(results["breakdown"])
        )
        lap("breakdown")
    return out


def _production_sections(
    args: argparse.Namespace,
    sections: list[str],
    sizes: Sizes,
    workdir: Path,
    results: dict[str, Any],
    lap: _Laps,
    extra_env: dict[str, str],
) -> list[str]:
    """Generation and ingestion of the production-shaped file, then the `rules` and e2e sections."""
    out = []
    log(f"generating the production-shaped file ({sizes['incidents']:,} rows) ...")
    results["generate"] = generate(workdir, sizes["incidents"])
    source = Path(results["generate"]["path"])
    ingest_dir = workdir / "ingestion"
    ingest_dir.mkdir()
    log("ingestion ...")
    results["ingestion"] = run_ingestion(source, ingest_dir, sizes["ingest_reps"], log)
    lap("generate + ingestion")
    if "ingestion" in sections:
        c = results["ingestion"]["counts"]
        out.append(
            f"## Ingestion ({sizes['incidents']:,} rows -> {c['narratives']:,} narratives, "
            f"{c['placeholders']:,} placeholders, {c['batches']} batches; median of "
            f"{sizes['ingest_reps']})\n\n" + ingestion_table(results["ingestion"], results["generate"])
        )
    if "rules" in sections:
        log("rules backend ...")
        results["rules"] = run_rules(ingest_dir / "ingest_r0.duckdb", workdir, log)
        out.append("## `rules` backend\n\n" + rules_table(results["rules"]))
        lap("rules")
    if "e2e" in sections:
        log(f"end to end through the CLI (concurrency {args.e2e_concurrency}) ...")
        results["e2e"] = run_end_to_end(source, workdir, args.e2e_concurrency, log, extra_env)
        env_note = f", env {' '.join(args.e2e_env)}" if args.e2e_env else ""
        out.append(
            f"## End to end: `narr ingest` + `narr run` ({sizes['incidents']:,} rows, concurrency "
            f"{args.e2e_concurrency}, latency {LATENCY_S} s{env_note})\n\n" + e2e_tables(results["e2e"])
        )
        lap("e2e")
    return out


def _write_report(args: argparse.Namespace, results: dict[str, Any], out: list[str]) -> None:
    """Add the targets and the title, print the markdown, write the JSON and markdown files."""
    table, verdicts = targets(results)
    results["targets"] = verdicts
    out.append("## Targets\n\n" + table)
    machine = results["machine"]
    out.insert(
        0,
        f"# narr_assets benchmarks ({results['mode']})\n\n`{results['command']}` - {results['started_at']}, "
        f"{results['seconds']:.0f} s, git {results['git']}; nproc {machine['nproc']}, Python {machine['python']}; "
        f"load average {results['loadavg_start']} -> {results['loadavg_end']}",
    )
    print("\n\n".join(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    args.out.with_suffix(".md").write_text("\n\n".join(out) + "\n")
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = {"smoke": SMOKE, "quick": QUICK, "full": FULL}[mode].copy()
    if args.incidents:
        sizes["incidents"] = args.incidents
    extra_env = dict(item.split("=", 1) for item in args.e2e_env)
    sections = args.only or list(SECTIONS)
    workdir = Path(tempfile.mkdtemp(prefix="narr-bench-"))
    started = time.time()
    results: dict[str, Any] = {
        "command": " ".join(
            [Path(sys.executable).name, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "mode": mode,
        "sizes": sizes,
        "latency_s": LATENCY_S,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "git": git_revision(),
        "machine": machine_facts(),
        "loadavg_start": loadavg(),
    }
    log(f"benchmarks ({results['mode']}) in {workdir}; load average {results['loadavg_start']}")
    lap = _Laps(results)
    out: list[str] = []
    try:
        out += _llm_sections(sections, sizes, workdir, results, lap)
        if {"ingestion", "rules", "e2e"} & set(sections):
            out += _production_sections(args, sections, sizes, workdir, results, lap, extra_env)
    finally:
        results["loadavg_end"] = loadavg()
        results["seconds"] = round(time.time() - started, 1)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _write_report(args, results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
