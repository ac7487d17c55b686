"""Stopping a run without paying for anything twice: on SIGINT, SIGTERM or a caller's request.

A stop request (the first Ctrl-C, a SIGTERM, or `should_stop` returning a reason - e.g. a
Dagster run termination) sets `stopping`: the workers take no new narrative, a narrative waiting
for a retry gives up, and the requests in flight are waited for (each bounded by
`run.timeout_s`) and journalled. The engine then writes every complete batch and the caller
raises `RunInterrupted` with one line saying what was kept and how to resume. A second request
from the same source - a second signal, or a forced termination after a termination request -
sets `abort`: the requests in flight are abandoned too (whatever they would have answered is
paid and lost), and complete batches are still written. Requests from different sources do not
add up: Dagster terminates a run it launched both by marking it CANCELING (seen by
`should_stop`) and by a SIGINT, and that is one request to stop, not two.

The signal handlers are installed only on the main thread (Python delivers signals there) and
only while the engine runs; the previous handlers - Dagster's, which raise
`DagsterExecutionInterruptedError`, or Python's default - are restored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from narr_assets.classify.summary import RunSummary


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on request after journalling its answers; `str()` says how to resume.

    A KeyboardInterrupt, so Dagster treats it as the interruption it is (the run is canceled,
    not failed, when a termination was requested) and nothing catches it as an ordinary error.
    """

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary


class StopControl:
    """Why and how urgently one run was asked to stop."""

    def __init__(self, log: Callable[[str], None], in_flight: Callable[[], int] = lambda: 0):
        self.stopping = asyncio.Event()  # take no new work; finish what is in flight
        self.abort = asyncio.Event()  # abandon what is in flight too
        self.reason: str | None = None
        self._log = log
        self._in_flight = in_flight
        self._asked: dict[str, int] = {}  # requests per source

    def request(self, reason: str, source: str = "signal") -> None:
        """Ask the run to stop; asked again by the same `source` (a second Ctrl-C), stop at once."""
        self._asked[source] = self._asked.get(source, 0) + 1
        if self.reason is None:
            self.reason = reason
            self.stopping.set()
            self._log(
                f"stopping ({reason}): no new requests; waiting for the {self._in_flight()} in flight (each at "
                "most run.timeout_s), then writing the complete batches; signal again to stop at once"
            )
        elif self._asked[source] > 1 and not self.abort.is_set():
            self.abort.set()
            self._log(
                f"stopping at once ({reason}): requests in flight are abandoned; the complete batches are still written"
            )

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to `request` while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals only reach the main thread; a caller on another thread stops via should_stop
            return
        loop = asyncio.get_running_loop()
        previous: dict[signal.Signals, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self.request, sig.name)
            yield
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)  # resets to Python's default; put back what was there
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    async def poll(self, should_stop: Callable[[], str | None], every_s: float = 1.0) -> None:
        """Call `should_stop` (in a thread: it may query a database) every `every_s` seconds.

        A reason asks the run to stop; a different reason later (a forced termination after a
        termination request) asks again, which stops it at once.
        """
        last: str | None = None
        while not self.abort.is_set():
            reason = await asyncio.to_thread(should_stop)
            if reason and reason != last:
                last = reason
                self.request(reason, source="poll")
            await asyncio.sleep(every_s)
