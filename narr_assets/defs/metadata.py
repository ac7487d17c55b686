"""Metadata people read in the UI: markdown tables, the run summary and table facts, built in one place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd

from narr_assets.classify import RunSummary
from narr_assets.evaluation import SCOPES
from narr_assets.store import Store

# The keys Dagster's UI reads a table asset's row count and columns from (`TableMetadataSet`,
# which dagster 1.13 does not export at the top level).
ROW_COUNT = "dagster/row_count"
COLUMN_SCHEMA = "dagster/column_schema"


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def md_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table (the UI renders it); floats to 3 decimals, integers with separators."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def counts_md(counts: Mapping[str, int], key: str = "count", value: str = "value") -> dg.MetadataValue:
    """Name -> count as a two-column markdown table."""
    return dg.MetadataValue.md(md_table([key, value], counts.items()))


def frame_md(frame: pd.DataFrame, max_rows: int = 30) -> dg.MetadataValue:
    """The first rows of a frame as a markdown table."""
    if frame.empty:
        return dg.MetadataValue.md("_empty_")
    shown = frame.head(max_rows)
    return dg.MetadataValue.md(md_table([str(c) for c in shown.columns], shown.itertuples(index=False)))


def metrics_md(ev: dict[str, Any], variant: str = "strict") -> dg.MetadataValue:
    """Each scope of one evaluation (`evaluation.evaluate`): n, confusion matrix, P/R/F1 [95% CI]."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = []
    for scope in SCOPES:
        m = ev["scopes"][scope][variant]
        ci = "" if m["f1_ci_low"] is None else f" [{fmt(m['f1_ci_low'])}, {fmt(m['f1_ci_high'])}]"
        rows.append(
            [
                scope,
                m["n"],
                m["tp"],
                m["fp"],
                m["tn"],
                m["fn"],
                fmt(m["precision"]),
                fmt(m["recall"]),
                fmt(m["f1"]) + ci,
            ]
        )
    columns = ["scope", "n", "TP", "FP", "TN", "FN", "precision", "recall", "F1 [95% CI]"]
    return dg.MetadataValue.md(md_table(columns, rows))


def run_summary_metadata(summary: RunSummary, model: str) -> dict[str, Any]:
    """Metadata of one classification run.

    A run covers a range of partitions and Dagster attaches the same metadata to each, so
    every count says it is for the run, not for the one batch.
    """
    return {
        "model": model,
        "config_hash": summary.config_hash,
        "run_batches": len(summary.batches),
        "run_batches_up_to_date": len(summary.up_to_date_batches),
        "run_narratives": summary.narratives,
        "run_calls_ok": summary.calls_ok,
        "run_attempts": summary.attempts,
        "run_reused_from_journal": summary.reused,
        "run_skipped_placeholders": summary.skipped,
        "run_failed_batches": len(summary.failed_batches),
        "run_prompt_tokens": summary.prompt_tokens,
        "run_completion_tokens": summary.completion_tokens,
        "run_calls_per_second": round(summary.calls_per_second, 2),
        "run_statuses": counts_md(dict(sorted(summary.status_counts.items())), "status", "rows"),
    }


def row_count(store: Store, table: str, experiment: str | None = None) -> dict[str, int]:
    """The `dagster/row_count` entry of a table, or of one experiment's rows in it.

    Args:
        store: The database.
        table: A table or view of the data contract; a name from the code, never user input.
        experiment: Count only this experiment's rows (tables with an `experiment` column).

    Returns:
        `{"dagster/row_count": n}`, to merge into an asset's metadata.
    """
    where, params = ("WHERE experiment = ?", [experiment]) if experiment else ("", [])
    (count,) = store.query_row(f'SELECT count(*) FROM "{table}" {where}', params)
    return {ROW_COUNT: int(count)}


def table_metadata(store: Store, table: str) -> dict[str, Any]:
    """The `dagster/row_count` and `dagster/column_schema` entries of a table.

    Args:
        store: The database.
        table: A table of the data contract; its columns come from DuckDB (`DESCRIBE`), so
            the schema the UI shows is the one the file has.

    Returns:
        Both entries, to merge into an asset's metadata.
    """
    described = store.query_rows(f'DESCRIBE "{table}"')  # name, type, null, key, default, extra
    columns = [
        dg.TableColumn(name=str(name), type=str(kind), constraints=dg.TableColumnConstraints(nullable=null == "YES"))
        for name, kind, null, *_ in described
    ]
    key = [str(row[0]) for row in described if row[3] == "PRI"]
    constraints = dg.TableConstraints(other=[f"primary key ({', '.join(key)})"] if key else [])
    schema = dg.TableSchema(columns=columns, constraints=constraints)
    return {**row_count(store, table), COLUMN_SCHEMA: dg.MetadataValue.table_schema(schema)}
