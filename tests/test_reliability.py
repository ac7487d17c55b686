"""Reliability scenarios: endpoint outage, source change mid-run, full disk, torn journal."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import outage_after, write_experiment, write_long_csv

from narr_assets import quality, settings
from narr_assets.classify import ClassificationFailed, classify_batches
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.experiments import load_experiment
from narr_assets.ingest import file_checksum
from narr_assets.results import evaluation_rows
from narr_assets.status import partition_state
from narr_assets.store import Store

pytestmark = pytest.mark.reliability


def ingest(store: Store, source: Path, batch_size: int = 10) -> list[str]:
    ingest_raw(store, source)
    return build_narratives(store, batch_size=batch_size)[1]


def run(cfg, store, batches, **kwargs):
    return classify_batches(
        cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir(), **kwargs
    )


def assert_complete(store: Store, experiment: str, n: int) -> None:
    rows = store.read_classifications(experiment)
    assert len(rows) == n and not rows[["incident_id", "narrative_type"]].duplicated().any()
    assert set(rows["status"]) <= {"ok", "skipped"}


def test_endpoint_down_for_a_while_then_back(project, server):
    store = Store(settings.db_path())
    batches = ingest(store, write_long_csv(project / "in.csv", 40))
    server.configure(latency_s=0.03)
    cfg = load_experiment(write_experiment(project / "experiments", "llm", server.base_url, concurrency=4, retries=10))

    thread = outage_after(server, 15, 2.0)
    summary = run(cfg, store, batches)
    thread.join()
    stats = server.stats()
    assert stats["by_outcome"]["down"] > 0, "the outage should have hit the run"
    assert_complete(store, "llm", 80)
    assert set(stats["ok_by_text"].values()) == {1} and summary.calls_ok == 80
    assert summary.attempts == stats["chat_requests"]


def test_source_changes_while_an_experiment_runs(project, server):
    """The run finishes on the version it started with; the change is visible, never mixed."""
    store = Store(settings.db_path())
    source = write_long_csv(project / "in.csv", 40)
    os.environ["NARR_SOURCE"] = str(source)
    batches = ingest(store, source)
    old_checksum = file_checksum(source)
    server.configure(latency_s=0.02)
    cfg = load_experiment(write_experiment(project / "experiments", "llm", server.base_url, concurrency=2))

    def edit_file():
        while server.stats()["completions_ok"] < 10:
            time.sleep(0.01)
        text = source.read_text().replace("Case 35-cme.", "Case 35-cme (amended by the examiner).")
        source.write_text(text)

    thread = threading.Thread(target=edit_file)
    thread.start()
    run(cfg, store, batches)
    thread.join()
    rows = store.read_classifications("llm")
    assert set(rows["data_checksum"]) == {old_checksum}  # every row from the version it read
    passed, meta = quality.checksum_current(store, file_checksum(source))
    assert not passed and meta["ingested_checksum"] == old_checksum
    # Re-ingest: only the edited narrative's batch is stale; its row is flagged, not mixed in.
    assert ingest(store, source) == []  # same keys: no new batches
    state = partition_state(store, cfg)
    stale_batch = store.query_df(
        "SELECT batch_id FROM narratives WHERE incident_id = '1035' AND narrative_type = 'cme'"
    ).iloc[0, 0]
    assert state.missing == [stale_batch]
    view = store.query_df(
        "SELECT incident_id, narrative_type, is_stale FROM classifications WHERE experiment = 'llm' AND is_stale"
    )
    assert list(zip(view["incident_id"], view["narrative_type"], strict=True)) == [("1035", "cme")]
    ev = evaluation_rows(store, cfg)
    assert ev.loc[(ev["incident_id"] == "1035") & (ev["narrative_type"] == "cme"), "status"].item() == "failed"
    server.reset()
    run(cfg, store, state.to_run())
    assert server.stats()["chat_requests"] == 1  # only the edited narrative is asked again
    assert partition_state(store, cfg).missing == []


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.decode().strip()}); disk-full scenario not run")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_partition_write_keeps_previous_rows(project, server, tiny_disk, monkeypatch):
    db = tiny_disk / "narr.duckdb"
    monkeypatch.setenv("NARR_DB", str(db))
    store = Store(db)
    batches = ingest(store, write_long_csv(project / "in.csv", 40))
    v1 = load_experiment(write_experiment(project / "experiments", "llm", server.base_url, version="v1"))
    run(v1, store, batches)
    before = store.read_classifications("llm")
    assert len(before) == 80
    # Fill the disk, then run a new prompt version: every write must fail cleanly.
    filler = tiny_disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    v2 = load_experiment(write_experiment(project / "experiments", "llm", server.base_url, version="v2"))
    with pytest.raises(ClassificationFailed) as err:
        run(v2, store, batches)
    message = str(err.value)
    assert "writing the batch failed" in message and "previous rows are intact" in message
    filler.unlink()
    after = store.read_classifications("llm")
    assert set(after["config_hash"]) == {v1.config_hash}
    assert after["raw_content"].tolist() == before["raw_content"].tolist()
    # With space again, the resume re-uses the journal (outside the full disk): no new calls.
    server.reset()
    run(v2, store, batches)
    assert server.stats()["chat_requests"] == 0
    assert set(store.read_classifications("llm")["config_hash"]) == {v2.config_hash}


def test_torn_journal_tail_is_skipped_and_only_that_answer_is_asked_again(project, server):
    store = Store(settings.db_path())
    batches = ingest(store, write_long_csv(project / "in.csv", 10))
    cfg = load_experiment(write_experiment(project / "experiments", "llm", server.base_url))
    run(cfg, store, batches)
    segment = next((settings.journal_dir() / "llm" / cfg.config_hash).glob("*.jsonl"))
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 40])  # tear the last record mid-line
    for batch in batches:  # lose the database rows too, so the journal is all there is
        store.replace_partition("llm", batch, store.read_classifications("llm").iloc[0:0])
    server.reset()
    logs: list[str] = []
    summary = run(cfg, store, batches, log=logs.append)
    assert summary.journal_corrupt_lines == 1 and any("torn or corrupt" in line for line in logs)
    assert server.stats()["chat_requests"] == 1
    assert_complete(store, "llm", 20)
