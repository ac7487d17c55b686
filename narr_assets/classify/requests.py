"""Asking the backend: pacing, retries with backoff, and the pool of workers.

Every attempt goes through one `RateLimiter` shared by all workers of a run, and is counted,
per run and per narrative. A `TransientError` (429, 5xx, timeout, dropped connection) is
retried after the server's `Retry-After` or an exponential backoff with full jitter, up to
`run.max_retries` times; then the narrative gives up and its batch is marked failed. A
`RejectedError` (the server refused this one request) is an answer: a `rejected` row. A
`FatalError` (bad key, unknown model) is not retried: it stops every worker at once.

Two rules stop a run that cannot get anywhere, both only while nothing has been answered yet
(after the first answer, an outage is ridden out with backoff):

- a dead endpoint: every request for `DEAD_ENDPOINT_AFTER_S` since the first failure failed to
  connect or timed out (or met a gateway's 502/503/504) - FatalError naming the endpoint;
- a refused request: the first `REJECT_ALL_AFTER` narratives asked were all refused with the
  same error - the request is wrong (e.g. `response_format`), not the narratives.

A run asked to stop (`stopping`) sends nothing new: a narrative waiting for a retry gives up
at once, and a request in flight is waited for (its timeout bounds the wait) but not retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from narr_assets.classify.rows import WorkItem
from narr_assets.experiments import RunSpec
from narr_assets.journal import JournalKey
from narr_assets.llm import Backend, FatalError, RawResponse, RejectedError, TransientError

# With nothing answered yet, this long of connection failures and timeouts means the endpoint
# is dead: stop, rather than back off through every narrative of the file (hours, for 35,000).
DEAD_ENDPOINT_AFTER_S = 30.0
# With nothing answered yet, this many narratives refused with the same error means the
# request is refused (a parameter the server rejects), not these narratives.
REJECT_ALL_AFTER = 5


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
class Asked:
    """What asking one narrative came to in this run."""

    # The answer - the server's refusal of the request included (`raw.rejected`) - or None.
    raw: RawResponse | None
    # Requests made for it in this run, retries included.
    attempts: int
    # Why there is no answer (None when there is one); never narrative text.
    reason: str | None = None


class Requester:
    """One run's calls to the backend, with the counts the run summary reports.

    Args:
        backend: Where requests go.
        run: The experiment's run settings (retries, rate limit).
        rng: Jitter of the backoff.
        endpoint: How errors name the endpoint (the experiment file and base URL, never a key).
        stopping: Set when the run is asked to stop (see module docstring).
        dead_after_s: The dead-endpoint window (default `DEAD_ENDPOINT_AFTER_S`).
    """

    def __init__(
        self,
        backend: Backend,
        run: RunSpec,
        rng: random.Random,
        *,
        endpoint: str = "the endpoint",
        stopping: asyncio.Event | None = None,
        dead_after_s: float | None = None,
    ):
        self.backend = backend
        self.max_retries = run.max_retries
        self.limiter = RateLimiter(run.requests_per_minute)
        self.rng = rng
        self.endpoint = endpoint
        self.stopping = stopping if stopping is not None else asyncio.Event()
        # Read at call time, so a test can shorten the window.
        self.dead_after_s = DEAD_ENDPOINT_AFTER_S if dead_after_s is None else dead_after_s
        self.attempts = 0
        self.transient_errors = 0
        self.answered = 0  # answers (HTTP 200)
        self.rejected = 0  # refusals of one request (HTTP 400/413/422)
        # batch_id -> why its first narrative gave up; such a batch is never written.
        self.failures: dict[str, str] = {}
        # Batches with a narrative left unanswered because the run was asked to stop.
        self.unfinished: set[str] = set()
        # Narratives being asked, with the requests made so far: what is left here when a
        # worker is cancelled (a FatalError elsewhere) was asked and never answered.
        self.in_flight: dict[JournalKey, tuple[WorkItem, int]] = {}
        self._first_unreachable: float | None = None
        self._unreachable = 0
        self._last_unreachable = ""
        self._refusals: list[str] = []  # signatures of the refusals before the first answer

    @property
    def reached(self) -> bool:
        """Whether the server has answered anything in this run (a refusal is an answer too)."""
        return self.answered + self.rejected > 0

    async def ask(self, item: WorkItem) -> Asked:
        """The item's answer, or no answer once its transient errors outlast the retries or the run stops.

        Raises:
            FatalError: the backend's, or one of the two rules of the module docstring.
        """
        self.in_flight[item.journal_key] = (item, 0)
        asked = await self._ask(item)
        del self.in_flight[item.journal_key]  # not on an exception: then it stays unanswered
        return asked

    async def _ask(self, item: WorkItem) -> Asked:
        attempts = 0
        for retry in range(self.max_retries + 1):
            if not self.stopping.is_set():
                await self.limiter.wait()
            if self.stopping.is_set():
                return self._stopped(item, attempts)
            attempts += 1
            self.attempts += 1
            self.in_flight[item.journal_key] = (item, attempts)
            try:
                raw = await self.backend.complete(item.text)
            except RejectedError as exc:
                return Asked(self._refusal(exc), attempts)
            except TransientError as exc:
                self._failed(exc)
                if retry == self.max_retries:
                    self.failures.setdefault(
                        item.batch_id, f"{item.incident_id}/{item.narrative_type}: {exc} after {attempts} attempts"
                    )
                    return Asked(None, attempts, str(exc))
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(retry + 1, self.rng)
                # A little jitter even after a Retry-After, so the workers do not return in lockstep.
                if await self._stopped_while_waiting(delay + self.rng.uniform(0, 0.1)):
                    return self._stopped(item, attempts)
                continue
            self.answered += 1
            return Asked(raw, attempts)
        raise AssertionError("unreachable: the last retry returns")  # pragma: no cover

    def _stopped(self, item: WorkItem, attempts: int) -> Asked:
        self.unfinished.add(item.batch_id)
        return Asked(None, attempts, "the run stopped before an answer")

    async def _stopped_while_waiting(self, delay: float) -> bool:
        """Sleep `delay` seconds, or less if the run is asked to stop; whether it was."""
        try:
            await asyncio.wait_for(self.stopping.wait(), delay)
        except TimeoutError:
            return False
        return True

    def _refusal(self, exc: RejectedError) -> RawResponse:
        """The refusal as an answer, unless every narrative so far got it (then FatalError)."""
        if not self.answered:
            self._refusals.append(exc.signature)
            if len(self._refusals) >= REJECT_ALL_AFTER and len(set(self._refusals)) == 1:
                raise exc.experiment_wide(len(self._refusals))
        self.rejected += 1
        return RawResponse(content=None, rejected=str(exc))

    def _failed(self, exc: TransientError) -> None:
        self.transient_errors += 1
        if exc.unreachable and not self.reached:
            if self._first_unreachable is None:
                self._first_unreachable = time.monotonic()
            self._unreachable += 1
            self._last_unreachable = str(exc)
            self.check_endpoint()

    def check_endpoint(self) -> None:
        """Raise FatalError once the endpoint counts as dead (see module docstring)."""
        if self.reached or self._first_unreachable is None:
            return
        elapsed = time.monotonic() - self._first_unreachable
        if elapsed >= self.dead_after_s:
            raise FatalError(
                f"{self.endpoint}: no answer from the server: {self._unreachable} request(s) failed over "
                f"{elapsed:.0f} s ({self._last_unreachable}) and none was answered; check that the server is "
                "running and that model.base_url is right, then re-run (journalled answers and written "
                "batches are kept)"
            )

    async def watch_endpoint(self) -> None:
        """Check the endpoint while every worker waits (on a hung request or a backoff)."""
        while True:
            await asyncio.sleep(min(1.0, self.dead_after_s / 4))
            self.check_endpoint()


async def run_workers(
    worker: Callable[[], Coroutine[Any, Any, None]],
    count: int,
    watchers: Iterable[Coroutine[Any, Any, None]] = (),
    abort: asyncio.Event | None = None,
) -> list[FatalError]:
    """Run `count` copies of `worker` until all return; the FatalErrors that stopped them.

    A FatalError in any worker or watcher cancels the rest at once: no point asking 35,000
    times with a wrong key or model name. `watchers` run beside the workers and are cancelled
    when the last worker returns; `abort`, once set, cancels every worker (requests in flight
    included). Any other exception propagates.
    """
    workers = {asyncio.create_task(worker()) for _ in range(count)}
    pending = workers | {asyncio.create_task(w) for w in watchers}
    if abort is not None:
        pending.add(asyncio.create_task(_cancel_on(abort, workers)))
    fatal: list[FatalError] = []
    try:
        while pending & workers and not fatal:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, FatalError):
                    fatal.append(exc)
                elif exc is not None:
                    raise exc
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return fatal


async def _cancel_on(event: asyncio.Event, tasks: set[asyncio.Task[None]]) -> None:
    await event.wait()
    for task in tasks:
        task.cancel()
