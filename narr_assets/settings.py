"""Where things live: paths resolved from environment variables, lazily.

Nothing here runs at import time; every function reads the environment when it is called, so
tests and the CLI can point the pipeline elsewhere by setting variables before a run.

| variable           | default                                   | meaning                         |
|--------------------|-------------------------------------------|---------------------------------|
| `NARR_SOURCE`      | `data/sample_labelled.xlsx`               | input spreadsheet or CSV        |
| `NARR_SHEET`       | first sheet                               | sheet name for `.xlsx` input    |
| `NARR_DB`          | `data/narr.duckdb`                        | DuckDB results database         |
| `NARR_EXPERIMENTS` | `configs/experiments`                     | folder of experiment YAML files |
| `NARR_DATA_DIR`    | directory of `NARR_DB`                    | journal, locks, reports, exports|
| `NARR_BATCH_SIZE`  | `100`                                     | narratives per new batch        |
| `NARR_LEXICON`     | `configs/lexicon.yaml`                    | lexicon of the `rules` backend  |
| `NARR_DB_LOCK_WAIT`| `60`                                      | seconds to wait for a locked DB |
| `NARR_PROMPT_DIRS` | none                                      | more folders for prompt files   |
| `NARR_SHARE_GROUP` | `0`                                       | `1`: data readable by the group |

Relative paths are resolved against the project root (the folder holding `pyproject.toml`),
not the current directory, so `dagster dev` and the CLI agree wherever they are started.

This module is the one reader of `NARR_*`. Dagster assets, checks and the sensor never read
the environment: they get the `settings` resource (`narr_assets/defs/resources.py`), built
from these functions when the definitions load, shown in the UI and overridable per run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _path(var: str, default: str) -> Path:
    value = os.environ.get(var) or default
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def source_path() -> Path:
    """The input file (`NARR_SOURCE`)."""
    return _path("NARR_SOURCE", "data/sample_labelled.xlsx")


def source_sheet() -> str | None:
    """The sheet to read from an `.xlsx` input (`NARR_SHEET`), or None for the first."""
    return os.environ.get("NARR_SHEET") or None


def db_path() -> Path:
    """The DuckDB database file (`NARR_DB`)."""
    return _path("NARR_DB", "data/narr.duckdb")


def experiments_dir() -> Path:
    """The folder of experiment YAML files (`NARR_EXPERIMENTS`)."""
    return _path("NARR_EXPERIMENTS", "configs/experiments")


def data_dir() -> Path:
    """Folder for the journal, locks, reports and exports (`NARR_DATA_DIR`)."""
    value = os.environ.get("NARR_DATA_DIR")
    return _path("NARR_DATA_DIR", value) if value else db_path().parent


@dataclass(frozen=True)
class DataLayout:
    """What lives under the data folder; the one place that names its sub-folders."""

    root: Path

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def exports(self) -> Path:
        return self.root / "exports"


def layout() -> DataLayout:
    """The data folder's layout under `NARR_DATA_DIR`."""
    return DataLayout(data_dir())


def journal_dir() -> Path:
    return layout().journal


def locks_dir() -> Path:
    return layout().locks


def reports_dir() -> Path:
    return layout().reports


def exports_dir() -> Path:
    return layout().exports


def lexicon_path() -> Path:
    """The lexicon of the `rules` backend (`NARR_LEXICON`)."""
    return _path("NARR_LEXICON", "configs/lexicon.yaml")


def prompt_dirs() -> list[Path]:
    """Extra folders prompt files may be read from (`NARR_PROMPT_DIRS`, `os.pathsep`-separated).

    Without it, prompt files must lie in the experiment file's folder or the project's
    `configs/`; each folder named here is allowed too (with its sub-folders).
    """
    raw = os.environ.get("NARR_PROMPT_DIRS") or ""
    out = []
    for part in raw.split(os.pathsep):
        if part.strip():
            path = Path(part.strip()).expanduser()
            out.append(path if path.is_absolute() else PROJECT_ROOT / path)
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def share_group() -> bool:
    """Whether restricted data is readable by the owner's group (`NARR_SHARE_GROUP=1`).

    Off by default: the database, journal, locks, reports and exports are owner-only
    (files 0600, folders 0700); on, files are 0640 and folders 0750.
    """
    raw = os.environ.get("NARR_SHARE_GROUP", "")
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise SettingError(f"NARR_SHARE_GROUP must be 1 or 0, got {raw!r}")


class SettingError(ValueError):
    """A `NARR_*` variable holds a value that cannot be used (`narr` exits 2, naming it)."""


def db_lock_wait_s() -> float:
    """Seconds to wait for the database while another process holds it (`NARR_DB_LOCK_WAIT`).

    DuckDB lets one process at a time open the file for writing; `narr` waits this long,
    retrying, before it gives up with an error naming the holder. 0 fails at once.
    """
    raw = os.environ.get("NARR_DB_LOCK_WAIT", "60")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait < float("inf"):
        raise SettingError(f"NARR_DB_LOCK_WAIT must be a number of seconds >= 0, got {raw!r}")
    return wait


def batch_size() -> int:
    """Narratives per new batch (`NARR_BATCH_SIZE`); existing batches never change."""
    raw = os.environ.get("NARR_BATCH_SIZE", "100")
    try:
        size = int(raw)
    except ValueError:
        raise SettingError(f"NARR_BATCH_SIZE must be a positive integer, got {raw!r}") from None
    if size < 1:
        raise SettingError(f"NARR_BATCH_SIZE must be a positive integer, got {raw!r}")
    return size
