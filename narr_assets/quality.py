"""Data-quality rules behind the asset checks, as plain functions over DuckDB tables.

Each rule returns `(passed, metadata)`; the Dagster checks in `checks.py` only wrap them.
"""

from __future__ import annotations

from typing import Any

from narr_assets.store import Store
from narr_assets.vocabulary import ANSWER_ERRORS, SKIPPED, sql_list

Result = tuple[bool, dict[str, Any]]


def narrative_keys_unique(store: Store) -> Result:
    (dup,) = store.query_row(
        "SELECT count(*) FROM (SELECT incident_id, narrative_type FROM narratives GROUP BY 1, 2 HAVING count(*) > 1)"
    )
    return int(dup) == 0, {"duplicated_keys": int(dup)}


def narrative_text_not_empty(store: Store) -> Result:
    (empty,) = store.query_row(
        "SELECT count(*) FROM narratives WHERE narrative_text IS NULL OR trim(narrative_text) = ''"
    )
    return int(empty) == 0, {"empty_texts": int(empty)}


def labels_valid(store: Store) -> Result:
    (bad,) = store.query_row(
        "SELECT count(*) FROM narratives"
        " WHERE coalesce(manual_flag_ind, 0) NOT IN (0, 1) OR coalesce(manual_flag, 0) NOT IN (0, 1)"
    )
    return int(bad) == 0, {"invalid_labels": int(bad)}


def checksum_current(store: Store, current_checksum: str) -> Result:
    """The ingested data comes from the file as it is now (else results would mix versions)."""
    stored = store.current_checksum()
    return stored == current_checksum, {"ingested_checksum": stored or "none", "file_checksum": current_checksum}


def one_row_per_narrative(store: Store, experiment: str) -> Result:
    """Every narrative of every classified batch has exactly one row, and no row is orphaned.

    Rows of narratives that an ingest removed from the source are kept on purpose (listed in
    `removed_narratives`, shown by the `removed_classifications` view): they are counted
    apart, not as orphans.
    """
    missing, orphaned, stale, removed = store.query_row(
        """
        WITH done AS (SELECT DISTINCT batch_id FROM classification_rows WHERE experiment = ?)
        SELECT
          (SELECT count(*) FROM narratives n JOIN done USING (batch_id)
             WHERE NOT EXISTS (SELECT 1 FROM classification_rows c WHERE c.experiment = ?
                               AND c.incident_id = n.incident_id AND c.narrative_type = n.narrative_type)) AS missing,
          (SELECT count(*) FROM classification_rows c WHERE c.experiment = ?
             AND NOT EXISTS (SELECT 1 FROM narratives n WHERE n.incident_id = c.incident_id
                             AND n.narrative_type = c.narrative_type)
             AND NOT EXISTS (SELECT 1 FROM removed_narratives r WHERE r.incident_id = c.incident_id
                             AND r.narrative_type = c.narrative_type)) AS orphaned,
          (SELECT count(*) FROM classification_rows c JOIN narratives n USING (incident_id, narrative_type)
             WHERE c.experiment = ? AND c.text_hash IS DISTINCT FROM n.text_hash) AS stale,
          (SELECT count(*) FROM classification_rows c JOIN removed_narratives r USING (incident_id, narrative_type)
             WHERE c.experiment = ?) AS removed
        """,
        [experiment] * 5,
    )
    missing, orphaned, stale, removed = int(missing), int(orphaned), int(stale), int(removed)
    return missing == 0 and orphaned == 0 and stale == 0, {
        "missing_rows": missing,
        "orphaned_rows": orphaned,
        "stale_rows": stale,
        "removed_narrative_rows": removed,
    }


def error_rate_below(store: Store, experiment: str, threshold: float) -> Result:
    """Answer errors (`vocabulary.ANSWER_ERRORS`) per asked row (every stored row not skipped)."""
    errors, asked = store.query_row(
        f"""
        SELECT count(*) FILTER (WHERE status IN {sql_list(ANSWER_ERRORS)}) AS errors,
               count(*) FILTER (WHERE status <> '{SKIPPED}') AS asked
        FROM classification_rows WHERE experiment = ?
        """,
        [experiment],
    )
    errors, asked = int(errors), int(asked)
    rate = errors / asked if asked else 0.0
    return rate <= threshold, {
        "error_rows": errors,
        "asked_rows": asked,
        "error_rate": round(rate, 4),
        "threshold": threshold,
    }


def confidences_in_range(store: Store, experiment: str) -> Result:
    (bad,) = store.query_row(
        "SELECT count(*) FROM classification_rows WHERE experiment = ? AND confidence IS NOT NULL"
        " AND (confidence < 0 OR confidence > 1 OR isnan(confidence))",
        [experiment],
    )
    return int(bad) == 0, {"out_of_range": int(bad)}
