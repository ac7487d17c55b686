"""What the engine reads and writes: work items from `narratives`, rows of `classification_rows`.

A result row is built from the raw answer (never from parsed fields kept elsewhere), so the
same function serves fresh answers and answers re-used from the journal, and every row
records the parser version that produced it (`parsing.PARSER_VERSION`, read at call time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from narr_assets import parsing
from narr_assets.experiments import ExperimentConfig
from narr_assets.journal import JournalKey
from narr_assets.llm import RawResponse
from narr_assets.store import CLASSIFICATION_COLUMNS
from narr_assets.vocabulary import REJECTED, SKIPPED


@dataclass
class WorkItem:
    """One narrative to classify (or to skip), as read from `narratives`."""

    batch_id: str
    incident_id: str
    narrative_type: str
    text: str
    text_hash: str
    is_placeholder: bool
    data_checksum: str | None = None

    @property
    def journal_key(self) -> JournalKey:
        """The key of this narrative's answers in the journal: one answer per text."""
        return (self.incident_id, self.narrative_type, self.text_hash)


_ITEM_COLUMNS = ("batch_id", "incident_id", "narrative_type", "narrative_text", "text_hash", "is_placeholder")


def work_items(narratives: pd.DataFrame) -> dict[str, list[WorkItem]]:
    """Group the `narratives` table's rows into work items per batch (in row order)."""
    columns = [narratives[c].tolist() for c in _ITEM_COLUMNS]
    # Frames built outside the store (benchmarks) may lack the provenance column.
    checksums = narratives["data_checksum"].tolist() if "data_checksum" in narratives else [None] * len(narratives)
    out: dict[str, list[WorkItem]] = {}
    for batch_id, incident_id, narrative_type, text, text_hash, placeholder, checksum in zip(
        *columns, checksums, strict=True
    ):
        out.setdefault(batch_id, []).append(
            WorkItem(
                batch_id=batch_id,
                incident_id=incident_id,
                narrative_type=narrative_type,
                text=text,
                text_hash=text_hash,
                is_placeholder=bool(placeholder),
                data_checksum=checksum,
            )
        )
    return out


def row_identity(
    cfg: ExperimentConfig, item: WorkItem, config_hash: str, *, attempts: int, from_journal: bool
) -> dict[str, Any]:
    """The columns of a `classification_rows` row that say whose answer it is and how it came.

    Args:
        cfg: The experiment.
        item: The narrative (key, batch, text hash, data checksum).
        config_hash: The experiment's config hash (computed once per run).
        attempts: Requests made for this answer.
        from_journal: Whether the answer was read back from the journal.

    Returns:
        Column -> value; the answer's own columns are added by the caller.
    """
    return {
        "experiment": cfg.name,
        "batch_id": item.batch_id,
        "incident_id": item.incident_id,
        "narrative_type": item.narrative_type,
        "text_hash": item.text_hash,
        "config_hash": config_hash,
        "attempts": attempts,
        "from_journal": from_journal,
        "parser_version": parsing.PARSER_VERSION,
        "data_checksum": item.data_checksum,
    }


def result_row(
    cfg: ExperimentConfig,
    item: WorkItem,
    raw: RawResponse | None,
    *,
    attempts: int,
    from_journal: bool,
    classified_at: float | None,
    config_hash: str,
) -> dict[str, Any]:
    """One `classification_rows` row from a raw answer (None means skipped placeholder).

    An answer that is the server's refusal of the request (`raw.rejected`) is a `rejected`
    row whose `error` is the refusal; nothing is parsed.

    `config_hash` is passed in, computed once per run: hashing the config per row would
    cost a model dump and a sha256 for every answer.
    """
    row = row_identity(cfg, item, config_hash, attempts=attempts, from_journal=from_journal)
    row["classified_at"] = pd.Timestamp(classified_at, unit="s", tz="UTC") if classified_at else None
    if raw is None:
        row.update(status=SKIPPED, error="placeholder narrative (run.skip_placeholders)")
        return row
    if raw.rejected is not None:
        row.update(status=REJECTED, error=raw.rejected, model=raw.model, latency_s=raw.latency_s)
        return row
    parsed = parsing.parse_answer(raw.content, raw.reasoning, raw.finish_reason, raw.refusal)
    row.update(
        status=parsed.status,
        detected=parsed.detected,
        confidence=parsed.confidence,
        indicators=json.dumps(list(parsed.indicators), ensure_ascii=False),
        rationale=parsed.rationale,
        error=parsed.error,
        answer_source=parsed.answer_source,
        raw_content=raw.content,
        raw_reasoning=raw.reasoning,
        finish_reason=raw.finish_reason,
        model=raw.model,
        prompt_tokens=raw.prompt_tokens,
        completion_tokens=raw.completion_tokens,
        reasoning_tokens=raw.reasoning_tokens,
        latency_s=raw.latency_s,
    )
    return row


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame in `classification_rows`' column order and dtypes, stamped `written_at`."""
    frame = pd.DataFrame(rows, columns=list(CLASSIFICATION_COLUMNS))
    frame["written_at"] = pd.Timestamp.now(tz="UTC")
    for col in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "attempts"):
        frame[col] = frame[col].astype("Int64")
    frame["detected"] = frame["detected"].astype("boolean")
    frame["confidence"] = frame["confidence"].astype("Float64")
    frame["latency_s"] = frame["latency_s"].astype("Float64")
    frame["classified_at"] = pd.to_datetime(frame["classified_at"], utc=True)
    return frame
