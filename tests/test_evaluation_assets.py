"""Evaluation over stored results: errors lower coverage and strict F1; cross-experiment tables."""

from __future__ import annotations

from conftest import write_experiment, write_long_csv

from narr_assets import evaluation, settings
from narr_assets.classify import classify_batches
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.experiments import load_experiment
from narr_assets.report import render_report
from narr_assets.results import cross_experiment, evaluate_experiment
from narr_assets.store import Store


def test_errors_lower_coverage_and_strict_f1_and_show_in_the_leaderboard(project, server):
    store = Store(settings.db_path())
    ingest_raw(store, write_long_csv(project / "in.csv", 60))
    batches = build_narratives(store, batch_size=30)[1]
    clean = load_experiment(write_experiment(project / "experiments", "clean", server.base_url, version="a"))
    flaky = load_experiment(write_experiment(project / "experiments", "flaky", server.base_url, version="b"))
    kwargs = {"journal_dir": settings.journal_dir(), "locks_dir": settings.locks_dir()}
    classify_batches(clean, store, batches, **kwargs)
    server.configure(refusal=0.3, seed=5)
    classify_batches(flaky, store, batches, **kwargs)

    ev_clean, ev_flaky = evaluate_experiment(store, clean), evaluate_experiment(store, flaky)
    assert ev_clean["coverage"]["answered_share"] == 1.0
    assert ev_flaky["coverage"]["answered_share"] < 0.85
    assert ev_flaky["coverage"]["by_status"]["refusal"] > 0
    s_clean, s_flaky = ev_clean["scopes"]["overall"]["strict"], ev_flaky["scopes"]["overall"]["strict"]
    assert s_flaky["f1"] < s_clean["f1"]
    assert s_flaky["n"] == s_clean["n"] == 120  # refused narratives stay in the denominator
    assert ev_flaky["scopes"]["overall"]["answered"]["n"] < 120

    stored = store.query_df("SELECT experiment, scope, variant, n, f1 FROM experiment_metrics ORDER BY 1, 2, 3")
    assert set(stored["experiment"]) == {"clean", "flaky"} and len(stored) == 16

    evals, pairwise, disagreements = cross_experiment(store, [clean, flaky])
    board = evaluation.leaderboard(evals)
    assert list(board["experiment"]) == ["clean", "flaky"]
    assert len(pairwise) == 1 and pairwise[0]["n_common"] == 120
    assert set(disagreements) == {"clean", "flaky"}
    out = render_report(evals, board, disagreements, project / "report.html", pairwise=pairwise)
    html = out.read_text()
    assert "flaky" in html and html.count("<svg") >= 6 and "http://" not in html


def test_unlabelled_results_give_null_metrics_not_zero(project, server):
    store = Store(settings.db_path())
    source = project / "unlabelled.csv"
    source.write_text(
        "IncidentID,NarrativeCME,NarrativeLE\n"
        "1,Her boyfriend assaulted her and she had a restraining order against him.,V died at home.\n"
        "2,V died after a fall.,V was found by a neighbour.\n"
    )
    ingest_raw(store, source)
    batches = build_narratives(store)[1]
    cfg = load_experiment(write_experiment(project / "experiments", "prod", server.base_url))
    classify_batches(cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir())
    ev = evaluate_experiment(store, cfg)
    strict = ev["scopes"]["overall"]["strict"]
    assert strict["f1"] is None and strict["precision"] is None and strict["n_labelled"] == 0
    assert ev["prevalence"]["overall"]["share"] == 0.25 and ev["prevalence"]["incident"]["share"] == 0.5
    assert ev["agreement"]["n_incidents_both_answered"] == 2
