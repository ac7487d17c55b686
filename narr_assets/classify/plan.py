"""Planning a run: which narratives are already answered and which must be asked.

A pure function of its inputs (no I/O, no clock, no randomness): given the experiment, the
work items per batch, the journal's newest record per narrative text and `retry_errors`,
`make_plan` decides for every narrative one of

- skip it: a placeholder under `run.skip_placeholders` gets a `skipped` row, whatever the
  journal holds;
- re-use its journalled answer: the record for this config and this text is re-parsed into a
  row (`from_journal`), so a crash, a lost batch or a parser upgrade costs no call - unless
  `retry_errors` is set and the answer parses to an answer error (`vocabulary.ANSWER_ERRORS`);
- not send it: a narrative longer than `run.max_input_chars` gets a `rejected` row saying so
  (a journalled answer, already paid for, is still re-used);
- ask it: it joins the queue with the number of attempts already journalled for it, so the
  attempt count of its row keeps counting across runs.

The engine takes the plan over: it appends the asked answers to `rows` and counts `pending`
down to zero, at which point the batch can be written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from narr_assets.classify.rows import WorkItem, result_row
from narr_assets.experiments import ExperimentConfig
from narr_assets.journal import JournalKey
from narr_assets.llm import RawResponse
from narr_assets.vocabulary import ANSWER_ERRORS, REJECTED


@dataclass
class Plan:
    """What a run starts from; counts are for this run only."""

    # Per batch: the rows known before any call (journal re-use and skipped placeholders).
    rows: dict[str, list[dict[str, Any]]]
    # Per batch: how many of its narratives are still to ask.
    pending: dict[str, int]
    # What to ask, in batch order: (item, attempts already journalled for its text).
    queue: list[tuple[WorkItem, int]] = field(default_factory=list)
    narratives: int = 0
    reused: int = 0
    skipped: int = 0
    # Narratives longer than run.max_input_chars: a `rejected` row, never sent.
    not_sent: int = 0

    @property
    def ready(self) -> list[str]:
        """Batches with nothing to ask, in key order: they can be written at once."""
        return sorted(batch_id for batch_id, n in self.pending.items() if n == 0)


def make_plan(
    cfg: ExperimentConfig,
    items_by_batch: dict[str, list[WorkItem]],
    records: dict[JournalKey, dict[str, Any]],
    *,
    retry_errors: bool = False,
    config_hash: str | None = None,
) -> Plan:
    """Sort every item into skipped, re-used from `records`, or queued (see module docstring).

    `records` is `Journal.latest()` for this experiment and config (empty without a journal);
    `config_hash` defaults to `cfg.config_hash` (the engine passes the one it computed).
    """
    config_hash = cfg.config_hash if config_hash is None else config_hash
    plan = Plan(rows={b: [] for b in items_by_batch}, pending={b: 0 for b in items_by_batch})
    for batch_id, items in items_by_batch.items():
        for item in items:
            plan.narratives += 1
            row = _known_row(cfg, item, records.get(item.journal_key), retry_errors, config_hash)
            if row is None:
                plan.queue.append((item, records.get(item.journal_key, {}).get("attempt", 0)))
                plan.pending[batch_id] += 1
                continue
            if row["from_journal"]:
                plan.reused += 1
            elif row["status"] == REJECTED:
                plan.not_sent += 1
            else:
                plan.skipped += 1
            plan.rows[batch_id].append(row)
    return plan


def _known_row(
    cfg: ExperimentConfig,
    item: WorkItem,
    record: dict[str, Any] | None,
    retry_errors: bool,
    config_hash: str,
) -> dict[str, Any] | None:
    """The item's row without asking (skipped, re-used or not sent), or None to ask."""
    if item.is_placeholder and cfg.run.skip_placeholders:
        return result_row(cfg, item, None, attempts=0, from_journal=False, classified_at=None, config_hash=config_hash)
    if record is not None and record.get("response") is not None:
        row = result_row(
            cfg,
            item,
            RawResponse.from_dict(record["response"]),
            attempts=record.get("attempt", 1),
            from_journal=True,
            classified_at=record.get("at"),
            config_hash=config_hash,
        )
        if not (retry_errors and row["status"] in ANSWER_ERRORS):
            return row
    limit = cfg.run.max_input_chars
    if limit is not None and len(item.text) > limit:
        refusal = f"not sent: {len(item.text)} characters > run.max_input_chars ({limit})"
        attempts = record.get("attempt", 0) if record is not None else 0
        return result_row(
            cfg,
            item,
            RawResponse(content=None, rejected=refusal),
            attempts=attempts,
            from_journal=False,
            classified_at=None,
            config_hash=config_hash,
        )
    return None
