"""One word, one definition: the narrative types and result statuses every module shares.

Every other module imports these names instead of spelling the values out, so the engine,
the store's SQL, the checks, the evaluation and the report cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

# --- narrative types ----------------------------------------------------------------------
CME = "cme"  # written from the coroner / medical examiner report
LE = "le"  # written from the law-enforcement report
NARRATIVE_TYPES: tuple[str, ...] = (CME, LE)

# --- statuses of a result row -------------------------------------------------------------
OK = "ok"  # the answer parsed into the result schema
PARSE_ERROR = "parse_error"  # an answer arrived but could not be parsed
REFUSAL = "refusal"  # the model declined to answer
TRUNCATED = "truncated"  # the answer was cut off (finish_reason "length")
# The server refused this one request (HTTP 400/413/422 about the input: context length,
# content filter), or it was never sent because it is longer than run.max_input_chars.
REJECTED = "rejected"
SKIPPED = "skipped"  # never sent: a placeholder narrative under run.skip_placeholders
FAILED = "failed"  # no current row at all (never asked, transport failure, or stale after an edit)

# What the response parser can return for one answer.
ANSWER_STATUSES: tuple[str, ...] = (OK, PARSE_ERROR, REFUSAL, TRUNCATED)
# What a stored `classification_rows` row can hold.
ROW_STATUSES: tuple[str, ...] = (*ANSWER_STATUSES, REJECTED, SKIPPED)
# Every status evaluation knows: the stored ones plus FAILED for a narrative without a current row.
STATUSES: tuple[str, ...] = (*ROW_STATUSES, FAILED)

# Groups. "Answer errors" are stored answers that are not usable: `--retry-errors` re-asks
# exactly these, and the error-rate check counts them. "Unanswered" adds FAILED: under strict
# scoring these count as wrong, and they never leave a metric's denominator.
ANSWERED: tuple[str, ...] = (OK,)
ANSWER_ERRORS: tuple[str, ...] = (PARSE_ERROR, REFUSAL, TRUNCATED, REJECTED)
UNANSWERED: tuple[str, ...] = (*ANSWER_ERRORS, FAILED)


def sql_list(values: Iterable[str]) -> str:
    """A SQL literal list, e.g. `('parse_error', 'refusal')`, for statuses in a query.

    Only for the constants above (never user input): the values are plain identifiers.
    """
    items = list(values)
    if not items or not all(v.replace("_", "").isalnum() for v in items):
        raise ValueError(f"not a list of status words: {items!r}")
    return "(" + ", ".join(f"'{v}'" for v in items) + ")"
