"""`make_plan`, the engine's pure planning step: skip, re-use from the journal, or ask."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
from conftest import write_experiment

from narr_assets.classify import Plan, WorkItem, make_plan
from narr_assets.experiments import ExperimentConfig, load_experiment
from narr_assets.journal import JournalKey, answer_record, unanswered_record
from narr_assets.llm import RawResponse
from narr_assets.vocabulary import ANSWER_ERRORS, OK, PARSE_ERROR, REFUSAL, REJECTED, SKIPPED, TRUNCATED

ANSWERS = {
    OK: RawResponse(content='{"detected": true, "confidence": 0.9, "indicators": ["threat"], "rationale": "r"}'),
    PARSE_ERROR: RawResponse(content="I think it is probably yes."),
    REFUSAL: RawResponse(content=None, refusal="I can't help with that."),
    TRUNCATED: RawResponse(content='{"detected": tr', finish_reason="length"),
    REJECTED: RawResponse(content=None, rejected="HTTP 400 (context_length_exceeded): too many tokens"),
}
AT = 1_700_000_000.0


@pytest.fixture
def cfg(tmp_path) -> ExperimentConfig:
    # No server: planning never calls the endpoint.
    return load_experiment(write_experiment(tmp_path, "llm", "http://127.0.0.1:9/v1"))


def with_skip_placeholders(cfg: ExperimentConfig, skip: bool) -> ExperimentConfig:
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"skip_placeholders": skip})})


def item(batch_id: str, incident_id: str, *, placeholder: bool = False, text_hash: str | None = None) -> WorkItem:
    return WorkItem(
        batch_id=batch_id,
        incident_id=incident_id,
        narrative_type="cme",
        text="Need LE report." if placeholder else f"Narrative {incident_id}.",
        text_hash=text_hash or f"h{incident_id}",
        is_placeholder=placeholder,
    )


def journal(cfg: ExperimentConfig, *entries: tuple[WorkItem, str, int]) -> dict[JournalKey, dict]:
    """`Journal.latest()` as it would read records of (item, answer status, attempt)."""
    return {
        it.journal_key: answer_record(it.journal_key, cfg.config_hash, attempt, AT, ANSWERS[status].to_dict())
        for it, status, attempt in entries
    }


def by_incident(plan: Plan, batch_id: str) -> dict[str, dict]:
    return {row["incident_id"]: row for row in plan.rows[batch_id]}


def test_journalled_answers_are_reused_and_the_rest_is_queued(cfg):
    a, b, c = item("b1", "1"), item("b1", "2"), item("b2", "3")
    plan = make_plan(cfg, {"b1": [a, b], "b2": [c]}, journal(cfg, (a, OK, 2), (c, OK, 1)))
    assert (plan.narratives, plan.reused, plan.skipped) == (3, 2, 0)
    assert plan.queue == [(b, 0)]
    assert plan.pending == {"b1": 1, "b2": 0}
    assert plan.ready == ["b2"]  # b1 still waits for its call
    row = by_incident(plan, "b1")["1"]
    assert row["status"] == OK and row["detected"] is True and row["from_journal"] is True
    assert row["attempts"] == 2 and row["classified_at"] == pd.Timestamp(AT, unit="s", tz="UTC")
    assert row["config_hash"] == cfg.config_hash and row["batch_id"] == "b1"
    assert list(by_incident(plan, "b2")) == ["3"]


def test_an_answer_for_an_older_text_is_not_reused(cfg):
    edited = item("b1", "1", text_hash="new")
    old = item("b1", "1", text_hash="old")
    plan = make_plan(cfg, {"b1": [edited]}, journal(cfg, (old, OK, 3)))
    assert plan.reused == 0 and plan.queue == [(edited, 0)] and plan.rows == {"b1": []}


def test_placeholders_are_skipped_whatever_the_journal_holds(cfg):
    assert cfg.run.skip_placeholders  # the default
    p, q = item("b1", "1", placeholder=True), item("b1", "2", placeholder=True)
    plan = make_plan(cfg, {"b1": [p, q]}, journal(cfg, (p, OK, 1)))
    assert (plan.narratives, plan.reused, plan.skipped) == (2, 0, 2)
    assert plan.queue == [] and plan.ready == ["b1"]
    for row in plan.rows["b1"]:
        assert row["status"] == SKIPPED and row["attempts"] == 0 and row["from_journal"] is False
        assert row["classified_at"] is None and "placeholder" in row["error"]


def test_placeholders_are_asked_or_reused_when_not_skipped(cfg):
    cfg = with_skip_placeholders(cfg, False)
    p, q = item("b1", "1", placeholder=True), item("b1", "2", placeholder=True)
    plan = make_plan(cfg, {"b1": [p, q]}, journal(cfg, (p, OK, 1)))
    assert (plan.reused, plan.skipped) == (1, 0)
    assert plan.queue == [(q, 0)] and plan.pending == {"b1": 1}
    assert by_incident(plan, "b1")["1"]["status"] == OK


def test_retry_errors_requeues_only_answer_errors(cfg):
    ok, parse_error, refusal, truncated, rejected = (item("b1", str(i)) for i in range(5))
    placeholder = item("b1", "9", placeholder=True)
    items = {"b1": [ok, parse_error, refusal, truncated, rejected, placeholder]}
    records = journal(
        cfg,
        (ok, OK, 1),
        (parse_error, PARSE_ERROR, 1),
        (refusal, REFUSAL, 2),
        (truncated, TRUNCATED, 3),
        (rejected, REJECTED, 1),
    )

    kept = make_plan(cfg, items, records)
    assert kept.queue == [] and kept.reused == 5 and kept.skipped == 1
    assert {row["incident_id"]: row["status"] for row in kept.rows["b1"]} == {
        "0": OK,
        "1": PARSE_ERROR,
        "2": REFUSAL,
        "3": TRUNCATED,
        "4": REJECTED,
        "9": SKIPPED,
    }
    # A journalled refusal of the request is re-used as it is: not sent again on every run.
    assert by_incident(kept, "b1")["4"]["error"].startswith("HTTP 400 (context_length_exceeded)")

    retried = make_plan(cfg, items, records, retry_errors=True)
    # Each is asked again with the attempts already made, so its row keeps counting.
    assert retried.queue == [(parse_error, 1), (refusal, 2), (truncated, 3), (rejected, 1)]
    assert retried.pending == {"b1": 4} and retried.reused == 1 and retried.skipped == 1
    assert sorted(row["status"] for row in retried.rows["b1"]) == sorted([OK, SKIPPED])
    assert set(ANSWER_ERRORS) == {PARSE_ERROR, REFUSAL, TRUNCATED, REJECTED}  # every answer error was covered


def test_an_empty_batch_is_ready_at_once(cfg):
    plan = make_plan(cfg, {"b1": [], "b2": [item("b2", "1")]}, {})
    assert plan.rows == {"b1": [], "b2": []}
    assert plan.pending == {"b1": 0, "b2": 1}
    assert plan.ready == ["b1"]
    assert plan.narratives == 1 and plan.queue == [(item("b2", "1"), 0)]
    assert make_plan(cfg, {}, {}) == Plan(rows={}, pending={})


def test_the_plan_is_a_pure_function_of_its_inputs(cfg):
    a, b, c = item("b2", "1"), item("b1", "2"), item("b1", "3", placeholder=True)
    items = {"b2": [a], "b1": [b, c], "b0": []}
    records = journal(cfg, (a, REFUSAL, 4), (b, OK, 1))
    before = (copy.deepcopy(items), copy.deepcopy(records))
    first = make_plan(cfg, items, records, retry_errors=True)
    second = make_plan(cfg, items, records, retry_errors=True)
    assert first == second
    assert (items, records) == before
    assert first.queue == [(a, 4)]
    assert first.ready == ["b0", "b1"]  # sorted by batch key, whatever the input order
    assert first.narratives == first.reused + first.skipped + first.not_sent + len(first.queue)


def test_the_given_config_hash_is_stamped_on_every_row(cfg):
    a, p = item("b1", "1"), item("b1", "2", placeholder=True)
    plan = make_plan(cfg, {"b1": [a, p]}, journal(cfg, (a, OK, 1)), config_hash="precomputed")
    assert {row["config_hash"] for row in plan.rows["b1"]} == {"precomputed"}


def with_max_input_chars(cfg: ExperimentConfig, limit: int | None) -> ExperimentConfig:
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"max_input_chars": limit})})


def test_narratives_over_max_input_chars_are_rejected_rows_never_sent(cfg):
    short, long, paid = item("b1", "1"), item("b1", "2"), item("b1", "3")
    long.text = "x" * 5000
    paid.text = "y" * 5000
    limited = with_max_input_chars(cfg, 1000)
    plan = make_plan(limited, {"b1": [short, long, paid]}, journal(cfg, (paid, OK, 1)))
    assert plan.queue == [(short, 0)] and plan.pending == {"b1": 1}
    assert (plan.narratives, plan.reused, plan.skipped, plan.not_sent) == (3, 1, 0, 1)
    row = by_incident(plan, "b1")["2"]
    assert row["status"] == REJECTED and row["attempts"] == 0 and row["from_journal"] is False
    assert row["error"] == "not sent: 5000 characters > run.max_input_chars (1000)"
    assert row.get("raw_content") is None and "x" * 20 not in str(row)  # no narrative text in the row
    # An answer already paid for is still used, whatever the limit says now.
    assert by_incident(plan, "b1")["3"]["status"] == OK
    # The limit is not in the config hash: changing it re-asks nothing that was answered.
    assert limited.config_hash == cfg.config_hash
    # Without the limit the long narrative is asked like any other.
    assert make_plan(cfg, {"b1": [long]}, {}).queue == [(long, 0)]


def test_unanswered_records_carry_the_attempt_count_into_the_next_run(cfg, tmp_path):
    from narr_assets.journal import Journal

    a, b = item("b1", "1"), item("b1", "2")
    with Journal(tmp_path / "j") as j:
        # `a`: a run gave up after 7 requests, the next one got an answer on its 2nd request.
        j.append(unanswered_record(a.journal_key, cfg.config_hash, 7, AT, "connection error: X"))
        j.append(answer_record(a.journal_key, cfg.config_hash, 9, AT + 10, ANSWERS[OK].to_dict()))
        # `b`: asked twice, by two runs that both gave up, never answered.
        j.append(unanswered_record(b.journal_key, cfg.config_hash, 3, AT, "timed out after 5 s"))
        j.append(unanswered_record(b.journal_key, cfg.config_hash, 5, AT + 10, "the run stopped before an answer"))
    records = Journal(tmp_path / "j").latest()
    assert records[b.journal_key]["response"] is None and records[b.journal_key]["attempt"] == 5
    plan = make_plan(cfg, {"b1": [a, b]}, records)
    assert plan.queue == [(b, 5)]  # asked again, counting on from 5
    assert by_incident(plan, "b1")["1"]["attempts"] == 9 and plan.reused == 1


def test_a_later_unanswered_record_raises_the_count_of_an_older_answer(cfg, tmp_path):
    from narr_assets.journal import Journal

    a = item("b1", "1")
    with Journal(tmp_path / "j") as j:
        j.append(answer_record(a.journal_key, cfg.config_hash, 2, AT, ANSWERS[REFUSAL].to_dict()))
        # --retry-errors asked it again 4 times, all failed: the refusal stays, its count grows.
        j.append(unanswered_record(a.journal_key, cfg.config_hash, 6, AT + 10, "HTTP 500"))
    records = Journal(tmp_path / "j").latest()
    kept = make_plan(cfg, {"b1": [a]}, records)
    assert kept.rows["b1"][0]["status"] == REFUSAL and kept.rows["b1"][0]["attempts"] == 6
    assert make_plan(cfg, {"b1": [a]}, records, retry_errors=True).queue == [(a, 6)]
