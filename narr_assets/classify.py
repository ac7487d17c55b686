"""The classification engine: one work queue across all partitions of a run.

For each narrative of the requested batches the engine either re-uses the journalled answer
(config hash + narrative key + text hash), skips it (placeholders, by default), or queues a
call. `run.concurrency` workers drain one queue, so the endpoint stays saturated across batch
boundaries; each answer is journalled the moment it arrives, and a batch is written to DuckDB
(atomically, by a single writer task) as soon as its last narrative is done. A narrative whose
call still fails after `run.max_retries` retries fails its batch - the batch is not written and
the run raises at the end, after every other batch is journalled and written - so a
backfill or `narr run` resumes exactly the missing work.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from narr_assets.experiments import ExperimentConfig
from narr_assets.journal import Journal, JournalStats
from narr_assets.llm import Backend, FatalError, RawResponse, TransientError, make_backend
from narr_assets.parsing import PARSER_VERSION, parse_answer
from narr_assets.store import CLASSIFICATION_COLUMNS, Store

ERROR_STATUSES = ("parse_error", "refusal", "truncated")
# A DuckDB transaction has a fixed cost (connect, checkpoint on close: ~45 ms quiet, 150 ms
# loaded); batches finished within this interval share one.
WRITE_INTERVAL_S = 2.0


class PartitionBusyError(RuntimeError):
    """Another process is classifying one of the requested batches."""


class ClassificationFailed(RuntimeError):
    """Some batches could not be completed; the others were written."""

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary


@dataclass
class WorkItem:
    batch_id: str
    incident_id: str
    narrative_type: str
    text: str
    text_hash: str
    is_placeholder: bool
    data_checksum: str | None = None


@dataclass
class RunSummary:
    """What one engine run did; every count is for this run only."""

    experiment: str
    config_hash: str
    batches: list[str] = field(default_factory=list)
    narratives: int = 0
    calls_ok: int = 0
    attempts: int = 0
    transient_errors: int = 0
    reused: int = 0
    skipped: int = 0
    written_batches: list[str] = field(default_factory=list)
    up_to_date_batches: list[str] = field(default_factory=list)
    failed_batches: dict[str, str] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    journal_corrupt_lines: int = 0
    active_seconds: float = 0.0

    @property
    def calls_per_second(self) -> float:
        return self.calls_ok / self.active_seconds if self.active_seconds > 0 else 0.0


# --- locks -------------------------------------------------------------------------------


@contextlib.contextmanager
def partition_locks(locks_dir: Path, experiment: str, batch_ids: list[str]) -> Iterator[None]:
    """Hold an exclusive lock on every batch of the run, or fail at once naming the holder.

    `flock` locks die with their process, so a `kill -9` never leaves a stale lock behind.
    """
    folder = Path(locks_dir) / experiment
    folder.mkdir(parents=True, exist_ok=True)
    held: list[int] = []
    try:
        for batch_id in batch_ids:
            fd = os.open(folder / f"{batch_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise PartitionBusyError(
                    f"partition {batch_id} of experiment {experiment!r} is being classified by another run "
                    f"({holder}); wait for it to finish or pick other partitions"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the flock


# --- pacing ------------------------------------------------------------------------------


class RateLimiter:
    """Spaces request starts to at most `per_minute`, shared by all workers of a run."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


def backoff_delay(retry: int, rng: random.Random, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter for the `retry`-th retry (1-based)."""
    return rng.uniform(0.0, min(cap, base * 2 ** (retry - 1)))


@dataclass
class Progress:
    """Counts, rate and ETA of the calls of this run (not of earlier runs or downtime)."""

    total: int
    emit: Callable[[str], None]
    every_s: float = 5.0
    done: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)

    def tick(self, ok: bool = True) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.emit(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        remaining = self.total - self.done - self.failed
        eta = format_duration(remaining / rate) if rate > 0 else "unknown"
        pct = 100.0 * (self.done + self.failed) / self.total if self.total else 100.0
        return (
            f"calls {self.done:,}/{self.total:,} ({pct:.1f}%), failed {self.failed:,}, "
            f"{rate:.1f}/s, elapsed {format_duration(elapsed)}, ETA {eta}"
        )


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# --- rows --------------------------------------------------------------------------------


def result_row(
    cfg: ExperimentConfig,
    item: WorkItem,
    raw: RawResponse | None,
    *,
    attempts: int,
    from_journal: bool,
    classified_at: float | None,
    config_hash: str,
) -> dict[str, Any]:
    """One `classification_rows` row from a raw answer (None means skipped placeholder).

    `config_hash` is passed in, computed once per run: hashing the config per row would
    cost a model dump and a sha256 for every answer.
    """
    row: dict[str, Any] = {
        "experiment": cfg.name,
        "batch_id": item.batch_id,
        "incident_id": item.incident_id,
        "narrative_type": item.narrative_type,
        "text_hash": item.text_hash,
        "config_hash": config_hash,
        "attempts": attempts,
        "from_journal": from_journal,
        "parser_version": PARSER_VERSION,
        "data_checksum": item.data_checksum,
        "classified_at": pd.Timestamp(classified_at, unit="s", tz="UTC") if classified_at else None,
    }
    if raw is None:
        row.update(status="skipped", error="placeholder narrative (run.skip_placeholders)")
        return row
    parsed = parse_answer(raw.content, raw.reasoning, raw.finish_reason, raw.refusal)
    row.update(
        status=parsed.status,
        detected=parsed.detected,
        confidence=parsed.confidence,
        indicators=json.dumps(list(parsed.indicators), ensure_ascii=False),
        rationale=parsed.rationale,
        error=parsed.error,
        answer_source=parsed.answer_source,
        raw_content=raw.content,
        raw_reasoning=raw.reasoning,
        finish_reason=raw.finish_reason,
        model=raw.model,
        prompt_tokens=raw.prompt_tokens,
        completion_tokens=raw.completion_tokens,
        reasoning_tokens=raw.reasoning_tokens,
        latency_s=raw.latency_s,
    )
    return row


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(CLASSIFICATION_COLUMNS))
    frame["written_at"] = pd.Timestamp.now(tz="UTC")
    for col in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "attempts"):
        frame[col] = frame[col].astype("Int64")
    frame["detected"] = frame["detected"].astype("boolean")
    frame["confidence"] = frame["confidence"].astype("Float64")
    frame["latency_s"] = frame["latency_s"].astype("Float64")
    frame["classified_at"] = pd.to_datetime(frame["classified_at"], utc=True)
    return frame


# --- the engine --------------------------------------------------------------------------


def work_items(narratives: pd.DataFrame) -> dict[str, list[WorkItem]]:
    """Group the `narratives` table's rows into work items per batch."""
    out: dict[str, list[WorkItem]] = {}
    for rec in narratives.itertuples(index=False):
        out.setdefault(rec.batch_id, []).append(
            WorkItem(
                batch_id=rec.batch_id,
                incident_id=rec.incident_id,
                narrative_type=rec.narrative_type,
                text=rec.narrative_text,
                text_hash=rec.text_hash,
                is_placeholder=bool(rec.is_placeholder),
                data_checksum=getattr(rec, "data_checksum", None),
            )
        )
    return out


async def run_engine(
    cfg: ExperimentConfig,
    items_by_batch: dict[str, list[WorkItem]],
    backend: Backend,
    journal: Journal | None,
    write_batches: Callable[[dict[str, pd.DataFrame]], None],
    *,
    retry_errors: bool = False,
    log: Callable[[str], None] = lambda line: None,
    progress_every_s: float = 5.0,
    seed: int | None = None,
) -> RunSummary:
    """Classify every item, journalling answers and writing each batch when it completes."""
    config_hash = cfg.config_hash
    summary = RunSummary(cfg.name, config_hash, batches=sorted(items_by_batch))
    stats = JournalStats()
    cached = journal.latest(stats) if journal is not None else {}
    summary.journal_corrupt_lines = stats.corrupt_lines
    if stats.corrupt_lines:
        log(
            f"journal: skipped {stats.corrupt_lines} torn or corrupt line(s) (a crash mid-write); those answers are asked again"
        )

    rows: dict[str, list[dict[str, Any]]] = {b: [] for b in items_by_batch}
    pending: dict[str, int] = {b: 0 for b in items_by_batch}
    queue: list[tuple[WorkItem, int]] = []
    for batch_id, items in items_by_batch.items():
        for item in items:
            summary.narratives += 1
            record = cached.get((item.incident_id, item.narrative_type, item.text_hash))
            if item.is_placeholder and cfg.run.skip_placeholders:
                summary.skipped += 1
                rows[batch_id].append(
                    result_row(
                        cfg, item, None, attempts=0, from_journal=False, classified_at=None, config_hash=config_hash
                    )
                )
                continue
            if record is not None:
                raw = RawResponse.from_dict(record["response"])
                row = result_row(
                    cfg,
                    item,
                    raw,
                    attempts=record.get("attempt", 1),
                    from_journal=True,
                    classified_at=record.get("at"),
                    config_hash=config_hash,
                )
                if not (retry_errors and row["status"] in ERROR_STATUSES):
                    summary.reused += 1
                    rows[batch_id].append(row)
                    continue
            queue.append((item, (record or {}).get("attempt", 0)))
            pending[batch_id] += 1

    write_queue: asyncio.Queue[str | None] = asyncio.Queue()
    finishing = asyncio.Event()

    async def writer() -> None:
        # Every batch completed while the previous write ran goes into the next transaction:
        # one DuckDB transaction costs tens of milliseconds whatever its size, so a fast
        # backend (rules, a quick server) would otherwise wait on writes. Each batch is still
        # replaced atomically; a group either lands whole or not at all.
        finished = False
        last_write = float("-inf")
        while not finished:
            group = [await write_queue.get()]
            # At most one transaction per WRITE_INTERVAL_S (answers are already journalled;
            # this only delays when they become visible in DuckDB).
            wait = WRITE_INTERVAL_S - (time.monotonic() - last_write)
            if wait > 0 and not finishing.is_set():
                try:  # the end of the run cuts the wait short: flush at once
                    await asyncio.wait_for(finishing.wait(), wait)
                except TimeoutError:
                    pass
            while not write_queue.empty():
                group.append(write_queue.get_nowait())
            if None in group:
                finished = True
                group = [b for b in group if b is not None]
            if not group:
                continue
            frames = {batch_id: rows_frame(rows[batch_id]) for batch_id in group}
            last_write = time.monotonic()
            try:
                await asyncio.to_thread(write_batches, frames)
                summary.written_batches.extend(group)
            except Exception as exc:  # e.g. disk full: the transaction rolled back, old rows stay
                for batch_id in group:
                    summary.failed_batches[batch_id] = (
                        f"writing the batch failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        "its previous rows are intact and its answers are journalled"
                    )

    writer_task = asyncio.create_task(writer())
    for batch_id in sorted(items_by_batch):
        if pending[batch_id] == 0:
            write_queue.put_nowait(batch_id)

    progress = Progress(total=len(queue), emit=log, every_s=progress_every_s)
    if queue:
        log(
            f"{cfg.name}: {summary.narratives:,} narratives in {len(items_by_batch)} batch(es): "
            f"{len(queue):,} to ask, {summary.reused:,} from the journal, {summary.skipped:,} placeholders skipped"
        )
    limiter = RateLimiter(cfg.run.requests_per_minute)
    rng = random.Random(seed)
    work: asyncio.Queue[tuple[WorkItem, int]] = asyncio.Queue()
    for entry in queue:
        work.put_nowait(entry)
    fatal: list[FatalError] = []

    async def call(item: WorkItem) -> RawResponse | None:
        for retry in range(cfg.run.max_retries + 1):
            await limiter.wait()
            summary.attempts += 1
            try:
                return await backend.complete(item.text)
            except TransientError as exc:
                summary.transient_errors += 1
                if retry == cfg.run.max_retries:
                    summary.failed_batches.setdefault(
                        item.batch_id, f"{item.incident_id}/{item.narrative_type}: {exc} after {retry + 1} attempts"
                    )
                    return None
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(retry + 1, rng)
                await asyncio.sleep(delay + rng.uniform(0, 0.1))
        return None

    async def worker() -> None:
        while True:
            try:
                item, previous = work.get_nowait()
            except asyncio.QueueEmpty:
                return
            raw = await call(item)
            if raw is None:
                progress.tick(ok=False)
            else:
                now = time.time()
                attempt = previous + 1
                if journal is not None and backend.journaled:
                    try:
                        journal.append(
                            {
                                "key": [item.incident_id, item.narrative_type],
                                "text_hash": item.text_hash,
                                "config_hash": config_hash,
                                "attempt": attempt,
                                "at": now,
                                "response": raw.to_dict(),
                            }
                        )
                    except OSError as exc:
                        # Without the journal a crash could lose paid answers: stop now.
                        raise FatalError(
                            f"cannot write the journal under {journal.root}: {exc}; free disk space and re-run "
                            "(answers journalled so far are kept)"
                        ) from None
                summary.calls_ok += 1
                summary.prompt_tokens += raw.prompt_tokens or 0
                summary.completion_tokens += raw.completion_tokens or 0
                rows[item.batch_id].append(
                    result_row(
                        cfg, item, raw, attempts=attempt, from_journal=False, classified_at=now, config_hash=config_hash
                    )
                )
                progress.tick(ok=True)
            pending[item.batch_id] -= 1
            if pending[item.batch_id] == 0 and item.batch_id not in summary.failed_batches:
                write_queue.put_nowait(item.batch_id)

    started = time.monotonic()
    workers = [asyncio.create_task(worker()) for _ in range(min(cfg.run.concurrency, max(len(queue), 1)))]
    try:
        # FatalError in any worker cancels the rest at once: no point asking 35,000 times
        # with a wrong key or model name.
        done, not_done = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if isinstance(exc, FatalError):
                fatal.append(exc)
            elif exc is not None:
                raise exc
        for task in not_done:
            task.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
    finally:
        summary.active_seconds = time.monotonic() - started
        write_queue.put_nowait(None)
        finishing.set()
        await writer_task
        await backend.aclose()
        if journal is not None:
            journal.close()
    if queue:
        progress.emit(progress.line())
    for batch_rows in rows.values():
        for row in batch_rows:
            summary.status_counts[row["status"]] = summary.status_counts.get(row["status"], 0) + 1
    if fatal:
        raise fatal[0]
    return summary


def classify_batches(
    cfg: ExperimentConfig,
    store: Store,
    batch_ids: list[str],
    *,
    journal_dir: Path,
    locks_dir: Path,
    retry_errors: bool = False,
    log: Callable[[str], None] = lambda line: None,
    progress_every_s: float = 5.0,
) -> RunSummary:
    """Classify the given batches of `narratives` for one experiment and write their rows.

    Raises:
        PartitionBusyError: another run holds one of the batches.
        FatalError: the endpoint refused in a way retrying cannot fix.
        ClassificationFailed: some batches failed after retries (the rest were written).
    """
    requested = sorted(set(batch_ids))
    # Batches already complete for this config and these texts are left alone (not locked,
    # not rewritten): a run over a range of partitions only works where work is missing.
    status = store.partition_status(cfg.name, cfg.config_hash).set_index("batch_id")
    complete = {
        b
        for b in requested
        if b in status.index
        and status.at[b, "current_rows"] == status.at[b, "narratives"]
        and not (retry_errors and status.at[b, "error_rows"] > 0)
    }
    batch_ids = [b for b in requested if b not in complete]
    if not batch_ids:
        summary = RunSummary(cfg.name, cfg.config_hash, batches=requested, up_to_date_batches=sorted(complete))
        log(f"{cfg.name}: all {len(requested)} batch(es) are up to date; nothing to ask")
        return summary
    with partition_locks(locks_dir, cfg.name, batch_ids):
        narratives = store.read_narratives(batch_ids)
        items = work_items(narratives)
        for batch_id in batch_ids:
            items.setdefault(batch_id, [])  # a batch whose narratives all left the file: write it empty
        backend = make_backend(cfg)
        journal = Journal.for_experiment(journal_dir, cfg.name, cfg.config_hash) if backend.journaled else None

        def write(frames: dict[str, pd.DataFrame]) -> None:
            store.replace_partitions(cfg.name, frames)

        summary = asyncio.run(
            run_engine(
                cfg,
                items,
                backend,
                journal,
                write,
                retry_errors=retry_errors,
                log=log,
                progress_every_s=progress_every_s,
            )
        )
        summary.up_to_date_batches = sorted(complete)
    if summary.failed_batches:
        detail = "; ".join(f"{b}: {why}" for b, why in sorted(summary.failed_batches.items())[:5])
        raise ClassificationFailed(
            f"{len(summary.failed_batches)} of {len(batch_ids)} batch(es) failed after retries and were not written "
            f"(their completed answers are journalled; re-run to resume): {detail}",
            summary,
        )
    return summary
