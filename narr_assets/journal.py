"""The journal: every completed model response, durable the moment it arrives.

Layout: `<journal_dir>/<experiment>/<config_hash>/<segment>.jsonl`. Each writing process
appends to a segment of its own, so parallel runs never interleave bytes in one file and no
lock is needed; readers merge all segments. One record is one line written with a single
`os.write` on an `O_APPEND` descriptor: once `append` returns, the record is in the kernel and
survives `kill -9` of the process. A background thread calls `fsync` every `fsync_interval_s`
seconds while there is something new, and `close` calls it once more; this bounds what a power
cut (not a process kill) can lose without making the event loop wait on a disk flush per
response.

Records hold the raw response (content, reasoning, finish reason, usage), never parsed
fields, so a parser change re-parses old answers without new calls. A torn last line (the
process died inside a write, or the disk filled) is detected, counted and skipped.

`attempt` counts every request made for a narrative text under this config, across runs. A
run that ends without an answer for a text it asked (retries exhausted, stopped, endpoint
dead) journals an *unanswered* record (`response` null) carrying its count, so the next run
keeps counting from there; only a `kill -9` loses the count of the requests it had in flight.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from narr_assets.private import open_private, private_dir

JournalKey = tuple[str, str, str]  # (incident_id, narrative_type, text_hash)


def answer_record(
    key: JournalKey, config_hash: str, attempt: int, at: float, response: dict[str, Any]
) -> dict[str, Any]:
    """One journal record: a raw response for one narrative text, as `Journal.latest` reads it.

    Args:
        key: The narrative's (incident_id, narrative_type, text_hash).
        config_hash: The experiment config that asked (also the journal folder's name).
        attempt: Attempts made for this text so far, this one included (across runs).
        at: Unix time the answer arrived.
        response: `RawResponse.to_dict()` - the raw answer, never parsed fields.
    """
    incident_id, narrative_type, text_hash = key
    return {
        "key": [incident_id, narrative_type],
        "text_hash": text_hash,
        "config_hash": config_hash,
        "attempt": attempt,
        "at": at,
        "response": response,
    }


def unanswered_record(key: JournalKey, config_hash: str, attempt: int, at: float, reason: str) -> dict[str, Any]:
    """A record of requests that got no answer: only their count matters (`response` is null).

    Args:
        key: The narrative's (incident_id, narrative_type, text_hash).
        config_hash: The experiment config that asked.
        attempt: Attempts made for this text so far, across runs.
        at: Unix time the run gave up on it.
        reason: Why there is no answer (e.g. `connection error: ...`), never narrative text.
    """
    return {**answer_record(key, config_hash, attempt, at, {}), "response": None, "unanswered": reason}


@dataclass
class JournalStats:
    records: int = 0
    corrupt_lines: int = 0
    segments: int = 0


@dataclass
class Journal:
    """Append-only store of raw responses for one (experiment, config hash)."""

    root: Path
    fsync_interval_s: float = 1.0
    _fd: int | None = field(default=None, init=False, repr=False)
    _dirty: bool = field(default=False, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _syncer: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def for_experiment(cls, journal_dir: Path, experiment: str, config_hash: str, **kwargs: Any) -> Journal:
        return cls(Path(journal_dir) / experiment / config_hash, **kwargs)

    def _segments(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl")) if self.root.is_dir() else []

    def iter_records(self, stats: JournalStats | None = None) -> Iterator[dict[str, Any]]:
        """Every well-formed record of every segment; torn or corrupt lines are counted."""
        stats = stats if stats is not None else JournalStats()
        for segment in self._segments():
            stats.segments += 1
            with open(segment, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        stats.corrupt_lines += 1  # torn final write
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        stats.corrupt_lines += 1
                        continue
                    if not isinstance(record, dict) or "key" not in record or "response" not in record:
                        stats.corrupt_lines += 1
                        continue
                    stats.records += 1
                    yield record

    def latest(self, stats: JournalStats | None = None) -> dict[JournalKey, dict[str, Any]]:
        """The newest answer per (incident_id, narrative_type, text_hash), with every attempt counted.

        A text with only unanswered records maps to the newest of them (`response` None); a
        text with an answer maps to the newest answer, its `attempt` raised to the highest
        count any record holds for the text.
        """
        out: dict[JournalKey, dict[str, Any]] = {}
        unanswered: dict[JournalKey, dict[str, Any]] = {}
        for record in self.iter_records(stats):
            incident_id, narrative_type = record["key"]
            key = (incident_id, narrative_type, record["text_hash"])
            if record["response"] is None:
                seen = unanswered.get(key)
                if seen is None or record.get("attempt", 0) >= seen.get("attempt", 0):
                    unanswered[key] = record
                continue
            prev = out.get(key)
            if prev is None or (record.get("at", 0), record.get("attempt", 0)) >= (
                prev.get("at", 0),
                prev.get("attempt", 0),
            ):
                out[key] = record
        for key, record in unanswered.items():
            answer = out.get(key)
            if answer is None:
                out[key] = record
            elif record.get("attempt", 0) > answer.get("attempt", 0):
                out[key] = {**answer, "attempt": record["attempt"]}
        return out

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (see module docstring for the guarantee)."""
        if self._fd is None:
            private_dir(self.root)
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
            self._fd = open_private(self.root / name, os.O_WRONLY | os.O_APPEND)
            self._stop.clear()
            self._syncer = threading.Thread(target=self._sync_loop, args=(self._fd,), name="journal-fsync", daemon=True)
            self._syncer.start()
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, data)
        if written != len(data):  # a short write means a full disk: the line is torn, say so
            raise OSError(f"journal {self.root}: short write ({written} of {len(data)} bytes); disk full?")
        self._dirty = True

    def _sync_loop(self, fd: int) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            if self._dirty:
                self._dirty = False
                os.fsync(fd)

    def close(self) -> None:
        if self._fd is not None:
            self._stop.set()
            if self._syncer is not None:
                self._syncer.join()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd, self._dirty, self._syncer = None, False, None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
