"""The R system's results and configs: import, materialise with the stored F1, stale texts, YAML conversion."""

from __future__ import annotations

import csv
import sqlite3
import warnings
from pathlib import Path

import dagster as dg
import pytest
import yaml
from conftest import NEGATIVE, POSITIVE, materialize
from sklearn.metrics import precision_recall_fscore_support

from narr_assets import settings
from narr_assets.classify import classify_batches
from narr_assets.cli import main
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import PLACEHOLDER, ExperimentError, load_experiment, load_experiments
from narr_assets.legacy import import_legacy
from narr_assets.store import Store
from narr_assets.vocabulary import OK, PARSE_ERROR, REJECTED

warnings.filterwarnings("ignore", category=dg.BetaWarning)

SYSTEM = "You read death investigation narratives.\nDecide whether the decedent was an IPV victim.\n"
TEMPLATE = 'Narrative:\n{narrative_text}\nAnswer as JSON: {"detected": true|false}'
# Incident ids as the R system wrote them: 100000 as `1e+05`, the others as plain numbers.
INCIDENTS = ["1e+05", *[str(100001 + i) for i in range(9)]]
OUR_IDS = ["100000", *[str(100001 + i) for i in range(9)]]


def _narratives() -> list[tuple[str, str, str, int]]:
    """(R incident id, R type, text, label) for 10 incidents x 2 types; the LE type in upper case."""
    out = []
    for i, incident in enumerate(INCIDENTS):
        for ntype in ("cme", "LE"):
            label = int((i + (ntype == "LE")) % 3 == 0)
            text = (POSITIVE if label else NEGATIVE) + f" Case {i}-{ntype.lower()}."
            out.append((incident, ntype, text, label))
    return out


# Per experiment: (verdicts by narrative index, error rows {index: raw response or None}, left out).
EXPERIMENTS = {
    1: {"wrong": {0, 5}, "errors": {3: "I cannot tell.", 8: None}, "missing": set()},
    2: {"wrong": {2, 7, 11}, "errors": {4: None}, "missing": {19}},
}


def build_legacy_db(path: Path, *, f1_offset: float = 0.0) -> Path:
    """An R system results database: two experiments over 20 narratives, with error rows.

    The stored precision/recall/F1 are computed here with scikit-learn over the non-error rows
    (the R system's way); `f1_offset` spoils the stored F1 of experiment 2.
    """
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE source_narratives (incident_id TEXT, narrative_type TEXT, narrative_text TEXT,
            manual_flag_ind INTEGER, manual_flag INTEGER, data_source TEXT, data_checksum TEXT, loaded_at TEXT);
        CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, experiment_name TEXT, status TEXT,
            model_name TEXT, model_provider TEXT, temperature REAL, system_prompt TEXT, user_template TEXT,
            prompt_version TEXT, prompt_author TEXT, run_seed INTEGER, data_file TEXT, start_time TEXT,
            end_time TEXT, total_runtime_sec REAL, api_url TEXT, precision_ipv REAL, recall_ipv REAL,
            f1_ipv REAL, n_true_positive INTEGER, n_true_negative INTEGER, n_false_positive INTEGER,
            n_false_negative INTEGER, notes TEXT);
        CREATE TABLE narrative_results (experiment_id INTEGER, incident_id TEXT, narrative_type TEXT,
            narrative_text TEXT, manual_flag_ind INTEGER, manual_flag INTEGER, detected INTEGER,
            confidence REAL, indicators TEXT, rationale TEXT, reasoning_steps TEXT, raw_response TEXT,
            response_sec REAL, processed_at TEXT, error_occurred INTEGER, error_message TEXT,
            prompt_tokens INTEGER, completion_tokens INTEGER, tokens_used INTEGER);
        """
    )
    narratives = _narratives()
    for incident, ntype, text, label in narratives:
        con.execute(
            "INSERT INTO source_narratives VALUES (?, ?, ?, ?, NULL, 'sample.xlsx', 'abc', '2025-01-01 10:00:00')",
            (incident, ntype, text, label),
        )
    for exp_id, spec in EXPERIMENTS.items():
        truth, pred = [], []
        for index, (incident, ntype, text, label) in enumerate(narratives):
            if index in spec["missing"]:
                continue
            error = index in spec["errors"]
            detected = None if error else (1 - label if index in spec["wrong"] else label)
            raw = spec["errors"].get(index) if error else '{"detected": %s}' % ("true" if detected else "false")
            con.execute(
                "INSERT INTO narrative_results VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, NULL, ?, 1.5, "
                "'2025-01-02 10:00:00', ?, ?, 300, 40, 340)",
                (exp_id, incident, ntype, text, label, detected, None if error else 0.9,
                 '["physical_violence"]' if detected else "[]", "rationale", raw, int(error),
                 "API error: timeout" if error else None),
            )  # fmt: skip
            if not error:
                truth.append(label)
                pred.append(detected)
        precision, recall, f1, _ = precision_recall_fscore_support(truth, pred, average="binary", zero_division=0)
        f1 += f1_offset if exp_id == 2 else 0.0
        con.execute(
            "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, model_provider, "
            "temperature, system_prompt, user_template, prompt_version, prompt_author, run_seed, data_file, "
            "api_url, precision_ipv, recall_ipv, f1_ipv, notes) VALUES (?, ?, 'completed', 'gpt-oss-120b', "
            "'lmstudio', ?, ?, ?, ?, 'jd', 1024, 'data/sample.xlsx', 'http://localhost:1234/v1/chat/completions', "
            "?, ?, ?, 'a note')",
            (exp_id, f"Indicators T0.{exp_id}", exp_id / 10, SYSTEM, TEMPLATE, f"v{exp_id}", precision, recall, f1),
        )
    con.commit()
    con.close()
    return path


def _stored(db: Path) -> dict[int, dict[str, float]]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT experiment_id, precision_ipv, recall_ipv, f1_ipv FROM experiments").fetchall()
    con.close()
    return {r[0]: {"precision": r[1], "recall": r[2], "f1": r[3]} for r in rows}


def test_import_writes_experiment_files_and_a_narratives_csv(project, capsys):
    db = build_legacy_db(project / "legacy.sqlite")
    out = project / "legacy.csv"
    assert main(["import-legacy", str(db), "--narratives-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("equals the stored value") == 2 and "20 narratives" in printed

    configs = {c.name: c for c in load_experiments() if c.backend == "imported"}
    assert sorted(configs) == ["legacy_1_indicators_t0_1", "legacy_2_indicators_t0_2"]
    cfg = configs["legacy_2_indicators_t0_2"]
    assert cfg.legacy is not None and cfg.legacy.experiment_id == 2
    assert Path(cfg.legacy.database) == db.resolve()
    assert (cfg.model.name, cfg.model.temperature, cfg.model.seed, cfg.prompt.version) == (
        "gpt-oss-120b",
        0.2,
        1024,
        "v2",
    )
    assert cfg.model.base_url == "http://localhost:1234/v1"
    assert cfg.system_prompt == SYSTEM  # verbatim, trailing newline included
    assert cfg.user_template == TEMPLATE.replace("{narrative_text}", PLACEHOLDER)
    assert "model_provider: lmstudio" in Path(cfg.source_file).read_text()

    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20
    assert {r["incident_id"] for r in rows} == set(OUR_IDS)
    assert {r["narrative_type"] for r in rows} == {"cme", "le"}
    assert (out.stat().st_mode & 0o077) == 0  # narrative text: owner-only

    # Only the named experiment is imported; importing again overwrites our own file.
    (project / "experiments" / "legacy_1_indicators_t0_1.yaml").unlink()
    assert main(["import-legacy", str(db), "--experiment", "2"]) == 0
    assert not (project / "experiments" / "legacy_1_indicators_t0_1.yaml").exists()


def test_narratives_csv_keeps_the_newest_load_and_texts_only_the_results_hold(project):
    db = build_legacy_db(project / "legacy.sqlite")
    con = sqlite3.connect(db)
    # An older load of one narrative, a narrative missing from source_narratives, a missing label.
    con.execute(
        "INSERT INTO source_narratives VALUES ('100001', 'CME', 'an older text', 1, NULL, 'old.xlsx', 'x', "
        "'2024-06-01 10:00:00')"
    )
    con.execute("DELETE FROM source_narratives WHERE incident_id = '100009' AND narrative_type = 'LE'")
    con.execute("UPDATE source_narratives SET manual_flag_ind = NULL WHERE incident_id = '1e+05'")
    con.commit()
    con.close()
    out = project / "legacy.csv"
    import_legacy(db, project / "experiments", out)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {(r["incident_id"], r["narrative_type"]): r for r in csv.DictReader(fh)}
    expected = {
        (OUR_IDS[index // 2], ntype.lower()): (text, str(label))
        for index, (_, ntype, text, label) in enumerate(_narratives())
    }
    assert {k: (r["narrative_text"], r["manual_flag_ind"]) for k, r in rows.items()} == expected


def test_imported_experiments_materialise_with_the_stored_answered_f1(project):
    db = build_legacy_db(project / "legacy.sqlite")
    source = project / "legacy.csv"
    import_legacy(db, project / "experiments", source)
    defs = build_definitions(settings=NarrSettings(source=str(source), data_dir=str(project), batch_size=8))
    store = Store(settings.db_path())
    names = {1: "legacy_1_indicators_t0_1", 2: "legacy_2_indicators_t0_2"}
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, INGEST_KEYS).success
        parts = instance.get_dynamic_partitions("narrative_batches")
        assert len(parts) == 3
        for name in names.values():
            result = materialize(defs, instance, [dg.AssetKey([name, "classifications"])], (parts[0], parts[-1]))
            assert result.success
            assert materialize(defs, instance, [dg.AssetKey([name, "metrics"])]).success
    metrics = store.query_df(
        "SELECT experiment, precision, recall, f1 FROM experiment_metrics "
        "WHERE scope = 'overall' AND variant = 'answered'"
    ).set_index("experiment")
    for exp_id, stored in _stored(db).items():
        for metric, value in stored.items():
            assert metrics.loc[names[exp_id], metric] == pytest.approx(value, abs=1e-12), (exp_id, metric)
    statuses = store.query_df(
        "SELECT experiment, status, count(*) AS n FROM classification_rows GROUP BY ALL ORDER BY ALL"
    ).values.tolist()
    # Experiment 1: one error with an answer it could not use, one without; experiment 2 lacks
    # one narrative entirely: a row all the same, never dropped.
    assert statuses == [
        [names[1], OK, 18],
        [names[1], PARSE_ERROR, 1],
        [names[1], REJECTED, 1],
        [names[2], OK, 18],
        [names[2], REJECTED, 2],
    ]
    missing = store.query_df(
        f"SELECT incident_id, narrative_type, error FROM classification_rows WHERE experiment = '{names[2]}' "
        "AND error LIKE 'no answer%'"
    )
    assert missing[["incident_id", "narrative_type"]].values.tolist() == [["100009", "le"]]


def _corpus(project: Path, edit: dict[int, str] | None = None) -> Path:
    """The legacy narratives as a long CSV, some texts replaced (index -> text)."""
    path = project / "corpus.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["incident_id", "narrative_type", "narrative_text", "manual_flag_ind"])
        for index, (incident, ntype, text, label) in enumerate(_narratives()):
            writer.writerow([incident, ntype, (edit or {}).get(index, text), label])
    return path


def test_a_changed_text_is_reported_stale_and_kept(project):
    db = build_legacy_db(project / "legacy.sqlite")
    (path,) = import_legacy(db, project / "experiments", ids=[1]).files
    cfg = load_experiment(path)
    store = Store(settings.db_path())
    ingest_raw(store, _corpus(project, edit={6: POSITIVE + " Case 3-cme, revised."}))
    batches = build_narratives(store, batch_size=100)[1]
    lines: list[str] = []
    kwargs = {"journal_dir": settings.journal_dir(), "locks_dir": settings.locks_dir()}
    summary = classify_batches(cfg, store, batches, log=lines.append, **kwargs)
    assert summary.narratives == 20 and summary.status_counts[REJECTED] == 2  # the edit, and one R error
    stale = store.query_df("SELECT incident_id, narrative_type, status, detected, error FROM classifications")
    row = stale[(stale.incident_id == "100003") & (stale.narrative_type == "cme")].iloc[0]
    assert row.status == REJECTED and row.error.startswith("stale:") and "revised" not in row.error
    assert [line for line in lines if "stale" in line] == [
        f"{cfg.name}: 1 narrative(s) stale (text changed since the legacy run), kept as status rejected: 100003/cme"
    ]


def test_a_different_database_is_a_different_config_and_a_replaced_one_is_refused(project):
    db = build_legacy_db(project / "legacy.sqlite")
    (path,) = import_legacy(db, project / "experiments", ids=[2]).files
    before = load_experiment(path)
    db.unlink()
    build_legacy_db(db, f1_offset=0.1)
    store = Store(settings.db_path())
    ingest_raw(store, _corpus(project))
    batches = build_narratives(store, batch_size=100)[1]
    kwargs = {"journal_dir": settings.journal_dir(), "locks_dir": settings.locks_dir()}
    with pytest.raises(ExperimentError, match=r"changed since it was imported; re-run `narr import-legacy"):
        classify_batches(before, store, batches, **kwargs)
    import_legacy(db, project / "experiments", ids=[2])
    assert load_experiment(path).config_hash != before.config_hash


def test_import_reports_a_stored_metric_its_rows_do_not_reproduce(project, capsys):
    db = build_legacy_db(project / "legacy.sqlite", f1_offset=0.05)
    assert main(["import-legacy", str(db)]) == 1
    printed = capsys.readouterr().out
    assert printed.count("equals the stored value") == 1
    assert "legacy_2_indicators_t0_2" in printed and "DIFFERS from the stored one: f1 stored" in printed


def test_import_refuses_what_it_cannot_read_in_one_line(project, capsys):
    not_db = project / "notes.sqlite"
    not_db.write_text("hello")
    db = build_legacy_db(project / "legacy.sqlite")
    empty = project / "empty.sqlite"
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.close()
    bad_type = project / "bad_type.sqlite"
    build_legacy_db(bad_type)
    con = sqlite3.connect(bad_type)
    con.execute("UPDATE narrative_results SET narrative_type = 'Narrative' WHERE rowid = 3")
    con.commit()
    con.close()
    cases = [
        ([str(bad_type)], "table narrative_results, rowid 3, column narrative_type: 'Narrative' is not one of"),
        ([str(not_db)], "not an SQLite database"),
        ([str(project / "missing.sqlite")], "legacy database not found"),
        ([str(db), "--experiment", "7"], "no experiment 7 in table experiments (it holds 1, 2)"),
        ([str(empty)], "table experiments not found"),
    ]
    for argv, expected in cases:
        assert main(["import-legacy", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in (project / "experiments").iterdir()) == ["rules.yaml"]


def test_import_never_overwrites_a_file_it_did_not_write_from_this_database(project, capsys):
    db = build_legacy_db(project / "legacy.sqlite")
    other = build_legacy_db(project / "other.sqlite")
    assert main(["import-legacy", str(db)]) == 0
    mine = project / "experiments" / "legacy_2_indicators_t0_2.yaml"
    before = mine.read_text()
    # Another database with the same experiment: refused, and nothing at all written.
    assert main(["import-legacy", str(other), "--narratives-out", str(project / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert f"already imported from {db.resolve()}" in err and len(err.strip().splitlines()) == 1
    assert mine.read_text() == before and not (project / "out.csv").exists()
    # A file of the user's under that name: left alone.
    mine.write_text("backend: rules\n")
    assert main(["import-legacy", str(db), "--experiment", "2"]) == 2
    assert "was not written by `narr import-legacy`" in capsys.readouterr().err
    assert mine.read_text() == "backend: rules\n"


def test_imported_backend_and_legacy_section_go_together(tmp_path):
    legacy = "legacy:\n  database: x.sqlite\n  experiment_id: 1\n  database_sha256: " + "a" * 64 + "\n"
    (tmp_path / "a.yaml").write_text("backend: imported\n")
    (tmp_path / "b.yaml").write_text("backend: rules\n" + legacy)
    for name in ("a", "b"):
        with pytest.raises(ExperimentError, match="backend 'imported' and the `legacy:` section go together"):
            load_experiment(tmp_path / f"{name}.yaml")
    (tmp_path / "c.yaml").write_text("backend: imported\n" + legacy)
    assert load_experiment(tmp_path / "c.yaml").pool is None  # sends no request


R_CONFIG = """
experiment:
  name: Indicators T0.2 (gpt-oss)
  author: J. Doe
  notes: best run of the spring
model:
  name: gpt-oss-120b
  provider: lmstudio
  api_url: http://user:pw@gpu-box:1234/v1/chat/completions
  temperature: 0.2
  api_key: sk-live-0123456789abcdef
prompt:
  version: indicators_v3
  system_prompt: |
    Reasoning: high
    You read death investigation narratives.
  user_template: |
    Narrative:
    {{narrative_text}}
    Answer in JSON.
data:
  file: data/all_suicides_2015.xlsx
run:
  seed: 1024
  max_narratives: 404
  save_raw: true
"""


def test_convert_legacy_config(project, capsys):
    r_file = project / "r_config.yaml"
    r_file.write_text(R_CONFIG)
    assert main(["convert-legacy-config", str(r_file)]) == 0
    assert "6 key(s) not mapped" in capsys.readouterr().out
    path = project / "experiments" / "indicators_t0_2_gpt_oss.yaml"
    cfg = load_experiment(path)
    original = yaml.safe_load(R_CONFIG)
    assert cfg.system_prompt == original["prompt"]["system_prompt"]
    assert cfg.user_template == original["prompt"]["user_template"].replace("{{narrative_text}}", PLACEHOLDER)
    assert (cfg.model.name, cfg.model.temperature, cfg.model.seed) == ("gpt-oss-120b", 0.2, 1024)
    assert cfg.model.base_url == "http://gpu-box:1234/v1" and cfg.description == "best run of the spring"
    text = path.read_text()
    assert "sk-live" not in text and "pw@" not in text
    for note in ("experiment.author", "data.file", "NARR_SOURCE", "run.max_narratives", "model.api_key: not copied"):
        assert note in text
    # A folder: every file converted, an unreadable one named in one line; our own file overwritten.
    (project / "broken.yaml").write_text("experiment: [unclosed\n")
    assert main(["convert-legacy-config", str(project)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"narr: {project / 'broken.yaml'}: not valid YAML") and len(err.splitlines()) == 1
    assert load_experiment(path).system_prompt == cfg.system_prompt
    # A file of the user's under the same name is left alone.
    path.write_text(path.read_text().replace("# Converted by", "# mine", 1))
    assert main(["convert-legacy-config", str(r_file)]) == 1
    assert "was not converted by narr" in capsys.readouterr().err and "# mine" in path.read_text()
