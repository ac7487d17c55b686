"""Self-contained HTML report of experiment evaluations.

The report is one HTML file with inline CSS and inline SVG plots: no scripts, no network, no
external fonts, so it opens on an air-gapped machine and can be archived next to the data.
It contains restricted-use narrative text (in the disagreement tables) and must be handled
like the input file.

Plots are drawn with matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), which
renders without a GUI backend and without touching global backend state. matplotlib is
imported only when a report is rendered: its import reads rc files and environment
variables, which must not happen when Dagster loads the definitions. SVG output is made
deterministic (fixed ``svg.hashsalt``, no date metadata) so re-rendering unchanged
evaluations gives a byte-identical file.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from narr_assets import factors
from narr_assets.evaluation import NARRATIVE_TYPES, SCOPES, STATUSES, VARIANTS
from narr_assets.private import write_private_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

_VARIANT_COLOURS = {"answered": "#4c78a8", "strict": "#e45756"}
# Per-run copies (`report-<run>.html`) kept next to `report.html`: each holds narrative text,
# so they are not kept forever; the newest few allow comparing with the last runs.
REPORT_COPIES = 5

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .85rem; }
.scroll { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: .2rem .45rem; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
td.t, th.t { text-align: left; }
.ci { color: #666; font-size: .8em; white-space: nowrap; }
.note { color: #555; font-size: .9rem; }
.warn { background: #fff4e5; border: 1px solid #f0b56b; padding: .5rem .8rem; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; }
.cm td, .cm th { min-width: 3rem; text-align: center; }
.narr { white-space: pre-wrap; text-align: left; max-width: 50rem; font-size: .8rem; }
details { margin: .6rem 0; } summary { cursor: pointer; font-weight: 600; }
figure { margin: .5rem 0; } svg { max-width: 100%; height: auto; }
"""


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _num(v: Any, digits: int = 3) -> str:
    if _missing(v):
        return "&ndash;"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{v:,}"
    f = float(v)
    if f.is_integer() and abs(f) >= 1000:
        return f"{int(f):,}"
    return _esc(f"{f:.{digits}f}")


def _int_or_dash(v: Any, spec: str = "") -> str:
    """An integer formatted with ``spec`` (e.g. ``","`` for thousands), or a dash if missing."""
    return "&ndash;" if _missing(v) else _esc(format(int(v), spec))


def _pct(v: Any) -> str:
    return "&ndash;" if _missing(v) else _esc(f"{100 * float(v):.1f}%")


def _with_ci(v: Any, low: Any, high: Any) -> str:
    if _missing(v):
        return "&ndash;"
    ci = "" if _missing(low) else f' <span class="ci">[{_num(low, 2)}, {_num(high, 2)}]</span>'
    return f"{_num(v)}{ci}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], text_cols: Sequence[int] = (), cls: str = "") -> str:
    """An HTML table; cells must already be escaped/formatted."""
    text = set(text_cols)
    head = "".join(f'<th class="t">{h}</th>' if i in text else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="t">{c}</td>' if i in text else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    cls_attr = f' class="{cls}"' if cls else ""
    # Wide tables scroll inside their own box instead of widening the whole page.
    return f'<div class="scroll"><table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# --------------------------------------------------------------------------------------
# SVG plots
# --------------------------------------------------------------------------------------


class _SvgRenderer:
    """Renders figures to inline SVG with ids unique across the whole report."""

    def __init__(self) -> None:
        self.count = 0

    def render(self, fig: Figure, alt: str) -> str:
        self.count += 1
        prefix = f"f{self.count}-"
        import matplotlib

        buf = io.StringIO()
        rc: dict[RcKeyType, Any] = {"svg.hashsalt": f"narr-assets-{self.count}", "svg.fonttype": "none"}
        with matplotlib.rc_context(rc):
            fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
        svg = buf.getvalue()
        # Inline SVG in HTML5 needs neither the XML prolog, the DOCTYPE, the namespace
        # declarations nor the RDF metadata; all of them carry http:// URIs, which would
        # make "no external references" impossible to check.
        svg = svg[svg.index("<svg") :]
        svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
        svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
        # matplotlib numbers ids per figure (figure_1, axes_1, ...); prefix them so several
        # figures in one document neither collide nor cross-reference.
        svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', svg)
        svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", svg)
        svg = svg.replace("<svg ", f'<svg role="img" aria-label="{_esc(alt)}" ', 1)
        return f"<figure>{svg}</figure>"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _nan(v: Any) -> float:
    return math.nan if _missing(v) else float(v)


def _err(v: Any, low: Any, high: Any) -> tuple[float, float]:
    if _missing(v) or _missing(low):
        return (0.0, 0.0)
    return (max(0.0, float(v) - float(low)), max(0.0, float(high) - float(v)))


def _fig_forest(lb: pd.DataFrame) -> Figure | None:
    if lb.empty or "f1" not in lb.columns or lb["f1"].isna().all():
        return None
    names = [str(e) for e in lb["experiment"]][::-1]
    fig = _figure(7, 0.45 * len(names) + 1.2)
    ax = fig.subplots()
    series = (
        ("f1", "strict", _VARIANT_COLOURS["strict"], "o"),
        ("answered_f1", "answered", _VARIANT_COLOURS["answered"], "s"),
    )
    for offset, (col, label, colour, marker) in enumerate(series):
        if col not in lb.columns:
            continue
        vals = [_nan(v) for v in lb[col]][::-1]
        lows = list(lb.get(f"{col}_ci_low", pd.Series([None] * len(lb))))[::-1]
        highs = list(lb.get(f"{col}_ci_high", pd.Series([None] * len(lb))))[::-1]
        errs = [_err(v, lo, hi) for v, lo, hi in zip(vals, lows, highs, strict=True)]
        ys = [i + (0.15 if offset == 0 else -0.15) for i in range(len(names))]
        xerr = [[e[0] for e in errs], [e[1] for e in errs]]
        ax.errorbar(vals, ys, xerr=xerr, fmt=marker, color=colour, capsize=3, label=f"F1 ({label})")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 with 95% bootstrap interval (overall narratives)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def _fig_scope_bars(ev: dict[str, Any]) -> Figure | None:
    scopes = ev["scopes"]
    if all(scopes[s]["strict"]["n_labelled"] == 0 for s in SCOPES):
        return None
    fig = _figure(10, 3.2)
    axes = fig.subplots(1, 3, sharey=True)
    width = 0.38
    for ax, metric in zip(axes, ("precision", "recall", "f1"), strict=True):
        for j, variant in enumerate(VARIANTS):
            xs, vals, lo, hi = [], [], [], []
            for i, s in enumerate(SCOPES):
                m = scopes[s][variant]
                xs.append(i + (j - 0.5) * width)
                vals.append(_nan(m[metric]))
                e = _err(m[metric], m[f"{metric}_ci_low"], m[f"{metric}_ci_high"])
                lo.append(e[0])
                hi.append(e[1])
            heights = [0 if math.isnan(v) else v for v in vals]
            ax.bar(xs, heights, width, color=_VARIANT_COLOURS[variant], label=variant, alpha=0.85)
            ax.errorbar(xs, vals, yerr=[lo, hi], fmt="none", ecolor="#333", capsize=2, linewidth=1)
        ax.set_xticks(range(len(SCOPES)), list(SCOPES))
        ax.set_ylim(0, 1.05)
        ax.set_title("F1" if metric == "f1" else metric.capitalize())
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
    return fig


def _fig_calibration(ev: dict[str, Any]) -> Figure | None:
    cal = ev.get("calibration")
    if not cal or not cal.get("n"):
        return None
    bins = [b for b in cal["bins"] if b["count"]]
    fig = _figure(4.2, 4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999", linewidth=1, label="perfect")
    ax.plot(
        [b["mean_predicted"] for b in bins],
        [b["observed_rate"] for b in bins],
        marker="o",
        color=_VARIANT_COLOURS["answered"],
        label="observed",
    )
    for b in bins:
        xy = (b["mean_predicted"], b["observed_rate"])
        ax.annotate(str(b["count"]), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean P(positive) in bin")
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"Reliability (Brier {cal['brier']:.3f})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _hist_axes(ax: Any, hist: dict[str, list], colour: str) -> None:
    edges, counts = hist["edges"], hist["counts"]
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=colour, edgecolor="white", linewidth=0.5)
    ax.set_ylabel("narratives")


def _fig_latency(ev: dict[str, Any]) -> Figure | None:
    lat = ev.get("latency") or {}
    if not lat.get("hist"):
        return None
    fig = _figure(4.5, 3)
    ax = fig.subplots()
    _hist_axes(ax, lat["hist"], "#72b7b2")
    ax.axvline(lat["median_s"], color="#333", linestyle="--", linewidth=1, label="median")
    ax.axvline(lat["p95_s"], color="#e45756", linestyle=":", linewidth=1, label="p95")
    ax.set_xlabel("latency per narrative (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fig_tokens(ev: dict[str, Any]) -> Figure | None:
    kinds = [k for k, v in (ev.get("tokens") or {}).items() if v.get("hist")]
    if not kinds:
        return None
    fig = _figure(3.6 * len(kinds), 3)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    # strict=False: one colour per token kind (prompt, completion, reasoning); runs without
    # some kinds leave the palette's later colours unused.
    for ax, kind, colour in zip(axes, kinds, ("#54a24b", "#eeca3b", "#b279a2"), strict=False):
        _hist_axes(ax, ev["tokens"][kind]["hist"], colour)
        ax.set_xlabel(f"{kind} tokens per narrative")
    fig.tight_layout()
    return fig


def _fig_factor(ft: pd.DataFrame, label: str) -> Figure:
    """Each experiment's strict F1 and interval, grouped (and coloured) by factor level."""
    fig = _figure(7, 0.4 * len(ft) + 1.4)
    ax = fig.subplots()
    levels = list(dict.fromkeys(ft["level"]))
    palette = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")
    ys = list(range(len(ft)))[::-1]
    for k, level in enumerate(levels):
        idx = [i for i, lv in enumerate(ft["level"]) if lv == level]
        sub = ft.iloc[idx]
        errs = [_err(v, lo, hi) for v, lo, hi in zip(sub["f1"], sub["f1_ci_low"], sub["f1_ci_high"], strict=True)]
        ax.errorbar(
            list(sub["f1"]),
            [ys[i] for i in idx],
            xerr=[[e[0] for e in errs], [e[1] for e in errs]],
            fmt="o",
            color=palette[k % len(palette)],
            capsize=3,
            label=level,
        )
        if k:  # a line between levels
            ax.axhline(ys[idx[0]] + 0.5, color="#ccc", linewidth=0.8)
    ax.set_yticks(ys, [str(e) for e in ft["experiment"]])
    ax.set_xlim(0, 1)
    ax.set_xlabel("strict F1 with 95% bootstrap interval (one point per experiment)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(title=label, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def _fig_heatmap(hm: Any, row_label: str, column_label: str) -> Figure:
    """Best strict F1 per cell of a factors.Heatmap; empty cells stay blank."""
    from matplotlib import colormaps

    values = np.array([[math.nan if v is None else v for v in r] for r in hm.best], dtype=float)
    fig = _figure(1.3 * len(hm.columns) + 1.5, 0.7 * len(hm.rows) + 1.5)
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    # pcolormesh, not imshow: imshow embeds a raster as a data: URI, the report stays vector-only.
    xs, ys = np.arange(len(hm.columns) + 1) - 0.5, np.arange(len(hm.rows) + 1) - 0.5
    ax.pcolormesh(xs, ys, np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1)
    ax.invert_yaxis()  # first row on top, as in the table
    for i, r in enumerate(hm.best):
        for j, v in enumerate(r):
            if v is None:
                continue
            n = hm.count[i][j]
            text = f"{v:.3f}" + (f"\nbest of {n}" if n > 1 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(hm.columns)), hm.columns)
    ax.set_yticks(range(len(hm.rows)), hm.rows)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    # No colorbar: matplotlib draws it as an embedded raster; each cell carries its value instead.
    ax.set_title("strict F1, best experiment in each cell (colour from 0 to 1)", fontsize=9)
    return fig


def _fig_precision_recall(lb: pd.DataFrame) -> Figure:
    """Strict precision against strict recall, one labelled point per experiment, with iso-F1 curves."""
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    for f in (0.5, 0.7, 0.9):
        rs = np.linspace(f / 2 + 1e-3, 1, 100)
        ax.plot(rs, f * rs / (2 * rs - f), color="#ddd", linewidth=0.8, linestyle="--")
        ax.annotate(f"F1={f:g}", (1, f / (2 - f)), fontsize=7, color="#999", xytext=(2, 0), textcoords="offset points")
    for _, r in lb.iterrows():
        ax.plot(float(r["recall"]), float(r["precision"]), "o", color=_VARIANT_COLOURS["strict"])
        xy = (float(r["recall"]), float(r["precision"]))
        ax.annotate(str(r["experiment"]), xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("strict recall")
    ax.set_ylabel("strict precision")
    ax.grid(alpha=0.3)
    return fig


_COST_AXES = {
    "seconds_per_narrative": "mean seconds per narrative",
    "tokens_per_narrative": "mean tokens per narrative (prompt + completion)",
}


def _fig_cost(ct: pd.DataFrame, columns: Sequence[str]) -> Figure:
    """Strict F1 (with interval) against mean seconds and/or tokens per narrative, points labelled."""
    fig = _figure(5 * len(columns), 4)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, col in zip(axes, columns, strict=True):
        sub = ct[ct[col].notna()]
        errs = [_err(v, lo, hi) for v, lo, hi in zip(sub["f1"], sub["f1_ci_low"], sub["f1_ci_high"], strict=True)]
        yerr = [[e[0] for e in errs], [e[1] for e in errs]]
        ax.errorbar(list(sub[col]), list(sub["f1"]), yerr=yerr, fmt="o", color=_VARIANT_COLOURS["strict"], capsize=3)
        for _, r in sub.iterrows():
            xy = (float(r[col]), float(r["f1"]))
            ax.annotate(str(r["experiment"]), xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(_COST_AXES[col])
        ax.set_ylabel("strict F1")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------

_LEADERBOARD_VIEW: tuple[tuple[str, str, str], ...] = (
    # (header, column, kind) kind: text | int | num | numD (D decimals) | g (shortest) | pct |
    # ci (with the column's _ci_low/_ci_high). A column the frame lacks is left out.
    ("#", "rank", "int"),
    ("experiment", "experiment", "text"),
    ("model", "model", "text"),
    ("temperature", "temperature", "g"),
    ("prompt version", "prompt_version", "text"),
    ("reasoning effort", "reasoning_effort", "text"),
    ("rows", "n_rows", "int"),
    ("answered", "answered_share", "pct"),
    ("errors", "n_errors", "int"),
    ("skipped", "n_skipped", "int"),
    ("labelled", "n_labelled", "int"),
    ("strict F1", "f1", "ci"),
    ("strict precision", "precision", "ci"),
    ("strict recall", "recall", "ci"),
    ("strict MCC", "mcc", "num"),
    ("answered F1", "answered_f1", "ci"),
    ("incident strict F1", "incident_f1", "ci"),
    ("CME strict F1", "cme_f1", "num"),
    ("LE strict F1", "le_f1", "num"),
    ("incident prevalence", "prevalence_incident", "pct"),
    ("CME/LE agree", "cme_le_agreement", "pct"),
    ("Brier", "brier", "num"),
    ("latency mean (s)", "latency_mean_s", "num2"),
    ("prompt tok/narr", "prompt_tokens_mean", "num0"),
    ("completion tok/narr", "completion_tokens_mean", "num0"),
)


def _cell(row: pd.Series, col: str, kind: str) -> str:
    v: Any = row.get(col)
    if kind == "text":
        return "&ndash;" if _missing(v) else _esc(v)
    if kind == "g":
        return "&ndash;" if _missing(v) else _esc(f"{float(v):g}")
    if kind == "int":
        return _int_or_dash(v, ",")
    if kind == "pct":
        return _pct(v)
    if kind == "ci":
        return _with_ci(v, row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high"))
    return _num(v, int(kind[3:]) if kind[3:] else 3)


def _leaderboard_section(lb: pd.DataFrame, svg: _SvgRenderer) -> str:
    parts = ['<h2 id="leaderboard">Leaderboard</h2>']
    if lb.empty:
        return parts[0] + '<p class="note">No experiments.</p>'
    view = [(h, c, k) for h, c, k in _LEADERBOARD_VIEW if c in lb.columns]
    if len(view) < 2:
        view = [(str(c), str(c), "text") for c in lb.columns]
    text_cols = [i for i, (_, _, k) in enumerate(view) if k == "text"]
    rows = [[_cell(r, c, k) for _, c, k in view] for _, r in lb.iterrows()]
    parts.append(_table([_esc(h) for h, _, _ in view], rows, text_cols))
    parts.append(
        '<p class="note">Sorted by strict F1 on all labelled narratives: parse errors, refusals, '
        "truncations and failures count as wrong, skipped placeholders as negative. "
        "&ldquo;Answered&rdquo; metrics use only narratives the model answered; the R system&rsquo;s "
        "F1 is the answered F1. Brackets are 95% "
        "intervals (Wilson for proportions, percentile bootstrap for F1). With a few dozen "
        "positives, overlapping intervals mean the ranking is not settled; see the paired tests.</p>"
    )
    fig = _fig_forest(lb)
    if fig is not None:
        parts.append(svg.render(fig, "F1 by experiment with 95% intervals"))
    return "".join(parts)


def _factor_block(lb: pd.DataFrame, factor: str, label: str, svg: _SvgRenderer) -> str:
    ft = factors.factor_table(lb, factor)
    head = f"<h3>Strict F1 by {_esc(label)}</h3>"
    n_levels = ft["level"].nunique()
    if n_levels < 2:
        return head + (
            f'<p class="note">Fewer than 2 distinct {_esc(label)}s among experiments with a strict F1 '
            f"({n_levels}): nothing to compare.</p>"
        )
    rows = [
        [
            _esc(r["level"]),
            _esc(r["experiment"]),
            _with_ci(r["f1"], r["f1_ci_low"], r["f1_ci_high"]),
            _int_or_dash(r["n_labelled"], ","),
        ]
        for _, r in ft.iterrows()
    ]
    parts = [head, _table([_esc(label), "experiment", "strict F1 [95% interval]", "labelled"], rows, (0, 1))]
    skipped = factors.left_out(lb, factor)
    if skipped:
        parts.append(f'<p class="note">{skipped} experiment(s) without a strict F1 or a {_esc(label)} left out.</p>')
    parts.append(svg.render(_fig_factor(ft, label), f"Strict F1 by {label}, one point per experiment"))
    return "".join(parts)


def _heatmap_block(lb: pd.DataFrame, svg: _SvgRenderer) -> str:
    hm = factors.heatmap_grid(lb, "prompt_version", "temperature")
    head = "<h3>Strict F1 by prompt version and temperature</h3>"
    if len(hm.rows) < 2 and len(hm.columns) < 2:
        return head + (
            '<p class="note">Fewer than 2 distinct prompt versions or temperatures among experiments with a '
            "strict F1: no grid.</p>"
        )

    def cell(i: int, j: int) -> str:
        v, n = hm.best[i][j], hm.count[i][j]
        if v is None:
            return ""
        more = f' <span class="ci">best of {n}: {_esc(hm.best_experiment[i][j])}</span>' if n > 1 else ""
        return _num(v) + more

    rows = [[_esc(r), *(cell(i, j) for j in range(len(hm.columns)))] for i, r in enumerate(hm.rows)]
    table = _table(["prompt version / temperature", *(_esc(c) for c in hm.columns)], rows, (0,))
    note = (
        '<p class="note">Each cell is the best strict F1 among the experiments with that prompt version and '
        "temperature (&ldquo;best of n&rdquo; when there are several; not an average); blank cells have none.</p>"
    )
    return head + table + note + svg.render(_fig_heatmap(hm, "prompt version", "temperature"), "Strict F1 heatmap")


def _precision_recall_block(lb: pd.DataFrame, svg: _SvgRenderer) -> str:
    head = "<h3>Strict precision and recall</h3>"
    cols = ("f1", "precision", "recall")
    pr = lb[lb[list(cols)].notna().all(axis=1)] if set(cols) <= set(lb.columns) else lb.iloc[0:0]
    if len(pr) < 2:
        return head + '<p class="note">Fewer than 2 experiments with a strict precision and recall: no plot.</p>'
    return head + svg.render(_fig_precision_recall(pr), "Strict precision against strict recall per experiment")


def _cost_factor_block(lb: pd.DataFrame, svg: _SvgRenderer) -> str:
    head = "<h3>Strict F1 against seconds and tokens per narrative</h3>"
    ct = factors.cost_table(lb)
    columns = [c for c in _COST_AXES if ct[c].notna().sum() >= 2]
    if not columns:
        return head + (
            '<p class="note">Fewer than 2 experiments with a strict F1 and a recorded latency or token count: '
            "no plot.</p>"
        )
    rows = [
        [
            _esc(r["experiment"]),
            _with_ci(r["f1"], r["f1_ci_low"], r["f1_ci_high"]),
            _num(r["seconds_per_narrative"], 2),
            _num(r["tokens_per_narrative"], 0),
        ]
        for _, r in ct.iterrows()
    ]
    header = ["experiment", "strict F1 [95% interval]", "seconds / narrative", "tokens / narrative"]
    return head + _table(header, rows, (0,)) + svg.render(_fig_cost(ct, columns), "Strict F1 against cost")


def _factors_section(lb: pd.DataFrame, svg: _SvgRenderer) -> str:
    head = (
        '<h2 id="factors">Factors</h2><p class="note">Each experiment keeps its own strict F1 and 95% '
        "interval; nothing is averaged across experiments. Experiments at one level also differ in the "
        "other factors, so read the groups together with the heatmap and the paired tests.</p>"
    )
    if lb.empty:
        return head + '<p class="note">No experiments.</p>'
    blocks = [_factor_block(lb, factor, label, svg) for factor, label in factors.FACTORS]
    blocks += [_heatmap_block(lb, svg), _precision_recall_block(lb, svg), _cost_factor_block(lb, svg)]
    return head + "".join(blocks)


def _metrics_table(ev: dict[str, Any]) -> str:
    header = ["scope", "variant", "n / labelled", "TP", "FP", "TN", "FN"]
    header += ["precision", "recall", "specificity", "accuracy", "F1", "MCC", "kappa"]
    with_ci = ("precision", "recall", "specificity", "accuracy", "f1")
    rows = []
    for s in SCOPES:
        for v in VARIANTS:
            m = ev["scopes"][s][v]
            rows.append(
                [
                    _esc(s),
                    _esc(v),
                    f"{m['n']:,} / {m['n_labelled']:,}",
                    *(_esc(m[k]) for k in ("tp", "fp", "tn", "fn")),
                    *(_with_ci(m[k], m[f"{k}_ci_low"], m[f"{k}_ci_high"]) for k in with_ci),
                    _num(m["mcc"]),
                    _num(m["kappa"]),
                ]
            )
    return _table(header, rows, text_cols=(0, 1))


def _confusion_tables(ev: dict[str, Any]) -> str:
    cells = []
    for v in VARIANTS:
        for s in SCOPES:
            m = ev["scopes"][s][v]
            body = _table(
                ["", "pred +", "pred &minus;"],
                [["label +", _esc(m["tp"]), _esc(m["fn"])], ["label &minus;", _esc(m["fp"]), _esc(m["tn"])]],
                cls="cm",
            )
            cells.append(f'<div><strong>{_esc(s)}</strong> <span class="note">({_esc(v)})</span>{body}</div>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _coverage_block(ev: dict[str, Any]) -> str:
    cov = ev["coverage"]
    rows = [
        [_esc(st), _esc(cov["by_status"][st]), *(_esc(cov["by_type"][t]["by_status"][st]) for t in NARRATIVE_TYPES)]
        for st in STATUSES
    ]
    rows.append(
        ["<strong>total</strong>", _esc(cov["n_rows"]), *(_esc(cov["by_type"][t]["n_rows"]) for t in NARRATIVE_TYPES)]
    )
    lab = ev["labels"]
    summary = (
        f"<p>{cov['n_rows']:,} narratives from {cov['n_incidents']:,} incidents; answered "
        f"{_pct(cov['answered_share'])} ({_pct(cov['answered_share_excl_skipped'])} of non-skipped); "
        f"{cov['n_errors']:,} errors. Labels: {lab['n_labelled_narratives']:,} narratives "
        f"({lab['n_positive_narratives']:,} positive), {lab['n_labelled_incidents']:,} incidents "
        f"({lab['n_positive_incidents']:,} positive).</p>"
    )
    if cov["n_ok_without_verdict"]:
        summary += (
            f'<p class="warn">{cov["n_ok_without_verdict"]:,} rows have status ok but no verdict; '
            "they count as errors.</p>"
        )
    return summary + _table(["status", "all", *NARRATIVE_TYPES], rows, text_cols=(0,))


def _prevalence_block(ev: dict[str, Any]) -> str:
    rows = [
        [_esc(s), _esc(p["n"]), _esc(p["n_detected"]), _with_ci(p["share"], p["ci_low"], p["ci_high"])]
        for s, p in ((s, ev["prevalence"][s]) for s in SCOPES)
    ]
    ag = ev["agreement"]
    agree = (
        f"<p>CME/LE agreement on {ag['n_incidents_both_answered']:,} incidents with both narratives answered: "
        f"{_with_ci(ag['agreement'], ag['agreement_ci_low'], ag['agreement_ci_high'])}, kappa {_num(ag['kappa'])} "
        f"(both positive {ag['both_detected']}, CME only {ag['cme_only']}, LE only {ag['le_only']}, "
        f"neither {ag['neither']}).</p>"
    )
    return _table(["scope", "answered", "detected", "share detected"], rows, text_cols=(0,)) + agree


def _cost_block(ev: dict[str, Any]) -> str:
    lat = ev["latency"]
    rows = [
        [
            _esc(k),
            _esc(v["n"]),
            _num(v["total"]),
            _num(v["mean"], 1),
            _num(v["median"], 1),
            _num(v["p95"], 1),
            _num(v["max"]),
        ]
        for k, v in ev["tokens"].items()
    ]
    lat_line = (
        f"<p>Latency over {lat['n']:,} calls: mean {_num(lat['mean_s'], 2)} s, median {_num(lat['median_s'], 2)} s, "
        f"p95 {_num(lat['p95_s'], 2)} s, max {_num(lat['max_s'], 2)} s, total {_num(lat['total_s'], 0)} s.</p>"
    )
    return lat_line + _table(["tokens", "n", "total", "mean", "median", "p95", "max"], rows, text_cols=(0,))


def _experiment_section(i: int, ev: dict[str, Any], svg: _SvgRenderer) -> str:
    name = ev.get("experiment")
    parts = [f'<h2 id="exp-{i}">Experiment: {_esc(name)}</h2>', "<h3>Coverage</h3>", _coverage_block(ev)]
    parts.append("<h3>Metrics</h3>")
    if ev["labels"]["n_labelled_narratives"] == 0 and ev["labels"]["n_labelled_incidents"] == 0:
        parts.append('<p class="note">No manual labels: label metrics are undefined.</p>')
    else:
        parts.append(_metrics_table(ev))
        fig = _fig_scope_bars(ev)
        if fig is not None:
            parts.append(svg.render(fig, f"Precision, recall and F1 of {name}"))
        parts.append("<h3>Confusion matrices</h3>")
        parts.append(_confusion_tables(ev))
    parts.append("<h3>Prevalence and CME/LE agreement</h3>")
    parts.append(_prevalence_block(ev))
    parts.append("<h3>Calibration</h3>")
    fig = _fig_calibration(ev)
    if fig is None:
        parts.append('<p class="note">No confidences on answered, labelled narratives.</p>')
    else:
        cal = ev["calibration"]
        parts.append(
            f"<p>{cal['n']:,} narratives; Brier score {_num(cal['brier'])}, expected calibration error "
            f"{_num(cal['ece'])}. P(positive) is the confidence for a positive verdict and one minus "
            "the confidence for a negative verdict.</p>"
        )
        parts.append(svg.render(fig, f"Reliability diagram of {name}"))
    parts.append("<h3>Latency and tokens</h3>")
    parts.append(_cost_block(ev))
    figs = [f for f in (_fig_latency(ev), _fig_tokens(ev)) if f is not None]
    if figs:
        rendered = "".join(svg.render(f, f"Latency and token distribution of {name}") for f in figs)
        parts.append(f'<div class="grid">{rendered}</div>')
    return "".join(parts)


def _pair_side(p: dict[str, Any], side: str) -> str:
    """One side's experiment name, with its model, temperature, prompt version and reasoning effort under it."""
    name = _esc(p.get(f"experiment_{side}"))
    labels = (("model", ""), ("temperature", "T="), ("prompt_version", "prompt "), ("reasoning_effort", "reasoning "))
    found: list[tuple[str, Any]] = [
        (label, p.get(f"{col}_{side}")) for col, label in labels if not _missing(p.get(f"{col}_{side}"))
    ]
    config = [label + (f"{float(v):g}" if label == "T=" else str(v)) for label, v in found]
    return name + (f'<br><span class="ci">{_esc(", ".join(config))}</span>' if config else "")


def _pairwise_section(pairwise: list[dict[str, Any]] | None) -> str:
    head = '<h2 id="pairwise">Pairwise comparisons</h2>'
    if not pairwise:
        return head + '<p class="note">No pairwise comparisons.</p>'
    header = [
        "A", "B", "common", "both answered", "verdict agreement", "kappa",
        "A+ B&minus; / A&minus; B+", "p (verdicts)",
        "answered: only A right / only B right", "p (answered)",
        "strict: only A right / only B right", "p (strict)", "strict F1 A / B",
        "incidents, strict: only A right / only B right", "p (incidents)", "incident strict F1 A / B",
    ]  # fmt: skip
    rows = [
        [
            _pair_side(p, "a"),
            _pair_side(p, "b"),
            _esc(p.get("n_common")),
            _esc(p.get("n_both_answered")),
            _pct(p.get("verdict_agreement")),
            _num(p.get("verdict_kappa")),
            f"{_esc(p.get('verdict_a_pos_b_neg'))} / {_esc(p.get('verdict_a_neg_b_pos'))}",
            _num(p.get("verdict_mcnemar_p"), 4),
            f"{_esc(p.get('answered_a_only_correct'))} / {_esc(p.get('answered_b_only_correct'))}",
            _num(p.get("answered_mcnemar_p"), 4),
            f"{_esc(p.get('strict_a_only_correct'))} / {_esc(p.get('strict_b_only_correct'))}",
            _num(p.get("strict_mcnemar_p"), 4),
            f"{_num(p.get('strict_f1_a'))} / {_num(p.get('strict_f1_b'))}",
            f"{_esc(p.get('incident_strict_a_only_correct'))} / {_esc(p.get('incident_strict_b_only_correct'))}",
            _num(p.get("incident_strict_mcnemar_p"), 4),
            f"{_num(p.get('incident_strict_f1_a'))} / {_num(p.get('incident_strict_f1_b'))}",
        ]
        for p in pairwise
    ]
    note = (
        '<p class="note">Pairs are the same narrative (incident, type) in both experiments. '
        "p-values are two-sided exact McNemar tests on the discordant pairs; a small p for the "
        "verdicts means one experiment flags systematically more than the other, a small p for "
        "correctness means one is right more often. The incident columns judge each incident "
        "(positive if either narrative is) on the narratives both experiments have.</p>"
    )
    return head + _table(header, rows, text_cols=(0, 1)) + note


def _indicators(v: Any) -> str:
    if _missing(v):
        return ""
    try:
        parsed = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        return _esc(v)
    if isinstance(parsed, list):
        return "<br>".join(_esc(x) for x in parsed)
    return _esc(v)


#: Rows of each experiment's disagreement table shown in the report (false negatives first,
#: most confident first); a full labelled run can have thousands, all kept in DuckDB.
MAX_DISAGREEMENT_ROWS = 200


def _disagreement_section(disagreements: dict[str, pd.DataFrame]) -> str:
    head = (
        '<h2 id="disagreements">Disagreements</h2>'
        '<p class="warn">The tables below quote restricted-use narrative text. Handle this file like '
        "the input data.</p>"
    )
    if not disagreements:
        return head + '<p class="note">No disagreement tables.</p>'
    parts = [head]
    max_rows = MAX_DISAGREEMENT_ROWS
    header = ["kind", "incident", "type", "label", "detected", "confidence", "indicators", "rationale", "narrative"]
    for name, df in disagreements.items():
        kinds = df["kind"].value_counts() if "kind" in df.columns else pd.Series(dtype=int)
        n_fn, n_fp = int(kinds.get("FN", 0)), int(kinds.get("FP", 0))
        rows = [
            [
                _esc(r.get("kind")),
                _esc(r.get("incident_id")),
                _esc(r.get("narrative_type")),
                _int_or_dash(r.get("manual_flag_ind")),
                "&ndash;" if _missing(r.get("detected")) else _esc(bool(r.get("detected"))),
                _num(r.get("confidence"), 2),
                _indicators(r.get("indicators")),
                _esc(r.get("rationale")),
                f'<div class="narr">{_esc(r.get("narrative_text"))}</div>',
            ]
            for _, r in df.head(max_rows).iterrows()
        ]
        table = _table(header, rows, text_cols=(0, 1, 2, 6, 7, 8)) if rows else '<p class="note">None.</p>'
        if len(df) > max_rows:
            table += (
                f'<p class="note">Showing the first {max_rows:,} of {len(df):,} (false negatives first, most '
                "confident first). Every row is in the DuckDB table <code>disagreements</code>.</p>"
            )
        parts.append(
            f"<details><summary>{_esc(name)}: {n_fn} false negatives, {n_fp} false positives</summary>{table}</details>"
        )
    return "".join(parts)


def render_report_html(
    evals: list[dict[str, Any]],
    leaderboard: pd.DataFrame,
    disagreements: dict[str, pd.DataFrame],
    title: str = "narr_assets report",
    pairwise: list[dict[str, Any]] | None = None,
) -> str:
    """Build the report as an HTML string (see :func:`render_report`).

    Args:
        evals: Dicts returned by ``evaluation.evaluate``, in display order.
        leaderboard: ``evaluation.leaderboard(evals)``.
        disagreements: Experiment name -> ``evaluation.disagreements`` table.
        title: Page title.
        pairwise: Dicts returned by ``evaluation.paired_comparison``.

    Returns:
        The complete HTML document.
    """
    svg = _SvgRenderer()
    toc = "".join(f'<li><a href="#exp-{i}">{_esc(ev.get("experiment"))}</a></li>' for i, ev in enumerate(evals))
    body = [
        f"<h1>{_esc(title)}</h1>",
        '<nav><ul><li><a href="#leaderboard">Leaderboard</a></li><li><a href="#factors">Factors</a></li>',
        toc,
        (
            '<li><a href="#pairwise">Pairwise comparisons</a></li>'
            '<li><a href="#disagreements">Disagreements</a></li></ul></nav>'
        ),
        _leaderboard_section(leaderboard, svg),
        _factors_section(leaderboard, svg),
        *(_experiment_section(i, ev, svg) for i, ev in enumerate(evals)),
        _pairwise_section(pairwise),
        _disagreement_section(disagreements),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def render_report(
    evals: list[dict[str, Any]],
    leaderboard: pd.DataFrame,
    disagreements: dict[str, pd.DataFrame],
    out_path: str | Path,
    title: str = "narr_assets report",
    pairwise: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the self-contained HTML report.

    Sections: leaderboard (table with intervals and coverage, F1 forest plot); per
    experiment: coverage, metrics table, precision/recall/F1 bars with intervals for
    overall/cme/le/incident x answered/strict, confusion matrices, prevalence and CME/LE
    agreement, reliability diagram, latency and token histograms; pairwise comparisons;
    disagreements (one collapsible ``<details>`` per experiment, at most
    ``MAX_DISAGREEMENT_ROWS`` rows each). Every value taken from the
    data is HTML-escaped. The file is written owner-only (``private.py``) to a temporary
    sibling and renamed, so a reader never sees half a report.

    Args:
        evals: Dicts returned by ``evaluation.evaluate``, in display order.
        leaderboard: ``evaluation.leaderboard(evals)``.
        disagreements: Experiment name -> ``evaluation.disagreements`` table.
        out_path: Destination ``.html`` file; parent directories are created.
        title: Page title.
        pairwise: Dicts returned by ``evaluation.paired_comparison``.

    Returns:
        The path written.
    """
    text = render_report_html(evals, leaderboard, disagreements, title=title, pairwise=pairwise)
    return write_private_bytes(Path(out_path), text.encode("utf-8"))


def prune_report_copies(folder: str | Path, keep: int = REPORT_COPIES, current: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` per-run copies (`report-*.html`) in `folder`.

    `report.html` (the latest) is not a copy and is never deleted.

    Args:
        folder: The reports folder.
        keep: How many copies to keep, newest by modification time.
        current: The copy just written, kept whatever the clock says (coarse timestamps tie).

    Returns:
        The copies deleted.
    """

    def age(path: Path) -> tuple[bool, int, str]:
        try:
            return (path == current, path.stat().st_mtime_ns, path.name)
        except FileNotFoundError:  # pruned by a concurrent run
            return (False, 0, path.name)

    copies = sorted(Path(folder).glob("report-*.html"), key=age, reverse=True)
    for old in copies[keep:]:
        old.unlink(missing_ok=True)
    return copies[keep:]
