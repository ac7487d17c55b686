"""Progress lines of a run: counts, rate and ETA of this run's calls.

Only calls of this run count (not answers re-used from the journal, not earlier runs, not
downtime), so the rate and ETA describe the work still to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
        """Count one finished call; emit a line at most every `every_s` seconds."""
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
    """`1h02m03s`, or `2m03s` under an hour."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
