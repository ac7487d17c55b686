"""Dagster wiring: definitions load, assets materialise on a temporary instance, checks, sensor."""

from __future__ import annotations

import warnings

import dagster as dg
from conftest import materialize, registered_batches, write_experiment, write_long_csv

from narr_assets import settings
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS, SourceCursor, source_change_request, source_file_sensor
from narr_assets.defs.resources import NarrSettings
from narr_assets.ingest import file_checksum
from narr_assets.status import batch_of
from narr_assets.store import Store

warnings.filterwarnings("ignore", category=dg.BetaWarning)

INGEST = INGEST_KEYS


def project_settings(project, source, batch_size: int = 100) -> NarrSettings:
    """The settings resource of a test project: built directly, no environment edited."""
    return NarrSettings(source=str(source), data_dir=str(project), batch_size=batch_size)


def test_asset_keys_snapshot(project):
    """A YAML edit that adds or renames an experiment shows up here as a reviewed diff."""
    defs = build_definitions()
    keys = sorted(k.to_user_string() for k in defs.resolve_all_asset_keys())
    assert keys == [
        "exports",
        "leaderboard",
        "narrative_batches",
        "narratives",
        "raw_narratives",
        "report",
        "rules/classifications",
        "rules/metrics",
        "source_file",
    ]
    checks = sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in defs.resolve_asset_graph().asset_check_keys)
    assert checks == [
        "narratives:checksum_matches_source_file",
        "narratives:keys_unique",
        "narratives:labels_valid",
        "narratives:text_not_empty",
        "rules/classifications:confidence_in_range",
        "rules/classifications:error_rate_below_threshold",
        "rules/classifications:one_row_per_narrative",
    ]


def test_shipped_definitions_load_with_all_experiments(monkeypatch):
    monkeypatch.delenv("NARR_EXPERIMENTS", raising=False)
    defs = build_definitions()
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    for name in ("rules", "llm_baseline", "llm_indicators", "llm_strict", "llm_context"):
        assert f"{name}/classifications" in keys and f"{name}/metrics" in keys
    cls = defs.get_assets_def(dg.AssetKey(["llm_strict", "classifications"]))
    assert cls.code_versions_by_key[cls.key]  # the config hash


def test_whole_graph_on_a_temporary_instance(project, server):
    source = write_long_csv(project / "input.csv", 30, placeholders=2)
    write_experiment(project / "experiments", "llm", server.base_url)
    defs = build_definitions(settings=project_settings(project, source, batch_size=20))
    with dg.instance_for_test() as instance:
        result = materialize(defs, instance, INGEST)
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {
            "keys_unique": True,
            "text_not_empty": True,
            "labels_valid": True,
            "checksum_matches_source_file": True,
        }
        partitions = instance.get_dynamic_partitions("narrative_batches")
        assert registered_batches(instance) == ["b00000", "b00001", "b00002"]
        # One run over all partitions of the LLM experiment.
        result = materialize(defs, instance, [dg.AssetKey(["llm", "classifications"])], ("b00000", "b00002"))
        assert result.success
        assert server.stats()["completions_ok"] == 58
        mats = result.get_asset_materialization_events()
        assert {m.partition for m in mats} == set(partitions)
        meta = mats[0].materialization.metadata
        assert meta["run_calls_ok"].value == 58 and meta["run_skipped_placeholders"].value == 2
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {
            "one_row_per_narrative": True,
            "error_rate_below_threshold": True,
            "confidence_in_range": True,
        }
        # Again: zero calls.
        assert materialize(defs, instance, [dg.AssetKey(["llm", "classifications"])], ("b00000", "b00002")).success
        assert server.stats()["chat_requests"] == 58
        result = materialize(
            defs, instance, [dg.AssetKey(["llm", "metrics"]), dg.AssetKey("leaderboard"), dg.AssetKey("report")]
        )
        assert result.success
        store = Store(settings.db_path())
        board = store.query_df("SELECT experiment, n_rows FROM leaderboard")
        assert list(board["experiment"]) == ["llm"] and int(board["n_rows"].iloc[0]) == 60
        assert (settings.reports_dir() / "report.html").stat().st_size > 10_000


def test_checksum_check_fails_until_reingested(project):
    source = write_long_csv(project / "input.csv", 5)
    defs = build_definitions(settings=project_settings(project, source))
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST).success
        with open(source, "a") as fh:
            fh.write("9999,cme,A new narrative about a fall from a ladder.,0\n")
        result = materialize(defs, instance, [dg.AssetKey("narratives")])
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["checksum_matches_source_file"] is False
        assert materialize(defs, instance, INGEST).success
        assert Store(settings.db_path()).current_checksum() == file_checksum(source)


def test_failed_ingest_leaves_previous_tables(project):
    source = write_long_csv(project / "input.csv", 5)
    defs = build_definitions(settings=project_settings(project, source))
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST).success
        before = Store(settings.db_path()).read_narratives()
        source.write_text("incident_id,wrong_column\n1,2\n")
        result = materialize(defs, instance, INGEST)
        assert not result.success
        after = Store(settings.db_path()).read_narratives()
        assert len(after) == len(before) == 10


def test_sensor_requests_one_run_per_new_checksum(project):
    source = write_long_csv(project / "input.csv", 3)
    resources = {"settings": project_settings(project, source)}
    first = file_checksum(source)
    decision, seen = source_change_request(first, SourceCursor(), str(source))
    assert isinstance(decision, dg.RunRequest) and decision.run_key == f"1-{first}" and seen.checksum == first
    assert isinstance(source_change_request(first, seen, str(source))[0], dg.SkipReason)  # unchanged: nothing
    assert isinstance(source_change_request(None, seen, str(source))[0], dg.SkipReason)  # no file: nothing
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, cursor=first, resources=resources)
        result = source_file_sensor(ctx)
        assert not result.run_requests
        with open(source, "a") as fh:
            fh.write("77,le,Another narrative.,0\n")
        ctx = dg.build_sensor_context(instance=instance, cursor=first, resources=resources)
        result = source_file_sensor(ctx)
        assert len(result.run_requests) == 1
        assert result.run_requests[0].run_key == f"1-{file_checksum(source)}"
        assert SourceCursor.loads(result.cursor) == SourceCursor(checksum=file_checksum(source), changes=1)


def test_experiment_file_error_leaves_out_only_that_file(project):
    bad = project / "experiments" / "broken.yaml"
    bad.write_text("backend: openai\nmodel:\n  temperature: 9\n")
    defs = build_definitions()
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert "rules/classifications" in keys and not any(k.startswith("broken/") for k in keys)
    leaderboard = defs.get_assets_def(dg.AssetKey("leaderboard"))
    assert f"invalid experiment file: {bad}" in leaderboard.descriptions_by_key[dg.AssetKey("leaderboard")]


def test_automation_is_opt_in_per_experiment(project, server):
    write_experiment(project / "experiments", "manual", server.base_url)
    auto = write_experiment(project / "experiments", "auto", server.base_url)
    auto.write_text(auto.read_text().replace("run:\n", "run:\n  auto_materialize: true\n"))
    defs = build_definitions()
    manual_def = defs.get_assets_def(dg.AssetKey(["manual", "classifications"]))
    auto_def = defs.get_assets_def(dg.AssetKey(["auto", "classifications"]))
    assert manual_def.automation_conditions_by_key.get(manual_def.key) is None
    assert auto_def.automation_conditions_by_key[auto_def.key] is not None


def test_retry_errors_through_run_config(project, server):
    source = write_long_csv(project / "input.csv", 10)
    write_experiment(project / "experiments", "llm", server.base_url)
    defs = build_definitions(settings=project_settings(project, source))
    key = dg.AssetKey(["llm", "classifications"])
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST).success
        server.configure(truncated=0.4, seed=2)
        assert materialize(defs, instance, [key], ("b00000", "b00000")).success
        errors = (
            Store(settings.db_path())
            .query_df("SELECT count(*) AS n FROM classification_rows WHERE status = 'truncated'")
            .iloc[0, 0]
        )
        assert errors > 0
        server.configure(truncated=0.0)
        server.reset()
        op_name = defs.get_assets_def(key).op.name
        config = {"ops": {op_name: {"config": {"retry_errors": True}}}}
        assert materialize(defs, instance, [key], ("b00000", "b00000"), run_config=config).success
        assert server.stats()["chat_requests"] == errors
        statuses = Store(settings.db_path()).query_df("SELECT DISTINCT status FROM classification_rows")["status"]
        assert set(statuses) == {"ok"}


def test_leaderboard_tables_forget_a_removed_experiment(project, server):
    source = write_long_csv(project / "input.csv", 8)
    # Mislabel one clearly positive narrative: every experiment then has a disagreement row.
    lines = source.read_text().splitlines()
    assert lines[1].endswith(",1")
    lines[1] = lines[1][:-1] + "0"
    source.write_text("\n".join(lines) + "\n")
    for name, version in (("alpha", "a"), ("beta", "b")):
        write_experiment(project / "experiments", name, server.base_url, version=version)
    defs = build_definitions(settings=project_settings(project, source))
    store = Store(settings.db_path())
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST).success
        parts = instance.get_dynamic_partitions("narrative_batches")
        for name in ("alpha", "beta"):
            assert materialize(defs, instance, [dg.AssetKey([name, "classifications"])], (parts[0], parts[-1])).success
        keys = [dg.AssetKey(["alpha", "metrics"]), dg.AssetKey(["beta", "metrics"]), dg.AssetKey("leaderboard")]
        assert materialize(defs, instance, keys).success
        pairs = store.query_df("SELECT experiment_a, experiment_b FROM pairwise_comparisons")
        assert pairs.values.tolist() == [["alpha", "beta"]]
        assert sorted(store.query_df("SELECT DISTINCT experiment FROM disagreements")["experiment"]) == [
            "alpha",
            "beta",
        ]

        (project / "experiments" / "beta.yaml").unlink()
        defs = build_definitions(settings=project_settings(project, source))
        assert materialize(defs, instance, [dg.AssetKey(["alpha", "metrics"]), dg.AssetKey("leaderboard")]).success
        assert list(store.query_df("SELECT experiment FROM leaderboard")["experiment"]) == ["alpha"]
        assert int(store.query_df("SELECT count(*) AS n FROM pairwise_comparisons")["n"].iloc[0]) == 0
        assert list(store.query_df("SELECT DISTINCT experiment FROM disagreements")["experiment"]) == ["alpha"]


def test_partial_failure_is_recorded_per_partition_and_checked(project, server):
    """A run in which one batch fails for good: Dagster shows exactly what DuckDB holds."""
    source = write_long_csv(project / "input.csv", 30)  # 60 narratives, 3 batches of 20
    write_experiment(project / "experiments", "llm", server.base_url, retries=1)
    defs = build_definitions(settings=project_settings(project, source, batch_size=20))
    key = dg.AssetKey(["llm", "classifications"])
    store = Store(settings.db_path())
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST).success
        parts = instance.get_dynamic_partitions("narrative_batches")
        server.configure(fail_text="Case 7-cme.")  # one narrative fails whatever the retries
        result = materialize(defs, instance, [key], (parts[0], parts[-1]))
        assert not result.success
        written = set(store.query_df("SELECT DISTINCT batch_id FROM classification_rows")["batch_id"])
        assert len(written) == 2  # the other two batches are in DuckDB
        status = instance.get_status_by_partition(key, parts, defs.get_assets_def(key).partitions_def)
        shown = {p for p, s in status.items() if s == dg.AssetPartitionStatus.MATERIALIZED}
        failed = {p for p, s in status.items() if s == dg.AssetPartitionStatus.FAILED}
        assert {batch_of(p) for p in shown} == written and shown | failed == set(parts) and not shown & failed
        # The checks ran on what was written, though the step failed.
        checks = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION), limit=20
        )
        evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in checks]
        evaluated = {e.check_name for e in evaluations if e.asset_key == key and e.passed}
        assert evaluated == {"one_row_per_narrative", "error_rate_below_threshold", "confidence_in_range"}

        # Resume: only the failed partition runs, and only its failed narrative is asked (the
        # other 19 answers are journalled); Dagster then shows all three materialised.
        server.configure(fail_text=None)
        server.reset()
        failed_key = next(iter(failed))
        assert materialize(defs, instance, [key], (failed_key, failed_key)).success
        assert server.stats()["completions_ok"] == 1
        status = instance.get_status_by_partition(key, parts, defs.get_assets_def(key).partitions_def)
        assert set(status.values()) == {dg.AssetPartitionStatus.MATERIALIZED}
