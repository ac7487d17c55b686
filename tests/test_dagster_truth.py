"""What Dagster shows about partitions equals what DuckDB holds, through a real instance.

Each scenario ends with the same comparison (`assert_agree`): for every experiment, the
partitions Dagster shows materialised are exactly the batches complete in DuckDB, and the
stale status of each materialised partition is what the data says it should be.
"""

from __future__ import annotations

import dagster as dg
import pytest
from conftest import materialize, write_experiment, write_long_csv
from dagster._utils.test.data_versions import get_stale_status_resolver

from narr_assets import settings
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import BATCH_PARTITIONS, INGEST_KEYS, batch_partitions
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import load_experiments
from narr_assets.status import batch_of, partition_keys, partition_state
from narr_assets.store import Store

EXPERIMENTS = ("llm", "rules")


def classifications(name: str) -> dg.AssetKey:
    return dg.AssetKey([name, "classifications"])


def build(project, source):
    return build_definitions(settings=NarrSettings(source=str(source), data_dir=str(project), batch_size=20))


def dagster_view(instance, defs, name: str) -> dict[str, str]:
    """Partition key -> MATERIALIZED / FAILED / MISSING, plus STALE when materialised but stale."""
    keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
    statuses = instance.get_status_by_partition(classifications(name), keys, batch_partitions) or {}
    assets = [a for a in defs.assets if isinstance(a, (dg.AssetsDefinition, dg.SourceAsset))]
    resolver = get_stale_status_resolver(instance, assets)
    view = {}
    for key in keys:
        status = statuses[key].value if statuses.get(key) else "MISSING"
        if status == "MATERIALIZED" and resolver.get_status(classifications(name), key).value == "STALE":
            status = "STALE"
        view[key] = status
    return view


def assert_agree(instance, defs, store) -> dict[str, dict[str, str]]:
    """Dagster's partitions are DuckDB's batches, and materialised (fresh) exactly where complete."""
    current = partition_keys(store)
    assert sorted(instance.get_dynamic_partitions(BATCH_PARTITIONS)) == sorted(current.values())
    views = {}
    for cfg in load_experiments():
        view = dagster_view(instance, defs, cfg.name)
        done = {current[b] for b in partition_state(store, cfg).done}
        shown = {k for k, s in view.items() if s == "MATERIALIZED"}
        assert shown == done, (cfg.name, view, sorted(done))
        views[cfg.name] = view
    return views


@pytest.mark.slow
def test_partial_failure_unchanged_reingest_and_one_edit_keep_dagster_equal_to_duckdb(project, server):
    special = {(7, "cme"): "Case 7-cme. This one will fail."}
    source = write_long_csv(project / "input.csv", 30, special=special)  # 60 narratives, 3 batches
    write_experiment(project / "experiments", "llm", server.base_url, retries=1)
    defs = build(project, source)
    store = Store(settings.db_path())
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST_KEYS).success
        keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        assert [batch_of(k) for k in keys] == ["b00000", "b00001", "b00002"] and all("-" in k for k in keys)

        # 1. Partial failure: one batch fails for good, two are written.
        server.configure(fail_text="This one will fail.")
        for name in EXPERIMENTS:
            materialize(defs, instance, [classifications(name)], (keys[0], keys[-1]))
        views = assert_agree(instance, defs, store)
        assert sorted(views["llm"].values()) == ["FAILED", "MATERIALIZED", "MATERIALIZED"]
        assert set(views["rules"].values()) == {"MATERIALIZED"}
        server.configure(fail_text=None)
        failed = [k for k, s in views["llm"].items() if s == "FAILED"]
        assert materialize(defs, instance, [classifications("llm")], (failed[0], failed[0])).success
        assert set(assert_agree(instance, defs, store)["llm"].values()) == {"MATERIALIZED"}

        # 2. Unchanged re-ingest: no key, state or staleness changes anywhere.
        before = {name: dagster_view(instance, defs, name) for name in EXPERIMENTS}
        assert materialize(defs, instance, INGEST_KEYS).success
        assert {name: dagster_view(instance, defs, name) for name in EXPERIMENTS} == before

        # 3. One narrative edited: exactly its batch gets a new, missing key, for every
        # experiment; the re-run asks only that narrative.
        special[(25, "le")] = "Case 25-le. Edited after review."
        write_long_csv(source, 30, special=special)
        assert materialize(defs, instance, INGEST_KEYS).success
        views = assert_agree(instance, defs, store)
        new_keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        changed = sorted(set(new_keys) - set(keys))
        assert [batch_of(k) for k in changed] == ["b00002"] and keys[2] not in new_keys  # superseded key deleted
        for name in EXPERIMENTS:
            assert views[name] == {keys[0]: "MATERIALIZED", keys[1]: "MATERIALIZED", changed[0]: "MISSING"}
        server.reset()
        assert materialize(defs, instance, [classifications("llm")], (changed[0], changed[0])).success
        assert server.stats()["completions_ok"] == 1  # the 19 unchanged answers came from the journal
        assert set(assert_agree(instance, defs, store)["llm"].values()) == {"MATERIALIZED"}

        # 4. The edit reverted: a third key (the run in 3 replaced the batch's rows, so the
        # first key's materialisation no longer describes DuckDB), missing; its re-run asks
        # nothing (the original answer is journalled).
        del special[(25, "le")]
        write_long_csv(source, 30, special=special)
        assert materialize(defs, instance, INGEST_KEYS).success
        (reverted,) = set(instance.get_dynamic_partitions(BATCH_PARTITIONS)) - set(keys[:2])
        assert batch_of(reverted) == "b00002" and reverted not in (keys[2], changed[0])
        assert dagster_view(instance, defs, "llm")[reverted] == "MISSING"
        server.reset()
        assert materialize(defs, instance, [classifications("llm")], (reverted, reverted)).success
        assert server.stats()["chat_requests"] == 0
        # `rules` never ran on the edit, so its rows for the original text are still there: the
        # one disagreement allowed is this safe one (done in DuckDB, missing in Dagster), and
        # materialising the missing partition records it without classifying anything.
        assert dagster_view(instance, defs, "rules")[reverted] == "MISSING"
        (rules,) = [c for c in load_experiments() if c.name == "rules"]
        assert "b00002" in partition_state(store, rules).done
        written_before = store.read_classifications("rules")["written_at"].max()
        assert materialize(defs, instance, [classifications("rules")], (reverted, reverted)).success
        assert store.read_classifications("rules")["written_at"].max() == written_before
        views = assert_agree(instance, defs, store)
        assert set(views["llm"].values()) == set(views["rules"].values()) == {"MATERIALIZED"}


@pytest.mark.slow
def test_label_edit_makes_metrics_stale_and_no_batch_need_work(project):
    source = write_long_csv(project / "input.csv", 30)
    defs = build(project, source)
    store = Store(settings.db_path())
    metrics = dg.AssetKey(["rules", "metrics"])
    assets = [a for a in defs.assets if isinstance(a, (dg.AssetsDefinition, dg.SourceAsset))]
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST_KEYS).success
        keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        assert materialize(defs, instance, [classifications("rules")], (keys[0], keys[-1])).success
        assert materialize(defs, instance, [metrics]).success
        assert get_stale_status_resolver(instance, assets).get_status(metrics).value == "FRESH"
        assert materialize(defs, instance, INGEST_KEYS).success  # unchanged: metrics stay fresh
        assert get_stale_status_resolver(instance, assets).get_status(metrics).value == "FRESH"

        text = source.read_text().splitlines()
        header, first = text[0], text[1].rsplit(",", 1)
        text[1] = f"{first[0]},{1 - int(first[1])}"  # one label flipped, no text changed
        source.write_text("\n".join([header, *text[1:]]) + "\n")
        assert materialize(defs, instance, INGEST_KEYS).success
        assert instance.get_dynamic_partitions(BATCH_PARTITIONS) == keys
        assert set(assert_agree(instance, defs, store)["rules"].values()) == {"MATERIALIZED"}
        causes = get_stale_status_resolver(instance, assets).get_stale_root_causes(metrics)
        assert [c.key.asset_key for c in causes] == [dg.AssetKey("narratives")]


@pytest.mark.slow
def test_config_edit_shows_as_a_code_version_change_everywhere(project):
    source = write_long_csv(project / "input.csv", 30)
    store = Store(settings.db_path())
    with dg.instance_for_test() as instance:
        defs = build(project, source)
        assert materialize(defs, instance, INGEST_KEYS).success
        keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        assert materialize(defs, instance, [classifications("rules")], (keys[0], keys[-1])).success
        path = project / "experiments" / "rules.yaml"
        edited = path.read_text().replace("skip_placeholders: true", "skip_placeholders: false")
        assert edited != path.read_text(), "the rules experiment file changed shape; edit another field"
        path.write_text(edited)
        defs = build(project, source)
        (cfg,) = [c for c in load_experiments() if c.name == "rules"]
        assert defs.get_assets_def(classifications("rules")).code_versions_by_key[classifications("rules")] == (
            cfg.config_hash
        )
        assets = [a for a in defs.assets if isinstance(a, (dg.AssetsDefinition, dg.SourceAsset))]
        resolver = get_stale_status_resolver(instance, assets)
        for key in keys:
            (cause,) = resolver.get_stale_root_causes(classifications("rules"), key)
            assert cause.category.value == "CODE" and "code version" in cause.reason
        state = partition_state(store, cfg)
        assert state.done == [] and len(state.missing) == 3  # DuckDB agrees: nothing done for this config
        # One action re-runs it: materialise all partitions (the UI's "Materialize all").
        assert materialize(defs, instance, [classifications("rules")], (keys[0], keys[-1])).success
        assert set(assert_agree(instance, defs, store)["rules"].values()) == {"MATERIALIZED"}


def test_a_key_outdated_between_launch_and_step_fails_alone(project):
    """A re-ingest between launch and step: the current keys are classified, the outdated one fails."""
    from narr_assets.defs.experiment import split_keys

    source = write_long_csv(project / "input.csv", 30)
    defs = build(project, source)
    store = Store(settings.db_path())
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST_KEYS).success
        keys = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        assert split_keys(store, keys) == (["b00000", "b00001", "b00002"], [])
        write_long_csv(source, 30, special={(0, "cme"): "Case 0-cme. Edited."})
        assert materialize(defs, instance, INGEST_KEYS).success
        # As if the run had been launched before the ingest deleted the old key.
        instance.add_dynamic_partitions(BATCH_PARTITIONS, [keys[0]])
        registered = instance.get_dynamic_partitions(BATCH_PARTITIONS)
        assert registered[-1] == keys[0] and len(registered) == 4
        result = materialize(defs, instance, [classifications("rules")], (registered[0], registered[-1]))
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert f"partition(s) {keys[0]} no longer match the narratives" in str(failure.step_failure_data.error)
        statuses = instance.get_status_by_partition(classifications("rules"), registered, batch_partitions)
        assert {k: s.value for k, s in statuses.items()} == {
            **{k: "MATERIALIZED" for k in registered[:3]},
            keys[0]: "FAILED",
        }
        (rules,) = [c for c in load_experiments() if c.name == "rules"]
        assert partition_state(store, rules).done == ["b00000", "b00001", "b00002"]
