"""Owner-only files and folders for restricted-use data.

The database, the journal, partition locks, reports and exports hold narrative text (or
answers about it), so they are created owner-only: files 0600, folders 0700, whatever the
process umask; `NARR_SHARE_GROUP=1` makes them 0640 and 0750 for a project group. Modes are
set explicitly after creation (a umask can only take bits away), and a file written again
through these helpers gets the current mode, so one left looser by an older version is
tightened when it is next written. Files and folders owned by another user are left alone:
changing them is not ours to do (and, as root, could lock their owner out).
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from narr_assets import settings


def file_mode() -> int:
    """The mode of restricted files: 0600, or 0640 with `NARR_SHARE_GROUP=1`."""
    return 0o640 if settings.share_group() else 0o600


def dir_mode() -> int:
    """The mode of restricted folders: 0700, or 0750 with `NARR_SHARE_GROUP=1`."""
    return 0o750 if settings.share_group() else 0o700


def _set_mode(path: Path, mode: int) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) == mode:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
        return  # a shared sticky folder such as /tmp (owned by root, who may run narr)
    path.chmod(mode)


def private_file(path: str | Path) -> Path:
    """Give an existing file (that this user owns) the restricted file mode.

    Args:
        path: The file; a missing file is ignored (e.g. a WAL DuckDB has already merged).

    Returns:
        The path.
    """
    path = Path(path)
    _set_mode(path, file_mode())
    return path


def private_database(path: str | Path) -> None:
    """Give a DuckDB file and its write-ahead log (when present) the restricted file mode.

    Args:
        path: The database file.
    """
    path = Path(path)
    private_file(path)
    private_file(path.with_name(path.name + ".wal"))


def private_dir(path: str | Path, *, tighten: bool = True) -> Path:
    """Create a folder (and its missing parents) with the restricted folder mode.

    Args:
        path: The folder.
        tighten: Also set the mode of `path` when it already exists. False for folders a
            user named (`narr export -o /tmp/x.csv` must not change `/tmp`); parents that
            already exist are never changed.

    Returns:
        The path.
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    mode = dir_mode()
    for created in missing:
        _set_mode(created, mode)
    if tighten and not missing:
        _set_mode(path, mode)
    return path


def open_private(path: str | Path, flags: int) -> int:
    """`os.open` of a restricted file, created (or re-stamped) with the restricted mode.

    Args:
        path: The file.
        flags: `os.open` flags; `O_CREAT` is added.

    Returns:
        The open descriptor.
    """
    mode = file_mode()
    fd = os.open(path, flags | os.O_CREAT, mode)
    info = os.fstat(fd)
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
        os.fchmod(fd, mode)
    return fd


@contextlib.contextmanager
def private_output(path: str | Path, *, tighten_parent: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` to write into; renamed over `path` on success.

    The temporary file exists with the restricted mode before a byte is written, so the
    content is never readable by others, and readers never see half a file.

    Args:
        path: The destination.
        tighten_parent: Also give an existing destination folder the restricted mode (for
            the data folder's own sub-folders, not for a folder a user named).

    Yields:
        The temporary path to write (an empty file; writers may truncate or replace it).
    """
    path = Path(path)
    private_dir(path.parent, tighten=tighten_parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    os.close(open_private(tmp, os.O_WRONLY | os.O_TRUNC))
    try:
        yield tmp
        private_file(tmp)  # a writer may have replaced the file rather than written into it
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_private_bytes(path: str | Path, data: bytes, *, tighten_parent: bool = False) -> Path:
    """Write `data` to a restricted file, atomically (temporary sibling, then rename).

    Args:
        path: The destination; missing folders are created with the restricted mode.
        data: The content.
        tighten_parent: As for `private_output`.

    Returns:
        The path.
    """
    path = Path(path)
    with private_output(path, tighten_parent=tighten_parent) as tmp:
        tmp.write_bytes(data)
    return path
