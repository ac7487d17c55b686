"""The classification engine against the fault-injecting test server (no Dagster here)."""

from __future__ import annotations

import threading

import pytest
from conftest import write_experiment, write_long_csv

from narr_assets import settings
from narr_assets.classify import ClassificationFailed, PartitionBusyError, classify_batches, partition_locks
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.experiments import load_experiment
from narr_assets.llm import FatalError
from narr_assets.status import partition_state
from narr_assets.store import Store


@pytest.fixture
def ingested(project):
    """40 incidents x 2 types = 80 narratives (4 placeholders) in 8 batches of 10."""
    source = write_long_csv(project / "input.csv", 40, placeholders=4)
    store = Store(settings.db_path())
    ingest_raw(store, source)
    _, batches = build_narratives(store, batch_size=10)
    assert len(batches) == 8
    return store, batches


def run(cfg, store, batches, **kwargs):
    return classify_batches(
        cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir(), **kwargs
    )


def experiment(project, server, **kwargs):
    return load_experiment(write_experiment(project / "experiments", "llm", server.base_url, **kwargs))


def test_one_call_per_narrative_then_none(project, ingested, server):
    store, batches = ingested
    cfg = experiment(project, server)
    summary = run(cfg, store, batches)
    stats = server.stats()
    assert summary.calls_ok == 76 and summary.skipped == 4
    assert stats["completions_ok"] == 76 and stats["chat_requests"] == 76
    assert set(stats["ok_by_text"].values()) == {1}
    rows = store.read_classifications("llm")
    assert len(rows) == 80 and rows[["incident_id", "narrative_type"]].duplicated().sum() == 0
    assert (rows["status"] == "skipped").sum() == 4 and (rows["status"] == "ok").sum() == 76
    # Materialising again re-uses the journal: zero calls.
    again = run(cfg, store, batches)
    assert server.stats()["chat_requests"] == 76
    assert again.up_to_date_batches == batches and again.calls_ok == 0
    assert len(store.read_classifications("llm")) == 80
    # A batch whose rows are gone is rebuilt from the journal, still with zero calls.
    store.replace_partition("llm", batches[3], store.read_classifications("llm").iloc[0:0])
    rebuilt = run(cfg, store, batches)
    assert rebuilt.reused == 10 and rebuilt.calls_ok == 0 and rebuilt.written_batches == [batches[3]]
    assert server.stats()["chat_requests"] == 76 and len(store.read_classifications("llm")) == 80
    assert partition_state(store, cfg).missing == []


@pytest.mark.reliability
def test_fault_storm_completes_with_every_row_and_explained_calls(project, ingested, server):
    store, batches = ingested
    server.configure(
        rate_limit=0.15, retry_after_s=0.05, server_error=0.15, hang=0.05, hang_s=3, drop=0.05, malformed=0.05, seed=3
    )
    cfg = experiment(project, server, timeout=0.5, retries=12)
    summary = run(cfg, store, batches)
    stats = server.stats()
    rows = store.read_classifications("llm")
    assert len(rows) == 80 and set(rows["status"]) <= {"ok", "skipped"}
    # Every narrative answered exactly once; every other request is a retry we counted.
    assert set(stats["ok_by_text"].values()) == {1} and len(stats["ok_by_text"]) == 76
    assert summary.calls_ok == 76
    assert summary.attempts == stats["chat_requests"]
    assert summary.transient_errors == summary.attempts - summary.calls_ok > 0


def test_retry_errors_replaces_only_error_rows(project, ingested, server):
    store, batches = ingested
    server.configure(refusal=0.3, seed=1)
    cfg = experiment(project, server)
    run(cfg, store, batches)
    first = store.read_classifications("llm").set_index(["incident_id", "narrative_type"])
    refused = first.index[first["status"] == "refusal"]
    ok = first.index[first["status"] == "ok"]
    assert len(refused) > 5
    server.configure(refusal=0.0)
    server.reset()
    state = partition_state(store, cfg)
    summary = run(cfg, store, state.to_run(retry_errors=True), retry_errors=True)
    assert summary.calls_ok == len(refused) == server.stats()["chat_requests"]
    after = store.read_classifications("llm").set_index(["incident_id", "narrative_type"])
    assert (after.loc[refused, "status"] == "ok").all()
    assert (after.loc[refused, "attempts"] == 2).all()
    assert after.loc[ok, "raw_content"].equals(first.loc[ok, "raw_content"])
    assert (after.loc[ok, "attempts"] == 1).all()
    assert len(after) == 80


def test_prompt_change_reasks_and_unchanged_does_not(project, ingested, server):
    store, batches = ingested
    cfg = experiment(project, server)
    run(cfg, store, batches)
    assert experiment(project, server).config_hash == cfg.config_hash
    changed = experiment(project, server, version="v2")
    assert changed.config_hash != cfg.config_hash
    assert sorted(partition_state(store, changed).missing) == sorted(batches)
    server.reset()
    run(changed, store, batches)
    assert server.stats()["chat_requests"] == 76
    assert set(store.read_classifications("llm")["config_hash"]) == {changed.config_hash}


@pytest.mark.reliability
def test_transport_failure_fails_only_its_batch_and_resume_pays_nothing_twice(project, ingested, server):
    store, batches = ingested
    server.configure(fail_first_n=3)  # every narrative needs 4 requests
    cfg = experiment(project, server, retries=1)
    with pytest.raises(ClassificationFailed, match="failed after retries") as err:
        run(cfg, store, batches)
    assert len(err.value.summary.failed_batches) == 8
    assert store.read_classifications("llm").empty
    stats = server.stats()
    assert stats["completions_ok"] == 0
    # Resume with more retries: each narrative is finally answered once.
    cfg = experiment(project, server, retries=4)
    run(cfg, store, partition_state(store, cfg).to_run())
    assert set(server.stats()["ok_by_text"].values()) == {1}
    assert len(store.read_classifications("llm")) == 80


def test_unauthorized_stops_at_once_with_a_fix(project, ingested, server, monkeypatch):
    store, batches = ingested
    server.configure(api_key="right-key")
    path = write_experiment(project / "experiments", "llm", server.base_url)
    path.write_text(path.read_text().replace("temperature: 0.0", "temperature: 0.0\n  api_key_env: NARR_TEST_KEY"))
    monkeypatch.setenv("NARR_TEST_KEY", "wrong-key")
    cfg = load_experiment(path)
    with pytest.raises(FatalError, match="NARR_TEST_KEY"):
        run(cfg, store, batches)
    assert server.stats()["chat_requests"] <= cfg.run.concurrency  # stopped, not 76 attempts
    assert "wrong-key" not in str(cfg.effective())


def test_unknown_model_names_the_fix(project, ingested, server):
    store, batches = ingested
    server.configure(models=["other-model"])
    cfg = experiment(project, server)
    with pytest.raises(FatalError, match=r"model\.name"):
        run(cfg, store, batches)


def test_second_run_on_same_partition_fails_fast(project, ingested, server):
    store, batches = ingested
    cfg = experiment(project, server)
    with (
        partition_locks(settings.locks_dir(), cfg.name, [batches[0]]),
        pytest.raises(PartitionBusyError, match=f"partition {batches[0]} .* another run .*pid"),
    ):
        run(cfg, store, batches[:2])
    assert server.stats()["chat_requests"] == 0
    run(cfg, store, batches[:2])  # lock released
    assert server.stats()["completions_ok"] == 20 - 4  # the 4 placeholders sort into b00000


@pytest.mark.parametrize(
    ("fault", "status"),
    [("refusal", "refusal"), ("truncated", "truncated"), ("reasoning_only", "ok"), ("prose", "ok")],
)
def test_messy_answers_are_rows_with_a_status(project, ingested, server, fault, status):
    store, batches = ingested
    server.configure(**{fault: 1.0})
    cfg = experiment(project, server, mode="prompt")
    run(cfg, store, batches[:1])
    rows = store.read_classifications("llm")
    asked = rows[rows["status"] != "skipped"]
    assert set(asked["status"]) == {status}
    assert asked["raw_content"].notna().all() or fault == "reasoning_only"
    if fault == "reasoning_only":
        assert (asked["answer_source"] == "reasoning").all()


def test_parallel_runs_on_different_partitions_lose_nothing(project, ingested, server):
    store, batches = ingested
    server.configure(latency_s=0.02)
    cfg = experiment(project, server)
    errors: list[BaseException] = []

    def worker(part):
        try:
            run(cfg, store, part)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = store.read_classifications("llm")
    assert len(rows) == 80 and not rows[["incident_id", "narrative_type"]].duplicated().any()
    assert set(server.stats()["ok_by_text"].values()) == {1}


def test_api_key_never_reaches_database_journal_or_logs(project, ingested, server, monkeypatch):
    store, batches = ingested
    secret = "sk-test-0123456789abcdef-secret"
    server.configure(api_key=secret)
    path = write_experiment(project / "experiments", "llm", server.base_url)
    path.write_text(path.read_text().replace("temperature: 0.0", "temperature: 0.0\n  api_key_env: NARR_TEST_KEY"))
    monkeypatch.setenv("NARR_TEST_KEY", secret)
    cfg = load_experiment(path)
    logs: list[str] = []
    run(cfg, store, batches, log=logs.append)
    assert server.stats()["completions_ok"] == 76
    assert secret not in "\n".join(logs)
    for file in project.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), f"API key found in {file}"


def test_parser_upgrade_reparses_from_the_journal_without_calls(project, ingested, server, monkeypatch):
    store, batches = ingested
    cfg = experiment(project, server)
    run(cfg, store, batches)
    # A new parser release: rows parsed by the old one are no longer current. The engine and
    # the store both read the version from `parsing` when they need it.
    monkeypatch.setattr("narr_assets.parsing.PARSER_VERSION", "9.9.9")
    assert sorted(partition_state(store, cfg).missing) == batches
    summary = run(cfg, store, batches)
    assert summary.reused == 76 and summary.calls_ok == 0
    assert server.stats()["chat_requests"] == 76
    assert set(store.read_classifications("llm")["parser_version"]) == {"9.9.9"}
    assert partition_state(store, cfg).missing == []


@pytest.mark.parametrize(("error", "cause"), [(OSError(), "OSError"), (OSError(28, "No space left"), "OSError: ")])
def test_a_failed_write_fails_its_batch_whatever_the_error_message(error, cause):
    import asyncio

    from narr_assets.classify import BatchWriter

    def write(frames):
        raise error

    async def go() -> BatchWriter:
        writer = BatchWriter(write, {"b1": [], "b2": []}, interval_s=0)
        writer.start()
        writer.submit("b1")
        writer.submit("b2")
        await writer.finish()
        return writer

    writer = asyncio.run(go())  # an exception without a message used to raise IndexError here
    assert writer.written == [] and sorted(writer.failures) == ["b1", "b2"]
    assert writer.failures["b1"].startswith(f"writing the batch failed ({cause}")
    assert "previous rows are intact" in writer.failures["b1"]
