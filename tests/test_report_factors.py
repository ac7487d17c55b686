"""Tests for the report's factor analyses (narr_assets.factors and the "Factors" section)."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from narr_assets.factors import cost_table, factor_table, heatmap_grid, left_out
from narr_assets.report import render_report_html

_COLUMNS = (
    "experiment", "model", "temperature", "prompt_version", "n_labelled", "f1", "f1_ci_low", "f1_ci_high",
    "precision", "recall", "latency_mean_s", "prompt_tokens_mean", "completion_tokens_mean",
)  # fmt: skip
_ROWS = (
    ("a", "m1", 0.2, "v1", 100, 0.80, 0.70, 0.88, 0.85, 0.75, 2.0, 1000.0, 200.0),
    ("d", "m1", 0.2, "v1", 100, 0.78, 0.69, 0.86, 0.80, 0.76, 2.5, 1000.0, 250.0),
    ("c", "m1", 1.5, "v2", 100, 0.75, 0.65, 0.84, 0.70, 0.81, 3.0, 1100.0, None),
    ("b", "m2 <x>", 0.0, "v1", 100, 0.70, 0.60, 0.79, 0.72, 0.68, 1.0, 900.0, 100.0),
    ("rules", None, None, None, 100, 0.50, 0.40, 0.60, 0.55, 0.46, None, None, None),
    ("unlabelled", "m1", 0.2, "v1", 0, None, None, None, None, None, 1.0, 800.0, 100.0),
)


def _board(names: tuple[str, ...] | None = None) -> pd.DataFrame:
    rows = [r for r in _ROWS if names is None or r[0] in names]
    lb = pd.DataFrame(rows, columns=list(_COLUMNS))
    for col in ("experiment", "model", "prompt_version"):
        lb[col] = lb[col].astype("string")
    for col in _COLUMNS[4:]:
        lb[col] = lb[col].astype("Float64")
    return lb


def _section(html: str) -> str:
    return html[html.index('id="factors"') : html.index('id="pairwise"')]


@pytest.fixture(scope="module")
def section() -> str:
    return _section(render_report_html([], _board(), {}))


def test_factor_table_lists_each_experiment_under_its_level_best_first():
    ft = factor_table(_board(), "model")
    assert list(ft["level"]) == ["m1", "m1", "m1", "m2 <x>"]
    assert list(ft["experiment"]) == ["a", "d", "c", "b"]
    assert ft.iloc[0].to_dict() == {
        "level": "m1", "experiment": "a", "f1": 0.80, "f1_ci_low": 0.70, "f1_ci_high": 0.88, "n_labelled": 100,
    }  # fmt: skip
    temps = factor_table(_board(), "temperature")
    assert list(temps["level"]) == ["0", "0.2", "0.2", "1.5"]
    assert list(temps["experiment"]) == ["b", "a", "d", "c"]
    # `rules` has no model/temperature/prompt, `unlabelled` no strict F1: both left out, never averaged in.
    assert left_out(_board(), "model") == 2
    assert left_out(_board(), "prompt_version") == 2


def test_heatmap_grid_keeps_the_best_of_each_cell_and_counts_them():
    hm = heatmap_grid(_board())
    assert hm.rows == ["v1", "v2"]
    assert hm.columns == ["0", "0.2", "1.5"]
    assert hm.best == [[0.70, 0.80, None], [None, None, 0.75]]
    assert hm.count == [[1, 2, 0], [0, 0, 1]]
    assert hm.best_experiment == [["b", "a", ""], ["", "", "c"]]


def test_a_leaderboard_without_config_columns_has_no_levels():
    bare = _board().drop(columns=["model", "temperature", "prompt_version"])
    assert factor_table(bare, "model").empty
    assert left_out(bare, "model") == len(bare)
    hm = heatmap_grid(bare)
    assert (hm.rows, hm.columns, hm.best) == ([], [], [])


def test_cost_table_adds_prompt_and_completion_tokens_per_narrative():
    ct = cost_table(_board())
    assert list(ct["experiment"]) == ["a", "d", "c", "b", "rules"]  # `unlabelled` has no strict F1
    assert ct["seconds_per_narrative"].fillna(-1).tolist() == [2.0, 2.5, 3.0, 1.0, -1]
    # c lacks completion tokens: no total rather than an understated one.
    assert ct["tokens_per_narrative"].fillna(-1).tolist() == [1200.0, 1250.0, -1, 1000.0, -1]


def test_factors_section_lists_values_and_draws_one_svg_per_plot(section):
    # model, prompt version, temperature, heatmap, precision/recall, F1 vs cost
    assert section.count("<svg") == 6
    for label in ("Strict F1 by model", "Strict F1 by prompt version", "Strict F1 by temperature"):
        assert f"<h3>{label}</h3>" in section
    assert '<td class="t">m1</td><td class="t">a</td><td>0.800 <span class="ci">[0.70, 0.88]</span></td>' in section
    assert '<td class="t">m2 &lt;x&gt;</td><td class="t">b</td>' in section and "<x>" not in section
    assert "2 experiment(s) without a strict F1 or a model left out." in section
    assert (
        '<tr><td class="t">v1</td><td>0.700</td><td>0.800 <span class="ci">best of 2: a</span></td><td></td></tr>'
        in (section)
    )
    assert (
        '<tr><td class="t">c</td><td>0.750 <span class="ci">[0.65, 0.84]</span></td><td>3.00</td><td>&ndash;</td>'
        in (section)
    )
    assert "<td>1,250</td>" in section
    assert "strict precision" in section and "strict recall" in section  # scatter axis labels
    assert "Fewer than 2" not in section


def test_factors_section_says_when_there_are_fewer_than_two_levels():
    section = _section(render_report_html([], _board(("a", "d")), {}))
    for label in ("models", "prompt versions", "temperatures"):
        assert f"Fewer than 2 distinct {label} among experiments with a strict F1 (1): nothing to compare." in section
    assert "Fewer than 2 distinct prompt versions or temperatures" in section
    assert section.count("<svg") == 2  # precision/recall and cost still have two experiments
    solo = _section(render_report_html([], _board(("a",)), {}))
    assert "<svg" not in solo
    assert "Fewer than 2 experiments with a strict precision and recall: no plot." in solo
    assert "Fewer than 2 experiments with a strict F1 and a recorded latency or token count: no plot." in solo


def test_factors_section_is_self_contained_with_unique_ids(section):
    lowered = section.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:|data:)""", lowered)
    assert "<script" not in lowered and "<img" not in lowered
    ids = re.findall(r'\bid="([^"]+)"', section)
    assert len(ids) == len(set(ids))
