"""Resources: the project's settings and the DuckDB database, as Dagster sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from narr_assets import settings
from narr_assets.ingest import file_checksum


class NarrSettings(dg.ConfigurableResource):
    """Where the pipeline reads its input and keeps its journal, locks, reports and exports.

    Built from the `NARR_*` variables (`settings.py`) when the definitions load, so the UI
    shows the values a run will use and a run can override them in its run config
    (`resources: {settings: {config: {batch_size: 50}}}`); tests construct it directly.
    """

    source: str = Field(description="Input spreadsheet (.xlsx) or CSV (NARR_SOURCE).")
    sheet: str | None = Field(default=None, description="Sheet of an .xlsx input; first sheet when empty (NARR_SHEET).")
    data_dir: str = Field(description="Folder for the journal, locks, reports and exports (NARR_DATA_DIR).")
    batch_size: int = Field(default=100, ge=1, description="Narratives per new batch; existing batches never change.")

    @classmethod
    def env_values(cls) -> dict[str, Any]:
        """The field values the `NARR_*` variables give (read through `settings.py`)."""
        return {
            "source": str(settings.source_path()),
            "sheet": settings.source_sheet(),
            "data_dir": str(settings.data_dir()),
            "batch_size": settings.batch_size(),
        }

    @classmethod
    def from_env(cls) -> NarrSettings:
        """Fully configured from the environment (what `narr` uses for its own checks and runs)."""
        return cls(**cls.env_values())

    @classmethod
    def overridable_from_env(cls) -> Any:  # a PartialResource, a type Dagster does not export
        """Configured from the environment, each field overridable in a run's config.

        A fully configured resource would take run config as a *replacement* (every field
        would have to be given again); a partial one merges the run's fields over these
        defaults, and the launchpad shows them.
        """
        return cls.configure_at_launch(**cls.env_values())

    @property
    def source_path(self) -> Path:
        return Path(self.source)

    @property
    def layout(self) -> settings.DataLayout:
        return settings.DataLayout(Path(self.data_dir))

    def source_checksum(self) -> str | None:
        """The checksum of the source file as it is now, or None when there is no file.

        The one place the current file is hashed for comparison (observation, sensor, the
        checksum check and `narr`), so they can never disagree on what "changed" means.
        """
        path = self.source_path
        return file_checksum(path) if path.is_file() else None


def duckdb_resource() -> DuckDBResource:
    """The results database (`NARR_DB`)."""
    return DuckDBResource(database=str(settings.db_path()))
