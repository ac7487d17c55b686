"""Evaluation of one experiment's classifications against the manual labels.

Everything here is a pure function of in-memory data (no dagster, no I/O) so it can be unit
tested against scikit-learn and reused by the assets, the CLI and the HTML report.

Conventions that hold throughout the module:

* A metric whose denominator is zero is ``None``, never a fake ``0`` (an experiment with no
  predicted positives has an *undefined* precision, not a precision of 0).
* Two variants of every labelled metric are reported, because the old pipeline silently
  dropped failed narratives from its denominators:

  - ``answered``: only rows the model actually answered (status ``ok`` with a verdict);
  - ``strict``: every labelled row. Error statuses (``parse_error``, ``refusal``,
    ``truncated``, ``rejected``, ``failed``, and an ``ok`` row without a verdict) count as *wrong*
    predictions (predicted = not label), so errors can only lower the score. ``skipped``
    rows count as predicted *negative*: a skipped row is a placeholder ("Need LE report.")
    with no content, so there is nothing in it the model could have flagged, which is exactly
    what a negative verdict says.

* Incident scope. An incident is predicted positive if any of its ``ok`` narratives is.
  Its label is ``manual_flag`` where given (the maximum if its rows disagree), otherwise the
  OR of its known narrative labels (``None`` if all are unknown).
  ``answered`` keeps the incidents with at least one ``ok`` narrative and no error among its
  non-skipped narratives; ``strict`` keeps every labelled incident and makes it wrong if any
  of its narratives has an error status (skipped narratives count as negative).
* JSON: :func:`evaluate` returns only dicts, lists, str, int, float and None (no NaN), so it
  can go straight into Dagster metadata or a DuckDB JSON column; :func:`evaluation_tables`
  flattens it into DataFrames.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from narr_assets import vocabulary
from narr_assets.vocabulary import CME, LE, OK, SKIPPED, UNANSWERED

SCHEMA_VERSION = 1

# The shared words, under the names this module has always exported (the report and the
# tests import them from here); `vocabulary` defines them.
STATUSES: tuple[str, ...] = vocabulary.STATUSES
ERROR_STATUSES: frozenset[str] = frozenset(UNANSWERED)
NARRATIVE_TYPES: tuple[str, ...] = vocabulary.NARRATIVE_TYPES
SCOPES: tuple[str, ...] = ("overall", *NARRATIVE_TYPES, "incident")
VARIANTS: tuple[str, ...] = ("answered", "strict")
METRICS: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "mcc",
    "kappa",
)
# Metrics that get a Wilson interval (proportions); F1 gets a bootstrap interval instead.
WILSON_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "specificity")
TOKEN_COLUMNS: tuple[str, ...] = ("prompt_tokens", "completion_tokens", "reasoning_tokens")
CALIBRATION_BINS = 10
HISTOGRAM_BINS = 20

_REQUIRED_COLUMNS: tuple[str, ...] = ("experiment", "incident_id", "narrative_type", "status")
_OPTIONAL_COLUMNS: tuple[str, ...] = (
    "detected",
    "confidence",
    "manual_flag_ind",
    "manual_flag",
    "latency_s",
    *TOKEN_COLUMNS,
    "indicators",
    "rationale",
    "narrative_text",
)


# --------------------------------------------------------------------------------------
# Elementary statistics
# --------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def confusion(y_true: Iterable[Any], y_pred: Iterable[Any]) -> dict[str, int]:
    """Binary confusion counts.

    Args:
        y_true: True labels, truthy/falsy values (0/1, bool). Missing values are not allowed.
        y_pred: Predicted labels, same length and encoding as ``y_true``.

    Returns:
        ``{"tp": int, "fp": int, "tn": int, "fn": int}``.

    Raises:
        ValueError: If the lengths differ or a value is missing or not 0/1.
    """
    t = _binary_array(y_true, "y_true")
    p = _binary_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} items but y_pred has {p.size}")
    return {
        "tp": int(np.sum(t & p)),
        "fp": int(np.sum(~t & p)),
        "tn": int(np.sum(~t & ~p)),
        "fn": int(np.sum(t & ~p)),
    }


def _binary_array(values: Iterable[Any], name: str) -> np.ndarray:
    arr = pd.Series(list(values) if not isinstance(values, pd.Series) else values, dtype=object)
    if arr.isna().any():
        raise ValueError(f"{name} has a missing value at position {int(arr.isna().to_numpy().argmax())}")
    out = arr.map(lambda v: float(v)).to_numpy(dtype=float)
    bad = ~np.isin(out, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"{name} has a non-binary value at position {int(bad.argmax())}")
    return out.astype(bool)


def binary_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | None]:
    """Accuracy, precision, recall, specificity, F1, MCC and Cohen's kappa from counts.

    A metric is ``None`` when its denominator is zero. F1 is ``2tp / (2tp + fp + fn)``, so it
    is ``None`` only when there is neither a true nor a predicted positive, and ``0.0`` when
    there are positives and none is found (scikit-learn >= 1.3 uses the same definition).

    Args:
        tp: True positives.
        fp: False positives.
        tn: True negatives.
        fn: False negatives.

    Returns:
        Dict with keys ``accuracy precision recall specificity f1 mcc kappa``.
    """
    tp, fp, tn, fn = int(tp), int(fp), int(tn), int(fn)
    n = tp + fp + tn + fn
    mcc_den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    # Closed form of Cohen's kappa for two binary raters, exact in integers; the denominator
    # is zero exactly when the expected agreement is 1 (both raters constant and equal).
    kappa_den = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": None if mcc_den == 0 else (tp * tn - fp * fn) / math.sqrt(mcc_den),
        "kappa": _ratio(2 * (tp * tn - fn * fp), kappa_den),
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score interval for a binomial proportion ``k / n``.

    Chosen over the normal (Wald) interval because it behaves at 0/n and n/n, which is common
    here (about 48 positives, per-type splits of a few dozen).

    Args:
        k: Successes.
        n: Trials.
        z: Standard normal quantile (1.959964 for 95 %).

    Returns:
        ``(low, high)``, or ``(None, None)`` when ``n == 0``.

    Raises:
        ValueError: If ``k`` is outside ``[0, n]``.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (None, None)
    p = k / n
    z2 = z * z
    den = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    # At k = 0 and k = n the bounds are exactly 0 and 1; pin them against rounding error.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def bootstrap_f1_interval(
    y_true: Iterable[Any],
    y_pred: Iterable[Any],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float | None, float | None]:
    """Seeded percentile bootstrap interval for F1, resampling items with replacement.

    F1 depends on a resample only through its (tp, fp, fn, tn) counts, and resampling n items
    with replacement draws those counts from a multinomial with the observed cell shares, so
    the counts are drawn directly: same distribution, O(n_boot) instead of O(n_boot * n).
    Resamples where F1 is undefined (no true and no predicted positive) are dropped.

    Args:
        y_true: True labels (0/1, no missing values).
        y_pred: Predicted labels.
        n_boot: Number of bootstrap resamples.
        seed: Seed of ``numpy.random.default_rng``; equal seeds give equal intervals.
        level: Coverage of the interval, e.g. 0.95.

    Returns:
        ``(low, high)``, or ``(None, None)`` when there are no items, F1 is undefined on the
        data, or every resample is undefined.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    c = confusion(y_true, y_pred)
    return _bootstrap_f1_from_counts(c["tp"], c["fp"], c["tn"], c["fn"], n_boot, seed, level)


def _bootstrap_f1_from_counts(
    tp: int, fp: int, tn: int, fn: int, n_boot: int, seed: int, level: float
) -> tuple[float | None, float | None]:
    n = tp + fp + tn + fn
    if n == 0 or 2 * tp + fp + fn == 0 or n_boot <= 0:
        return (None, None)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.array([tp, fp, tn, fn], dtype=float) / n, size=n_boot)
    btp, bfp, bfn = draws[:, 0], draws[:, 1], draws[:, 3]
    den = 2 * btp + bfp + bfn
    f1 = 2 * btp[den > 0] / den[den > 0]
    if f1.size == 0:
        return (None, None)
    alpha = (1 - level) / 2
    low, high = np.quantile(f1, [alpha, 1 - alpha])
    return (float(low), float(high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test (binomial test of ``b`` vs ``c`` discordant pairs).

    Args:
        b: Pairs where only the first classifier is right (or positive).
        c: Pairs where only the second classifier is right (or positive).

    Returns:
        The p-value ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``;
        1.0 when there are no discordant pairs.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact needs non-negative counts, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # Sum the lower tail from its largest term downwards: each term is the previous one times
    # i / (n - i + 1), so the loop stops as soon as terms no longer change the sum. Exact
    # integer sums of binomial coefficients take minutes at production sizes (n ~ 20,000).
    term = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))
    tail = 0.0
    for i in range(k, -1, -1):
        tail += term
        if term < tail * 1e-17:
            break
        term *= i / (n - i + 1)
    return min(1.0, 2.0 * tail)


# --------------------------------------------------------------------------------------
# Preparing the rows
# --------------------------------------------------------------------------------------


def _float_column(df: pd.DataFrame, col: str) -> np.ndarray:
    """A column as float64 with NaN for missing (handles nullable, object and bool dtypes)."""
    s = df[col]
    try:
        if s.dtype == object:
            s = s.map(lambda v: np.nan if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v)
            s = s.map(lambda v: float(v) if not isinstance(v, float) else v)
        return pd.to_numeric(s, errors="raise").astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        # Name the column, not the offending value: a text column may hold narrative content.
        raise ValueError(f"column {col!r} must be numeric or boolean ({type(exc).__name__})") from None


def _check_binary(values: np.ndarray, df: pd.DataFrame, col: str) -> None:
    bad = ~np.isnan(values) & ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"column {col!r} must be 0/1 or missing; row {df.index[int(bad.argmax())]!r} is not")


def _prepare(rows: pd.DataFrame) -> pd.DataFrame:
    """Validate ``rows`` and return a compact frame with float-coded verdicts and labels."""
    missing = [c for c in _REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack required column(s) {missing}")
    df = rows.copy()
    for col in _OPTIONAL_COLUMNS:
        if col not in df.columns:
            df[col] = None
    status = df["status"].astype(object)
    bad_status = ~status.isin(STATUSES)
    if bad_status.any():
        i = int(bad_status.to_numpy().argmax())
        raise ValueError(f"unknown status {status.iloc[i]!r} in row {df.index[i]!r}; expected one of {STATUSES}")
    ntype = df["narrative_type"].astype(object)
    bad_type = ~ntype.isin(NARRATIVE_TYPES)
    if bad_type.any():
        i = int(bad_type.to_numpy().argmax())
        raise ValueError(f"unknown narrative_type {ntype.iloc[i]!r} in row {df.index[i]!r}")
    out = pd.DataFrame(
        {
            "experiment": df["experiment"].astype(object).to_numpy(),
            "incident_id": df["incident_id"].astype(str).to_numpy(),
            "narrative_type": ntype.to_numpy(),
            "status": status.to_numpy(),
            "det": _float_column(df, "detected"),
            "lab": _float_column(df, "manual_flag_ind"),
            "mflag": _float_column(df, "manual_flag"),
            "conf": _float_column(df, "confidence"),
        },
        index=df.index,
    )
    for col, name in (("det", "detected"), ("lab", "manual_flag_ind"), ("mflag", "manual_flag")):
        _check_binary(out[col].to_numpy(), df, name)
    dup = out.duplicated(["incident_id", "narrative_type"])
    if dup.any():
        i = int(dup.to_numpy().argmax())
        raise ValueError(
            f"duplicate (incident_id, narrative_type) = ({out['incident_id'].iloc[i]!r}, "
            f"{out['narrative_type'].iloc[i]!r}) in row {df.index[i]!r}"
        )
    # "answered" means the model gave a verdict; an ok row without one is treated as an error.
    out["answered"] = (out["status"] == OK).to_numpy() & ~np.isnan(out["det"].to_numpy())
    out["error"] = (out["status"] != SKIPPED).to_numpy() & ~out["answered"].to_numpy()
    out["skipped"] = (out["status"] == SKIPPED).to_numpy()
    return out


def _strict_prediction(label: np.ndarray, det: np.ndarray, answered: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Strict predictions: the verdict if answered, wrong if an error, negative if skipped."""
    pred = np.zeros(label.shape, dtype=float)
    pred[answered] = det[answered]
    pred[error] = 1.0 - label[error]
    return pred


# --------------------------------------------------------------------------------------
# Scopes
# --------------------------------------------------------------------------------------


def _scope_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labelled: int, n_boot: int, seed: int) -> dict[str, Any]:
    c = confusion(y_true, y_pred) if len(y_true) else {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    out: dict[str, Any] = {
        "n": tp + fp + tn + fn,
        "n_labelled": int(n_labelled),
        **c,
        "n_positive": tp + fn,
        "n_predicted_positive": tp + fp,
    }
    out.update(binary_metrics(tp, fp, tn, fn))
    wilson_counts = {
        "accuracy": (tp + tn, tp + fp + tn + fn),
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "specificity": (tn, tn + fp),
    }
    for name in WILSON_METRICS:
        low, high = wilson_interval(*wilson_counts[name])
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    low, high = _bootstrap_f1_from_counts(tp, fp, tn, fn, n_boot, seed, 0.95)
    out["f1_ci_low"], out["f1_ci_high"] = low, high
    return out


def _narrative_scope(df: pd.DataFrame, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    lab = df["lab"].to_numpy()
    labelled = ~np.isnan(lab)
    sub = df[labelled]
    y = sub["lab"].to_numpy()
    det = sub["det"].to_numpy()
    ans = sub["answered"].to_numpy()
    err = sub["error"].to_numpy()
    n_labelled = int(labelled.sum())
    return {
        "answered": _scope_metrics(y[ans], det[ans], n_labelled, n_boot, seed),
        "strict": _scope_metrics(y, _strict_prediction(y, det, ans, err), n_labelled, n_boot, seed),
    }


def _incident_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per incident: label, label source, verdict and status counts."""
    work = df.assign(det_ok=np.where(df["answered"].to_numpy(), df["det"].to_numpy(), 0.0))
    g = work.groupby("incident_id", sort=True)
    inc = pd.DataFrame(
        {
            "mflag": g["mflag"].max(),
            "mflag_min": g["mflag"].min(),
            "lab_or": g["lab"].max(),
            "n_rows": g.size(),
            "n_answered": g["answered"].sum(),
            "n_error": g["error"].sum(),
            "n_skipped": g["skipped"].sum(),
            "pred": g["det_ok"].max(),
        }
    )
    has_manual = inc["mflag"].notna()
    inc["label"] = inc["mflag"].where(has_manual, inc["lab_or"])
    # Object dtype: incidents without any label have no source (None, not a string).
    no_source = np.full(len(inc), None, dtype=object)
    inc["label_source"] = np.where(
        has_manual.to_numpy(), "manual_flag", np.where(inc["lab_or"].notna().to_numpy(), "narrative_or", no_source)
    )
    inc["answered"] = (inc["n_answered"] > 0) & (inc["n_error"] == 0)
    inc["error"] = inc["n_error"] > 0
    return inc


def _incident_scope(inc: pd.DataFrame, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    sub = inc[inc["label"].notna()]
    y = sub["label"].to_numpy(dtype=float)
    pred = sub["pred"].to_numpy(dtype=float)
    ans = sub["answered"].to_numpy(dtype=bool)
    err = sub["error"].to_numpy(dtype=bool)
    strict_pred = np.where(err, 1.0 - y, pred)
    return {
        "answered": _scope_metrics(y[ans], pred[ans], len(sub), n_boot, seed),
        "strict": _scope_metrics(y, strict_pred, len(sub), n_boot, seed),
    }


# --------------------------------------------------------------------------------------
# Descriptive sections
# --------------------------------------------------------------------------------------


def _status_counts(status: pd.Series) -> dict[str, int]:
    counts = status.value_counts()
    return {s: int(counts.get(s, 0)) for s in STATUSES}


def _coverage(df: pd.DataFrame) -> dict[str, Any]:
    n = len(df)
    n_answered = int(df["answered"].sum())
    n_skipped = int(df["skipped"].sum())
    n_ok = int((df["status"] == OK).sum())
    return {
        "n_rows": n,
        "n_incidents": int(df["incident_id"].nunique()),
        "by_status": _status_counts(df["status"]),
        "by_type": {
            t: {
                "n_rows": int((df["narrative_type"] == t).sum()),
                "by_status": _status_counts(df.loc[df["narrative_type"] == t, "status"]),
            }
            for t in NARRATIVE_TYPES
        },
        "n_ok": n_ok,
        "n_ok_without_verdict": n_ok - n_answered,
        "n_answered": n_answered,
        "n_errors": int(df["error"].sum()),
        "n_skipped": n_skipped,
        "answered_share": _ratio(n_answered, n),
        "answered_share_excl_skipped": _ratio(n_answered, n - n_skipped),
    }


def _labels(df: pd.DataFrame, inc: pd.DataFrame) -> dict[str, Any]:
    lab = df["lab"].dropna()
    ilab = inc["label"].dropna()
    both = inc["mflag"].notna() & inc["lab_or"].notna()
    return {
        "n_labelled_narratives": int(lab.size),
        "n_positive_narratives": int(lab.sum()),
        "n_labelled_incidents": int(ilab.size),
        "n_positive_incidents": int(ilab.sum()),
        "incident_label_source": {
            "manual_flag": int((inc["label_source"] == "manual_flag").sum()),
            "narrative_or": int((inc["label_source"] == "narrative_or").sum()),
        },
        # Rows of one incident carrying different manual_flag values (we use the maximum).
        "n_manual_flag_conflicts": int((inc["mflag"] != inc["mflag_min"]).where(inc["mflag"].notna(), False).sum()),
        # Incidents whose manual_flag differs from the OR of its narrative labels: worth a look.
        "n_manual_flag_vs_narrative_or_mismatch": int((inc["mflag"] != inc["lab_or"]).where(both, False).sum()),
    }


def _share(k: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(k, n)
    return {"n": int(n), "n_detected": int(k), "share": _ratio(k, n), "ci_low": low, "ci_high": high}


def _prevalence(df: pd.DataFrame, inc: pd.DataFrame) -> dict[str, Any]:
    ans = df[df["answered"]]
    out = {"overall": _share(int(ans["det"].sum()), len(ans))}
    for t in NARRATIVE_TYPES:
        sub = ans[ans["narrative_type"] == t]
        out[t] = _share(int(sub["det"].sum()), len(sub))
    ians = inc[inc["answered"]]
    out["incident"] = _share(int(ians["pred"].sum()), len(ians))
    return out


def _agreement(df: pd.DataFrame) -> dict[str, Any]:
    ans = df[df["answered"]]
    wide = ans.pivot(index="incident_id", columns="narrative_type", values="det")
    if not set(NARRATIVE_TYPES) <= set(wide.columns):
        cme = le = np.array([], dtype=bool)
    else:
        wide = wide.dropna(subset=list(NARRATIVE_TYPES))
        cme = wide[CME].to_numpy(dtype=float).astype(bool)
        le = wide[LE].to_numpy(dtype=float).astype(bool)
    both, cme_only = int(np.sum(cme & le)), int(np.sum(cme & ~le))
    le_only, neither = int(np.sum(~cme & le)), int(np.sum(~cme & ~le))
    n = both + cme_only + le_only + neither
    low, high = wilson_interval(both + neither, n)
    return {
        "n_incidents_both_answered": n,
        "n_agree": both + neither,
        "agreement": _ratio(both + neither, n),
        "agreement_ci_low": low,
        "agreement_ci_high": high,
        "kappa": binary_metrics(both, le_only, neither, cme_only)["kappa"],
        "both_detected": both,
        "cme_only": cme_only,
        "le_only": le_only,
        "neither": neither,
    }


def _calibration(df: pd.DataFrame) -> dict[str, Any] | None:
    sub = df[df["answered"] & df["lab"].notna() & df["conf"].notna()]
    if sub.empty:
        return None
    conf = sub["conf"].to_numpy()
    valid = (conf >= 0.0) & (conf <= 1.0)
    conf, det, y = conf[valid], sub["det"].to_numpy()[valid], sub["lab"].to_numpy()[valid]
    n_invalid = int((~valid).sum())
    if conf.size == 0:
        return {"n": 0, "n_invalid": n_invalid, "brier": None, "ece": None, "bins": []}
    # The model reports confidence in its own verdict; the probability of the positive class
    # is that confidence for a positive verdict and its complement for a negative one.
    p = np.where(det == 1.0, conf, 1.0 - conf)
    idx = np.minimum((p * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    bins, ece = [], 0.0
    for b in range(CALIBRATION_BINS):
        m = idx == b
        count = int(m.sum())
        mean_p: float | None = None
        rate: float | None = None
        if count:
            mean_p, rate = float(p[m].mean()), float(y[m].mean())
            ece += count / p.size * abs(mean_p - rate)
        bins.append(
            {
                "bin": b,
                "lo": b / CALIBRATION_BINS,
                "hi": (b + 1) / CALIBRATION_BINS,
                "count": count,
                "mean_predicted": mean_p,
                "observed_rate": rate,
            }
        )
    return {
        "n": int(p.size),
        "n_invalid": n_invalid,
        "brier": float(np.mean((p - y) ** 2)),
        "ece": float(ece),
        "bins": bins,
    }


def _histogram(values: np.ndarray) -> dict[str, list] | None:
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        # A single value still deserves a visible bar.
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _distribution(values: np.ndarray) -> dict[str, Any]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"n": 0, "total": None, "mean": None, "median": None, "p95": None, "max": None, "hist": None}
    return {
        "n": int(v.size),
        "total": float(v.sum()),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
        "hist": _histogram(v),
    }


def _latency(rows: pd.DataFrame) -> dict[str, Any]:
    # Latency of every row that has one (errors included: their calls cost time too).
    d = _distribution(_float_column(rows, "latency_s") if "latency_s" in rows.columns else np.array([]))
    return {
        "n": d["n"],
        "mean_s": d["mean"],
        "median_s": d["median"],
        "p95_s": d["p95"],
        "max_s": d["max"],
        "total_s": d["total"],
        "hist": d["hist"],
    }


def _tokens(rows: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in TOKEN_COLUMNS:
        kind = col.removesuffix("_tokens")
        d = _distribution(_float_column(rows, col) if col in rows.columns else np.array([]))
        out[kind] = {
            "n": d["n"],
            "total": None if d["total"] is None else round(d["total"]),
            "mean": d["mean"],
            "median": d["median"],
            "p95": d["p95"],
            "max": None if d["max"] is None else round(d["max"]),
            "hist": d["hist"],
        }
    return out


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars to Python and NaN/inf to None, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if obj is None or obj is pd.NA:
        return None
    return obj


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def evaluate(rows: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Evaluate one experiment's rows (coverage, labelled metrics, calibration, cost).

    Args:
        rows: One row per narrative result of a single experiment (see module docstring for
            the columns; only ``experiment``, ``incident_id``, ``narrative_type`` and
            ``status`` are required, missing optional columns count as all-null).
        n_boot: Bootstrap resamples for the F1 intervals.
        seed: Bootstrap seed (the same seed is used for every scope, so results are
            reproducible).

    Returns:
        A JSON-serialisable dict with keys ``schema_version``, ``experiment``, ``n_boot``,
        ``seed``, ``coverage``, ``labels``, ``scopes`` (``overall``/``cme``/``le``/
        ``incident`` x ``answered``/``strict``), ``prevalence``, ``agreement``,
        ``calibration`` (None without confidences), ``latency`` and ``tokens``.

    Raises:
        ValueError: If rows mix experiments, a required column is missing, a status or
            narrative type is unknown, a label is not 0/1, or a (incident_id,
            narrative_type) pair repeats. Messages name the row, never narrative text.
    """
    df = _prepare(rows)
    experiments = sorted({str(e) for e in df["experiment"].dropna().unique()})
    if len(experiments) > 1:
        raise ValueError(f"evaluate() takes the rows of one experiment, got {experiments}")
    inc = _incident_frame(df)
    scopes: dict[str, Any] = {"overall": _narrative_scope(df, n_boot, seed)}
    for t in NARRATIVE_TYPES:
        scopes[t] = _narrative_scope(df[df["narrative_type"] == t], n_boot, seed)
    scopes["incident"] = _incident_scope(inc, n_boot, seed)
    result = {
        "schema_version": SCHEMA_VERSION,
        "experiment": experiments[0] if experiments else None,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "coverage": _coverage(df),
        "labels": _labels(df, inc),
        "scopes": scopes,
        "prevalence": _prevalence(df, inc),
        "agreement": _agreement(df),
        "calibration": _calibration(df),
        "latency": _latency(rows),
        "tokens": _tokens(rows),
    }
    return _jsonable(result)


def summary_row(ev: dict[str, Any]) -> dict[str, Any]:
    """Flat scalar summary of one evaluation (for Dagster metadata and the leaderboard).

    Args:
        ev: A dict returned by :func:`evaluate`.

    Returns:
        Dict of str/int/float/None values; the headline F1 is the strict overall F1.
    """
    cov, sc = ev["coverage"], ev["scopes"]
    strict, answered = sc["overall"]["strict"], sc["overall"]["answered"]
    cal = ev.get("calibration") or {}
    tok = ev["tokens"]
    return {
        "experiment": ev["experiment"],
        "n_rows": cov["n_rows"],
        "n_incidents": cov["n_incidents"],
        "n_answered": cov["n_answered"],
        "answered_share": cov["answered_share"],
        "n_errors": cov["n_errors"],
        "n_skipped": cov["n_skipped"],
        "n_labelled": strict["n_labelled"],
        "n_positive": strict["n_positive"],
        "tp": strict["tp"],
        "fp": strict["fp"],
        "tn": strict["tn"],
        "fn": strict["fn"],
        "f1": strict["f1"],
        "f1_ci_low": strict["f1_ci_low"],
        "f1_ci_high": strict["f1_ci_high"],
        "precision": strict["precision"],
        "precision_ci_low": strict["precision_ci_low"],
        "precision_ci_high": strict["precision_ci_high"],
        "recall": strict["recall"],
        "recall_ci_low": strict["recall_ci_low"],
        "recall_ci_high": strict["recall_ci_high"],
        "accuracy": strict["accuracy"],
        "specificity": strict["specificity"],
        "mcc": strict["mcc"],
        "kappa": strict["kappa"],
        "answered_n": answered["n"],
        "answered_f1": answered["f1"],
        "answered_f1_ci_low": answered["f1_ci_low"],
        "answered_f1_ci_high": answered["f1_ci_high"],
        "answered_precision": answered["precision"],
        "answered_recall": answered["recall"],
        "cme_f1": sc[CME]["strict"]["f1"],
        "le_f1": sc[LE]["strict"]["f1"],
        "incident_f1": sc["incident"]["strict"]["f1"],
        "incident_f1_ci_low": sc["incident"]["strict"]["f1_ci_low"],
        "incident_f1_ci_high": sc["incident"]["strict"]["f1_ci_high"],
        "incident_answered_f1": sc["incident"]["answered"]["f1"],
        "prevalence_narrative": ev["prevalence"]["overall"]["share"],
        "prevalence_incident": ev["prevalence"]["incident"]["share"],
        "cme_le_agreement": ev["agreement"]["agreement"],
        "cme_le_kappa": ev["agreement"]["kappa"],
        "brier": cal.get("brier"),
        "latency_mean_s": ev["latency"]["mean_s"],
        "latency_p95_s": ev["latency"]["p95_s"],
        "prompt_tokens_mean": tok["prompt"]["mean"],
        "completion_tokens_mean": tok["completion"]["mean"],
        "reasoning_tokens_mean": tok["reasoning"]["mean"],
        "prompt_tokens_total": tok["prompt"]["total"],
        "completion_tokens_total": tok["completion"]["total"],
        "reasoning_tokens_total": tok["reasoning"]["total"],
    }


_TEXT_COLUMNS = frozenset({"experiment", "scope", "variant", "status", "experiment_a", "experiment_b"})
_INTEGER_NAMES = frozenset({"rank", "bin", "count", "n", "tp", "fp", "tn", "fn"})


def _column_dtype(name: str, values: list[Any]) -> Any:
    """Nullable dtype of a table column, stable even when a column is entirely null.

    Tables are created in DuckDB from the first frame written, so an all-null column must
    still get its proper type (an integer count, a float metric), not ``object``.
    """
    if name in _TEXT_COLUMNS:
        return "string"
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, (bool, np.bool_)) for v in vals):
        return "boolean"
    if vals and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        return "Int64"
    if vals and all(isinstance(v, (int, float, np.integer, np.floating)) for v in vals):
        return "Float64"
    if vals:
        return object
    if name in _INTEGER_NAMES or name.startswith("n_") or name.endswith(("_n", "tokens_total")):
        return "Int64"
    return "Float64"


def _typed_frame(records: list[dict[str, Any]], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """DataFrame with nullable dtypes so None becomes SQL NULL in DuckDB, not NaN."""
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in records for k in r))
    data = {}
    for col in cols:
        values = [r.get(col) for r in records]
        data[col] = pd.array(values, dtype=_column_dtype(col, values))
    return pd.DataFrame(data, columns=cols)


def leaderboard(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """Rank experiments by strict overall F1.

    Strict F1 is the headline because answered F1 rewards an experiment for failing on hard
    narratives (they leave the denominator); answered F1 is shown beside it. Ties and
    undefined F1 are broken by answered F1, then experiment name; undefined values sort last.

    Args:
        evals: Dicts returned by :func:`evaluate`.

    Returns:
        One row per experiment: ``rank`` then the columns of :func:`summary_row`, with
        nullable dtypes (``Int64``/``Float64``).
    """
    records = [summary_row(ev) for ev in evals]
    columns = ["rank", *summary_row_columns()]
    if not records:
        return _typed_frame([], columns)
    records.sort(
        key=lambda r: (
            r["f1"] is None,
            -(r["f1"] or 0.0),
            r["answered_f1"] is None,
            -(r["answered_f1"] or 0.0),
            str(r["experiment"]),
        )
    )
    for i, r in enumerate(records, start=1):
        r["rank"] = i
    return _typed_frame(records, columns)


@functools.cache
def _summary_columns() -> tuple[str, ...]:
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in _REQUIRED_COLUMNS})
    return tuple(summary_row(evaluate(empty, n_boot=0)).keys())


def summary_row_columns() -> list[str]:
    """Column names of :func:`summary_row` (and, after ``rank``, of :func:`leaderboard`)."""
    return list(_summary_columns())


def evaluation_tables(ev: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Flatten one evaluation into tables (all carry an ``experiment`` column).

    Args:
        ev: A dict returned by :func:`evaluate`.

    Returns:
        ``metrics`` (one row per scope x variant), ``coverage`` (one row per status, with
        narrative-type breakdown), ``prevalence`` (one row per scope), ``calibration`` (one
        row per bin; empty without confidences) and ``summary`` (one row, see
        :func:`summary_row`).
    """
    exp = ev["experiment"]
    metrics = [{"experiment": exp, "scope": s, "variant": v, **ev["scopes"][s][v]} for s in SCOPES for v in VARIANTS]
    cov = ev["coverage"]
    coverage = [
        {
            "experiment": exp,
            "status": st,
            "n": cov["by_status"][st],
            "n_cme": cov["by_type"][CME]["by_status"][st],
            "n_le": cov["by_type"][LE]["by_status"][st],
            "share": _ratio(cov["by_status"][st], cov["n_rows"]),
        }
        for st in STATUSES
    ]
    prevalence = [{"experiment": exp, "scope": s, **ev["prevalence"][s]} for s in SCOPES]
    cal = ev.get("calibration") or {"bins": []}
    calibration = [{"experiment": exp, **b} for b in cal["bins"]]
    cal_cols = ["experiment", "bin", "lo", "hi", "count", "mean_predicted", "observed_rate"]
    return {
        "metrics": _typed_frame(metrics),
        "coverage": _typed_frame(coverage),
        "prevalence": _typed_frame(prevalence),
        "calibration": _typed_frame(calibration, cal_cols),
        "summary": _typed_frame([summary_row(ev)]),
    }


def _paired_stats(correct_a: np.ndarray, correct_b: np.ndarray, prefix: str) -> dict[str, Any]:
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    n = int(correct_a.size)
    return {
        f"{prefix}_n": n,
        f"{prefix}_both_correct": int(np.sum(correct_a & correct_b)),
        f"{prefix}_both_wrong": int(np.sum(~correct_a & ~correct_b)),
        f"{prefix}_a_only_correct": a_only,
        f"{prefix}_b_only_correct": b_only,
        f"{prefix}_accuracy_a": _ratio(int(correct_a.sum()), n),
        f"{prefix}_accuracy_b": _ratio(int(correct_b.sum()), n),
        f"{prefix}_mcnemar_p": mcnemar_exact(a_only, b_only),
    }


def paired_comparison(rows_a: pd.DataFrame, rows_b: pd.DataFrame, name_a: str, name_b: str) -> dict[str, Any]:
    """Compare two experiments on the narratives they share.

    Pairs are matched on (incident_id, narrative_type). Four views:

    * ``verdict_*``: on pairs both answered, agreement and kappa between the two verdicts and
      an exact McNemar test of "A positive, B negative" vs "A negative, B positive" (does one
      flag more than the other, labels not needed);
    * ``answered_*``: on pairs both answered and labelled, correctness against the label and
      an exact McNemar test of "only A right" (b) vs "only B right" (c);
    * ``strict_*``: the same on every labelled pair, errors counting as wrong and skipped as
      negative (the rules of :func:`evaluate`), plus the strict F1 of each side on this set;
    * ``incident_strict_*``: the strict view per incident (positive if either narrative is;
      wrong if any of its narratives has an error), on the narratives both experiments have.

    Args:
        rows_a: Rows of experiment A (same columns as for :func:`evaluate`).
        rows_b: Rows of experiment B.
        name_a: Display name of A.
        name_b: Display name of B.

    Returns:
        A flat JSON-serialisable dict (see keys above plus ``experiment_a``,
        ``experiment_b``, ``n_common``, ``n_only_a``, ``n_only_b``, ``n_label_conflicts``).
    """
    a, b = _prepare(rows_a), _prepare(rows_b)
    key = ["incident_id", "narrative_type"]
    cols = [*key, "det", "lab", "answered", "error"]
    m = a[cols].merge(b[cols], on=key, how="inner", suffixes=("_a", "_b"))
    lab_a, lab_b = m["lab_a"].to_numpy(), m["lab_b"].to_numpy()
    conflicts = int(np.sum(~np.isnan(lab_a) & ~np.isnan(lab_b) & (lab_a != lab_b)))
    # Both sides come from the same labelled input; prefer A's label, fall back to B's.
    lab = np.where(np.isnan(lab_a), lab_b, lab_a)
    det_a, det_b = m["det_a"].to_numpy(), m["det_b"].to_numpy()
    ans_a, ans_b = m["answered_a"].to_numpy(bool), m["answered_b"].to_numpy(bool)
    err_a, err_b = m["error_a"].to_numpy(bool), m["error_b"].to_numpy(bool)
    both = ans_a & ans_b
    va, vb = det_a[both] == 1.0, det_b[both] == 1.0
    a_pos_b_neg, a_neg_b_pos = int(np.sum(va & ~vb)), int(np.sum(~va & vb))
    n_both = int(both.sum())
    out: dict[str, Any] = {
        "experiment_a": name_a,
        "experiment_b": name_b,
        "n_common": len(m),
        "n_only_a": len(a) - len(m),
        "n_only_b": len(b) - len(m),
        "n_label_conflicts": conflicts,
        "n_both_answered": n_both,
        "verdict_agree": n_both - a_pos_b_neg - a_neg_b_pos,
        "verdict_agreement": _ratio(n_both - a_pos_b_neg - a_neg_b_pos, n_both),
        "verdict_kappa": binary_metrics(int(np.sum(va & vb)), a_neg_b_pos, int(np.sum(~va & ~vb)), a_pos_b_neg)[
            "kappa"
        ],
        "verdict_a_pos_b_neg": a_pos_b_neg,
        "verdict_a_neg_b_pos": a_neg_b_pos,
        "verdict_mcnemar_p": mcnemar_exact(a_pos_b_neg, a_neg_b_pos),
    }
    labelled = ~np.isnan(lab)
    sel = both & labelled
    out.update(_paired_stats(det_a[sel] == lab[sel], det_b[sel] == lab[sel], "answered"))
    y = lab[labelled]
    pa = _strict_prediction(y, det_a[labelled], ans_a[labelled], err_a[labelled])
    pb = _strict_prediction(y, det_b[labelled], ans_b[labelled], err_b[labelled])
    out.update(_paired_stats(pa == y, pb == y, "strict"))
    ca, cb = (confusion(y, pa), confusion(y, pb)) if y.size else ({"tp": 0, "fp": 0, "tn": 0, "fn": 0},) * 2
    out["strict_f1_a"] = binary_metrics(**ca)["f1"]
    out["strict_f1_b"] = binary_metrics(**cb)["f1"]
    out.update(_paired_incidents(a, b, m[key]))
    return _jsonable(out)


def _paired_incidents(a: pd.DataFrame, b: pd.DataFrame, common: pd.DataFrame) -> dict[str, Any]:
    """Strict incident-level paired statistics (positive if either narrative is).

    Both sides are reduced to the narratives they share before incidents are formed, so an
    incident's verdict never rests on a narrative only one experiment saw.
    """
    inc_a = _incident_frame(a.merge(common, on=["incident_id", "narrative_type"]))
    inc_b = _incident_frame(b.merge(common, on=["incident_id", "narrative_type"]))
    label = inc_a["label"].where(inc_a["label"].notna(), inc_b["label"])
    keep = label.notna().to_numpy()
    y = label.to_numpy(dtype=float)[keep]

    def strict(inc: pd.DataFrame) -> np.ndarray:
        pred, err = inc["pred"].to_numpy(dtype=float)[keep], inc["error"].to_numpy(dtype=bool)[keep]
        return np.where(err, 1.0 - y, pred)

    pa, pb = strict(inc_a), strict(inc_b)
    out = _paired_stats(pa == y, pb == y, "incident_strict")
    ca, cb = (confusion(y, pa), confusion(y, pb)) if y.size else ({"tp": 0, "fp": 0, "tn": 0, "fn": 0},) * 2
    out["incident_strict_f1_a"] = binary_metrics(**ca)["f1"]
    out["incident_strict_f1_b"] = binary_metrics(**cb)["f1"]
    return out


def _paired_columns(prefix: str) -> list[str]:
    return [
        f"{prefix}_{k}"
        for k in (
            "n",
            "both_correct",
            "both_wrong",
            "a_only_correct",
            "b_only_correct",
            "accuracy_a",
            "accuracy_b",
            "mcnemar_p",
        )
    ]


#: Keys of :func:`paired_comparison`, in order: the columns of the `pairwise_comparisons` table.
PAIRWISE_COLUMNS: tuple[str, ...] = (
    "experiment_a", "experiment_b", "n_common", "n_only_a", "n_only_b", "n_label_conflicts",
    "n_both_answered", "verdict_agree", "verdict_agreement", "verdict_kappa", "verdict_a_pos_b_neg",
    "verdict_a_neg_b_pos", "verdict_mcnemar_p", *_paired_columns("answered"), *_paired_columns("strict"),
    "strict_f1_a", "strict_f1_b", *_paired_columns("incident_strict"), "incident_strict_f1_a", "incident_strict_f1_b",
)  # fmt: skip


def pairwise_table(comparisons: list[dict[str, Any]]) -> pd.DataFrame:
    """Stack :func:`paired_comparison` results into one table with nullable dtypes.

    Args:
        comparisons: Dicts returned by :func:`paired_comparison` (may be empty: the table
            still has every column, so a stored table can always be replaced).

    Returns:
        One row per comparison, columns :data:`PAIRWISE_COLUMNS`.
    """
    return _typed_frame(comparisons, PAIRWISE_COLUMNS)


DISAGREEMENT_COLUMNS: tuple[str, ...] = (
    "experiment",
    "incident_id",
    "narrative_type",
    "kind",
    "manual_flag_ind",
    "detected",
    "confidence",
    "indicators",
    "rationale",
    "narrative_text",
)


def disagreements(rows: pd.DataFrame) -> pd.DataFrame:
    """False positives and false negatives among answered, labelled narratives.

    Args:
        rows: Rows of one or more experiments (same columns as for :func:`evaluate`).

    Returns:
        Columns ``experiment incident_id narrative_type kind manual_flag_ind detected
        confidence indicators rationale narrative_text``; ``kind`` is ``"FN"`` or ``"FP"``.
        Sorted FN first, then by confidence descending (missing last), then experiment,
        incident and narrative type, so the most confident misses lead.
    """
    if "experiment" in rows.columns and rows["experiment"].nunique(dropna=False) > 1:
        parts = [disagreements(g) for _, g in rows.groupby("experiment", sort=True, dropna=False)]
        return _sort_disagreements(pd.concat(parts, ignore_index=True))
    df = _prepare(rows)
    full = rows.copy()
    for col in _OPTIONAL_COLUMNS:
        if col not in full.columns:
            full[col] = None
    wrong = df["answered"].to_numpy() & ~np.isnan(df["lab"].to_numpy()) & (df["det"].to_numpy() != df["lab"].to_numpy())
    sub, src = df[wrong], full[wrong]
    out = pd.DataFrame(
        {
            "experiment": sub["experiment"].to_numpy(),
            "incident_id": sub["incident_id"].to_numpy(),
            "narrative_type": sub["narrative_type"].to_numpy(),
            "kind": np.where(sub["lab"].to_numpy() == 1.0, "FN", "FP"),
            "manual_flag_ind": pd.array(sub["lab"].to_numpy(), dtype="Float64").astype("Int64"),
            "detected": pd.array(sub["det"].to_numpy() == 1.0, dtype="boolean"),
            "confidence": pd.array(sub["conf"].to_numpy(), dtype="Float64"),
            "indicators": src["indicators"].astype(object).where(src["indicators"].notna(), None).to_numpy(),
            "rationale": src["rationale"].astype(object).where(src["rationale"].notna(), None).to_numpy(),
            "narrative_text": src["narrative_text"]
            .astype(object)
            .where(src["narrative_text"].notna(), None)
            .to_numpy(),
        },
        columns=list(DISAGREEMENT_COLUMNS),
    )
    return _sort_disagreements(out)


def disagreement_table(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Stack :func:`disagreements` tables (of several experiments) into one.

    Args:
        parts: Tables returned by :func:`disagreements`; may be empty.

    Returns:
        Their rows in order, columns :data:`DISAGREEMENT_COLUMNS`; with no parts, an empty
        table with the same columns and dtypes (so a stored table can always be replaced).
    """
    if parts:
        return pd.concat(parts, ignore_index=True)
    dtypes = {"manual_flag_ind": "Int64", "detected": "boolean", "confidence": "Float64"}
    return pd.DataFrame(columns=list(DISAGREEMENT_COLUMNS)).astype(
        {c: dtypes.get(c, "string") for c in DISAGREEMENT_COLUMNS}
    )


def _sort_disagreements(df: pd.DataFrame) -> pd.DataFrame:
    order = df.assign(
        _k=(df["kind"] != "FN").astype(int),
        _c=-df["confidence"].astype("Float64").fillna(-np.inf).astype(float),
    )
    order = order.sort_values(["_k", "_c", "experiment", "incident_id", "narrative_type"], kind="mergesort")
    return order.drop(columns=["_k", "_c"]).reset_index(drop=True)


def to_json(ev: dict[str, Any]) -> str:
    """Serialise an evaluation deterministically (sorted keys, no NaN).

    Args:
        ev: A dict returned by :func:`evaluate` or :func:`paired_comparison`.

    Returns:
        JSON text.
    """
    return json.dumps(ev, sort_keys=True, allow_nan=False)
