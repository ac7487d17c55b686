"""The batch writer: the one task of a run that writes completed batches to DuckDB.

A batch is submitted once its last narrative is answered (or at once if nothing was left to
ask). Every batch completed while the previous write ran goes into the next transaction: one
DuckDB transaction costs tens of milliseconds whatever its size (connect, checkpoint on
close: ~45 ms quiet, 150 ms loaded), so a fast backend (rules, a quick server) would otherwise
wait on writes. Each batch is still replaced atomically; a group either lands whole or not at
all. A group whose write fails (e.g. disk full) rolls back: its batches keep their previous
rows, are recorded in `failures`, and the run goes on - their answers are journalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from narr_assets.classify.rows import rows_frame

# Batches finished within this interval share one transaction.
WRITE_INTERVAL_S = 2.0


class BatchWriter:
    """Writes submitted batches from `rows`, at most one transaction per `interval_s`."""

    def __init__(
        self,
        write_batches: Callable[[dict[str, pd.DataFrame]], None],
        rows: dict[str, list[dict[str, Any]]],
        interval_s: float = WRITE_INTERVAL_S,
    ):
        self._write_batches = write_batches
        self._rows = rows
        self._interval_s = interval_s
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()  # None: the run is over
        self._finishing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written: list[str] = []
        self.failures: dict[str, str] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def submit(self, batch_id: str) -> None:
        """Queue a batch whose rows are all in `rows`."""
        self._queue.put_nowait(batch_id)

    async def finish(self) -> None:
        """Write whatever is queued at once (no waiting out the interval) and stop."""
        self._queue.put_nowait(None)
        self._finishing.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        finished = False
        last_write = float("-inf")
        while not finished:
            group, finished = await self._next_group(last_write)
            if group:
                frames = {batch_id: rows_frame(self._rows[batch_id]) for batch_id in group}
                last_write = time.monotonic()
                await self._write(frames)

    async def _next_group(self, last_write: float) -> tuple[list[str], bool]:
        """The batches of the next transaction, and whether the run is over."""
        entries = [await self._queue.get()]
        # At most one transaction per interval (answers are already journalled; this only
        # delays when they become visible in DuckDB). The end of the run cuts the wait short.
        wait = self._interval_s - (time.monotonic() - last_write)
        if wait > 0 and not self._finishing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finishing.wait(), wait)
        while not self._queue.empty():
            entries.append(self._queue.get_nowait())
        group = [batch_id for batch_id in entries if batch_id is not None]
        return group, len(group) < len(entries)

    async def _write(self, frames: dict[str, pd.DataFrame]) -> None:
        try:
            await asyncio.to_thread(self._write_batches, frames)
            self.written.extend(frames)
        except Exception as exc:  # e.g. disk full: the transaction rolled back, old rows stay
            lines = str(exc).strip().splitlines()  # none at all for e.g. a bare OSError()
            cause = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
            for batch_id in frames:
                self.failures[batch_id] = (
                    f"writing the batch failed ({cause}); its previous rows are intact and its answers are journalled"
                )
