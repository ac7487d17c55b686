"""The engine: one run over many batches, and `classify_batches`, its entry point over a store.

`run_engine` reads the journal, plans the run (`plan.make_plan`), starts the batch writer,
and lets `run.concurrency` workers drain one queue of narratives to ask. Each answer is
journalled the moment it arrives, before anything else happens to it; the batch it completes
goes to the writer. `classify_batches` first leaves alone the batches that are already
complete (`status.partition_state`), locks the others, and raises `ClassificationFailed` at the
end if some batches could not be completed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from narr_assets.classify.locks import partition_locks
from narr_assets.classify.plan import Plan, make_plan
from narr_assets.classify.progress import Progress
from narr_assets.classify.requests import Requester, run_workers
from narr_assets.classify.rows import WorkItem, result_row, work_items
from narr_assets.classify.summary import RunSummary
from narr_assets.classify.writer import BatchWriter
from narr_assets.experiments import ExperimentConfig
from narr_assets.journal import Journal, JournalKey, JournalStats, answer_record
from narr_assets.llm import Backend, FatalError, RawResponse, make_backend
from narr_assets.status import partition_state
from narr_assets.store import Store


class ClassificationFailed(RuntimeError):
    """Some batches could not be completed; the others were written."""

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary


class _Answers:
    """Where an asked narrative ends up: journalled, made a row, its batch handed to the writer.

    Holds what the workers of one run share: the rows and pending counts taken over from the
    plan, and the counts of successful calls and their tokens.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        plan: Plan,
        requester: Requester,
        writer: BatchWriter,
        journal: Journal | None,
        progress: Progress,
        config_hash: str,
    ):
        self.cfg = cfg
        self.config_hash = config_hash
        self.requester = requester
        self.writer = writer
        self.journal = journal  # None when the backend's answers are not worth journalling
        self.progress = progress
        self.rows = plan.rows
        self.pending = plan.pending
        self.work: asyncio.Queue[tuple[WorkItem, int]] = asyncio.Queue()
        for entry in plan.queue:
            self.work.put_nowait(entry)
        self.calls_ok = self.prompt_tokens = self.completion_tokens = 0

    async def worker(self) -> None:
        """Ask queued narratives until the queue is empty."""
        while True:
            try:
                item, previous = self.work.get_nowait()
            except asyncio.QueueEmpty:
                return
            raw = await self.requester.ask(item)
            if raw is None:
                self.progress.tick(ok=False)
            else:
                self._record(item, previous + 1, raw)
                self.progress.tick(ok=True)
            self.pending[item.batch_id] -= 1
            if self.pending[item.batch_id] == 0 and item.batch_id not in self.requester.failures:
                self.writer.submit(item.batch_id)

    def _record(self, item: WorkItem, attempt: int, raw: RawResponse) -> None:
        now = time.time()
        if self.journal is not None:
            self._journal(self.journal, item.journal_key, attempt, now, raw)
        self.calls_ok += 1
        self.prompt_tokens += raw.prompt_tokens or 0
        self.completion_tokens += raw.completion_tokens or 0
        self.rows[item.batch_id].append(
            result_row(
                self.cfg,
                item,
                raw,
                attempts=attempt,
                from_journal=False,
                classified_at=now,
                config_hash=self.config_hash,
            )
        )

    def _journal(self, journal: Journal, key: JournalKey, attempt: int, at: float, raw: RawResponse) -> None:
        try:
            journal.append(answer_record(key, self.config_hash, attempt, at, raw.to_dict()))
        except OSError as exc:
            # Without the journal a crash could lose paid answers: stop now.
            raise FatalError(
                f"cannot write the journal under {journal.root}: {exc}; free disk space and re-run "
                "(answers journalled so far are kept)"
            ) from None


def _journalled(journal: Journal | None, summary: RunSummary, log: Callable[[str], None]) -> dict[JournalKey, Any]:
    """The journal's newest answer per narrative text; torn lines are counted and reported."""
    if journal is None:
        return {}
    stats = JournalStats()
    records = journal.latest(stats)
    summary.journal_corrupt_lines = stats.corrupt_lines
    if stats.corrupt_lines:
        log(
            f"journal: skipped {stats.corrupt_lines} torn or corrupt line(s) (a crash mid-write); "
            "those answers are asked again"
        )
    return records


def _finish_summary(summary: RunSummary, answers: _Answers, requester: Requester, writer: BatchWriter) -> None:
    """Fold the counts of the run's parts into its summary."""
    summary.calls_ok = answers.calls_ok
    summary.prompt_tokens, summary.completion_tokens = answers.prompt_tokens, answers.completion_tokens
    summary.attempts, summary.transient_errors = requester.attempts, requester.transient_errors
    summary.written_batches.extend(writer.written)
    summary.failed_batches.update(requester.failures)
    summary.failed_batches.update(writer.failures)
    for batch_rows in answers.rows.values():
        for row in batch_rows:
            summary.status_counts[row["status"]] = summary.status_counts.get(row["status"], 0) + 1


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
    """Classify every item, journalling answers and writing each batch when it completes.

    Closes `backend` and `journal` when done. Raises the first FatalError of the run, after
    every completed batch is written.
    """
    summary = RunSummary(cfg.name, cfg.config_hash, batches=sorted(items_by_batch))
    records = _journalled(journal, summary, log)
    plan = make_plan(cfg, items_by_batch, records, retry_errors=retry_errors, config_hash=summary.config_hash)
    summary.narratives, summary.reused, summary.skipped = plan.narratives, plan.reused, plan.skipped
    writer = BatchWriter(write_batches, plan.rows)
    writer.start()
    for batch_id in plan.ready:
        writer.submit(batch_id)
    progress = Progress(total=len(plan.queue), emit=log, every_s=progress_every_s)
    if plan.queue:
        log(
            f"{cfg.name}: {plan.narratives:,} narratives in {len(items_by_batch)} batch(es): {len(plan.queue):,} "
            f"to ask, {plan.reused:,} from the journal, {plan.skipped:,} placeholders skipped"
        )
    requester = Requester(backend, cfg.run, random.Random(seed))
    answers = _Answers(
        cfg, plan, requester, writer, journal if backend.journaled else None, progress, summary.config_hash
    )
    started = time.monotonic()
    try:
        fatal = await run_workers(answers.worker, min(cfg.run.concurrency, max(len(plan.queue), 1)))
    finally:
        summary.active_seconds = time.monotonic() - started
        await writer.finish()
        await backend.aclose()
        if journal is not None:
            journal.close()
    if plan.queue:
        progress.emit(progress.line())
    _finish_summary(summary, answers, requester, writer)
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
    up_to_date = sorted(set(requested) & set(partition_state(store, cfg).up_to_date(retry_errors)))
    to_run = [b for b in requested if b not in up_to_date]
    if not to_run:
        log(f"{cfg.name}: all {len(requested)} batch(es) are up to date; nothing to ask")
        return RunSummary(cfg.name, cfg.config_hash, batches=requested, up_to_date_batches=up_to_date)
    with partition_locks(locks_dir, cfg.name, to_run):
        summary = _classify_locked(cfg, store, to_run, journal_dir, retry_errors, log, progress_every_s)
        summary.up_to_date_batches = up_to_date
    if summary.failed_batches:
        detail = "; ".join(f"{b}: {why}" for b, why in sorted(summary.failed_batches.items())[:5])
        raise ClassificationFailed(
            f"{len(summary.failed_batches)} of {len(to_run)} batch(es) failed after retries and were not written "
            f"(their completed answers are journalled; re-run to resume): {detail}",
            summary,
        )
    return summary


def _classify_locked(
    cfg: ExperimentConfig,
    store: Store,
    batch_ids: list[str],
    journal_dir: Path,
    retry_errors: bool,
    log: Callable[[str], None],
    progress_every_s: float,
) -> RunSummary:
    """Run the engine over `batch_ids`, whose locks the caller holds."""
    items = work_items(store.read_narratives(batch_ids))
    for batch_id in batch_ids:
        items.setdefault(batch_id, [])  # a batch whose narratives all left the file: write it empty
    backend = make_backend(cfg)
    journal = Journal.for_experiment(journal_dir, cfg.name, cfg.config_hash) if backend.journaled else None

    def write(frames: dict[str, pd.DataFrame]) -> None:
        store.replace_partitions(cfg.name, frames)

    return asyncio.run(
        run_engine(
            cfg, items, backend, journal, write, retry_errors=retry_errors, log=log, progress_every_s=progress_every_s
        )
    )
