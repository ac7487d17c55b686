"""Asking the backend: pacing, retries with backoff, and the pool of workers.

Every attempt goes through one `RateLimiter` shared by all workers of a run, and is counted.
A `TransientError` (429, 5xx, timeout, dropped connection) is retried after the server's
`Retry-After` or an exponential backoff with full jitter, up to `run.max_retries` times; then
the narrative gives up and its batch is marked failed. A `FatalError` (bad key, unknown model)
is not retried: it stops every worker at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from narr_assets.classify.rows import WorkItem
from narr_assets.experiments import RunSpec
from narr_assets.llm import Backend, FatalError, RawResponse, TransientError


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


class Requester:
    """One run's calls to the backend, with the counts the run summary reports."""

    def __init__(self, backend: Backend, run: RunSpec, rng: random.Random):
        self.backend = backend
        self.max_retries = run.max_retries
        self.limiter = RateLimiter(run.requests_per_minute)
        self.rng = rng
        self.attempts = 0
        self.transient_errors = 0
        # batch_id -> why its first narrative gave up; such a batch is never written.
        self.failures: dict[str, str] = {}

    async def ask(self, item: WorkItem) -> RawResponse | None:
        """The item's answer, or None once its transient errors outlast the retries."""
        for retry in range(self.max_retries + 1):
            await self.limiter.wait()
            self.attempts += 1
            try:
                return await self.backend.complete(item.text)
            except TransientError as exc:
                self.transient_errors += 1
                if retry == self.max_retries:
                    self.failures.setdefault(
                        item.batch_id, f"{item.incident_id}/{item.narrative_type}: {exc} after {retry + 1} attempts"
                    )
                    return None
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(retry + 1, self.rng)
                # A little jitter even after a Retry-After, so the workers do not return in lockstep.
                await asyncio.sleep(delay + self.rng.uniform(0, 0.1))
        return None


async def run_workers(worker: Callable[[], Coroutine[Any, Any, None]], count: int) -> list[FatalError]:
    """Run `count` copies of `worker` until all return; the FatalErrors that stopped them.

    A FatalError in any worker cancels the rest at once: no point asking 35,000 times with a
    wrong key or model name. Any other exception propagates.
    """
    tasks = [asyncio.create_task(worker()) for _ in range(count)]
    done, not_done = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    fatal: list[FatalError] = []
    for task in done:
        exc = task.exception()
        if isinstance(exc, FatalError):
            fatal.append(exc)
        elif exc is not None:
            raise exc
    for task in not_done:
        task.cancel()
    await asyncio.gather(*not_done, return_exceptions=True)
    return fatal
