"""Ingestion never destroys: refusals, change counts, removed narratives, checksums, locking.

Every refusal is checked against a snapshot of every ingestion table taken before it: a
refused file must leave them exactly as they were.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import openpyxl
import pytest
from conftest import NEGATIVE, POSITIVE, ROOT, materialize

from narr_assets import ingest as reader_module
from narr_assets import quality, settings
from narr_assets.classify import classify_batches
from narr_assets.corpus import IngestRefused, build_narratives, ingest_raw, ingestion_lock
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS
from narr_assets.defs.resources import NarrSettings
from narr_assets.experiments import load_experiment
from narr_assets.ingest import file_checksum, read_source
from narr_assets.results import evaluation_rows
from narr_assets.status import summarise_statuses
from narr_assets.store import Store

warnings.filterwarnings("ignore", category=dg.BetaWarning)
pytestmark = pytest.mark.reliability  # ingestion scenarios of the README's reliability table

TABLES = (
    "raw_narratives",
    "narratives",
    "rejected_rows",
    "narrative_conflicts",
    "batch_ledger",
    "ingest_log",
    "removed_narratives",
)
HEADER = ["incident_id", "narrative_type", "narrative_text", "manual_flag_ind"]


def snapshot(store: Store, drop: tuple[str, ...] = ()) -> dict[str, list[tuple[Any, ...]]]:
    """Every ingestion table as sorted rows of plain values (`drop`: columns left out)."""
    out = {}
    for table in TABLES:
        frame = store.query_df(f"SELECT * FROM {table}").drop(columns=list(drop), errors="ignore")
        frame = frame.astype(object).where(frame.notna(), None)
        out[table] = sorted((tuple(map(str, row)) for row in frame.itertuples(index=False)), key=str)
    return out


def write_rows(path: Path, rows: list[list[Any]]) -> Path:
    """A long-layout CSV: the header, then `rows`."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def corpus_rows(n: int, edits: dict[tuple[str, str], list[Any]] | None = None) -> list[list[Any]]:
    """`n` incidents x (cme, le) with distinct texts; `edits` replaces the row of a key."""
    rows = []
    for i in range(n):
        for t in ("cme", "le"):
            row = [str(1000 + i), t, f"{POSITIVE if i % 3 == 0 else NEGATIVE} Case {i}-{t}.", int(i % 3 == 0)]
            rows.append((edits or {}).get((str(1000 + i), t), row))
    return rows


def messy_corpus(path: Path, n: int = 10) -> Path:
    """A corpus with one rejected row and one conflicting duplicate, so every table has rows."""
    return write_rows(path, [*corpus_rows(n), ["", "cme", "a narrative without an ID"], ["1000", "cme", "other", 0]])


def ingest(store: Store, path: Path, **options: Any) -> dict[str, int]:
    """Both ingestion steps; the stats of the second (with the change counts)."""
    ingest_raw(store, path, **options)
    result, _ = build_narratives(store, batch_size=4)
    return result.stats


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "narr.duckdb")


@pytest.fixture
def filled(tmp_path: Path, store: Store) -> Path:
    """A store with rows in every ingestion table (one incident removed); returns the source."""
    ingest(store, messy_corpus(tmp_path / "first.csv", n=10))
    source = messy_corpus(tmp_path / "in.csv", n=9)
    ingest(store, source)
    return source


def test_every_table_of_the_filled_store_has_rows(filled, store):
    """The snapshots below compare something: each table has rows before the refused file."""
    assert all(snapshot(store)[table] for table in TABLES)


@pytest.mark.parametrize("fmt", ["csv", "xlsx"])
def test_header_only_file_is_refused_and_changes_nothing(tmp_path, store, filled, fmt):
    before = snapshot(store)
    empty = tmp_path / f"empty.{fmt}"
    if fmt == "csv":
        write_rows(empty, [])
    else:
        workbook = openpyxl.Workbook()
        workbook.active.append(HEADER)
        workbook.save(empty)
    with pytest.raises(IngestRefused) as refused:
        ingest_raw(store, empty)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(empty))
    assert "a header and no data rows" in message and "nothing was changed" in message
    assert snapshot(store) == before
    assert store.current_checksum() == file_checksum(filled)


def test_all_empty_narratives_are_refused_and_change_nothing(tmp_path, store, filled):
    before = snapshot(store)
    blank = write_rows(tmp_path / "blank.csv", [["1", "cme", ""], ["2", "le", "   "], ["3", "cme", ""]])
    with pytest.raises(IngestRefused, match=r"3 data row\(s\) but no usable narrative \(3 empty narrative cell"):
        ingest_raw(store, blank)
    assert snapshot(store) == before


def test_build_narratives_refuses_an_empty_raw_table(store):
    """A never-filled `raw_narratives` no longer writes an empty corpus and a null checksum."""
    with pytest.raises(IngestRefused, match=r"raw_narratives: nothing to ingest.*nothing was changed"):
        build_narratives(store)
    assert store.query_row("SELECT count(*) FROM ingest_log") == (0,)


def test_mass_removal_is_refused_then_allowed(tmp_path, store, filled):
    before = snapshot(store)  # 18 narratives, 2 removed earlier
    small = write_rows(tmp_path / "small.csv", corpus_rows(4))  # keeps 8: removes 10 of 18
    with pytest.raises(IngestRefused) as refused:
        ingest_raw(store, small)
    message = str(refused.value)
    assert "\n" not in message and "would remove 10 of the 18 stored narratives" in message
    assert "nothing was changed" in message and "--allow-removal" in message
    assert snapshot(store) == before

    stats = ingest(store, small, allow_mass_removal=True)
    assert stats["removed"] == 10 and stats["unchanged"] == 8 and stats["narratives"] == 8
    removed = store.read_removed()
    assert len(removed) == 12
    assert sorted(removed["data_checksum"].value_counts().tolist()) == [2, 10]
    assert (removed["data_checksum"] == file_checksum(small)).sum() == 10
    assert set(removed["batch_id"]) <= set(store.read_ledger()["batch_id"])
    assert removed["removed_at"].notna().all()


def test_removing_exactly_half_is_not_a_mass_removal(tmp_path, store):
    ingest(store, write_rows(tmp_path / "in.csv", corpus_rows(10)))
    stats = ingest(store, write_rows(tmp_path / "half.csv", corpus_rows(5)))
    assert stats["removed"] == 10 and stats["narratives"] == 10


def test_change_counts_are_returned_logged_and_compared_with_what_was_stored(tmp_path, store):
    first = ingest(store, write_rows(tmp_path / "in.csv", corpus_rows(10)))
    assert (first["added"], first["changed"], first["removed"], first["unchanged"]) == (20, 0, 0, 0)
    edits = {
        ("1001", "cme"): ["1001", "cme", "An edited narrative.", 0],  # text changed
        ("1002", "le"): ["1002", "le", f"{NEGATIVE} Case 2-le.", 1],  # label changed only
        ("1004", "cme"): ["1004", "cme", "Edited text and label.", 1],  # both: counts as changed
    }
    rows = [r for r in corpus_rows(10, edits) if r[0] != "1009"]  # 1009 removed (2 narratives)
    rows += [["2000", "cme", "A new narrative.", 0], ["2000", "le", "Another new one.", 1], ["2001", "le", "Third.", 0]]
    path = write_rows(tmp_path / "edited.csv", rows)
    read = ingest_raw(store, path)
    expected = {"added": 3, "changed": 2, "labels_changed": 1, "removed": 2, "unchanged": 15, "restored": 0}
    assert read.changes == expected  # the preview, before anything is written
    result, _ = build_narratives(store, batch_size=4)
    assert {k: result.stats[k] for k in expected} == expected
    (logged,) = store.query_row("SELECT stats FROM ingest_log ORDER BY loaded_at DESC LIMIT 1")
    assert {k: json.loads(logged)[k] for k in expected} == expected


def test_labels_only_change_keeps_results_current(project):
    store = Store(settings.db_path())
    ingest(store, write_rows(project / "in.csv", corpus_rows(4)))
    cfg = load_experiment(project / "experiments" / "rules.yaml")
    classify_batches(cfg, store, store.batch_ids(), journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir())
    relabelled = corpus_rows(4, {("1001", "le"): ["1001", "le", f"{NEGATIVE} Case 1-le.", 1]})
    stats = ingest(store, write_rows(project / "relabelled.csv", relabelled))
    assert (stats["labels_changed"], stats["changed"], stats["unchanged"]) == (1, 0, 7)
    row = store.query_df("SELECT * FROM classifications WHERE incident_id = '1001' AND narrative_type = 'le'")
    assert row["manual_flag_ind"].tolist() == [1] and row["is_stale"].tolist() == [False]


def test_removed_narratives_results_are_flagged_excluded_and_restored(project):
    store = Store(settings.db_path())
    ingest(store, write_rows(project / "in.csv", corpus_rows(6)))
    cfg = load_experiment(project / "experiments" / "rules.yaml")
    classify_batches(cfg, store, store.batch_ids(), journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir())
    assert sum(summarise_statuses(store, cfg)["by_status"].values()) == 12

    without = write_rows(project / "without.csv", [r for r in corpus_rows(6) if r[0] != "1002"])
    stats = ingest(store, without)
    assert stats["removed"] == 2
    # The rows are kept, flagged, and out of every current count.
    assert store.query_row("SELECT count(*) FROM classification_rows") == (12,)
    view = store.query_df("SELECT * FROM classifications")
    assert len(view) == 10 and "1002" not in set(view["incident_id"]) and view["narrative_text"].notna().all()
    flagged = store.query_df("SELECT * FROM removed_classifications")
    assert sorted(flagged["narrative_type"]) == ["cme", "le"] and set(flagged["incident_id"]) == {"1002"}
    assert flagged["removed_at"].notna().all()
    assert set(flagged["removed_by_checksum"]) == {file_checksum(without)}
    statuses = summarise_statuses(store, cfg)
    assert sum(statuses["by_status"].values()) == 10 and statuses["removed_rows"] == 2
    assert "1002" not in set(evaluation_rows(store, cfg)["incident_id"])  # metrics read these rows
    # The experiment's check counts them apart: kept on purpose, not orphans.
    passed, meta = quality.one_row_per_narrative(store, cfg.name)
    assert passed and meta["orphaned_rows"] == 0 and meta["removed_narrative_rows"] == 2

    stats = ingest(store, write_rows(project / "back.csv", corpus_rows(6)))
    assert stats["added"] == 2 and stats["restored"] == 2
    assert store.read_removed().empty
    assert store.query_row("SELECT count(*) FROM removed_classifications") == (0,)
    back = store.query_df("SELECT * FROM classifications WHERE incident_id = '1002'")
    assert len(back) == 2 and not back["is_stale"].any()  # same text: the old answers are current again
    assert summarise_statuses(store, cfg)["removed_rows"] == 0


@pytest.mark.parametrize(("fmt", "reader"), [("csv", "_read_csv_rows"), ("xlsx", "_read_calamine")])
def test_checksum_is_of_the_bytes_parsed_even_if_the_file_is_replaced(tmp_path, store, monkeypatch, fmt, reader):
    """The file is swapped (atomic rename) right after the reader parsed it, before any hashing."""
    source, replacement = tmp_path / f"in.{fmt}", tmp_path / f"new.{fmt}"
    old_rows, new_rows = corpus_rows(3), corpus_rows(3, {("1000", "cme"): ["1000", "cme", "Edited after.", 0]})

    def write_both() -> None:
        for path, rows in ((source, old_rows), (replacement, new_rows)):
            if fmt == "csv":
                write_rows(path, rows)
            else:
                workbook = openpyxl.Workbook()
                for row in [HEADER, *rows]:
                    workbook.active.append(row)
                workbook.save(path)

    write_both()
    old_hash = hashlib.md5(source.read_bytes()).hexdigest()
    parse = getattr(reader_module, reader)

    def parse_then_swap(*args: Any, **kwargs: Any) -> Any:
        parsed = parse(*args, **kwargs)
        os.replace(replacement, source)
        return parsed

    monkeypatch.setattr(reader_module, reader, parse_then_swap)
    load = read_source(source)
    assert load.checksum == old_hash != file_checksum(source)
    assert "Edited after." not in set(load.frame["narrative_text"])

    # Through the corpus: the stored checksum is the old file's, so the edit is picked up next time.
    write_both()
    old_hash = hashlib.md5(source.read_bytes()).hexdigest()  # a workbook's bytes hold its save time
    ingest(store, source)
    assert store.current_checksum() == old_hash
    assert set(store.query_df("SELECT DISTINCT data_checksum FROM raw_narratives")["data_checksum"]) == {old_hash}
    assert store.current_checksum() != file_checksum(source)


WORKER = """
import sys
from pathlib import Path
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.store import Store

db, source, locks, steps = sys.argv[1:5]
store = Store(db)
log = lambda line: print(line, file=sys.stderr, flush=True)
if steps == "both":
    ingest_raw(store, Path(source), locks_dir=Path(locks), log=log)
build_narratives(store, batch_size=7, locks_dir=Path(locks), log=log)
"""


@pytest.mark.parametrize("steps", ["both", "build"])
def test_two_processes_ingesting_at_once_take_turns(tmp_path, steps):
    """Both start while the lock is held, both wait, both succeed, and the tables are as after one ingest.

    `build`: the two processes run only `build_narratives` over an already loaded
    `raw_narratives`, where the batch ledger is read and extended (the duplicate-key race).
    """
    source = messy_corpus(tmp_path / "in.csv", n=30)
    locks = tmp_path / "locks"
    shared, reference = Store(tmp_path / "shared.duckdb"), Store(tmp_path / "reference.duckdb")
    if steps == "build":
        ingest_raw(shared, source, locks_dir=locks)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [tmp_path / f"worker{i}.err" for i in range(2)]
    with ingestion_lock(locks):
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(shared.path), str(source), str(locks), steps],
                stderr=open(log, "w"),  # noqa: SIM115 - closed by the process's exit
                env=env,
            )
            for log in logs
        ]
        deadline = time.monotonic() + 60
        while not all("waiting for another ingestion" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(w.poll() is None for w in workers), [log.read_text() for log in logs]
            time.sleep(0.05)
    assert [w.wait(timeout=120) for w in workers] == [0, 0], [log.read_text() for log in logs]
    assert all(f"(pid {os.getpid()} since " in log.read_text() for log in logs)

    ingest_raw(reference, source, locks_dir=locks)
    build_narratives(reference, batch_size=7, locks_dir=locks)
    stamps = ("loaded_at", "added_at", "stats")
    got, want = snapshot(shared, drop=stamps), snapshot(reference, drop=stamps)
    assert got.pop("ingest_log") == want["ingest_log"] * 2
    assert got == {k: v for k, v in want.items() if k != "ingest_log"}
    logged = [json.loads(s) for (s,) in shared.query_rows("SELECT stats FROM ingest_log ORDER BY loaded_at")]
    assert logged[1]["added"] == 0 and logged[1]["unchanged"] == logged[0]["added"] == 60


def write_formula_workbook(path: Path, formula_rows: int = 1) -> Path:
    """Wide layout; `formula_rows` rows whose CME narrative is a formula saved without a value."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["IncidentID", "NarrativeCME", "NarrativeLE"])
    for i in range(formula_rows):
        sheet.append([str(100 + i), f'=HYPERLINK("https://example.org/{i}", "case {i}")', None])
    workbook.save(path)
    return path


def test_a_sheet_of_formulas_without_values_is_refused_with_the_reason(tmp_path, store, filled):
    before = snapshot(store)
    with pytest.raises(IngestRefused) as refused:
        ingest_raw(store, write_formula_workbook(tmp_path / "formulas.xlsx", formula_rows=3))
    message = str(refused.value)
    assert "3 rejected row(s)" in message and "first rejected: row 2: column NarrativeCME holds a formula" in message
    assert "https://example.org" not in message  # no cell content in the message
    assert snapshot(store) == before


def test_ingest_assets_refuse_an_empty_file_and_a_mass_removal_through_dagster(project):
    source = messy_corpus(project / "in.csv")
    defs = build_definitions(settings=NarrSettings(source=str(source), data_dir=str(project), batch_size=4))
    store = Store(settings.db_path())

    def run(run_config: dict | None = None) -> dg.ExecuteInProcessResult:
        return materialize(defs, instance, INGEST_KEYS, run_config=run_config)

    with dg.instance_for_test() as instance:
        assert run().success
        partitions = instance.get_dynamic_partitions("narrative_batches")
        before = snapshot(store)

        write_rows(source, [])
        result = run()
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert failure.step_key == "raw_narratives"
        description = failure.step_failure_data.user_failure_data.description
        assert description == (
            f"{source}: nothing to ingest, found a header and no data rows; nothing was changed "
            "(check the source file and sheet)"
        )
        assert snapshot(store) == before
        assert instance.get_dynamic_partitions("narrative_batches") == partitions

        write_rows(source, corpus_rows(2))  # removes 16 of 20
        assert not run().success
        assert snapshot(store) == before
        op = defs.get_assets_def(dg.AssetKey("raw_narratives")).op.name
        result = run({"ops": {op: {"config": {"allow_mass_removal": True}}}})
        assert result.success
        meta = {
            m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()
        }
        assert meta["raw_narratives"]["removed"].value == 16 and meta["narratives"]["removed"].value == 16
        assert meta["narratives"]["unchanged"].value == 4
        assert len(store.read_removed()) == 16
