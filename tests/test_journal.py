"""The journal: durable appends, latest-wins, torn tails skipped, per-process segments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from narr_assets.journal import Journal, JournalStats, answer_record


def record(iid: str, attempt: int = 1, at: float = 1.0, content: str = "{}") -> dict:
    return answer_record((iid, "cme", "h" + iid), "c", attempt, at, {"content": content})


def test_record_format_on_disk(tmp_path):
    """The line format existing journals hold: a change here must still read old segments."""
    with Journal(tmp_path / "j") as journal:
        journal.append(record("7", attempt=3, at=5.5, content="x"))
    line = next((tmp_path / "j").glob("*.jsonl")).read_text()
    assert json.loads(line) == {
        "key": ["7", "cme"],
        "text_hash": "h7",
        "config_hash": "c",
        "attempt": 3,
        "at": 5.5,
        "response": {"content": "x"},
    }
    assert Journal(tmp_path / "j").latest() == {("7", "cme", "h7"): json.loads(line)}


def test_append_then_latest_wins(tmp_path):
    with Journal(tmp_path / "j") as journal:
        journal.append(record("1", attempt=1, at=1.0, content="old"))
        journal.append(record("1", attempt=2, at=2.0, content="new"))
        journal.append(record("2"))
    latest = Journal(tmp_path / "j").latest()
    assert latest[("1", "cme", "h1")]["response"]["content"] == "new"
    assert set(latest) == {("1", "cme", "h1"), ("2", "cme", "h2")}


def test_torn_and_corrupt_lines_are_counted_and_skipped(tmp_path):
    with Journal(tmp_path / "j") as journal:
        journal.append(record("1"))
    segment = next((tmp_path / "j").glob("*.jsonl"))
    with open(segment, "ab") as fh:
        fh.write(b"not json at all\n")
        fh.write(json.dumps(record("3")).encode()[:25])  # torn final write, no newline
    stats = JournalStats()
    latest = Journal(tmp_path / "j").latest(stats)
    assert set(latest) == {("1", "cme", "h1")}
    assert stats.corrupt_lines == 2 and stats.records == 1


def test_each_writer_has_its_own_segment_and_readers_merge(tmp_path):
    a, b = Journal(tmp_path / "j"), Journal(tmp_path / "j")
    a.append(record("1"))
    b.append(record("2"))
    a.close(), b.close()
    assert len(list((tmp_path / "j").glob("*.jsonl"))) == 2
    assert len(Journal(tmp_path / "j").latest()) == 2


def test_record_survives_sigkill_right_after_append(tmp_path):
    """`append` returning means the line is in the kernel: kill -9 cannot lose it."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from narr_assets.journal import Journal
        j = Journal({str(tmp_path / "j")!r}, fsync_interval_s=3600)
        j.append({record("9")!r})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ})
    assert proc.returncode == -9
    assert ("9", "cme", "h9") in Journal(tmp_path / "j").latest()


def test_missing_directory_reads_empty(tmp_path):
    assert Journal(tmp_path / "nothing").latest() == {}
