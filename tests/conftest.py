"""Shared fixtures: an isolated project (database, journal, Dagster home) and the test server."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from narr_assets.testing.server import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample_labelled.xlsx"

POSITIVE = (
    "V was a 30 year old female. Her boyfriend had assaulted her many times and she had a restraining "
    "order against him."
)
NEGATIVE = (
    "V was a 52 year old male who died by suicide after losing his job. No history of domestic violence was reported."
)

LLM_EXPERIMENT = """
description: test experiment against the local test server
backend: openai
model:
  name: test-model
  base_url: {base_url}
  temperature: 0.0
prompt:
  version: {version}
  system: You decide whether the decedent was a victim of intimate partner violence (IPV).
  user_template: "<narrative>\\n<<TEXT>>\\n</narrative>\\nAnswer in JSON."
output:
  mode: {mode}
run:
  concurrency: {concurrency}
  timeout_s: {timeout}
  max_retries: {retries}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Point every setting at a temporary folder; returns that folder."""
    monkeypatch.setenv("NARR_DB", str(tmp_path / "narr.duckdb"))
    monkeypatch.setenv("NARR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NARR_EXPERIMENTS", str(tmp_path / "experiments"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("NARR_SOURCE", str(SAMPLE))
    (tmp_path / "experiments").mkdir()
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "experiments" / "rules.yaml").write_text((ROOT / "configs" / "experiments" / "rules.yaml").read_text())
    return tmp_path


def write_long_csv(
    path: Path, n_incidents: int, placeholders: int = 0, special: dict[tuple[int, str], str] | None = None
) -> Path:
    """A long-layout CSV with alternating positive/negative narratives over both types.

    The first `placeholders` incidents get a placeholder LE narrative; `special` replaces the
    texts of some (incident index, type) pairs.
    """
    special = special or {}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["incident_id", "narrative_type", "narrative_text", "manual_flag_ind"])
        for i in range(n_incidents):
            for t in ("cme", "le"):
                positive = (i + (t == "le")) % 4 == 0
                text = (POSITIVE if positive else NEGATIVE) + f" Case {i}-{t}."
                if i < placeholders and t == "le":
                    text = "Need LE report."
                text = special.get((i, t), text)
                writer.writerow([f"{1000 + i}", t, text, int(positive)])
    return path


def write_experiment(
    folder: Path,
    name: str,
    base_url: str,
    *,
    version: str = "v1",
    mode: str = "json_schema",
    concurrency: int = 8,
    timeout: float = 5,
    retries: int = 6,
) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        LLM_EXPERIMENT.format(
            base_url=base_url, version=version, mode=mode, concurrency=concurrency, timeout=timeout, retries=retries
        )
    )
    return path


@pytest.fixture
def server():
    handle = serve_in_thread()
    try:
        yield handle
    finally:
        handle.stop()


def materialize(defs, instance, keys, partition_range=None, run_config=None):
    """Materialise `keys` of a project's definitions on `instance`, as one run (checks included).

    `partition_range` is (first, last) of the batch partitions, like a single-run backfill.
    """
    import dagster as dg

    tags = {}
    if partition_range:
        tags = {
            "dagster/asset_partition_range_start": partition_range[0],
            "dagster/asset_partition_range_end": partition_range[1],
        }
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    return dg.materialize(
        [*assets, *defs.asset_checks],
        selection=keys,
        instance=instance,
        resources=defs.resources,
        tags=tags,
        run_config=run_config,
        raise_on_error=False,
    )


_WATCHED = ("NARR_", "DAGSTER_HOME")


@pytest.fixture(autouse=True)
def _no_leaked_settings():
    """A test may change settings only through `monkeypatch` (undone first) or a resource."""
    before = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED)}
    assert after == before, f"the test leaked settings into the environment: {set(after.items()) ^ set(before.items())}"
