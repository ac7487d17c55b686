"""Tests for the self-contained HTML report (narr_assets.report)."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from narr_assets.evaluation import disagreements, evaluate, leaderboard, paired_comparison
from narr_assets.report import render_report, render_report_html

INJECTED = "<script>alert('x')</script>"
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "source", "wbr"}


def _rows(experiment: str, seed: int, labelled: bool = True, with_costs: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(40):
        for t in ("cme", "le"):
            label = int(rng.random() < 0.25)
            status = "ok" if rng.random() > 0.1 else "parse_error"
            det = bool(label if rng.random() < 0.8 else 1 - label) if status == "ok" else None
            recs.append(
                {
                    "experiment": experiment,
                    "incident_id": f"{1000 + i}",
                    "narrative_type": t,
                    "status": status,
                    "detected": det,
                    "confidence": float(rng.random()) if status == "ok" and with_costs else None,
                    "manual_flag_ind": label if labelled else None,
                    "manual_flag": None,
                    "latency_s": float(rng.gamma(3, 1.5)) if with_costs else None,
                    "prompt_tokens": int(rng.integers(900, 1100)) if with_costs else None,
                    "completion_tokens": int(rng.integers(100, 300)) if with_costs else None,
                    "reasoning_tokens": None,
                    "indicators": '["restraining order", "<b>bold</b>"]',
                    "rationale": INJECTED,
                    "narrative_text": 'V & partner "argued" <img src=x onerror=alert(1)>',
                }
            )
    df = pd.DataFrame(recs)
    df["detected"] = df["detected"].astype("boolean")
    for col in ("manual_flag_ind", "manual_flag", "prompt_tokens", "completion_tokens", "reasoning_tokens"):
        df[col] = df[col].astype("Int64")
    return df


@pytest.fixture(scope="module")
def inputs():
    a = _rows("gpt-oss <indicators>", 1)
    b = _rows("qwen-strict", 2)
    c = _rows("unlabelled-run", 3, labelled=False, with_costs=False)
    evals = [evaluate(df, n_boot=200) for df in (a, b, c)]
    return {
        "evals": evals,
        "leaderboard": leaderboard(evals),
        "disagreements": {df["experiment"].iloc[0]: disagreements(df) for df in (a, b)},
        "pairwise": [paired_comparison(a, b, "gpt-oss <indicators>", "qwen-strict")],
    }


@pytest.fixture(scope="module")
def report_html(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "nested" / "report.html"
    path = render_report(out_path=out, title="IPV <test> report", **inputs)
    assert path == out and path.exists()
    return path.read_text(encoding="utf-8")


class _TagBalance(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_report_is_well_formed_html(report_html):
    assert report_html.startswith("<!DOCTYPE html>")
    assert report_html.rstrip().endswith("</html>")
    parser = _TagBalance()
    parser.feed(report_html)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    assert parser.tags.count("details") == 2
    assert parser.tags.count("h1") == 1


def test_report_has_expected_plots(report_html):
    # forest plot + (metric bars, calibration, latency, tokens) for each labelled experiment
    # with costs; the unlabelled experiment without costs has no plot; in "Factors" (no config
    # columns in this leaderboard) only precision/recall and F1 against cost.
    assert report_html.count("<svg") == 1 + 4 + 4 + 2
    assert report_html.count("</svg>") == 11
    ids = re.findall(r'\bid="([^"]+)"', report_html)
    assert len(ids) == len(set(ids)), "element ids must be unique across figures"


def test_report_is_self_contained(report_html):
    lowered = report_html.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:|data:)""", lowered)
    assert "<script" not in lowered
    assert "<link" not in lowered
    assert "@import" not in lowered
    assert "<img" not in lowered


def test_report_escapes_injected_content(report_html):
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in report_html
    assert "&lt;img src=x onerror=alert(1)&gt;" in report_html
    assert "V &amp; partner &quot;argued&quot;" in report_html
    assert "&lt;b&gt;bold&lt;/b&gt;" in report_html
    assert "<title>IPV &lt;test&gt; report</title>" in report_html
    assert "gpt-oss &lt;indicators&gt;" in report_html
    assert "<indicators>" not in report_html  # also inside SVG tick labels


def test_report_sections_and_values(report_html, inputs):
    for anchor in ("leaderboard", "factors", "pairwise", "disagreements", "exp-0", "exp-1", "exp-2"):
        assert f'id="{anchor}"' in report_html
    assert "No manual labels: label metrics are undefined." in report_html
    top = inputs["leaderboard"].iloc[0]
    assert f"{top['f1']:.3f}" in report_html
    n_fn = int((inputs["disagreements"]["qwen-strict"]["kind"] == "FN").sum())
    assert f"qwen-strict: {n_fn} false negatives" in report_html
    pair = inputs["pairwise"][0]
    section = report_html[report_html.index('id="pairwise"') : report_html.index('id="disagreements"')]
    assert "incidents, strict: only A right / only B right" in section
    assert f"<td>{pair['incident_strict_a_only_correct']} / {pair['incident_strict_b_only_correct']}</td>" in section
    assert f"{pair['incident_strict_f1_a']:.3f} / {pair['incident_strict_f1_b']:.3f}" in section


def test_report_is_deterministic(inputs, report_html):
    assert render_report_html(title="IPV <test> report", **inputs) == report_html


def test_report_without_optional_sections(tmp_path):
    ev = evaluate(_rows("solo", 4, labelled=False, with_costs=False), n_boot=0)
    html = render_report([ev], leaderboard([ev]), {}, tmp_path / "r.html").read_text()
    assert "<svg" not in html
    assert "No pairwise comparisons." in html
    assert "No disagreement tables." in html


def test_disagreements_are_capped_with_a_note(inputs, monkeypatch):
    from narr_assets import report

    name = "qwen-strict"
    table = inputs["disagreements"][name]
    assert len(table) > 3
    monkeypatch.setattr(report, "MAX_DISAGREEMENT_ROWS", 3)
    html = report.render_report_html(inputs["evals"], inputs["leaderboard"], {name: table})
    section = html[html.index('id="disagreements"') :]
    assert section.count('<div class="narr">') == 3
    assert f"Showing the first 3 of {len(table):,}" in section
    n_fn = int((table["kind"] == "FN").sum())
    assert f"{n_fn} false negatives" in section  # the summary still counts every row


def test_import_does_not_load_matplotlib():
    """Loading the Dagster definitions imports this module; matplotlib must wait for a render."""
    code = "import sys, narr_assets.report; assert 'matplotlib' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


def test_rejected_rows_have_their_own_line_in_the_coverage_table(tmp_path):
    df = _rows("refused", 5)
    refused = df.index[:3]  # incident 1000 cme/le and 1001 cme: two cme, one le
    df.loc[refused, "status"] = "rejected"
    df.loc[refused, "detected"] = None
    ev = evaluate(df, n_boot=0)
    html = render_report([ev], leaderboard([ev]), {}, tmp_path / "r.html").read_text()
    assert '<tr><td class="t">rejected</td><td>3</td><td>2</td><td>1</td></tr>' in html
    n_errors = int((df["status"] != "ok").sum())
    assert ev["coverage"]["n_errors"] == n_errors and f"{n_errors:,} errors" in html
