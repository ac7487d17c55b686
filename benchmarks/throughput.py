"""Classification throughput: bare `AsyncOpenAI` loop vs the engine, same server, same run.

The test server runs in a subprocess (its own core) with a fixed latency, so throughput is
bounded by latency / concurrency and by the client's CPU per request; the engine's cost over
the bare loop is the journal, parsing, row building and the DuckDB batch writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LATENCY_S,
    BatchWriter,
    Timed,
    bare_loop,
    experiment,
    make_items,
    median,
    use_default_transport,
)
from narr_assets.classify import run_engine
from narr_assets.experiments import ExperimentConfig
from narr_assets.ingest import read_source
from narr_assets.journal import Journal
from narr_assets.llm import OpenAIBackend
from narr_assets.narratives import placeholder_mask
from narr_assets.store import Store
from narr_assets.testing.generate import generate_production
from narr_assets.testing.server import ServerHandle, serve_in_subprocess


def sample_texts(workdir: Path) -> tuple[list[str], str]:
    """Non-placeholder narratives of production-like length, and where they came from."""
    path = workdir / "throughput_source.xlsx"
    generate_production(path, n_incidents=600, seed=1)
    texts = read_source(path).frame["narrative_text"].dropna().str.strip()
    texts = texts[texts != ""]
    return list(texts[~placeholder_mask(texts)]), "narr_assets.testing.generate (600 incidents, seed 1)"


def _server_check(server: ServerHandle, n: int) -> dict[str, int]:
    stats = server.stats()
    if stats["completions_ok"] != n:
        raise RuntimeError(f"server answered {stats['completions_ok']} of {n} requests")
    return {"chat_requests": stats["chat_requests"], "max_in_flight": stats["max_in_flight"]}


def measure_bare(
    server: ServerHandle, cfg: ExperimentConfig, texts: Sequence[str], concurrency: int, **options: bool
) -> dict[str, Any]:
    """One bare-loop measurement of `len(texts)` requests (`options`: see `bare_loop`)."""
    server.reset()
    with Timed() as t:
        answered = asyncio.run(bare_loop(cfg, texts, concurrency, **options))
    if answered != len(texts):
        raise RuntimeError(f"bare loop: {answered} of {len(texts)} answers had content")
    return {
        "n": len(texts),
        "wall_s": t.wall_s,
        "cpu_s": t.cpu_s,
        "rate": len(texts) / t.wall_s,
        "transactions": 0,
        **_server_check(server, len(texts)),
    }


def measure_engine(
    server: ServerHandle,
    cfg: ExperimentConfig,
    texts: Sequence[str],
    concurrency: int,
    workdir: Path,
    tag: str,
    *,
    write_mode: str = "store",
    journal: bool = True,
    default_transport: bool = False,
) -> dict[str, Any]:
    """One engine measurement: real backend, journal and DuckDB store, fresh for this run.

    Args:
        write_mode: A `BatchWriter` mode (`store` is what `classify_batches` does).
        journal: Journal every answer (as the pipeline does) or not.
        default_transport: Use the SDK's default httpx transport instead of aiohttp.
    """
    items = make_items(texts, len(texts))
    store = Store(workdir / f"{tag}.duckdb")
    store.query_df("SELECT 1")  # create the schema outside the timed block
    jour = Journal.for_experiment(workdir / "journal" / tag, cfg.name, cfg.config_hash) if journal else None
    writer = BatchWriter(store, cfg.name, write_mode)
    server.reset()
    with Timed() as t:
        backend = OpenAIBackend(cfg)
        if default_transport:
            use_default_transport(backend)
        summary = asyncio.run(run_engine(cfg, items, backend, jour, writer.write))
    n = len(texts)
    written = int(store.query_df("SELECT count(*) AS n FROM classification_rows")["n"].iloc[0])
    expected = 0 if write_mode == "none" else n
    if summary.calls_ok != n or written != expected or summary.failed_batches:
        raise RuntimeError(
            f"engine: {summary.calls_ok} calls ok, {written} rows written of {n}: {summary.failed_batches}"
        )
    return {
        "n": n,
        "wall_s": t.wall_s,
        "cpu_s": t.cpu_s,
        "rate": n / t.wall_s,
        "active_s": summary.active_seconds,
        "batches": len(items),
        "transactions": writer.transactions,
        **_server_check(server, n),
    }


#: The cost breakdown's variants: label -> ("bare" | "engine", keyword arguments). The first is
#: the reference every rate is compared with.
BREAKDOWN_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bare loop (reference: `chat.completions.create`, default transport)": ("bare", {}),
    "bare loop, `client.post` + aiohttp transport (fastest hand-written)": ("bare", {"post": True, "aiohttp": True}),
    "engine (as shipped: `client.post`, aiohttp transport)": ("engine", {}),
    "engine, default httpx transport": ("engine", {"default_transport": True}),
    "engine, no DuckDB writes": ("engine", {"write_mode": "none"}),
    "engine, no DuckDB writes, no journal": ("engine", {"write_mode": "none", "journal": False}),
}


def run_breakdown(
    workdir: Path, concurrency: int, n: int, reps: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Where the engine's time goes at one concurrency: bare vs engine variants, same run.

    Args:
        workdir: Temporary folder.
        concurrency: Requests in flight.
        n: Narratives per measurement.
        reps: Repetitions (the variant order rotates every repetition).
        log: Progress sink.

    Returns:
        `{"concurrency", "narratives", "rows": [...], "raw": [...]}`; each row has the median
        rate, the median rate relative to bare in the same repetition and CPU ms per request.
    """
    texts, _ = sample_texts(workdir)
    batch = [texts[i % len(texts)] for i in range(n)]
    labels = list(BREAKDOWN_VARIANTS)
    reference = labels[0]
    server = serve_in_subprocess(latency_s=LATENCY_S)
    raw: list[dict[str, Any]] = []
    try:
        cfg = experiment(workdir / "experiments", f"bd_c{concurrency}", server.base_url, concurrency)
        for rep in range(reps):
            order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
            for label in order:
                kind, options = BREAKDOWN_VARIANTS[label]
                if kind == "bare":
                    result = measure_bare(server, cfg, batch, concurrency, **options)
                else:
                    tag = f"bd_{labels.index(label)}_r{rep}"
                    result = measure_engine(server, cfg, batch, concurrency, workdir, tag, **options)
                raw.append({"variant": label, "rep": rep, **result})
                log(
                    f"  breakdown rep {rep + 1}/{reps} c={concurrency} {label:70s} {result['rate']:7.1f}/s  "
                    f"cpu {1000 * result['cpu_s'] / n:5.2f} ms/req"
                )
    finally:
        server.stop()
    rows = []
    for label in labels:
        mine = {r["rep"]: r for r in raw if r["variant"] == label}
        bare = {r["rep"]: r for r in raw if r["variant"] == reference}
        rows.append(
            {
                "variant": label,
                "rate": median([r["rate"] for r in mine.values()]),
                "over_bare": median([mine[k]["rate"] / bare[k]["rate"] for k in mine]),
                "cpu_ms_per_req": median([1000 * r["cpu_s"] / r["n"] for r in mine.values()]),
                "bare_cpu_over_cpu": median([bare[k]["cpu_s"] / mine[k]["cpu_s"] for k in mine]),
                "transactions": median([r["transactions"] for r in mine.values()]),
            }
        )
    return {"concurrency": concurrency, "narratives": n, "reps": reps, "rows": rows, "raw": raw}


def run_throughput(
    workdir: Path, points: Sequence[tuple[int, int]], reps: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure the bare loops and the engine at every (concurrency, narratives) point.

    Three clients per point and repetition: `bare` (the reference loop the SDK's README
    shows), `bare_fast` (`client.post` + aiohttp, the fastest loop we know how to write) and
    `engine`. Their order rotates every repetition so slow phases of the shared machine hit
    all three; ratios are taken per repetition, then the median.

    Args:
        workdir: Temporary folder for databases and journals.
        points: (concurrency, narratives) pairs.
        reps: Repetitions per point.
        log: Progress sink (counts and rates only).

    Returns:
        `{"latency_s", "points": [...], "raw": [...]}` with per-point medians and every measurement.
    """
    texts, source = sample_texts(workdir)
    server = serve_in_subprocess(latency_s=LATENCY_S)
    raw: list[dict[str, Any]] = []
    try:
        for rep in range(reps):
            for concurrency, n in points:
                cfg = experiment(workdir / "experiments", f"tp_c{concurrency}", server.base_url, concurrency)
                batch = [texts[i % len(texts)] for i in range(n)]
                kinds = ("bare", "bare_fast", "engine")
                for kind in kinds[rep % 3 :] + kinds[: rep % 3]:
                    if kind == "bare":
                        result = measure_bare(server, cfg, batch, concurrency)
                    elif kind == "bare_fast":
                        result = measure_bare(server, cfg, batch, concurrency, post=True, aiohttp=True)
                    else:
                        result = measure_engine(server, cfg, batch, concurrency, workdir, f"tp_c{concurrency}_r{rep}")
                    raw.append({"kind": kind, "concurrency": concurrency, "rep": rep, **result})
                    log(
                        f"  throughput rep {rep + 1}/{reps} c={concurrency:<3d} {kind:9s} n={n:5d} "
                        f"{result['rate']:7.1f}/s  cpu {1000 * result['cpu_s'] / n:5.2f} ms/req  "
                        f"max in flight {result['max_in_flight']}"
                    )
    finally:
        server.stop()
    return {
        "latency_s": LATENCY_S,
        "reps": reps,
        "texts_source": source,
        "distinct_texts": len(texts),
        "points": summarise(raw),
        "raw": raw,
    }


def summarise(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: median rates, median paired ratio, CPU per request, speed-ups."""
    by = {(r["kind"], r["concurrency"], r["rep"]): r for r in raw}
    concurrencies = sorted({r["concurrency"] for r in raw})
    reps = sorted({r["rep"] for r in raw})
    base = None
    if 1 in concurrencies:
        base = median([by["bare", 1, rep]["rate"] for rep in reps])
    out = []
    for c in concurrencies:
        bare = [by["bare", c, rep] for rep in reps]
        fast = [by["bare_fast", c, rep] for rep in reps]
        eng = [by["engine", c, rep] for rep in reps]
        bare_rate, eng_rate = median([b["rate"] for b in bare]), median([e["rate"] for e in eng])
        out.append(
            {
                "concurrency": c,
                "narratives": bare[0]["n"],
                "ideal_rate": c / LATENCY_S,
                "bare_rate": bare_rate,
                "engine_rate": eng_rate,
                "engine_over_bare": median([e["rate"] / b["rate"] for b, e in zip(bare, eng, strict=True)]),
                "bare_fast_rate": median([f["rate"] for f in fast]),
                "engine_over_bare_fast": median([e["rate"] / f["rate"] for f, e in zip(fast, eng, strict=True)]),
                "bare_fast_cpu_ms_per_req": median([1000 * f["cpu_s"] / f["n"] for f in fast]),
                "bare_cpu_ms_per_req": median([1000 * b["cpu_s"] / b["n"] for b in bare]),
                "engine_cpu_ms_per_req": median([1000 * e["cpu_s"] / e["n"] for e in eng]),
                # What engine/bare tends to when the client is CPU-bound (less noisy than rates).
                "bare_cpu_over_engine_cpu": median([b["cpu_s"] / e["cpu_s"] for b, e in zip(bare, eng, strict=True)]),
                "engine_speedup_vs_one_at_a_time": eng_rate / base if base else None,
                "bare_speedup_vs_one_at_a_time": bare_rate / base if base else None,
                "max_in_flight": max(e["max_in_flight"] for e in eng),
                "engine_rate_all": [e["rate"] for e in eng],
                "bare_rate_all": [b["rate"] for b in bare],
                "bare_fast_rate_all": [f["rate"] for f in fast],
            }
        )
    return out
