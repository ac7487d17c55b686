"""Shared pieces of the benchmarks: the bare client loop, experiment files, tables, machine facts.

Nothing here prints narrative text: only counts, rates and timings leave the process.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import openai
import pandas as pd
from openai.types.chat import ChatCompletionMessageParam

from narr_assets.classify import WorkItem
from narr_assets.experiments import ExperimentConfig, build_messages, load_experiment
from narr_assets.llm import OpenAIBackend, request_params
from narr_assets.narratives import text_hash
from narr_assets.store import Store

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = PROJECT_ROOT / "configs" / "prompts"
#: Fixed latency of the test server for every LLM benchmark (seconds per request).
LATENCY_S = 0.1

# The production prompt (indicators) so request bodies have the real size (~1.9 kB of prompt
# around each narrative); the test server answers from the text between <narrative> markers.
EXPERIMENT_YAML = """\
description: benchmark experiment against the local test server
backend: openai
model:
  name: bench-model
  base_url: {base_url}
  temperature: 0.2
  max_tokens: 2048
prompt:
  version: indicators-v1
  system_file: {prompts}/indicators.md
  user_template_file: {prompts}/user_template.md
output:
  mode: json_schema
run:
  concurrency: {concurrency}
  timeout_s: 60
  max_retries: 6
"""


def write_experiment(folder: Path, name: str, base_url: str, concurrency: int) -> Path:
    """Write an LLM experiment file using the indicators prompt.

    Args:
        folder: Experiments folder (created if missing).
        name: Experiment name (the file stem).
        base_url: The test server's `/v1` URL.
        concurrency: `run.concurrency`.

    Returns:
        The path of the YAML file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(EXPERIMENT_YAML.format(base_url=base_url, prompts=PROMPTS, concurrency=concurrency))
    return path


def experiment(folder: Path, name: str, base_url: str, concurrency: int) -> ExperimentConfig:
    """Write and load a benchmark experiment (see `write_experiment`)."""
    return load_experiment(write_experiment(folder, name, base_url, concurrency))


def make_items(texts: Sequence[str], n: int, batch_size: int = 100) -> dict[str, list[WorkItem]]:
    """`n` work items cycling over `texts`, in batches of `batch_size`, with unique keys.

    Args:
        texts: Narrative texts (non-placeholders).
        n: Number of items.
        batch_size: Narratives per batch (the pipeline default is 100).

    Returns:
        Work items grouped by batch id, as `classify.work_items` returns them.
    """
    out: dict[str, list[WorkItem]] = {}
    for i in range(n):
        text = texts[i % len(texts)]
        batch_id = f"b{i // batch_size:05d}"
        out.setdefault(batch_id, []).append(
            WorkItem(
                batch_id=batch_id,
                incident_id=f"{100000 + i // 2}",
                narrative_type=("cme", "le")[i % 2],
                text=text,
                text_hash=text_hash(text),
                is_placeholder=False,
            )
        )
    return out


async def bare_loop(
    cfg: ExperimentConfig, texts: Sequence[str], concurrency: int, *, post: bool = False, aiohttp: bool = False
) -> int:
    """A hand-written client: `AsyncOpenAI` + `asyncio.Semaphore`, no journal, no database.

    Sends the same messages and body (`llm.request_params`) as the engine, keeps each answer's
    content (the benchmark experiment has no `extra_body`, so `create` takes the body as is). The
    defaults are the reference loop (what the SDK's README shows); `post` and `aiohttp` make
    it the fastest loop we know how to write with the SDK, the two choices the engine makes.

    Args:
        cfg: The experiment (endpoint, prompt, parameters).
        texts: One request per text.
        concurrency: Requests in flight.
        post: Send with `client.post(..., cast_to=object)` instead of `chat.completions.create`.
        aiohttp: Use the SDK's aiohttp transport instead of its default httpx one.

    Returns:
        The number of answers with content.
    """
    client = openai.AsyncOpenAI(
        base_url=cfg.model.base_url,
        api_key="not-needed",
        max_retries=0,
        timeout=cfg.run.timeout_s,
        http_client=openai.DefaultAioHttpClient() if aiohttp else None,
    )
    semaphore = asyncio.Semaphore(concurrency)
    params = request_params(cfg)

    async def one(text: str) -> str | None:
        async with semaphore:
            if post:
                answer = await client.post(
                    "/chat/completions", body={"messages": build_messages(cfg, text), **params}, cast_to=object
                )
                body = cast("dict[str, Any]", answer)  # the parsed JSON body, as is
                return body["choices"][0]["message"]["content"]
            # build_messages gives plain {"role", "content"} dicts: valid message params
            messages = cast("list[ChatCompletionMessageParam]", build_messages(cfg, text))
            completion = await client.chat.completions.create(messages=messages, **params)
            return completion.choices[0].message.content

    try:
        answers = await asyncio.gather(*(one(t) for t in texts))
    finally:
        await client.close()
    return sum(1 for a in answers if a)


def use_default_transport(backend: OpenAIBackend) -> None:
    """Give a backend the SDK's default (httpx) transport instead of aiohttp, all else equal."""
    old = backend.client
    backend.client = openai.AsyncOpenAI(
        base_url=str(old.base_url), api_key=old.api_key, max_retries=old.max_retries, timeout=old.timeout
    )
    asyncio.run(old.close())


class BatchWriter:
    """The `write_batches` callback of `run_engine`: `store` (what `classify_batches` does,
    `Store.replace_partitions` per group of finished batches the engine hands over) or
    `none` (nothing written, to measure the writes' cost)."""

    MODES = ("store", "none")

    def __init__(self, store: Store, experiment: str, mode: str = "store"):
        if mode not in self.MODES:
            raise ValueError(f"unknown write mode {mode!r}; known: {self.MODES}")
        self.store, self.experiment, self.mode = store, experiment, mode
        self.transactions = 0

    def write(self, frames: dict[str, pd.DataFrame]) -> None:
        """Write the rows of the batches the engine hands over (one transaction)."""
        if self.mode == "store":
            self.store.replace_partitions(self.experiment, frames)
            self.transactions += 1


@dataclass
class Timed:
    """Wall and CPU seconds of one measured block (CPU: this process, all threads)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __enter__(self) -> Timed:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


def median(values: Sequence[float]) -> float:
    """Median of the repetitions (the machine is shared and noisy)."""
    return float(statistics.median(values))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are shown with up to 3 significant decimals."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """CPU count, Python, platform and the versions of the libraries on the hot path."""
    return {
        "nproc": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": {
            d: _version(d)
            for d in (
                "openai",
                "httpx2",
                "dagster",
                "duckdb",
                "pandas",
                "pyarrow",
                "python-calamine",
                "openpyxl",
                "narr_assets",
            )
        },
    }


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages (how busy the shared machine was)."""
    return [round(x, 2) for x in os.getloadavg()]
