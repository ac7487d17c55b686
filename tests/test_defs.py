"""The Dagster layer's own pieces: the settings resource and the metadata tables."""

from __future__ import annotations

import hashlib

import dagster as dg
import pandas as pd
import pytest
from conftest import registered_batches

from narr_assets import settings
from narr_assets.classify import RunSummary
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS, ingest_selection
from narr_assets.defs.metadata import counts_md, frame_md, md_table, metrics_md, run_summary_metadata
from narr_assets.defs.resources import NarrSettings
from narr_assets.evaluation import SCOPES, evaluate


def test_settings_resource_is_built_from_the_environment(project, monkeypatch):
    monkeypatch.setenv("NARR_BATCH_SIZE", "37")
    monkeypatch.setenv("NARR_SHEET", "Sheet2")
    resource = NarrSettings.from_env()
    assert resource.batch_size == 37 and resource.sheet == "Sheet2"
    assert resource.source_path == settings.source_path()
    assert resource.layout.journal == settings.journal_dir() == project / "journal"
    assert resource.layout.reports == settings.reports_dir()


def test_settings_resource_defaults_when_nothing_is_set(monkeypatch):
    for var in ("NARR_SOURCE", "NARR_SHEET", "NARR_DB", "NARR_DATA_DIR", "NARR_BATCH_SIZE"):
        monkeypatch.delenv(var, raising=False)
    resource = NarrSettings.from_env()
    assert resource.source_path == settings.PROJECT_ROOT / "data" / "sample_labelled.xlsx"
    assert resource.sheet is None and resource.batch_size == 100
    assert resource.layout.exports == settings.PROJECT_ROOT / "data" / "exports"


def test_settings_resource_checksum_is_none_without_a_file(tmp_path):
    resource = NarrSettings(source=str(tmp_path / "missing.csv"), data_dir=str(tmp_path))
    assert resource.source_checksum() is None
    (tmp_path / "missing.csv").write_text("a,b\n")
    assert resource.source_checksum() == hashlib.md5(b"a,b\n").hexdigest()


def test_batch_size_is_validated_by_the_resource(tmp_path):
    with pytest.raises(Exception, match="batch_size"):
        NarrSettings(source="x.csv", data_dir=str(tmp_path), batch_size=0)


def test_definitions_carry_the_given_settings(project, tmp_path):
    given = NarrSettings(source=str(tmp_path / "in.csv"), data_dir=str(tmp_path), batch_size=7)
    defs = build_definitions(settings=given)
    assert defs.resources["settings"] is given  # as given: tests and `narr` pass a built resource
    assert set(defs.resources) == {"settings", "duckdb"}


def test_a_run_can_override_one_setting(project, monkeypatch):
    """Run config reaches the resource: the launchpad can change one setting for one run, and
    the others keep their values from the environment."""
    source = project / "in.csv"
    source.write_text(
        "incident_id,narrative_type,narrative_text\n" + "".join(f"{i},cme,Narrative number {i}.\n" for i in range(9))
    )
    monkeypatch.setenv("NARR_SOURCE", str(source))
    monkeypatch.setenv("NARR_BATCH_SIZE", "100")
    defs = build_definitions()  # the code location's resource: values from the environment
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            assets,
            selection=INGEST_KEYS,
            instance=instance,
            resources=defs.resources,
            run_config={"resources": {"settings": {"config": {"batch_size": 4}}}},
        )
        assert result.success
        assert registered_batches(instance) == ["b00000", "b00001", "b00002"]
        # Without run config: the environment's values.
        source.write_text(source.read_text() + "".join(f"{i},le,Another narrative {i}.\n" for i in range(9)))
        assert dg.materialize(assets, selection=INGEST_KEYS, instance=instance, resources=defs.resources).success
        assert registered_batches(instance) == ["b00000", "b00001", "b00002", "b00003"]


def test_ingest_selection_is_the_three_ingest_assets():
    assert [k.to_user_string() for k in INGEST_KEYS] == ["raw_narratives", "narratives", "narrative_batches"]
    defs = build_definitions(settings=NarrSettings(source="x.csv", data_dir="/tmp"), experiments=[])
    assert ingest_selection.resolve(defs.resolve_asset_graph()) == set(INGEST_KEYS)


def test_md_table_formats_cells():
    table = md_table(["a", "b", "c", "d"], [[1234, 0.5, None, "x"], [True, float("nan"), "y", 2]])
    assert table.splitlines() == [
        "| a | b | c | d |",
        "|---|---|---|---|",
        "| 1,234 | 0.500 |  | x |",
        "| True |  | y | 2 |",
    ]


def test_frame_and_counts_tables():
    assert frame_md(pd.DataFrame()).value == "_empty_"
    shown = frame_md(pd.DataFrame({"rank": range(1, 41), "f1": [0.5] * 40}), max_rows=3).value
    assert shown.count("\n") == 4 and "| 3 | 0.500 |" in shown
    assert counts_md({"ok": 3, "skipped": 1}, "status", "rows").value.splitlines()[2:] == [
        "| ok | 3 |",
        "| skipped | 1 |",
    ]


def test_metrics_table_has_one_line_per_scope():
    rows = pd.DataFrame(
        {
            "experiment": "e",
            "incident_id": [str(i // 2) for i in range(8)],
            "narrative_type": ["cme", "le"] * 4,
            "manual_flag_ind": [1, 0, 0, 0, 1, 1, 0, 0],
            "status": "ok",
            "detected": [True, False, False, True, True, True, False, False],
            "confidence": 0.9,
        }
    )
    md = metrics_md(evaluate(rows, n_boot=50), "strict").value
    lines = md.splitlines()
    assert len(lines) == 2 + len(SCOPES) and lines[2].startswith("| overall | 8 | 3 | 1 | 4 | 0 |")


def test_run_summary_metadata_names_run_counts():
    summary = RunSummary("e", "abc", batches=["b00000", "b00001"], calls_ok=5, status_counts={"skipped": 1, "ok": 5})
    meta = run_summary_metadata(summary, "m")
    assert meta["run_batches"] == 2 and meta["run_calls_ok"] == 5 and meta["config_hash"] == "abc"
    assert meta["run_statuses"].value.splitlines()[2:] == ["| ok | 5 |", "| skipped | 1 |"]
