"""Factor analyses of the leaderboard: strict F1 by model, prompt version and temperature.

Pure functions over the frame `results.leaderboard_table` returns (one row per experiment).
They never average F1 across experiments: each experiment keeps its own point and interval,
grouped under its factor level, because experiments at one level differ in everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

#: (leaderboard column, label) of each factor the report breaks strict F1 down by.
FACTORS: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("prompt_version", "prompt version"),
    ("temperature", "temperature"),
)
_NUMERIC_FACTORS = frozenset({"temperature"})
FACTOR_COLUMNS = ("level", "experiment", "f1", "f1_ci_low", "f1_ci_high", "n_labelled")


def _defined(v: Any) -> bool:
    return v is not None and v is not pd.NA and not (isinstance(v, float) and v != v)


def level_label(factor: str, value: Any) -> str:
    """How a factor level is shown: temperatures as the shortest number (`0.2`), others as text.

    Args:
        factor: Leaderboard column (`model`, `prompt_version`, `temperature`).
        value: The experiment's value of that column (not null).

    Returns:
        The label.
    """
    return f"{float(value):g}" if factor in _NUMERIC_FACTORS else str(value)


def _level_order(factor: str, values: list[Any]) -> list[Any]:
    """Distinct values, numerically for temperatures, alphabetically otherwise."""
    distinct = list(dict.fromkeys(values))
    if factor in _NUMERIC_FACTORS:
        return sorted(distinct, key=float)
    return sorted(distinct, key=str)


def _scored(lb: pd.DataFrame, factor: str) -> pd.DataFrame:
    """Experiments with a defined strict F1 and a value for `factor`."""
    if factor not in lb.columns or "f1" not in lb.columns:
        return lb.iloc[0:0]
    keep = [_defined(f) and _defined(v) for f, v in zip(lb["f1"], lb[factor], strict=True)]
    return lb[keep]


def factor_table(lb: pd.DataFrame, factor: str) -> pd.DataFrame:
    """Each scored experiment under its level of `factor`, with its own strict F1 and interval.

    Experiments without labels (undefined F1) or without a value for the factor (e.g. no
    temperature for the `rules` backend) are left out; :func:`left_out` counts them.

    Args:
        lb: Leaderboard frame (`results.leaderboard_table`).
        factor: A column of `FACTORS`.

    Returns:
        Columns `FACTOR_COLUMNS`; levels in order (numeric for temperature), within a level
        best strict F1 first, then experiment name.
    """
    scored = _scored(lb, factor)
    if scored.empty:  # also a leaderboard without config columns (`evaluation.leaderboard`)
        return pd.DataFrame(columns=list(FACTOR_COLUMNS))
    order = {v: i for i, v in enumerate(_level_order(factor, list(scored[factor])))}
    records = [
        {
            "level": level_label(factor, r[factor]),
            "experiment": str(r["experiment"]),
            "f1": float(r["f1"]),
            "f1_ci_low": float(r["f1_ci_low"]) if _defined(r.get("f1_ci_low")) else None,
            "f1_ci_high": float(r["f1_ci_high"]) if _defined(r.get("f1_ci_high")) else None,
            "n_labelled": int(r["n_labelled"]) if _defined(r.get("n_labelled")) else None,
        }
        for _, r in sorted(
            scored.iterrows(),
            key=lambda item: (order[item[1][factor]], -float(item[1]["f1"]), str(item[1]["experiment"])),
        )
    ]
    return pd.DataFrame(records, columns=list(FACTOR_COLUMNS))


def left_out(lb: pd.DataFrame, factor: str) -> int:
    """How many leaderboard experiments `factor_table` leaves out (no strict F1 or no value).

    Args:
        lb: Leaderboard frame.
        factor: A column of `FACTORS`.

    Returns:
        The count.
    """
    return len(lb) - len(_scored(lb, factor))


@dataclass(frozen=True)
class Heatmap:
    """Best strict F1 per (row level, column level) cell; `None`/0/"" where no experiment falls."""

    rows: list[str]
    columns: list[str]
    best: list[list[float | None]]
    count: list[list[int]]
    best_experiment: list[list[str]]


def heatmap_grid(lb: pd.DataFrame, row: str = "prompt_version", column: str = "temperature") -> Heatmap:
    """Grid of the best strict F1 per combination of two factors, with how many experiments each cell has.

    Args:
        lb: Leaderboard frame.
        row: Factor along the rows.
        column: Factor along the columns.

    Returns:
        The grid over experiments with a defined strict F1 and both factors set; levels in
        the order of :func:`factor_table`; ties for best go to the first experiment by name.
    """
    scored = _scored(_scored(lb, row), column)
    if scored.empty:
        return Heatmap([], [], [], [], [])
    row_vals = _level_order(row, list(scored[row]))
    col_vals = _level_order(column, list(scored[column]))
    rows = [level_label(row, v) for v in row_vals]
    cols = [level_label(column, v) for v in col_vals]
    best: list[list[float | None]] = [[None] * len(cols) for _ in rows]
    count = [[0] * len(cols) for _ in rows]
    names = [[""] * len(cols) for _ in rows]
    ordered = sorted(scored.iterrows(), key=lambda item: str(item[1]["experiment"]))
    for _, r in ordered:
        i, j = rows.index(level_label(row, r[row])), cols.index(level_label(column, r[column]))
        count[i][j] += 1
        current = best[i][j]
        if current is None or float(r["f1"]) > current:
            best[i][j], names[i][j] = float(r["f1"]), str(r["experiment"])
    return Heatmap(rows, cols, best, count, names)


COST_COLUMNS = ("experiment", "f1", "f1_ci_low", "f1_ci_high", "seconds_per_narrative", "tokens_per_narrative")


def cost_table(lb: pd.DataFrame) -> pd.DataFrame:
    """Strict F1 beside the mean seconds and tokens per narrative of each experiment with a strict F1.

    Seconds are the leaderboard's `latency_mean_s` (rows with a recorded latency, errors
    included); tokens are `prompt_tokens_mean + completion_tokens_mean` (reasoning tokens are
    counted inside completion tokens by OpenAI-compatible servers), null unless both are known.

    Args:
        lb: Leaderboard frame.

    Returns:
        Columns `COST_COLUMNS`, in leaderboard order.
    """

    def get(r: pd.Series, col: str) -> float | None:
        v: Any = r.get(col)
        return float(v) if _defined(v) else None

    records = []
    for _, r in lb.iterrows():
        if get(r, "f1") is None:
            continue
        prompt, completion = get(r, "prompt_tokens_mean"), get(r, "completion_tokens_mean")
        records.append(
            {
                "experiment": str(r["experiment"]),
                "f1": get(r, "f1"),
                "f1_ci_low": get(r, "f1_ci_low"),
                "f1_ci_high": get(r, "f1_ci_high"),
                "seconds_per_narrative": get(r, "latency_mean_s"),
                "tokens_per_narrative": None if prompt is None or completion is None else prompt + completion,
            }
        )
    return pd.DataFrame(records, columns=list(COST_COLUMNS))
