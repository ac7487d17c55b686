"""`experiment_status`: counts and an ETA from active run time, not wall time."""

from __future__ import annotations

import time

from conftest import write_experiment, write_long_csv

from narr_assets import settings
from narr_assets.classify import ClassificationFailed, classify_batches
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.experiments import load_experiment
from narr_assets.status import experiment_status
from narr_assets.store import Store


def test_eta_uses_active_time_and_ignores_downtime(project, server):
    store = Store(settings.db_path())
    ingest_raw(store, write_long_csv(project / "in.csv", 50, placeholders=2))  # 100 narratives, 98 to ask
    batches = build_narratives(store, batch_size=25)[1]
    cfg = load_experiment(write_experiment(project / "experiments", "llm", server.base_url, concurrency=2))
    before = experiment_status(store, cfg)
    assert before["remaining_calls"] == 98 and before["eta_s"] is None and before["batches_missing"] == 4
    server.configure(latency_s=0.02)
    summary = classify_batches(
        cfg, store, batches[:2], journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir()
    )
    store.log_run(summary)
    time.sleep(1.0)  # "downtime" between runs must not slow the measured rate
    st = experiment_status(store, cfg)
    assert st["remaining_calls"] == 50 and st["batches_done"] == 2 and st["batches_missing"] == 2
    rate = summary.calls_ok / summary.active_seconds
    assert abs(st["rate_per_s"] - rate) < 1e-9
    assert abs(st["eta_s"] - 50 / rate) < 1e-6
    assert st["by_status"] == {"ok": 48, "skipped": 2}


def test_failed_run_is_logged_and_counted_as_missing(project, server):
    store = Store(settings.db_path())
    ingest_raw(store, write_long_csv(project / "in.csv", 10))
    batches = build_narratives(store, batch_size=10)[1]
    server.configure(server_error=1.0)
    cfg = load_experiment(write_experiment(project / "experiments", "llm", server.base_url, retries=0))
    try:
        classify_batches(cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir())
    except ClassificationFailed as exc:
        store.log_run(exc.summary)
    st = experiment_status(store, cfg)
    assert st["batches_missing"] == 2 and st["remaining_calls"] == 20 and st["eta_s"] is None
