"""The engine: one run over many batches, and `classify_batches`, its entry point over a store.

`run_engine` reads the journal, plans the run (`plan.make_plan`), starts the batch writer,
and lets `run.concurrency` workers drain one queue of narratives to ask. Each answer is
journalled the moment it arrives, before anything else happens to it; the batch it completes
goes to the writer. A refusal of one request (HTTP 400/413/422) is an answer: a `rejected` row.
`classify_batches` first leaves alone the batches that are already complete
(`status.partition_state`), locks the others, and at the end raises `RunInterrupted` if the run
was asked to stop (SIGINT, SIGTERM, a Dagster termination: see `stopping`) or
`ClassificationFailed` if some batches could not be completed.

A row's `attempts` is every request made for its narrative text under this config, retries
included, summed across runs through the journal (`journal` module docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from narr_assets.classify.locks import partition_locks
from narr_assets.classify.plan import Plan, make_plan
from narr_assets.classify.progress import Progress
from narr_assets.classify.requests import Asked, Requester, run_workers
from narr_assets.classify.rows import WorkItem, result_row, work_items
from narr_assets.classify.stopping import RunInterrupted, StopControl
from narr_assets.classify.summary import RunSummary
from narr_assets.classify.writer import BatchWriter
from narr_assets.experiments import ExperimentConfig
from narr_assets.journal import Journal, JournalKey, JournalStats, answer_record, unanswered_record
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
    plan, the counts of successful calls and their tokens, and the narratives left without an
    answer (their attempts are journalled at the end so the count goes on in the next run).
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
        log: Callable[[str], None],
    ):
        self.cfg = cfg
        self.config_hash = config_hash
        self.requester = requester
        self.writer = writer
        self.journal = journal  # None when the backend's answers are not worth journalling
        self.progress = progress
        self.log = log
        self.rows = plan.rows
        self.pending = plan.pending
        self.work: asyncio.Queue[tuple[WorkItem, int]] = asyncio.Queue()
        for entry in plan.queue:
            self.work.put_nowait(entry)
        self.previous = {item.journal_key: previous for item, previous in plan.queue}
        self.calls_ok = self.prompt_tokens = self.completion_tokens = 0
        # Refusals held back until something is answered (see `_settle`).
        self.deferred: list[tuple[WorkItem, int, RawResponse]] = []
        # Narratives asked in this run without an answer: (item, attempts in this run, why).
        self.unanswered: list[tuple[WorkItem, int, str]] = []

    async def worker(self) -> None:
        """Ask queued narratives until the queue is empty or the run is asked to stop."""
        while not self.requester.stopping.is_set():
            try:
                item, previous = self.work.get_nowait()
            except asyncio.QueueEmpty:
                return
            asked = await self.requester.ask(item)
            self._settle(item, previous, asked)

    def _settle(self, item: WorkItem, previous: int, asked: Asked) -> None:
        if asked.raw is None:
            self.unanswered.append((item, asked.attempts, asked.reason or "no answer"))
            self.progress.tick(ok=False)
            self._done(item)  # its batch is failed or unfinished: never written
            return
        if asked.raw.rejected is not None and not self.requester.answered:
            # Until one request is answered, a refusal may be the experiment's (the same one for
            # every narrative: `REJECT_ALL_AFTER`); held back, it leaves no row and no journal
            # record behind if the run stops on it, so a fixed config asks these again.
            self.deferred.append((item, previous + asked.attempts, asked.raw))
            return
        self.flush_deferred()
        self._answer(item, previous + asked.attempts, asked.raw)

    def flush_deferred(self) -> None:
        """Keep the refusals held back: something was answered, or the run ended without a verdict on them."""
        deferred, self.deferred = self.deferred, []
        for item, attempts, raw in deferred:
            self._answer(item, attempts, raw)

    def _answer(self, item: WorkItem, attempts: int, raw: RawResponse) -> None:
        self._record(item, attempts, raw)
        self.progress.tick(ok=True)
        if raw.rejected is not None:
            self._log_refusal(item, raw.rejected)
        self._done(item)

    def _done(self, item: WorkItem) -> None:
        batch_id = item.batch_id
        self.pending[batch_id] -= 1
        blocked = batch_id in self.requester.failures or batch_id in self.requester.unfinished
        if self.pending[batch_id] == 0 and not blocked:
            self.writer.submit(batch_id)

    def _log_refusal(self, item: WorkItem, refusal: str) -> None:
        # The status and code only ("HTTP 400 (context_length_exceeded)"): the server's message
        # is in the row's `error`, redacted, and stays out of the logs in case it quotes the input.
        refused = self.requester.rejected
        if refused <= _REFUSALS_LOGGED:
            self.log(
                f"{self.cfg.name}: {item.incident_id}/{item.narrative_type} (batch {item.batch_id}) refused by the "
                f"server: {refusal.split(':', 1)[0]}; kept as status rejected"
                + (" (further refusals are counted, not logged)" if refused == _REFUSALS_LOGGED else "")
            )

    def _record(self, item: WorkItem, attempt: int, raw: RawResponse) -> None:
        now = time.time()
        if self.journal is not None:
            self._journal(self.journal, answer_record(item.journal_key, self.config_hash, attempt, now, raw.to_dict()))
        if raw.rejected is None:
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

    def journal_unanswered(self, fatal: bool) -> None:
        """Journal the attempts made for narratives left without an answer, so counting goes on.

        Besides those that gave up, that is the requests a FatalError cancelled mid-flight and,
        on a FatalError, the refusals held back.
        """
        left = list(self.unanswered)
        left += [(item, attempts, "cancelled: the run stopped") for item, attempts in self.requester.in_flight.values()]
        if fatal:
            left += [
                (item, attempts - self.previous[item.journal_key], "refused like every request")
                for item, attempts, _ in self.deferred
            ]
        if self.journal is None:
            return
        now = time.time()
        for item, attempts, reason in left:
            if attempts > 0:  # a narrative never sent has nothing new to count
                total = self.previous[item.journal_key] + attempts
                self._journal(self.journal, unanswered_record(item.journal_key, self.config_hash, total, now, reason))

    def _journal(self, journal: Journal, record: dict[str, Any]) -> None:
        try:
            journal.append(record)
        except OSError as exc:
            # Without the journal a crash could lose paid answers: stop now.
            raise FatalError(
                f"cannot write the journal under {journal.root}: {exc}; free disk space and re-run "
                "(answers journalled so far are kept)"
            ) from None


# Refusals logged one by one; past this many, only counted (the summary has them all).
_REFUSALS_LOGGED = 10


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
    summary.rejected = requester.rejected
    summary.written_batches.extend(writer.written)
    summary.failed_batches.update(requester.failures)
    summary.failed_batches.update(writer.failures)
    for batch_rows in answers.rows.values():
        for row in batch_rows:
            summary.status_counts[row["status"]] = summary.status_counts.get(row["status"], 0) + 1


def _endpoint(cfg: ExperimentConfig) -> str:
    """How errors name the endpoint: the experiment file and the base URL (never a key)."""
    return f"{cfg.source_file}: endpoint {cfg.model.base_url}" if cfg.backend == "openai" else cfg.source_file


def _start_line(cfg: ExperimentConfig, plan: Plan, batches: int) -> str:
    line = (
        f"{cfg.name}: {plan.narratives:,} narratives in {batches} batch(es): {len(plan.queue):,} "
        f"to ask, {plan.reused:,} from the journal, {plan.skipped:,} placeholders skipped"
    )
    return line + (f", {plan.not_sent:,} not sent (longer than run.max_input_chars)" if plan.not_sent else "")


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
    stop_on_signals: bool = False,
    should_stop: Callable[[], str | None] | None = None,
) -> RunSummary:
    """Classify every item, journalling answers and writing each batch when it completes.

    With `stop_on_signals` (main thread only), SIGINT and SIGTERM stop the run gracefully, as
    does `should_stop` returning a reason (polled every second, in a thread); the summary's
    `stopped` then says why (see `stopping`). Closes `backend` and `journal` when done.
    Raises the first FatalError of the run, after every completed batch is written.
    """
    summary = RunSummary(cfg.name, cfg.config_hash, batches=sorted(items_by_batch))
    records = _journalled(journal, summary, log)
    plan = make_plan(cfg, items_by_batch, records, retry_errors=retry_errors, config_hash=summary.config_hash)
    summary.narratives, summary.reused, summary.skipped = plan.narratives, plan.reused, plan.skipped
    summary.not_sent = plan.not_sent
    writer = BatchWriter(write_batches, plan.rows)
    writer.start()
    for batch_id in plan.ready:
        writer.submit(batch_id)
    progress = Progress(total=len(plan.queue), emit=log, every_s=progress_every_s)
    if plan.queue:
        log(_start_line(cfg, plan, len(items_by_batch)))
    stop = StopControl(log, in_flight=lambda: len(requester.in_flight))
    requester = Requester(backend, cfg.run, random.Random(seed), endpoint=_endpoint(cfg), stopping=stop.stopping)
    answers = _Answers(
        cfg, plan, requester, writer, journal if backend.journaled else None, progress, summary.config_hash, log
    )
    watchers = [requester.watch_endpoint(), *([stop.poll(should_stop)] if should_stop else [])]
    started = time.monotonic()
    # The handlers stay until the last batch is written: a signal must never land mid-write.
    with stop.on_signals() if stop_on_signals else contextlib.nullcontext():
        try:
            workers = min(cfg.run.concurrency, max(len(plan.queue), 1))
            fatal = await run_workers(answers.worker, workers, watchers, abort=stop.abort)
            if not fatal:
                answers.flush_deferred()
            answers.journal_unanswered(fatal=bool(fatal))
        finally:
            summary.active_seconds = time.monotonic() - started
            await writer.finish()
            await backend.aclose()
            if journal is not None:
                journal.close()
    if plan.queue:
        progress.emit(progress.line())
    _finish_summary(summary, answers, requester, writer)
    summary.stopped = stop.reason
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
    should_stop: Callable[[], str | None] | None = None,
) -> RunSummary:
    """Classify the given batches of `narratives` for one experiment and write their rows.

    SIGINT and SIGTERM (when called on the main thread), or `should_stop` returning a reason,
    stop the run gracefully: nothing new is sent, the requests in flight are journalled, the
    complete batches written, then `RunInterrupted` is raised (see `stopping`).

    Raises:
        PartitionBusyError: another run holds one of the batches.
        FatalError: the endpoint refused in a way retrying cannot fix, or never answered.
        RunInterrupted: the run was asked to stop; its message says what was kept.
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
        summary = _classify_locked(cfg, store, to_run, journal_dir, retry_errors, log, progress_every_s, should_stop)
        summary.up_to_date_batches = up_to_date
    if summary.stopped:
        raise RunInterrupted(_interrupted_line(cfg, summary, len(to_run)), summary)
    if summary.failed_batches:
        detail = "; ".join(f"{b}: {why}" for b, why in sorted(summary.failed_batches.items())[:5])
        raise ClassificationFailed(
            f"{len(summary.failed_batches)} of {len(to_run)} batch(es) failed after retries and were not written "
            f"(their completed answers are journalled; re-run to resume): {detail}",
            summary,
        )
    return summary


def _interrupted_line(cfg: ExperimentConfig, summary: RunSummary, batches: int) -> str:
    """One line: why the run stopped, what it kept, how to resume."""
    kept = summary.calls_ok + summary.rejected
    left = batches - len(summary.written_batches)
    failed = f" ({len(summary.failed_batches)} of them failed after retries)" if summary.failed_batches else ""
    return (
        f"{cfg.name}: stopped ({summary.stopped}): {kept:,} answer(s) of this run journalled, "
        f"{len(summary.written_batches)} complete batch(es) written, {left} left to do{failed}; resume with "
        f"`narr run {cfg.name}` (or materialise the missing partitions): journalled answers are not asked again"
    )


def _classify_locked(
    cfg: ExperimentConfig,
    store: Store,
    batch_ids: list[str],
    journal_dir: Path,
    retry_errors: bool,
    log: Callable[[str], None],
    progress_every_s: float,
    should_stop: Callable[[], str | None] | None,
) -> RunSummary:
    """Run the engine over `batch_ids`, whose locks the caller holds."""
    items = work_items(store.read_narratives(batch_ids))
    for batch_id in batch_ids:
        items.setdefault(batch_id, [])  # a batch whose narratives all left the file: write it empty
    if cfg.backend == "imported":
        # The answers are already in the R system's database: nothing to ask or journal.
        from narr_assets.legacy import classify_imported  # legacy imports classify.rows: not at the top

        return classify_imported(cfg, items, lambda frames: store.replace_partitions(cfg.name, frames), log)
    backend = make_backend(cfg)
    journal = Journal.for_experiment(journal_dir, cfg.name, cfg.config_hash) if backend.journaled else None

    def write(frames: dict[str, pd.DataFrame]) -> None:
        store.replace_partitions(cfg.name, frames)

    return asyncio.run(
        run_engine(
            cfg,
            items,
            backend,
            journal,
            write,
            retry_errors=retry_errors,
            log=log,
            progress_every_s=progress_every_s,
            stop_on_signals=True,
            should_stop=should_stop,
        )
    )
