"""What the UI shows beyond the data: no BetaWarning noise, row counts and column schemas, a group per experiment."""

from __future__ import annotations

import subprocess
import sys
import warnings

import dagster as dg
from conftest import materialize, write_experiment, write_long_csv

from narr_assets import settings
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS
from narr_assets.defs.metadata import COLUMN_SCHEMA, ROW_COUNT
from narr_assets.defs.resources import NarrSettings
from narr_assets.store import Store

# Imports the code location in a fresh interpreter (import-time warnings included) with every
# BetaWarning an error, then loads it as `dagster dev` does.
LOAD_WITH_BETA_AS_ERROR = """
import warnings, dagster as dg
warnings.simplefilter("error", dg.BetaWarning)
from narr_assets.definitions import defs
loaded = defs()
print(sorted(k.to_user_string() for k in loaded.resolve_all_asset_keys()))
"""


def test_code_location_loads_without_beta_warnings(project, server):
    auto = write_experiment(project / "experiments", "auto", server.base_url)
    auto.write_text(auto.read_text().replace("run:\n", "run:\n  auto_materialize: true\n"))
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_BETA_AS_ERROR], capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "BetaWarning" not in loaded.stderr
    assert "'auto/classifications'" in loaded.stdout and "'rules/classifications'" in loaded.stdout


def test_each_experiment_has_its_own_asset_group(project, server):
    """The asset graph draws a box per experiment, named after it; a name that is a shared group's
    gets its own group all the same."""
    write_experiment(project / "experiments", "llm", server.base_url)
    write_experiment(project / "experiments", "ingest", server.base_url)
    graph = build_definitions().resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert groups == {
        "source_file": "ingest",
        "raw_narratives": "ingest",
        "narratives": "ingest",
        "narrative_batches": "ingest",
        "rules/classifications": "rules",
        "rules/metrics": "rules",
        "llm/classifications": "llm",
        "llm/metrics": "llm",
        "ingest/classifications": "ingest_experiment",
        "ingest/metrics": "ingest_experiment",
        "leaderboard": "evaluation",
        "report": "evaluation",
        "exports": "evaluation",
    }


def _latest_metadata(instance: dg.DagsterInstance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key))
    assert event is not None and event.asset_materialization is not None, key
    return dict(event.asset_materialization.metadata)


def test_table_assets_carry_row_counts_and_ingest_tables_their_schema(project):
    """Read back from the instance after the whole graph ran (no BetaWarning on the way): the row
    count of each table asset is the table's, and the three ingest tables list DuckDB's columns."""
    source = write_long_csv(project / "input.csv", 15, placeholders=2)
    with open(source, "a") as fh:  # a row without text: read into raw_narratives, not a narrative
        fh.write("1099,le,,0\n")
    defs = build_definitions(settings=NarrSettings(source=str(source), data_dir=str(project), batch_size=10))
    with dg.instance_for_test() as instance, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert materialize(defs, instance, INGEST_KEYS).success
        keys = instance.get_dynamic_partitions("narrative_batches")
        assert materialize(defs, instance, [dg.AssetKey(["rules", "classifications"])], (keys[0], keys[-1])).success
        # Every table asset; `report` (HTML, no rows) is left out.
        rest = [dg.AssetKey(["rules", "metrics"]), dg.AssetKey("leaderboard"), dg.AssetKey("exports")]
        assert materialize(defs, instance, rest).success
        metadata = {
            key: _latest_metadata(instance, key)
            for key in (
                "raw_narratives",
                "narratives",
                "narrative_batches",
                "rules/classifications",
                "rules/metrics",
                "leaderboard",
                "exports",
            )
        }
    assert not [w for w in caught if issubclass(w.category, dg.BetaWarning)]
    store = Store(settings.db_path())

    def count(sql: str) -> int:
        return int(store.query_row(sql)[0])

    expected = {
        "raw_narratives": count("SELECT count(*) FROM raw_narratives"),
        "narratives": count("SELECT count(*) FROM narratives"),
        "narrative_batches": count("SELECT count(*) FROM batch_ledger"),
        "rules/classifications": count("SELECT count(*) FROM classifications WHERE experiment = 'rules'"),
        "rules/metrics": count("SELECT count(*) FROM experiment_metrics WHERE experiment = 'rules'"),
        "leaderboard": count("SELECT count(*) FROM leaderboard"),
        "exports": count("SELECT count(*) FROM classifications WHERE experiment = 'rules'"),
    }
    assert {key: meta[ROW_COUNT].value for key, meta in metadata.items()} == expected
    assert expected["raw_narratives"] == 31 and expected["narratives"] == 30 and expected["rules/classifications"] == 30
    for asset, table in (("raw_narratives",) * 2, ("narratives",) * 2, ("narrative_batches", "batch_ledger")):
        schema = metadata[asset][COLUMN_SCHEMA].schema
        described = store.query_rows(f"DESCRIBE {table}")
        assert [(c.name, c.type) for c in schema.columns] == [(row[0], row[1]) for row in described]
    narratives_schema = metadata["narratives"][COLUMN_SCHEMA].schema
    assert narratives_schema.constraints.other == ["primary key (incident_id, narrative_type)"]
    nullable = {c.name: c.constraints.nullable for c in narratives_schema.columns}
    assert nullable["narrative_text"] is False and nullable["manual_flag_ind"] is True
