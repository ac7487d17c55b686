"""Tests for the evaluation functions (narr_assets.evaluation), checked against scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
)

from narr_assets.evaluation import (
    DISAGREEMENT_COLUMNS,
    PAIRWISE_COLUMNS,
    SCOPES,
    STATUSES,
    VARIANTS,
    binary_metrics,
    bootstrap_f1_interval,
    confusion,
    disagreement_table,
    disagreements,
    evaluate,
    evaluation_tables,
    leaderboard,
    mcnemar_exact,
    paired_comparison,
    pairwise_table,
    summary_row_columns,
    to_json,
    wilson_interval,
)

ERRORS = ("parse_error", "refusal", "truncated", "rejected", "failed")


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def make_rows(records: list[dict], experiment: str = "exp") -> pd.DataFrame:
    """Rows in the pipeline's dtypes; records need incident_id, narrative_type, status."""
    base = {
        "experiment": experiment,
        "detected": None,
        "confidence": None,
        "manual_flag_ind": None,
        "manual_flag": None,
        "latency_s": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "reasoning_tokens": None,
        "indicators": None,
        "rationale": None,
        "narrative_text": None,
    }
    df = pd.DataFrame([{**base, **r} for r in records])
    df["detected"] = df["detected"].astype("boolean")
    for col in ("manual_flag_ind", "manual_flag", "prompt_tokens", "completion_tokens", "reasoning_tokens"):
        df[col] = df[col].astype("Int64")
    for col in ("confidence", "latency_s"):
        df[col] = df[col].astype("Float64")
    return df


def random_rows(seed: int, n_incidents: int = 60, error_rate: float = 0.1, experiment: str = "exp") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_incidents):
        for t in ("cme", "le"):
            if rng.random() < 0.15:
                continue  # some incidents have one narrative only
            label = int(rng.random() < 0.2) if rng.random() > 0.05 else None
            u = rng.random()
            status = "ok" if u > error_rate else ("skipped" if u < error_rate / 3 else str(rng.choice(ERRORS)))
            det = None
            if status == "ok":
                truth = label if label is not None else int(rng.random() < 0.2)
                det = bool(truth if rng.random() < 0.8 else 1 - truth)
            records.append(
                {
                    "incident_id": f"I{i:04d}",
                    "narrative_type": t,
                    "status": status,
                    "detected": det,
                    "confidence": float(rng.random()) if status == "ok" else None,
                    "manual_flag_ind": label,
                    "latency_s": float(rng.gamma(3, 1.5)) if status != "skipped" else None,
                    "prompt_tokens": int(rng.integers(800, 1200)) if status != "skipped" else None,
                    "completion_tokens": int(rng.integers(50, 400)) if status != "skipped" else None,
                    "narrative_text": "text",
                }
            )
    return make_rows(records, experiment)


def sk_none(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def assert_close(ours: float | None, theirs: float | None) -> None:
    if theirs is None:
        assert ours is None
    else:
        assert ours == pytest.approx(theirs, abs=1e-12)


# --------------------------------------------------------------------------------------
# binary_metrics / confusion vs scikit-learn
# --------------------------------------------------------------------------------------


def _random_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    mode = seed % 6
    if mode == 0:
        y = np.zeros(n, int)  # all negative
    elif mode == 1:
        y = np.ones(n, int)  # all positive
    else:
        y = (rng.random(n) < rng.random()).astype(int)
    if mode == 2:
        p = y.copy()  # all correct
    elif mode == 3:
        p = np.zeros(n, int)  # predicts nothing
    else:
        p = np.where(rng.random(n) < rng.random(), y, 1 - y)
    return y, p


SPECIAL = {
    "all_negative_correct": ([0, 0, 0, 0], [0, 0, 0, 0]),
    "all_positive_correct": ([1, 1, 1], [1, 1, 1]),
    "all_negative_all_flagged": ([0, 0, 0], [1, 1, 1]),
    "all_positive_missed": ([1, 1], [0, 0]),
    "single_tp": ([1], [1]),
    "single_fn": ([1], [0]),
    "single_fp": ([0], [1]),
    "tie_half": ([1, 0, 1, 0], [1, 1, 0, 0]),
    "all_wrong": ([1, 0, 1, 0], [0, 1, 0, 1]),
}


# scikit-learn warns on the undefined cases we compare on purpose; silence only those.
@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@pytest.mark.filterwarnings("ignore:.*have only one label in common:sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.parametrize(
    "y_true,y_pred",
    [_random_labels(s) for s in range(150)] + list(SPECIAL.values()),
    ids=[f"seed{s}" for s in range(150)] + list(SPECIAL),
)
def test_metrics_match_sklearn(y_true, y_pred):
    c = confusion(y_true, y_pred)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    assert c == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    m = binary_metrics(**c)
    assert_close(m["accuracy"], accuracy_score(y_true, y_pred))
    assert_close(m["precision"], sk_none(precision_score(y_true, y_pred, zero_division=np.nan)))
    assert_close(m["recall"], sk_none(recall_score(y_true, y_pred, zero_division=np.nan)))
    assert_close(m["specificity"], sk_none(recall_score(y_true, y_pred, pos_label=0, zero_division=np.nan)))
    assert_close(m["f1"], sk_none(f1_score(y_true, y_pred, zero_division=np.nan)))
    assert_close(m["kappa"], sk_none(cohen_kappa_score(y_true, y_pred, replace_undefined_by=np.nan)))
    # scikit-learn reports an undefined MCC as 0.0; we report None, and only then.
    if m["mcc"] is None:
        assert (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) == 0
        assert matthews_corrcoef(y_true, y_pred) == 0.0
    else:
        assert m["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=1e-12)


def test_binary_metrics_hand_computed():
    m = binary_metrics(tp=8, fp=2, tn=85, fn=5)
    assert m["accuracy"] == pytest.approx(0.93)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(8 / 13)
    assert m["specificity"] == pytest.approx(85 / 87)
    assert m["f1"] == pytest.approx(16 / 23)
    assert m["mcc"] == pytest.approx((8 * 85 - 2 * 5) / math.sqrt(10 * 13 * 87 * 90))
    po, pe = 0.93, (10 * 13 + 90 * 87) / 100**2
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe))


@pytest.mark.parametrize(
    "counts,expected_none,expected_values",
    [
        ((0, 0, 0, 0), {"accuracy", "precision", "recall", "specificity", "f1", "mcc", "kappa"}, {}),
        ((0, 0, 10, 0), {"precision", "recall", "f1", "mcc", "kappa"}, {"accuracy": 1.0, "specificity": 1.0}),
        ((0, 0, 5, 5), {"precision", "mcc"}, {"recall": 0.0, "f1": 0.0, "kappa": 0.0, "accuracy": 0.5}),
        ((4, 0, 0, 0), {"specificity", "mcc", "kappa"}, {"precision": 1.0, "recall": 1.0, "f1": 1.0}),
    ],
)
def test_undefined_metrics_are_none_not_zero(counts, expected_none, expected_values):
    m = binary_metrics(*counts)
    assert {k for k, v in m.items() if v is None} == expected_none
    for k, v in expected_values.items():
        assert m[k] == pytest.approx(v)


def test_confusion_rejects_missing_and_mismatched():
    with pytest.raises(ValueError, match="missing"):
        confusion([1, None], [1, 0])
    with pytest.raises(ValueError, match="items"):
        confusion([1, 0], [1])
    with pytest.raises(ValueError, match="non-binary"):
        confusion([1, 2], [1, 0])


# --------------------------------------------------------------------------------------
# Intervals and tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (1, 1, 0.2065, 1.0),
        (42, 48, 0.7530, 0.9414),
    ],
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)
    assert lo <= k / n <= hi


@pytest.mark.parametrize("k,n", [(0, 1), (1, 3), (7, 48), (48, 48), (20, 400), (399, 400), (3, 5000)])
def test_wilson_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-8)
    assert hi == pytest.approx(ref.high, abs=1e-8)


def test_wilson_empty_and_invalid():
    assert wilson_interval(0, 0) == (None, None)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize(
    "b,c", [(0, 1), (0, 7), (3, 15), (15, 3), (10, 10), (1, 2), (25, 40), (100, 130), (2000, 2100), (10000, 10500)]
)
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 7) == pytest.approx(2 / 2**7)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3, 15) == mcnemar_exact(15, 3)


def test_bootstrap_reproducible_and_contains_point():
    y, p = _random_labels(7)
    y = np.r_[y, [1] * 10, [0] * 30]
    p = np.r_[p, [1] * 8 + [0] * 2, [0] * 27 + [1] * 3]
    first = bootstrap_f1_interval(y, p, n_boot=1000, seed=3)
    assert first == bootstrap_f1_interval(y, p, n_boot=1000, seed=3)
    assert first != bootstrap_f1_interval(y, p, n_boot=1000, seed=4)
    point = binary_metrics(**confusion(y, p))["f1"]
    assert 0.0 <= first[0] <= point <= first[1] <= 1.0
    assert first[1] - first[0] > 0.05


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bootstrap_agrees_with_naive_item_resampling(seed):
    """The multinomial shortcut has the same distribution as resampling items."""
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.15).astype(int)
    p = np.where(rng.random(300) < 0.85, y, 1 - y)
    idx = rng.integers(0, 300, size=(4000, 300))
    yb, pb = y[idx], p[idx]
    tp = ((yb == 1) & (pb == 1)).sum(1)
    den = 2 * tp + ((yb == 0) & (pb == 1)).sum(1) + ((yb == 1) & (pb == 0)).sum(1)
    naive = np.quantile(2 * tp[den > 0] / den[den > 0], [0.025, 0.975])
    ours = bootstrap_f1_interval(y, p, n_boot=4000, seed=seed)
    assert ours[0] == pytest.approx(naive[0], abs=0.04)
    assert ours[1] == pytest.approx(naive[1], abs=0.04)


@pytest.mark.parametrize(
    "y,p,expected",
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], (1.0, 1.0)),
        ([0, 0, 0], [0, 0, 0], (None, None)),
        ([], [], (None, None)),
    ],
)
def test_bootstrap_degenerate(y, p, expected):
    assert bootstrap_f1_interval(y, p, n_boot=200) == expected


# --------------------------------------------------------------------------------------
# evaluate(): narrative scopes
# --------------------------------------------------------------------------------------


def _expected_strict(df: pd.DataFrame) -> tuple[list[int], list[int]]:
    """Strict rule written independently of the implementation."""
    y, p = [], []
    for _, r in df.iterrows():
        if pd.isna(r["manual_flag_ind"]):
            continue
        label = int(r["manual_flag_ind"])
        if r["status"] == "ok":
            pred = int(bool(r["detected"]))
        elif r["status"] == "skipped":
            pred = 0
        else:
            pred = 1 - label
        y.append(label)
        p.append(pred)
    return y, p


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("scope", ["overall", "cme", "le"])
def test_evaluate_narrative_scopes_match_sklearn(seed, scope):
    df = random_rows(seed, error_rate=0.25)
    ev = evaluate(df, n_boot=200, seed=seed)
    sub = df if scope == "overall" else df[df["narrative_type"] == scope]
    ok = sub[(sub["status"] == "ok") & sub["manual_flag_ind"].notna()]
    y_a, p_a = ok["manual_flag_ind"].astype(int).to_numpy(), ok["detected"].astype(int).to_numpy()
    y_s, p_s = _expected_strict(sub)
    for variant, (y, p) in {"answered": (y_a, p_a), "strict": (y_s, p_s)}.items():
        m = ev["scopes"][scope][variant]
        tn, fp, fn, tp = confusion_matrix(y, p, labels=[0, 1]).ravel()
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
        assert m["n"] == len(y)
        assert m["n_labelled"] == int(sub["manual_flag_ind"].notna().sum())
        assert_close(m["f1"], sk_none(f1_score(y, p, zero_division=np.nan)))
        assert_close(m["precision"], sk_none(precision_score(y, p, zero_division=np.nan)))
        assert_close(m["recall"], sk_none(recall_score(y, p, zero_division=np.nan)))
        if m["f1_ci_low"] is not None:
            assert m["f1_ci_low"] <= m["f1_ci_high"]
        lo, hi = wilson_interval(tp, tp + fp)
        assert (m["precision_ci_low"], m["precision_ci_high"]) == (lo, hi)


def _clean_rows(n_pos: int = 10, n_neg: int = 30) -> list[dict]:
    """Labelled narratives, all answered correctly (one narrative per incident)."""
    recs = []
    for i in range(n_pos + n_neg):
        label = int(i < n_pos)
        recs.append(
            {
                "incident_id": str(i),
                "narrative_type": "cme" if i % 2 else "le",
                "status": "ok",
                "detected": bool(label),
                "confidence": 0.9,
                "manual_flag_ind": label,
            }
        )
    return recs


@pytest.mark.parametrize("error_status", ERRORS)
def test_strict_f1_below_answered_when_errors_hit_positives(error_status):
    recs = _clean_rows()
    for r in recs[:4]:  # four positives fail
        r.update(status=error_status, detected=None, confidence=None)
    ev = evaluate(make_rows(recs), n_boot=200)
    answered, strict = ev["scopes"]["overall"]["answered"], ev["scopes"]["overall"]["strict"]
    assert answered["f1"] == 1.0 and answered["n"] == 36
    assert strict["n"] == 40 and strict["fn"] == 4 and strict["tp"] == 6
    assert strict["f1"] == pytest.approx(12 / 16)
    assert strict["f1"] < answered["f1"]


def test_a_rejected_row_is_an_error_in_coverage_and_wrong_under_strict_scoring():
    recs = _clean_rows()
    recs[0].update(status="rejected", detected=None, confidence=None)  # a positive the server refused
    recs[20].update(status="rejected", detected=None, confidence=None)  # a negative the server refused
    ev = evaluate(make_rows(recs), n_boot=0)
    cov = ev["coverage"]
    assert cov["by_status"]["rejected"] == 2 and cov["n_errors"] == 2 and cov["n_skipped"] == 0
    strict, answered = ev["scopes"]["overall"]["strict"], ev["scopes"]["overall"]["answered"]
    assert (strict["tp"], strict["fp"], strict["tn"], strict["fn"]) == (9, 1, 29, 1)
    assert strict["n"] == 40 and answered["n"] == 38


def test_errors_on_negatives_become_false_positives_and_skipped_negatives():
    recs = _clean_rows()
    recs[20].update(status="refusal", detected=None)  # a negative that errors -> FP
    recs[21].update(status="skipped", detected=None)  # a negative skipped -> TN
    recs[0].update(status="skipped", detected=None)  # a positive skipped -> FN
    recs[1].update(status="ok", detected=None)  # ok without verdict -> error -> FN
    ev = evaluate(make_rows(recs), n_boot=0)
    s = ev["scopes"]["overall"]["strict"]
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (8, 1, 29, 2)
    assert ev["coverage"]["n_ok_without_verdict"] == 1
    assert ev["coverage"]["n_errors"] == 2
    assert ev["coverage"]["n_skipped"] == 2
    assert ev["scopes"]["overall"]["answered"]["n"] == 36
    assert s["f1_ci_low"] is None  # n_boot=0 disables the bootstrap


def test_unlabelled_rows_give_none_metrics_but_prevalence():
    df = random_rows(5)
    df["manual_flag_ind"] = pd.array([None] * len(df), dtype="Int64")
    ev = evaluate(df, n_boot=100)
    for s in SCOPES:
        for v in VARIANTS:
            m = ev["scopes"][s][v]
            assert m["n"] == 0 and m["n_labelled"] == 0
            for k in (
                "accuracy",
                "precision",
                "recall",
                "specificity",
                "f1",
                "mcc",
                "kappa",
                "f1_ci_low",
                "recall_ci_low",
            ):
                assert m[k] is None, (s, v, k)
    ok = df[df["status"] == "ok"]
    assert ev["prevalence"]["overall"]["share"] == pytest.approx(ok["detected"].astype(int).mean())
    for t in ("cme", "le"):
        okt = ok[ok["narrative_type"] == t]
        assert ev["prevalence"][t]["n"] == len(okt)
        assert ev["prevalence"][t]["n_detected"] == int(okt["detected"].sum())
    assert ev["agreement"]["n_incidents_both_answered"] > 0
    assert ev["calibration"] is None
    assert ev["labels"]["n_labelled_narratives"] == 0


# --------------------------------------------------------------------------------------
# evaluate(): incident scope, agreement, calibration, cost
# --------------------------------------------------------------------------------------


def _incident_rows() -> pd.DataFrame:
    r = [
        # A: manual_flag=1 overrides narrative labels 0/0; both ok, LE detects -> TP
        ("A", "cme", "ok", False, 0, 1),
        ("A", "le", "ok", True, 0, 1),
        # B: no manual_flag, OR of labels (0, 1) = 1; both ok negative -> FN
        ("B", "cme", "ok", False, 0, None),
        ("B", "le", "ok", False, 1, None),
        # C: label 0 from OR(0, None); CME ok negative, LE skipped -> answered TN
        ("C", "cme", "ok", False, 0, None),
        ("C", "le", "skipped", None, None, None),
        # D: label 1; CME ok positive but LE parse_error -> not answered, strict wrong (FN)
        ("D", "cme", "ok", True, 1, None),
        ("D", "le", "parse_error", None, 1, None),
        # E: all labels null -> unlabelled incident (still counted for prevalence)
        ("E", "cme", "ok", True, None, None),
        ("E", "le", "ok", False, None, None),
        # F: only a skipped narrative, label 0 -> not answered, strict predicted negative (TN)
        ("F", "cme", "skipped", None, 0, None),
        # G: label 0; CME detected positive -> FP
        ("G", "cme", "ok", True, 0, 0),
        ("G", "le", "ok", True, 0, 0),
    ]
    cols = ["incident_id", "narrative_type", "status", "detected", "manual_flag_ind", "manual_flag"]
    return make_rows([dict(zip(cols, x, strict=True)) for x in r])


def test_incident_scope_rules():
    ev = evaluate(_incident_rows(), n_boot=100)
    ans, strict = ev["scopes"]["incident"]["answered"], ev["scopes"]["incident"]["strict"]
    # answered: A TP, B FN, C TN, G FP (D has an error, E unlabelled, F only skipped)
    assert (ans["n"], ans["tp"], ans["fn"], ans["tn"], ans["fp"]) == (4, 1, 1, 1, 1)
    # strict: + D (error -> FN) + F (skipped -> TN)
    assert (strict["n"], strict["tp"], strict["fn"], strict["tn"], strict["fp"]) == (6, 1, 2, 2, 1)
    assert strict["n_labelled"] == 6
    labels = ev["labels"]
    assert labels["incident_label_source"] == {"manual_flag": 2, "narrative_or": 4}
    assert labels["n_labelled_incidents"] == 6 and labels["n_positive_incidents"] == 3
    assert labels["n_manual_flag_vs_narrative_or_mismatch"] == 1  # incident A
    # incident prevalence among answered incidents A B C E G: A, E, G detected
    assert (ev["prevalence"]["incident"]["n"], ev["prevalence"]["incident"]["n_detected"]) == (5, 3)


def test_agreement_between_cme_and_le():
    ev = evaluate(_incident_rows(), n_boot=0)
    ag = ev["agreement"]
    # both answered: A (F,T) B (F,F) E (T,F) G (T,T)
    assert ag["n_incidents_both_answered"] == 4
    assert (ag["both_detected"], ag["cme_only"], ag["le_only"], ag["neither"]) == (1, 1, 1, 1)
    assert ag["agreement"] == 0.5
    assert ag["kappa"] == pytest.approx(cohen_kappa_score([0, 0, 1, 1], [1, 0, 0, 1]))


def test_calibration_bins_and_brier_match_sklearn():
    rng = np.random.default_rng(11)
    recs = []
    for i in range(200):
        label = int(rng.random() < 0.3)
        det = bool(label if rng.random() < 0.8 else 1 - label)
        recs.append(
            {
                "incident_id": str(i),
                "narrative_type": "cme",
                "status": "ok",
                "detected": det,
                "confidence": float(rng.choice([0.5, 0.6, 0.75, 0.9, 0.95, 1.0])),
                "manual_flag_ind": label,
            }
        )
    df = make_rows(recs)
    cal = evaluate(df, n_boot=0)["calibration"]
    conf = df["confidence"].astype(float).to_numpy()
    p_pos = np.where(df["detected"].astype(bool), conf, 1 - conf)
    y = df["manual_flag_ind"].astype(int).to_numpy()
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p_pos))
    assert cal["n"] == 200 and len(cal["bins"]) == 10
    assert sum(b["count"] for b in cal["bins"]) == 200
    top = cal["bins"][9]  # [0.9, 1.0] includes 1.0
    mask = p_pos >= 0.9
    assert top["count"] == int(mask.sum())
    assert top["mean_predicted"] == pytest.approx(p_pos[mask].mean())
    assert top["observed_rate"] == pytest.approx(y[mask].mean())
    empty = [b for b in cal["bins"] if b["count"] == 0]
    assert empty and all(b["mean_predicted"] is None and b["observed_rate"] is None for b in empty)


def test_latency_and_tokens():
    df = random_rows(3)
    ev = evaluate(df, n_boot=0)
    lat = df["latency_s"].dropna().astype(float).to_numpy()
    assert ev["latency"]["n"] == lat.size
    assert ev["latency"]["mean_s"] == pytest.approx(lat.mean())
    assert ev["latency"]["median_s"] == pytest.approx(np.median(lat))
    assert ev["latency"]["p95_s"] == pytest.approx(np.percentile(lat, 95))
    assert sum(ev["latency"]["hist"]["counts"]) == lat.size
    pt = df["prompt_tokens"].dropna().astype(int)
    assert ev["tokens"]["prompt"]["total"] == int(pt.sum())
    assert ev["tokens"]["prompt"]["mean"] == pytest.approx(pt.mean())
    assert ev["tokens"]["reasoning"] == {
        "n": 0, "total": None, "mean": None, "median": None, "p95": None, "max": None, "hist": None
    }  # fmt: skip


def test_coverage_counts():
    df = random_rows(8, error_rate=0.3)
    cov = evaluate(df, n_boot=0)["coverage"]
    assert cov["n_rows"] == len(df)
    assert cov["by_status"] == {s: int((df["status"] == s).sum()) for s in cov["by_status"]}
    assert sum(cov["by_status"].values()) == len(df)
    assert cov["answered_share"] == pytest.approx((df["status"] == "ok").mean())
    assert cov["by_type"]["le"]["n_rows"] == int((df["narrative_type"] == "le").sum())


def test_evaluate_is_json_serialisable_and_reproducible():
    df = random_rows(4)
    ev = evaluate(df, n_boot=300, seed=9)
    text = to_json(ev)  # allow_nan=False: no NaN sneaks in
    assert json.loads(text) == ev
    assert to_json(evaluate(df, n_boot=300, seed=9)) == text
    assert set(ev) == {
        "schema_version", "experiment", "n_boot", "seed", "coverage", "labels", "scopes",
        "prevalence", "agreement", "calibration", "latency", "tokens",
    }  # fmt: skip
    assert set(ev["scopes"]) == set(SCOPES)


def test_empty_rows():
    ev = evaluate(make_rows([{"incident_id": "x", "narrative_type": "cme", "status": "ok"}]).iloc[:0], n_boot=10)
    assert ev["coverage"]["n_rows"] == 0
    assert ev["coverage"]["answered_share"] is None
    assert ev["scopes"]["incident"]["strict"]["f1"] is None


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda df: df.assign(experiment=["a"] + ["b"] * (len(df) - 1)), "one experiment"),
        (lambda df: df.assign(status=["weird", *list(df["status"][1:])]), "unknown status"),
        (lambda df: df.assign(narrative_type=["ME", *list(df["narrative_type"][1:])]), "narrative_type"),
        (lambda df: pd.concat([df, df.iloc[:1]]), "duplicate"),
        (lambda df: df.assign(manual_flag_ind=pd.array([2] + [0] * (len(df) - 1), dtype="Int64")), "0/1"),
        (lambda df: df.drop(columns=["status"]), "required"),
    ],
)
def test_evaluate_validation_errors_never_quote_text(mutate, match):
    df = random_rows(1, n_incidents=5)
    df["narrative_text"] = "SECRET NARRATIVE"
    with pytest.raises(ValueError, match=match) as err:
        evaluate(mutate(df), n_boot=0)
    assert "SECRET" not in str(err.value)


# --------------------------------------------------------------------------------------
# Tables, leaderboard, comparisons, disagreements
# --------------------------------------------------------------------------------------


def test_leaderboard_sorted_by_strict_f1_with_none_last():
    good = evaluate(make_rows(_clean_rows(), "good"), n_boot=50)
    recs = _clean_rows()
    for r in recs[:3]:
        r.update(detected=False)
    worse = evaluate(make_rows(recs, "worse"), n_boot=50)
    unlabelled = make_rows(_clean_rows(), "unlabelled")
    unlabelled["manual_flag_ind"] = pd.array([None] * len(unlabelled), dtype="Int64")
    none = evaluate(unlabelled, n_boot=50)
    lb = leaderboard([none, worse, good])
    assert list(lb["experiment"]) == ["good", "worse", "unlabelled"]
    assert list(lb["rank"]) == [1, 2, 3]
    assert lb["f1"].iloc[0] == 1.0 and lb["f1"].iloc[1] == pytest.approx(14 / 17)
    assert pd.isna(lb["f1"].iloc[2])
    assert list(lb.columns) == ["rank", *summary_row_columns()]
    assert str(lb["f1"].dtype) == "Float64" and str(lb["tp"].dtype) == "Int64"
    assert leaderboard([]).empty


def test_evaluation_tables():
    ev = evaluate(random_rows(2), n_boot=100)
    tables = evaluation_tables(ev)
    assert len(tables["metrics"]) == len(SCOPES) * len(VARIANTS)
    row = tables["metrics"].set_index(["scope", "variant"]).loc[("le", "strict")]
    assert row["f1"] == pytest.approx(ev["scopes"]["le"]["strict"]["f1"])
    assert len(tables["coverage"]) == len(STATUSES) and tables["coverage"]["n"].sum() == ev["coverage"]["n_rows"]
    assert "rejected" in set(tables["coverage"]["status"])  # one row per status, the new one too
    assert len(tables["calibration"]) == 10
    assert len(tables["prevalence"]) == 4 and len(tables["summary"]) == 1


def test_paired_comparison_counts_and_mcnemar():
    base = _clean_rows(10, 30)
    a = make_rows(base, "A")
    b_recs = [dict(r) for r in base]
    for r in b_recs[:5]:  # B misses five positives
        r["detected"] = False
    b_recs[35]["detected"] = True  # and flags one negative
    b_recs[36].update(status="failed", detected=None)  # and fails once
    b_recs.append({"incident_id": "extra", "narrative_type": "cme", "status": "ok", "detected": True})
    b = make_rows(b_recs, "B")
    pc = paired_comparison(a, b, "A", "B")
    assert (pc["n_common"], pc["n_only_a"], pc["n_only_b"]) == (40, 0, 1)
    assert pc["n_both_answered"] == 39
    assert (pc["verdict_a_pos_b_neg"], pc["verdict_a_neg_b_pos"]) == (5, 1)
    assert pc["verdict_mcnemar_p"] == pytest.approx(mcnemar_exact(5, 1))
    assert (pc["answered_n"], pc["answered_a_only_correct"], pc["answered_b_only_correct"]) == (39, 6, 0)
    assert (pc["strict_n"], pc["strict_a_only_correct"], pc["strict_b_only_correct"]) == (40, 7, 0)
    assert pc["strict_mcnemar_p"] == pytest.approx(binomtest(0, 7, 0.5).pvalue)
    assert pc["strict_f1_a"] == 1.0 and pc["strict_f1_b"] < 1.0
    assert json.loads(to_json(pc)) == pc
    assert tuple(pc) == PAIRWISE_COLUMNS
    assert list(pairwise_table([pc, pc]).columns) == list(PAIRWISE_COLUMNS)


def test_paired_comparison_per_incident():
    """Incident verdicts (positive if either narrative is), on the narratives both have."""

    def rec(inc, typ, label, det, status="ok"):
        return {
            "incident_id": inc,
            "narrative_type": typ,
            "status": status,
            "detected": det if status == "ok" else None,
            "manual_flag_ind": label,
        }

    a = [
        rec("0", "cme", 1, True),
        rec("0", "le", 0, False),  # right
        rec("1", "cme", 1, True),
        rec("1", "le", 0, False),  # right
        rec("2", "cme", 0, False),
        rec("2", "le", 0, True),  # wrong (false positive)
        rec("3", "cme", 0, False),
        rec("3", "le", 0, False),  # right
        rec("4", "cme", 1, True),
        rec("4", "le", 0, False),  # right
        rec("5", "cme", 1, False),
        rec("5", "le", 0, False),  # only A has incident 5
    ]
    b = [
        rec("0", "cme", 1, False),
        rec("0", "le", 0, True),  # both narratives wrong, incident right
        rec("1", "cme", 1, False),
        rec("1", "le", 0, False),  # wrong
        rec("2", "cme", 0, False),
        rec("2", "le", 0, False),  # right
        rec("3", "cme", 0, False),
        rec("3", "le", 0, False),  # right
        rec("4", "cme", 1, None, status="failed"),
        rec("4", "le", 0, False),  # an error: wrong
    ]
    pc = paired_comparison(make_rows(a, "A"), make_rows(b, "B"), "A", "B")
    assert pc["incident_strict_n"] == 5
    assert (pc["incident_strict_both_correct"], pc["incident_strict_both_wrong"]) == (2, 0)
    assert (pc["incident_strict_a_only_correct"], pc["incident_strict_b_only_correct"]) == (2, 1)
    assert pc["incident_strict_mcnemar_p"] == pytest.approx(mcnemar_exact(2, 1))
    assert pc["incident_strict_f1_a"] == pytest.approx(6 / 7)  # TP 3, FP 1, FN 0
    assert pc["incident_strict_f1_b"] == pytest.approx(0.5)  # TP 1, FP 0, FN 2
    # At narrative level incident 0 counts against B twice; per incident B got it right.
    assert pc["strict_a_only_correct"] == 4 and pc["strict_b_only_correct"] == 1


def test_empty_pairwise_and_disagreement_tables_keep_their_columns():
    """`leaderboard` replaces both tables even when empty, so they need columns and types."""
    pairs = pairwise_table([])
    assert pairs.empty and list(pairs.columns) == list(PAIRWISE_COLUMNS)
    assert str(pairs["experiment_a"].dtype) == "string" and str(pairs["n_common"].dtype) == "Int64"
    empty = disagreement_table([])
    assert empty.empty and list(empty.columns) == list(DISAGREEMENT_COLUMNS)
    assert str(empty["confidence"].dtype) == "Float64" and str(empty["detected"].dtype) == "boolean"
    recs = _clean_rows(2, 2)
    recs[0]["detected"] = False
    parts = [disagreements(make_rows(recs, "x")), disagreements(make_rows(recs, "y"))]
    assert list(disagreement_table(parts)["experiment"]) == ["x", "y"]


def test_disagreements_ordering_and_content():
    recs = _clean_rows(4, 6)
    recs[0].update(detected=False, confidence=0.6, rationale="<script>x</script>", narrative_text="N0")  # FN
    recs[1].update(detected=False, confidence=0.9, narrative_text="N1")  # FN, more confident
    recs[2].update(detected=False, confidence=None)  # FN without confidence: last FN
    recs[5].update(detected=True, confidence=0.99, indicators='["shelter"]')  # FP
    recs[6].update(status="parse_error", detected=None)  # not ok: never a disagreement
    out = disagreements(make_rows(recs))
    assert list(out.columns) == list(DISAGREEMENT_COLUMNS)
    assert list(out["kind"]) == ["FN", "FN", "FN", "FP"]
    assert list(out["incident_id"]) == ["1", "0", "2", "5"]
    assert out.loc[1, "rationale"] == "<script>x</script>"
    assert out.loc[0, "narrative_text"] == "N1"
    assert out.loc[3, "indicators"] == '["shelter"]'
    assert list(out["manual_flag_ind"]) == [1, 1, 1, 0]


def test_disagreements_of_several_experiments():
    recs = _clean_rows(2, 2)
    recs[0]["detected"] = False
    both = pd.concat([make_rows(recs, "x"), make_rows(recs, "y")], ignore_index=True)
    out = disagreements(both)
    assert list(out["experiment"]) == ["x", "y"]


def test_tables_keep_types_when_columns_are_all_null():
    """DuckDB tables are created from the first frame written: null columns must be typed."""
    df = random_rows(6)
    df["manual_flag_ind"] = pd.array([None] * len(df), dtype="Int64")
    df["confidence"] = pd.array([None] * len(df), dtype="Float64")
    tables = evaluation_tables(evaluate(df, n_boot=0))
    assert tables["calibration"].empty
    assert str(tables["calibration"]["bin"].dtype) == "Int64"
    assert str(tables["calibration"]["observed_rate"].dtype) == "Float64"
    metrics = tables["metrics"]
    assert str(metrics["f1"].dtype) == "Float64" and metrics["f1"].isna().all()
    assert str(metrics["tp"].dtype) == "Int64"
    assert str(metrics["scope"].dtype) == "string"
    assert str(tables["summary"]["reasoning_tokens_total"].dtype) == "Int64"
