"""`make_plan`, the engine's pure planning step: skip, re-use from the journal, or ask."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
from conftest import write_experiment

from narr_assets.classify import Plan, WorkItem, make_plan
from narr_assets.experiments import ExperimentConfig, load_experiment
from narr_assets.journal import JournalKey, answer_record
from narr_assets.llm import RawResponse
from narr_assets.vocabulary import ANSWER_ERRORS, OK, PARSE_ERROR, REFUSAL, SKIPPED, TRUNCATED

ANSWERS = {
    OK: RawResponse(content='{"detected": true, "confidence": 0.9, "indicators": ["threat"], "rationale": "r"}'),
    PARSE_ERROR: RawResponse(content="I think it is probably yes."),
    REFUSAL: RawResponse(content=None, refusal="I can't help with that."),
    TRUNCATED: RawResponse(content='{"detected": tr', finish_reason="length"),
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
    ok, parse_error, refusal, truncated = (item("b1", str(i)) for i in range(4))
    placeholder = item("b1", "9", placeholder=True)
    items = {"b1": [ok, parse_error, refusal, truncated, placeholder]}
    records = journal(cfg, (ok, OK, 1), (parse_error, PARSE_ERROR, 1), (refusal, REFUSAL, 2), (truncated, TRUNCATED, 3))

    kept = make_plan(cfg, items, records)
    assert kept.queue == [] and kept.reused == 4 and kept.skipped == 1
    assert {row["incident_id"]: row["status"] for row in kept.rows["b1"]} == {
        "0": OK,
        "1": PARSE_ERROR,
        "2": REFUSAL,
        "3": TRUNCATED,
        "9": SKIPPED,
    }

    retried = make_plan(cfg, items, records, retry_errors=True)
    # Each is asked again with the attempts already made, so its row keeps counting.
    assert retried.queue == [(parse_error, 1), (refusal, 2), (truncated, 3)]
    assert retried.pending == {"b1": 3} and retried.reused == 1 and retried.skipped == 1
    assert sorted(row["status"] for row in retried.rows["b1"]) == sorted([OK, SKIPPED])
    assert set(ANSWER_ERRORS) == {PARSE_ERROR, REFUSAL, TRUNCATED}  # every answer error was covered


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
    assert first.narratives == first.reused + first.skipped + len(first.queue)


def test_the_given_config_hash_is_stamped_on_every_row(cfg):
    a, p = item("b1", "1"), item("b1", "2", placeholder=True)
    plan = make_plan(cfg, {"b1": [a, p]}, journal(cfg, (a, OK, 1)), config_hash="precomputed")
    assert {row["config_hash"] for row in plan.rows["b1"]} == {"precomputed"}
