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
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pandas as pd
from openai.types.chat import ChatCompletion

from narr_assets.classify import WorkItem
from narr_assets.experiments import ExperimentConfig, build_messages, load_experiment
from narr_assets.narratives import text_hash
from narr_assets.parsing import RESULT_SCHEMA
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
            WorkItem(batch_id=batch_id, incident_id=f"{100000 + i // 2}", narrative_type=("cme", "le")[i % 2],
                     text=text, text_hash=text_hash(text), is_placeholder=False)
        )
    return out


def request_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The sampling parameters a hand-written client would send for this experiment."""
    params: dict[str, Any] = {
        "model": cfg.model.name,
        "temperature": cfg.model.temperature,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "ipv_verdict", "schema": RESULT_SCHEMA, "strict": True},
        },
    }
    if cfg.model.max_tokens is not None:
        params["max_tokens"] = cfg.model.max_tokens
    return params


async def bare_loop(cfg: ExperimentConfig, texts: Sequence[str], concurrency: int) -> int:
    """The reference client: `AsyncOpenAI` + `asyncio.Semaphore`, no journal, no database.

    Sends the same messages and parameters as the engine, keeps each answer's content.

    Args:
        cfg: The experiment (endpoint, prompt, parameters).
        texts: One request per text.
        concurrency: Requests in flight.

    Returns:
        The number of answers with content.
    """
    client = openai.AsyncOpenAI(base_url=cfg.model.base_url, api_key="not-needed", max_retries=0,
                                timeout=cfg.run.timeout_s)
    semaphore = asyncio.Semaphore(concurrency)
    params = request_params(cfg)

    async def one(text: str) -> str | None:
        async with semaphore:
            completion = await client.chat.completions.create(messages=build_messages(cfg, text), **params)
            return completion.choices[0].message.content

    try:
        answers = await asyncio.gather(*(one(t) for t in texts))
    finally:
        await client.close()
    return sum(1 for a in answers if a)


class BatchWriter:
    """The `write_batches` callback of `run_engine`, in one of three modes.

    Modes: `store` - `Store.replace_partitions` for every group the engine hands over, as
    `classify_batches` does (the engine groups the batches finished while the previous write
    ran; one DuckDB connection and transaction per group); `interval` - groups are buffered
    and written together at most every `interval_s` seconds and at `finish()` (a candidate
    improvement, simulated outside the engine); `none` - nothing is written.
    """

    MODES = ("store", "interval", "none")

    def __init__(self, store: Store, experiment: str, mode: str = "store", interval_s: float = 2.0):
        if mode not in self.MODES:
            raise ValueError(f"unknown write mode {mode!r}; known: {self.MODES}")
        self.store, self.experiment, self.mode, self.interval_s = store, experiment, mode, interval_s
        self._buffer: dict[str, pd.DataFrame] = {}
        self._last = time.monotonic()
        self.transactions = 0

    def write(self, frames: dict[str, pd.DataFrame]) -> None:
        """Write (or buffer) the rows of the batches the engine hands over."""
        if self.mode == "store":
            self.store.replace_partitions(self.experiment, frames)
            self.transactions += 1
        elif self.mode == "interval":
            self._buffer.update(frames)
            if time.monotonic() - self._last >= self.interval_s:
                self.finish()

    def finish(self) -> None:
        """Write what is still buffered (the engine's writer would, when its queue ends)."""
        if self._buffer:
            self.store.replace_partitions(self.experiment, self._buffer)
            self._buffer = {}
            self.transactions += 1
        self._last = time.monotonic()


class PostCompletions:
    """Stand-in for `client.chat.completions` that sends the body with `client.post`.

    `chat.completions.create` (with or without `.with_raw_response`) walks every request
    through the SDK's typed transform (`openai._utils._transform`), about 1 ms of CPU per
    request here. `client.post(..., cast_to=httpx.Response)` - the SDK's documented way to
    make custom requests - skips it, raises the same exceptions and returns the raw response.
    Installed on a real `OpenAIBackend` to simulate that fix; it serves both call paths the
    backend has used (`create` -> `ChatCompletion`, `with_raw_response.create` -> raw).
    """

    def __init__(self, client: openai.AsyncOpenAI):
        self.client = client
        self.with_raw_response = _RawPost(client)

    async def create(self, *, messages: list[dict[str, str]], extra_body: dict[str, Any] | None = None,
                     **params: Any) -> ChatCompletion:
        """Send one chat completion request as `create` would, untransformed; parsed answer."""
        body = {"messages": messages, **params, **(extra_body or {})}
        return await self.client.post("/chat/completions", body=body, cast_to=ChatCompletion)


class _RawPost:
    def __init__(self, client: openai.AsyncOpenAI):
        self.client = client

    async def create(self, *, messages: list[dict[str, str]], extra_body: dict[str, Any] | None = None,
                     **params: Any) -> SimpleNamespace:
        """Send one request untransformed; `.http_response` like `with_raw_response.create`."""
        body = {"messages": messages, **params, **(extra_body or {})}
        response = await self.client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        return SimpleNamespace(http_response=response)


@dataclass
class Timed:
    """Wall and CPU seconds of one measured block (CPU: this process, all threads)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __enter__(self) -> "Timed":
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
        "versions": {d: _version(d) for d in ("openai", "httpx2", "dagster", "duckdb", "pandas", "pyarrow",
                                               "python-calamine", "openpyxl", "narr_assets")},
    }


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages (how busy the shared machine was)."""
    return [round(x, 2) for x in os.getloadavg()]
