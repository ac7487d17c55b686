"""The engine against a hostile endpoint: refusals, dead and hung servers, echoed keys, stops.

Each scenario runs the real engine (`classify_batches`) against the project's test server; the
graceful-stop scenarios run it in a real subprocess that receives a real signal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import NEGATIVE, POSITIVE, outage_after, partition_key_of, write_experiment, write_long_csv

from narr_assets import settings
from narr_assets.classify import ClassificationFailed, classify_batches
from narr_assets.classify import requests as requests_module
from narr_assets.corpus import build_narratives, ingest_raw
from narr_assets.experiments import load_experiment
from narr_assets.journal import Journal
from narr_assets.llm import FatalError
from narr_assets.status import partition_state
from narr_assets.store import Store
from narr_assets.testing.server import narrative_key

# Two beta APIs the project uses on purpose (see narr_assets.cli.main).
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-live-4f9a2c7e1b3d5f6a8c0e2b4d6f8a0c1e"
# 1 MB of narrative: far past any context window (the server's limit below is 100,000 characters).
HUGE = " ".join([NEGATIVE] * (1_000_000 // (len(NEGATIVE) + 1)))


def ingest(project: Path, n_incidents: int, batch_size: int = 10, **special: str) -> tuple[Store, list[str]]:
    texts = {(int(k.split("_")[0]), k.split("_")[1]): v for k, v in special.items()}
    store = Store(settings.db_path())
    ingest_raw(store, write_long_csv(project / "in.csv", n_incidents, special=texts))
    return store, build_narratives(store, batch_size=batch_size)[1]


def experiment(project: Path, base_url: str, *, run_extra: str = "", key_env: str | None = None, **kwargs):
    path = write_experiment(project / "experiments", "llm", base_url, **kwargs)
    text = path.read_text() + "".join(f"  {line}\n" for line in run_extra.splitlines() if line)
    if key_env:
        text = text.replace("temperature: 0.0", f"temperature: 0.0\n  api_key_env: {key_env}")
    path.write_text(text)
    return load_experiment(path)


def run(cfg, store, batches, **kwargs):
    return classify_batches(
        cfg, store, batches, journal_dir=settings.journal_dir(), locks_dir=settings.locks_dir(), **kwargs
    )


def journal_records(cfg) -> list[dict]:
    folder = settings.journal_dir() / cfg.name / cfg.config_hash
    return list(Journal(folder).iter_records()) if folder.is_dir() else []


def answers_journalled(cfg) -> int:
    return sum(1 for r in journal_records(cfg) if r["response"] is not None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- refusals


def test_one_refused_narrative_is_a_rejected_row_and_the_corpus_goes_on(project, server):
    """A 1 MB narrative among 512 that the server refuses (400 context_length_exceeded)."""
    store, batches = ingest(project, 256, batch_size=64, **{"100_cme": HUGE})
    server.configure(max_prompt_chars=100_000)
    cfg = experiment(project, server.base_url)
    logs: list[str] = []
    summary = run(cfg, store, batches, log=logs.append)  # no FatalError: the run goes on
    rows = store.read_classifications("llm").set_index(["incident_id", "narrative_type"])
    assert len(rows) == 512 and summary.written_batches == batches and summary.rejected == 1
    big = rows.loc[("1100", "cme")]
    assert big["status"] == "rejected" and big["attempts"] == 1
    assert big["error"].startswith("HTTP 400 (context_length_exceeded): This model's maximum context length")
    assert len(big["error"]) <= 250
    assert (rows.drop(index=("1100", "cme"))["status"] == "ok").all()
    assert summary.status_counts == {"ok": 511, "rejected": 1}
    # The log names the narrative and the refusal, never its text (nor the server's message).
    assert any("1100/cme" in line and "HTTP 400 (context_length_exceeded)" in line for line in logs)
    assert NEGATIVE[:30] not in "\n".join(logs)
    assert server.stats()["chat_requests"] == 512
    # The refusal is journalled like an answer: a rebuilt batch re-uses it, nothing is sent.
    store.replace_partition("llm", big["batch_id"], store.read_classifications("llm").iloc[0:0])
    rebuilt = run(cfg, store, batches)
    assert rebuilt.reused == 64 and rebuilt.status_counts["rejected"] == 1
    assert server.stats()["chat_requests"] == 512
    # --retry-errors asks it again (here the server has since grown its context): only it.
    server.configure(max_prompt_chars=0)
    retried = run(cfg, store, partition_state(store, cfg).to_run(retry_errors=True), retry_errors=True)
    assert retried.calls_ok == 1 and server.stats()["chat_requests"] == 513
    big = store.read_classifications("llm").set_index(["incident_id", "narrative_type"]).loc[("1100", "cme")]
    assert big["status"] == "ok" and big["attempts"] == 2


def test_a_refusal_quoting_the_input_keeps_no_narrative_text(project, server):
    """vLLM-style 422 whose `input` is the whole user message: the echo is cut from `error`."""
    secret_text = "The decedent's sister Wilhelmina Q. Oyelaran-Fitzgerald reported the threats. " * 40
    store, batches = ingest(project, 5, **{"2_le": secret_text})
    server.configure(max_prompt_chars=2_000, echo_input=True)
    cfg = experiment(project, server.base_url)
    run(cfg, store, batches)
    rows = store.read_classifications("llm").set_index(["incident_id", "narrative_type"])
    error = rows.loc[("1002", "le"), "error"]
    assert rows.loc[("1002", "le"), "status"] == "rejected"
    assert error.startswith("HTTP 422: Value error, This model's maximum context length")
    assert "Oyelaran" not in error and "Wilhelmina" not in error
    for record in journal_records(cfg):
        assert "Oyelaran" not in json.dumps(record)


def test_max_input_chars_skips_over_long_narratives_before_sending(project, server):
    store, batches = ingest(project, 20, **{"3_cme": HUGE})
    cfg = experiment(project, server.base_url, run_extra="max_input_chars: 20000")
    assert cfg.config_hash == experiment(project, server.base_url).config_hash  # not hashed: see RunSpec
    cfg = experiment(project, server.base_url, run_extra="max_input_chars: 20000")
    logs: list[str] = []
    summary = run(cfg, store, batches, log=logs.append)
    rows = store.read_classifications("llm").set_index(["incident_id", "narrative_type"])
    big = rows.loc[("1003", "cme")]
    assert big["status"] == "rejected" and big["attempts"] == 0
    assert big["error"] == f"not sent: {len(HUGE)} characters > run.max_input_chars (20000)"
    assert summary.not_sent == 1 and any("1 not sent (longer than run.max_input_chars)" in line for line in logs)
    stats = server.stats()
    assert stats["chat_requests"] == 39 and narrative_key(HUGE) not in stats["by_text"]


def test_the_same_refusal_for_every_narrative_stops_the_run_and_leaves_no_rows(project, server):
    """A rejected parameter (400 for every request) is about the experiment: stop, name the fix."""
    store, batches = ingest(project, 40)
    server.configure(reject_param="response_format")
    cfg = experiment(project, server.base_url, mode="json_schema", concurrency=1)
    with pytest.raises(FatalError) as err:
        run(cfg, store, batches)
    message = str(err.value)
    assert server.base_url in message and "output.mode" in message and "run.max_input_chars" in message
    assert "refused the first 5 narratives" in message and "Unrecognized request argument" in message
    assert "\n" not in message
    asked = server.stats()["chat_requests"]
    assert asked == 5
    # Neither rows nor journalled refusals: fixing the server (same config) asks them again.
    assert store.read_classifications("llm").empty and answers_journalled(cfg) == 0
    server.configure(reject_param=None)
    run(cfg, store, batches)
    rows = store.read_classifications("llm")
    assert len(rows) == 80 and set(rows["status"]) == {"ok"}
    # The five refused requests count: those narratives show 2 attempts.
    assert sorted(rows["attempts"].value_counts().to_dict().items()) == [(1, 75), (2, 5)]


def test_refusals_before_the_first_answer_are_kept_once_answers_follow(project, server):
    marker = "Redacted-by-policy"
    special = {"0_cme": f"{marker} {NEGATIVE}", "0_le": f"{marker} {POSITIVE}", "1_cme": f"{marker} x."}
    store, batches = ingest(project, 10, **special)
    server.configure(reject_text=marker)
    cfg = experiment(project, server.base_url, concurrency=1)  # one at a time: the three come first
    summary = run(cfg, store, batches)
    rows = store.read_classifications("llm").set_index(["incident_id", "narrative_type"])
    refused = rows[rows["status"] == "rejected"]
    assert sorted(refused.index) == [("1000", "cme"), ("1000", "le"), ("1001", "cme")]
    assert refused["error"].str.startswith("HTTP 400 (content_filter): The prompt was filtered").all()
    assert summary.rejected == 3 and summary.calls_ok == 17 and len(rows) == 20


# ----------------------------------------------------------------------------- dead endpoints


@pytest.mark.reliability
def test_a_dead_endpoint_stops_within_a_minute_naming_it_and_keeps_what_completed(project, server, monkeypatch):
    """Connection refused from the first request on: default retries, a 3 s window.

    The default window is 30 s (asserted below); waiting it out here would add 27 s to the
    suite for no more coverage: the window is one parameter of the same code path.
    """
    assert requests_module.DEAD_ENDPOINT_AFTER_S == 30.0
    monkeypatch.setattr(requests_module, "DEAD_ENDPOINT_AFTER_S", 3.0)
    monkeypatch.setenv("NARR_TEST_KEY", SECRET)
    store, batches = ingest(project, 50)  # 100 narratives in 10 batches
    cfg = experiment(project, server.base_url, key_env="NARR_TEST_KEY")
    run(cfg, store, batches[:1])  # one batch answered and journalled while the server was up
    store.replace_partition("llm", batches[0], store.read_classifications("llm").iloc[0:0])
    server.stop()  # nothing listens on the port any more
    started = time.monotonic()
    with pytest.raises(FatalError) as err:
        run(cfg, store, batches)
    elapsed = time.monotonic() - started
    # The first request fails at once; the run stops one window later (DEAD_ENDPOINT_AFTER_S), not hours.
    assert 3.0 <= elapsed < 3.0 + 10
    message = str(err.value)
    assert f"endpoint {server.base_url}" in message and "connection error" in message
    assert "none was answered" in message and SECRET not in message and SECRET[:12] not in message
    # What completed is kept: the batch rebuilt from the journal is written.
    rows = store.read_classifications("llm")
    assert set(rows["batch_id"]) == {batches[0]} and len(rows) == 10
    # The attempts made are journalled, so the next run counts on from them.
    unanswered = [r for r in journal_records(cfg) if r["response"] is None]
    assert unanswered and all(r["attempt"] >= 1 for r in unanswered)


@pytest.mark.reliability
def test_a_hanging_endpoint_stops_too(project, server, monkeypatch):
    monkeypatch.setattr(requests_module, "DEAD_ENDPOINT_AFTER_S", 3.0)
    store, batches = ingest(project, 10)
    server.configure(hang=1.0, hang_s=60)
    cfg = experiment(project, server.base_url, timeout=1, concurrency=4)
    started = time.monotonic()
    with pytest.raises(FatalError, match=r"timed out after 1 s\) and none was answered"):
        run(cfg, store, batches)
    # First failure after the 1 s timeout, stop 3 s later; hung retries are not waited for.
    assert time.monotonic() - started < 1 + 3 + 3
    assert store.read_classifications("llm").empty


def test_an_endpoint_that_comes_up_within_the_window_is_waited_for(project, server):
    store, batches = ingest(project, 10)
    server.down(1.5)  # every request dropped for the first 1.5 s, then answered
    cfg = experiment(project, server.base_url, retries=10)
    summary = run(cfg, store, batches)
    assert summary.calls_ok == 20 and server.stats()["by_outcome"]["down"] > 0


@pytest.mark.reliability
def test_an_outage_after_answers_is_ridden_out_even_past_the_window(project, server, monkeypatch):
    monkeypatch.setattr(requests_module, "DEAD_ENDPOINT_AFTER_S", 0.5)  # far shorter than the outage
    store, batches = ingest(project, 20)
    server.configure(latency_s=0.02)
    cfg = experiment(project, server.base_url, concurrency=2, retries=12)

    thread = outage_after(server, 5, 2.0)
    summary = run(cfg, store, batches)
    thread.join()
    assert summary.calls_ok == 40 and server.stats()["by_outcome"]["down"] > 0


# ----------------------------------------------------------------------------- honest attempts


def test_attempts_are_the_requests_the_server_saw_for_each_narrative(project, server):
    store, batches = ingest(project, 10)
    server.configure(fail_first_n=2)  # every narrative: 500, 500, then an answer
    cfg = experiment(project, server.base_url)
    run(cfg, store, batches)
    rows = store.read_classifications("llm")
    assert set(rows["attempts"]) == {3}
    # Across runs: a run that gives up journals its count, the resume counts on from it.
    server.reset()
    server.configure(fail_first_n=4)
    v2 = experiment(project, server.base_url, version="v2", retries=1)
    with pytest.raises(ClassificationFailed):
        run(v2, store, batches)  # 2 attempts each, all failed
    v2 = experiment(project, server.base_url, version="v2", retries=6)
    run(v2, store, batches)  # 2 more failures, then the answer: 5 in all
    rows = store.read_classifications("llm")
    texts = store.read_narratives(batches).set_index(["incident_id", "narrative_type"])["narrative_text"]
    seen = server.stats()["by_text"]
    for row in rows.itertuples():
        assert row.attempts == 5 == seen[narrative_key(texts.loc[(row.incident_id, row.narrative_type)])]


# ----------------------------------------------------------------------------- secrets


def test_a_key_echoed_by_the_server_is_redacted_everywhere(project, server, monkeypatch):
    """401 and 400s whose messages repeat the bearer token: the key reaches no message or file."""
    monkeypatch.setenv("NARR_TEST_KEY", SECRET)
    store, batches = ingest(project, 10, **{"4_le": HUGE})
    server.configure(echo_key=True, max_prompt_chars=100_000)  # the right key: refusals echo it
    cfg = experiment(project, server.base_url, key_env="NARR_TEST_KEY")
    logs: list[str] = []
    run(cfg, store, batches, log=logs.append)
    error = store.read_classifications("llm").set_index(["incident_id", "narrative_type"]).loc[("1004", "le"), "error"]
    assert error.startswith("HTTP 400 (context_length_exceeded)") and "[redacted]" in error
    server.configure(api_key="another-key")  # now a 401 echoing ours
    v2 = experiment(project, server.base_url, key_env="NARR_TEST_KEY", version="v2")
    with pytest.raises(FatalError) as err:
        run(v2, store, batches, log=logs.append)
    assert "NARR_TEST_KEY" in str(err.value) and "Incorrect API key provided: Bearer [redacted]" in str(err.value)
    for text in (str(err.value), *logs):
        assert SECRET not in text and SECRET[3:20] not in text
    for file in project.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), f"API key found in {file}"
            assert SECRET[3:20].encode() not in file.read_bytes(), f"a piece of the API key found in {file}"


# ----------------------------------------------------------------------------- graceful stop

# The engine in a real process of its own, as `narr run` runs it: signals reach its main thread.
ENGINE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from narr_assets import settings
    from narr_assets.classify import RunInterrupted, classify_batches
    from narr_assets.experiments import load_experiment
    from narr_assets.store import Store

    cfg = load_experiment(sys.argv[1])
    store = Store(settings.db_path())
    batches = sorted(store.query_df("SELECT DISTINCT batch_id FROM narratives")["batch_id"])
    log = lambda line: print(line, file=sys.stderr, flush=True)
    try:
        classify_batches(cfg, store, batches, journal_dir=settings.journal_dir(),
                         locks_dir=settings.locks_dir(), log=log, progress_every_s=0.5)
    except RunInterrupted as exc:
        print(exc, flush=True)
        sys.exit(130)
    print("finished", flush=True)
    """
)


def start_engine(project: Path, cfg) -> subprocess.Popen[str]:
    script = project / "engine.py"
    script.write_text(ENGINE_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), cfg.source_file],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.mark.reliability
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_after_journalling_every_answer_in_flight(project, server, sig):
    store, batches = ingest(project, 100, batch_size=20)  # 200 narratives in 10 batches
    server.configure(latency_s=0.3)
    cfg = experiment(project, server.base_url, concurrency=8, timeout=10)
    proc = start_engine(project, cfg)
    wait_for(lambda: server.stats()["completions_ok"] >= 50)
    assert server.stats()["in_flight"] > 0  # the signal lands with requests in flight
    signalled = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    print(out, err[-1500:])  # shown with -s: the figures of the report
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - signalled < 0.3 + 3  # the requests in flight, then out
    stats = server.stats()
    assert stats["in_flight"] == 0 and 50 <= stats["completions_ok"] < 200
    assert stats["client_gone"] == 0  # no answer computed for a client that had hung up
    # Every answer the server sent is journalled; nothing was asked after the signal.
    assert answers_journalled(cfg) == stats["completions_ok"] == stats["chat_requests"]
    line = out.strip().splitlines()[-1]
    assert f"stopped ({sig.name})" in line and "journalled" in line and "narr run llm" in line
    assert f"stopping ({sig.name}): no new requests" in err and "Traceback" not in err
    # Written batches are complete; the rest are not written at all.
    rows = store.read_classifications("llm")
    written = set(rows["batch_id"])
    assert written and all((rows["batch_id"] == b).sum() == 20 for b in written)
    # The resume asks nothing twice.
    server.configure(latency_s=0.01)
    run(cfg, store, batches)
    stats = server.stats()
    assert stats["completions_ok"] == 200 and set(stats["ok_by_text"].values()) == {1}
    assert len(store.read_classifications("llm")) == 200


@pytest.mark.reliability
def test_a_second_signal_stops_at_once_and_still_writes_complete_batches(project, server):
    store, _ = ingest(project, 40, batch_size=10)
    server.configure(latency_s=0.05)
    cfg = experiment(project, server.base_url, concurrency=4, timeout=60)
    proc = start_engine(project, cfg)
    wait_for(lambda: server.stats()["completions_ok"] >= 25)
    server.configure(hang=1.0, hang_s=60)  # what is in flight now will not come back soon
    wait_for(lambda: server.stats()["by_outcome"]["hang"] >= 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # waiting for the hung requests (up to their 60 s timeout)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - signalled < 5
    assert "stopping at once (SIGINT)" in err
    assert answers_journalled(cfg) == server.stats()["completions_ok"]
    rows = store.read_classifications("llm")
    assert len(rows) >= 20 and all((rows["batch_id"] == b).sum() == 10 for b in set(rows["batch_id"]))


def test_stop_requests_from_two_sources_are_one_request_and_a_repeat_aborts():
    import asyncio

    from narr_assets.classify import StopControl

    async def go() -> None:
        lines: list[str] = []
        stop = StopControl(lines.append)
        # Dagster terminating a run it launched: CANCELING (polled) and a SIGINT - one request.
        stop.request("termination requested in Dagster", source="poll")
        stop.request("SIGINT")
        assert stop.stopping.is_set() and not stop.abort.is_set()
        assert stop.reason == "termination requested in Dagster" and len(lines) == 1
        stop.request("SIGINT")  # Ctrl-C again: now at once
        assert stop.abort.is_set() and "stopping at once (SIGINT)" in lines[-1]

    asyncio.run(go())


# ----------------------------------------------------------------------------- through Dagster

DAGSTER_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import dagster as dg
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    from narr_assets.definitions import build_definitions
    from narr_assets.defs.resources import NarrSettings

    source, data_dir, start, end = sys.argv[1:5]
    defs = build_definitions(settings=NarrSettings(source=source, data_dir=data_dir, batch_size=20))
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    with dg.DagsterInstance.get() as instance:
        keys = instance.get_dynamic_partitions("narrative_batches")  # batch ids -> versioned keys
        start, end = (next(k for k in keys if k.startswith(b + "-")) for b in (start, end))
        result = dg.materialize(
            [*assets, *defs.asset_checks], selection=[dg.AssetKey(["llm", "classifications"])],
            instance=instance, resources=defs.resources, raise_on_error=False,
            tags={"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end},
        )
    print("success" if result.success else "no success", flush=True)
    """
)


def dagster_ingest(project: Path, source: Path) -> None:
    import dagster as dg

    from narr_assets.definitions import build_definitions
    from narr_assets.defs.ingest import INGEST_KEYS
    from narr_assets.defs.resources import NarrSettings

    defs = build_definitions(settings=NarrSettings(source=str(source), data_dir=str(project), batch_size=20))
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    with dg.DagsterInstance.get() as instance:
        assert dg.materialize(
            [*assets, *defs.asset_checks], selection=INGEST_KEYS, instance=instance, resources=defs.resources
        ).success


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["ui_terminate", "run_worker_sigint"])
def test_terminating_a_dagster_run_stops_it_gracefully(project, server, how):
    """The two ways Dagster 1.13 terminates a run, on a run executing in its own process.

    `ui_terminate` is what the UI's Terminate button does (`run_coordinator.cancel_run`): for a
    run launched in-process (by `narr`) it can only mark the run CANCELING, which the asset polls.
    `run_worker_sigint` is what it does to a run it launched itself through a code server:
    CANCELING, then SIGINT to the run worker process.
    """
    import dagster as dg

    source = write_long_csv(project / "in.csv", 100)  # 200 narratives, 10 batches of 20
    dagster_ingest(project, source)
    server.configure(latency_s=0.3)
    cfg = experiment(project, server.base_url, concurrency=8, timeout=10)
    script = project / "dagster_run.py"
    script.write_text(DAGSTER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(source), str(project), "b00000", "b00009"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: server.stats()["completions_ok"] >= 50)
    with dg.DagsterInstance.get() as instance:
        (run_record,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        if how == "ui_terminate":
            assert instance.run_coordinator.cancel_run(run_record.run_id) is False  # no code server to reach
        else:
            instance.report_run_canceling(run_record)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "no success" in out, err[-3000:]
        run_after = instance.get_run_by_id(run_record.run_id)
        assert run_after is not None and run_after.status == dg.DagsterRunStatus.CANCELED
        messages = [e.user_message for e in instance.all_logs(run_record.run_id)]
    stopped = [m for m in messages if "llm: stopped (" in m and "journalled" in m]
    assert stopped, messages[-10:]
    stats = server.stats()
    assert stats["in_flight"] == 0 and stats["completions_ok"] < 200 and stats["client_gone"] == 0
    assert answers_journalled(cfg) == stats["completions_ok"] == stats["chat_requests"]
    store = Store(settings.db_path())
    rows = store.read_classifications("llm")
    assert all((rows["batch_id"] == b).sum() == 20 for b in set(rows["batch_id"]))
    # Resume (a new run over the same range): nothing is asked twice.
    server.configure(latency_s=0.01)
    proc = subprocess.run(
        [sys.executable, str(script), str(source), str(project), "b00000", "b00009"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "success" in proc.stdout and "no success" not in proc.stdout, proc.stderr[-3000:]
    stats = server.stats()
    assert stats["completions_ok"] == 200 and set(stats["ok_by_text"].values()) == {1}


def test_an_echoed_key_reaches_no_dagster_event_or_file(project, server, monkeypatch):
    """A 401 repeating the bearer token, materialised through `build_definitions`."""
    import dagster as dg

    from narr_assets.definitions import build_definitions
    from narr_assets.defs.ingest import INGEST_KEYS
    from narr_assets.defs.resources import NarrSettings

    monkeypatch.setenv("NARR_TEST_KEY", SECRET)
    source = write_long_csv(project / "in.csv", 10)
    server.configure(api_key="the-right-key", echo_key=True)
    experiment(project, server.base_url, key_env="NARR_TEST_KEY")
    defs = build_definitions(settings=NarrSettings(source=str(source), data_dir=str(project), batch_size=10))
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    with dg.instance_for_test() as instance:
        kwargs = {"instance": instance, "resources": defs.resources, "raise_on_error": False}
        assert dg.materialize([*assets, *defs.asset_checks], selection=INGEST_KEYS, **kwargs).success
        start, end = (partition_key_of(instance, b) for b in ("b00000", "b00001"))
        tags = {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}
        result = dg.materialize(
            [*assets, *defs.asset_checks], selection=[dg.AssetKey(["llm", "classifications"])], tags=tags, **kwargs
        )
        assert not result.success
        assert server.stats()["by_outcome"]["unauthorized"] >= 1  # the server did echo the key
        events = [e for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
        failure = [e for e in events if e.dagster_event is not None and e.dagster_event.is_step_failure]
        assert failure and "Incorrect API key provided: Bearer [redacted]" in repr(failure)
        for event in events:
            assert SECRET not in repr(event) and SECRET[3:20] not in repr(event)
        instance_root = Path(instance.root_directory)
        for folder in (instance_root, project):
            for file in folder.rglob("*"):
                if file.is_file():
                    assert SECRET[3:20].encode() not in file.read_bytes(), f"API key found in {file}"


@pytest.mark.slow
def test_narr_run_prints_no_echoed_key(project, server):
    """`narr run` against a server whose 401 repeats the bearer token: stdout, stderr, files."""
    source = write_long_csv(project / "in.csv", 10)
    server.configure(api_key="the-right-key", echo_key=True)
    experiment(project, server.base_url, key_env="NARR_TEST_KEY")
    env = {**os.environ, "NARR_SOURCE": str(source), "NARR_TEST_KEY": SECRET}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "narr"), "run", "llm"], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode != 0 and "HTTP 401" in proc.stderr and "[redacted]" in proc.stderr, proc.stderr[-3000:]
    assert server.stats()["by_outcome"]["unauthorized"] >= 1
    for text in (proc.stdout, proc.stderr):
        assert SECRET not in text and SECRET[3:20] not in text
    for file in project.rglob("*"):
        if file.is_file():
            assert SECRET[3:20].encode() not in file.read_bytes(), f"API key found in {file}"


@pytest.mark.slow
@pytest.mark.reliability
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_narr_run_interrupted_by_a_signal_pays_nothing_twice(project, server, signum):
    """The real `narr run` (Dagster in-process) with SIGINT mid-run, then the same command again.

    The engine's guarantees, and `narr`'s exit: one line, exit code 130, no traceback.
    """
    source = write_long_csv(project / "in.csv", 100)  # 200 narratives
    server.configure(latency_s=0.3)
    cfg = experiment(project, server.base_url, concurrency=8, timeout=10)
    env = {**os.environ, "NARR_SOURCE": str(source), "NARR_BATCH_SIZE": "20"}
    narr = str(Path(sys.executable).parent / "narr")
    subprocess.run([narr, "ingest"], env=env, capture_output=True, check=True, timeout=240)
    proc = subprocess.Popen([narr, "run", "llm"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: server.stats()["completions_ok"] >= 40, timeout=120)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    # One line saying what was kept, exit 130 (interrupted), no traceback.
    assert proc.returncode == 130 and f"llm: stopped ({signum.name})" in err, err[-3000:]
    assert "Traceback" not in err
    stats = server.stats()
    assert stats["completions_ok"] < 200 and stats["client_gone"] == 0
    assert answers_journalled(cfg) == stats["completions_ok"] == stats["chat_requests"]
    server.configure(latency_s=0.01)
    resumed = subprocess.run([narr, "run", "llm"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stats = server.stats()
    assert stats["completions_ok"] == 200 and set(stats["ok_by_text"].values()) == {1}
    assert len(Store(settings.db_path()).read_classifications("llm")) == 200
