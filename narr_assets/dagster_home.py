"""The Dagster instance's `dagster.yaml`, written when absent by `narr` and the code location.

Dagster reads `$DAGSTER_HOME/dagster.yaml` when a process starts (`narr`, `dagster dev`, a
run worker). The file narr writes keeps a restricted-use project private and its endpoints
within budget: no telemetry, no sign-up pop-up over the UI of an offline machine, one
classification step per endpoint pool at a time (`narr_assets/defs/pools.py`), and slots of
runs that ended without releasing them (a killed run worker) freed by the daemon. A file a
user wrote is never changed; one narr wrote before these settings existed is brought up to
date. No Dagster import here: the CLI calls this before Dagster loads the instance.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from narr_assets import private

DAGSTER_YAML = """\
# Written by narr (narr_assets/dagster_home.py) because this file was absent; yours to edit.
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    # A pool without a limit set in the UI gets this one: one classification step per
    # endpoint at a time, so overlapping runs never exceed the step's run.concurrency.
    default_limit: 1
run_monitoring:
  enabled: true
  # The daemon frees pool slots still held by a run this long after it ended (a killed run).
  free_slots_after_run_end_seconds: 30
"""

# What narr wrote before pools existed: replaced by DAGSTER_YAML, as nobody edited it.
_OLD_DAGSTER_YAML = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"


def ensure_dagster_yaml(home: str | Path) -> bool:
    """Write narr's `dagster.yaml` into an existing Dagster home folder unless it has one.

    The file is owner-only (like the project's data) and appears whole or not at all: it is
    written to a temporary sibling, then hard-linked into place, which fails rather than
    replace a file another process wrote in the meantime.

    Args:
        home: The `DAGSTER_HOME` folder; nothing is written when it does not exist.

    Returns:
        True when the file was written now.
    """
    home = Path(home)
    target = home / "dagster.yaml"
    if not home.is_dir() or target.is_symlink():
        return False
    with contextlib.suppress(FileNotFoundError):
        if target.read_text(encoding="utf-8") != _OLD_DAGSTER_YAML:
            return False
    tmp = home / f".dagster.yaml.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = private.open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(DAGSTER_YAML)
        if target.exists():  # narr's own old file, unedited: bring it up to date
            tmp.replace(target)
            return True
        try:
            os.link(tmp, target)
        except FileExistsError:  # another process was first; its file stands
            return False
        except OSError:  # a file system without hard links: a rename, if still absent
            if target.exists():
                return False
            tmp.replace(target)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def configured_home() -> Path | None:
    """The folder `DAGSTER_HOME` names, or None when it is unset (Dagster then uses a temporary one)."""
    value = os.environ.get("DAGSTER_HOME")
    return Path(value).expanduser() if value else None
