"""The experiment registry, config columns in the comparisons, and which F1 every headline names."""

from __future__ import annotations

import json
import warnings

import dagster as dg
from conftest import materialize, write_experiment, write_long_csv

from narr_assets import cli, evaluation, settings
from narr_assets.classify import classify_batches
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.definitions import build_definitions
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import load_experiment
from narr_assets.results import evaluate_experiment
from narr_assets.store import REGISTRY_COLUMNS, Store

warnings.filterwarnings("ignore", category=dg.BetaWarning)

SECRET = "sk-registry-test-0123456789"
HOSTED = """
description: hosted, indicators prompt
backend: openai
model:
  name: gpt-oss-120b
  base_url: https://alice:hunter2@api.example.org:8443/v1
  api_key_env: REGISTRY_TEST_KEY
  temperature: {temperature}
  max_tokens: 8192
  seed: 7
  reasoning_effort: high
prompt:
  version: indicators-v2
  system: Decide whether the decedent was a victim of intimate partner violence.
  user_template: "<narrative>\\n<<TEXT>>\\n</narrative>"
output:
  mode: json_object
"""


def _corpus(project, incidents: int = 4) -> tuple[Store, list[str]]:
    store = Store(settings.db_path())
    ingest_raw(store, write_long_csv(project / "in.csv", incidents))
    return store, build_narratives(store, batch_size=100)[1]


def _registry(store: Store) -> list[dict]:
    frame = store.read_registry()
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def test_openai_registry_row_has_the_config_and_never_the_key(project, monkeypatch):
    monkeypatch.setenv("REGISTRY_TEST_KEY", SECRET)
    store, _ = _corpus(project)
    path = project / "experiments" / "hosted.yaml"
    path.write_text(HOSTED.format(temperature=0.2))
    cfg = load_experiment(path)
    assert cfg.api_key() == SECRET  # the key is set: the registry still must not hold it

    evaluate_experiment(store, cfg)  # nothing classified yet: the config is registered anyway
    (row,) = _registry(store)
    assert {k: row[k] for k in REGISTRY_COLUMNS if k != "config"} == {
        "experiment": "hosted",
        "config_hash": cfg.config_hash,
        "backend": "openai",
        "model": "gpt-oss-120b",
        "base_url": "https://api.example.org:8443/v1",  # user and password cut out
        "api_key_env": "REGISTRY_TEST_KEY",  # the variable's name, never its value
        "temperature": 0.2,
        "seed": 7,
        "max_tokens": 8192,
        "reasoning_effort": "high",
        "prompt_version": "indicators-v2",
        "system_prompt": "Decide whether the decedent was a victim of intimate partner violence.",
        "user_template": "<narrative>\n<<TEXT>>\n</narrative>",
        "output_mode": "json_object",
        "source_file": str(path),
        "description": "hosted, indicators prompt",
    }
    hashed = cfg.effective()
    assert hashed["model"]["base_url"] == "https://alice:hunter2@api.example.org:8443/v1"
    assert json.loads(row["config"]) == {**hashed, "model": {**hashed["model"], "base_url": row["base_url"]}}
    assert row["first_seen"] is not None and row["last_seen"] == row["first_seen"]
    # Nowhere in the database file: not in the registry, not in any other table.
    assert SECRET.encode() not in settings.db_path().read_bytes()
    assert b"hunter2" not in settings.db_path().read_bytes()


def test_rerun_keeps_first_seen_and_an_edited_config_gets_its_own_row(project, monkeypatch):
    monkeypatch.setenv("REGISTRY_TEST_KEY", SECRET)
    store, _ = _corpus(project)
    path = project / "experiments" / "hosted.yaml"
    path.write_text(HOSTED.format(temperature=0.2))
    first = load_experiment(path)
    evaluate_experiment(store, first)
    (before,) = _registry(store)

    evaluate_experiment(store, load_experiment(path))  # the same config again
    (again,) = _registry(store)
    assert again["first_seen"] == before["first_seen"] and again["last_seen"] > before["last_seen"]

    path.write_text(HOSTED.format(temperature=0.7))  # an edit: a new config hash, the old row stays
    edited = load_experiment(path)
    evaluate_experiment(store, edited)
    rows = _registry(store)
    assert [(r["config_hash"], r["temperature"]) for r in rows] == [(first.config_hash, 0.2), (edited.config_hash, 0.7)]
    assert rows[0]["first_seen"] == before["first_seen"] and rows[1]["first_seen"] > before["first_seen"]


def test_rules_registry_row(project):
    store, batches = _corpus(project)
    cfg = load_experiment(project / "experiments" / "rules.yaml")
    classify_batches(cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir())
    evaluate_experiment(store, cfg)
    (row,) = _registry(store)
    assert (row["experiment"], row["backend"], row["model"], row["config_hash"]) == (
        "rules",
        "rules",
        "rules",
        cfg.config_hash,
    )
    # A lexicon classifier has no endpoint, sampling or prompt: those are null, not defaults.
    unset = ("base_url", "api_key_env", "temperature", "seed", "max_tokens", "reasoning_effort", "prompt_version")
    assert all(row[k] is None for k in (*unset, "system_prompt", "user_template", "output_mode"))
    assert json.loads(row["config"])["lexicon_sha"] == cfg.lexicon_sha and row["source_file"].endswith("rules.yaml")


def test_comparisons_carry_the_config_and_name_the_f1_variant(project, server, capsys):
    """Through the Dagster assets: registry, leaderboard, pairwise table, report and `narr materialize`'s lines."""
    store, batches = _corpus(project, incidents=10)
    folder = project / "experiments"
    (folder / "rules.yaml").unlink()
    cold = load_experiment(write_experiment(folder, "cold", server.base_url, version="p1"))
    hot_path = write_experiment(folder, "hot", server.base_url, version="p1")
    hot_path.write_text(hot_path.read_text().replace("temperature: 0.0", "temperature: 0.7"))
    hot = load_experiment(hot_path)
    for cfg in (cold, hot):
        classify_batches(cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir())
    defs = build_definitions(settings=NarrSettings(source=str(project / "in.csv"), data_dir=str(project)))
    keys = [dg.AssetKey(["cold", "metrics"]), dg.AssetKey(["hot", "metrics"]), dg.AssetKey("leaderboard")]
    with dg.instance_for_test() as instance:
        result = materialize(defs, instance, [*keys, dg.AssetKey("report")])
    assert result.success
    (shown,) = [
        m.materialization.metadata["leaderboard"].value
        for m in result.get_asset_materialization_events()
        if m.asset_key == dg.AssetKey("leaderboard")
    ]
    assert "strict_f1" in shown and "answered_f1" in shown and "temperature" in shown  # the UI's table

    assert set(store.read_registry()["experiment"]) == {"cold", "hot"}
    board = store.query_df("SELECT * FROM leaderboard ORDER BY experiment")
    config = board[["experiment", "model", "temperature", "prompt_version", "reasoning_effort"]]
    assert config.astype(object).where(config.notna(), None).values.tolist() == [
        ["cold", "test-model", 0.0, "p1", None],
        ["hot", "test-model", 0.7, "p1", None],
    ]
    assert list(board["config_hash"]) == [cold.config_hash, hot.config_hash]
    assert set(board["headline_variant"]) == {"strict"}
    kept = ["rank", *evaluation.summary_row_columns()]  # the columns other code reads are all there
    assert [c for c in board.columns if c in kept] == kept
    pair = store.query_df("SELECT * FROM pairwise_comparisons").iloc[0]
    assert (pair["experiment_a"], pair["temperature_a"], pair["experiment_b"], pair["temperature_b"]) == (
        "cold",
        0.0,
        "hot",
        0.7,
    )
    assert pair["model_a"] == pair["model_b"] == "test-model" and pair["prompt_version_b"] == "p1"

    html = (settings.reports_dir() / "report.html").read_text()
    for header in ("model", "temperature", "prompt version", "reasoning effort", "strict F1", "answered F1"):
        assert f">{header}</th>" in html
    assert '"t">test-model</td>' in html and "<td>0.7</td>" in html and '"t">p1</td>' in html
    assert "the R system&rsquo;s F1 is the answered F1" in html
    assert "test-model, T=0.7, prompt p1" in html  # the pairwise table's B side

    cli._print_where()  # what `narr materialize` prints after its runs
    out = capsys.readouterr().out
    assert "strict F1: unanswered counted as wrong" in out and "answered F1: unanswered left out" in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("1. ", "2. "))]
    assert len(lines) == 2 and all(" strict F1 " in line and " answered F1 " in line for line in lines)
