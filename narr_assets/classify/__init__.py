"""The classification engine: one work queue across all partitions of a run.

For each narrative of the requested batches the engine either re-uses the journalled answer
(config hash + narrative key + text hash), skips it (placeholders, by default), or queues a
call. `run.concurrency` workers drain one queue, so the endpoint stays saturated across batch
boundaries; each answer is journalled the moment it arrives, and a batch is written to DuckDB
(atomically, by a single writer task) as soon as its last narrative is done. A narrative whose
call still fails after `run.max_retries` retries fails its batch - the batch is not written and
the run raises at the end, after every other batch is journalled and written - so a
backfill or `narr run` resumes exactly the missing work. A request the server refuses for its
input (HTTP 400/413/422) is a `rejected` row; a run that nothing answers stops within a minute;
a run asked to stop (SIGINT, SIGTERM, a Dagster termination) finishes its requests in flight,
journals them and writes the complete batches first.

Modules, in the order a run uses them:

- `engine`: `classify_batches` (skip complete batches, lock, run, raise on failures) and
  `run_engine` (the run itself, wiring the parts below);
- `locks`: one process per batch at a time (`partition_locks`);
- `rows`: work items from `narratives`, result rows for `classification_rows`;
- `plan`: the pure planning step - skip, re-use from the journal, or ask;
- `requests`: pacing, retries with backoff, the dead-endpoint and refused-request rules, the
  worker pool;
- `stopping`: graceful stops on signals or on request (`RunInterrupted`);
- `writer`: completed batches grouped into one DuckDB transaction per `WRITE_INTERVAL_S`;
- `progress`, `summary`: what the run reports while and after it runs.
"""

from narr_assets.classify.engine import ClassificationFailed, classify_batches, run_engine
from narr_assets.classify.locks import PartitionBusyError, partition_locks
from narr_assets.classify.plan import Plan, make_plan
from narr_assets.classify.progress import Progress, format_duration
from narr_assets.classify.requests import RateLimiter, Requester, backoff_delay
from narr_assets.classify.rows import WorkItem, result_row, rows_frame, work_items
from narr_assets.classify.stopping import RunInterrupted, StopControl
from narr_assets.classify.summary import RunSummary
from narr_assets.classify.writer import WRITE_INTERVAL_S, BatchWriter
from narr_assets.vocabulary import ANSWER_ERRORS

# The old module's name for the statuses `retry_errors` asks again; the word is defined in
# `vocabulary` (ANSWER_ERRORS) and this is only an alias for existing importers.
ERROR_STATUSES = ANSWER_ERRORS

__all__ = [
    "ERROR_STATUSES",
    "WRITE_INTERVAL_S",
    "BatchWriter",
    "ClassificationFailed",
    "PartitionBusyError",
    "Plan",
    "Progress",
    "RateLimiter",
    "Requester",
    "RunInterrupted",
    "RunSummary",
    "StopControl",
    "WorkItem",
    "backoff_delay",
    "classify_batches",
    "format_duration",
    "make_plan",
    "partition_locks",
    "result_row",
    "rows_frame",
    "run_engine",
    "work_items",
]
