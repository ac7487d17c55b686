"""Exports of an experiment's results joined with the narratives (CSV, Parquet, JSON lines)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from narr_assets.private import private_output
from narr_assets.store import Store

FORMATS = ("csv", "parquet", "jsonl")
# Cells a spreadsheet would run as a formula (OWASP CSV injection list).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def export_frame(store: Store, experiment: str) -> pd.DataFrame:
    """Results of one experiment with the narrative, labels and incident attributes."""
    return store.query_df(
        """
        SELECT n.incident_id, n.narrative_type, n.narrative_text, n.manual_flag_ind, n.manual_flag,
               n.is_placeholder, n.attributes, c.status, c.detected, c.confidence, c.indicators, c.rationale,
               c.error, c.model, c.config_hash, c.prompt_tokens, c.completion_tokens, c.reasoning_tokens,
               c.latency_s, c.attempts, c.classified_at, c.is_stale, n.batch_id
        FROM narratives n
        JOIN classifications c USING (incident_id, narrative_type)
        WHERE c.experiment = ?
        ORDER BY n.incident_id, n.narrative_type
        """,
        [experiment],
    )


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells that a spreadsheet would evaluate with a single quote."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_PREFIXES) else v)
    return out


def write_export(frame: pd.DataFrame, path: Path, fmt: str, *, tighten_folder: bool = False) -> Path:
    """Write `frame` as `fmt` to `path`, owner-only (see `private.py`), atomically.

    CSV is UTF-8 with a BOM so Excel keeps accents.

    Args:
        frame: The rows to write.
        path: The destination; missing folders are created owner-only.
        fmt: One of `FORMATS`.
        tighten_folder: Also make an existing destination folder owner-only (the data
            folder's `exports/`); not for a path the user chose (`narr export -o`), whose
            folder is theirs to decide.

    Returns:
        The path written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with private_output(path, tighten_parent=tighten_folder) as tmp:
        if fmt == "csv":
            neutralise_formulas(frame).to_csv(tmp, index=False, encoding="utf-8-sig")
        elif fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, date_format="iso", force_ascii=False)
    return path
