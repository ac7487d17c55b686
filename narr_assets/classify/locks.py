"""Partition locks: at most one process classifies a batch of an experiment at a time.

A lock is an `flock` on `<locks_dir>/<experiment>/<batch_id>.lock`, which holds the holder's
pid and start time so the refusal can name it. `flock` locks die with their process, so a
`kill -9` never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from narr_assets.private import open_private, private_dir


class PartitionBusyError(RuntimeError):
    """Another process is classifying one of the requested batches."""


@contextlib.contextmanager
def partition_locks(locks_dir: Path, experiment: str, batch_ids: list[str]) -> Iterator[None]:
    """Hold an exclusive lock on every batch of the run, or fail at once naming the holder."""
    folder = private_dir(Path(locks_dir) / experiment)
    held: list[int] = []
    try:
        for batch_id in batch_ids:
            held.append(_lock(folder, experiment, batch_id))
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the flock


def _lock(folder: Path, experiment: str, batch_id: str) -> int:
    """The open descriptor holding `batch_id`'s lock, stamped with this process."""
    fd = open_private(folder / f"{batch_id}.lock", os.O_RDWR)
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
    return fd
