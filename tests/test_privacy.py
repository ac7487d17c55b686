"""Restricted data stays private: owner-only files and folders, group sharing on request, bounded report copies."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import dagster as dg
import pytest
from conftest import materialize as materialize_assets
from conftest import write_experiment, write_long_csv

from narr_assets import private, settings
from narr_assets.classify.locks import partition_locks
from narr_assets.definitions import build_definitions
from narr_assets.defs.ingest import INGEST_KEYS
from narr_assets.defs.resources import NarrSettings
from narr_assets.journal import Journal
from narr_assets.report import REPORT_COPIES, prune_report_copies
from narr_assets.store import Store

warnings.filterwarnings("ignore", category=dg.BetaWarning)


@pytest.fixture
def loose_umask():
    """The common 022 umask, so owner-only modes come from the code and not from the machine."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def data_folder(project, monkeypatch, loose_umask):
    """A data folder (database, journal, locks, reports, exports) that narr itself creates."""
    data = project / "data"
    monkeypatch.setenv("NARR_DATA_DIR", str(data))
    monkeypatch.setenv("NARR_DB", str(data / "narr.duckdb"))
    return data


def modes(folder: Path) -> dict[str, str]:
    """Relative path -> octal mode of `folder` and everything under it."""
    out = {".": oct(stat.S_IMODE(folder.stat().st_mode))}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            out[str(path.relative_to(folder))] = oct(stat.S_IMODE(path.stat().st_mode))
    return out


def materialize(defs, instance, keys, partition_range=None):
    result = materialize_assets(defs, instance, keys, partition_range)
    assert result.success
    return result


def run_whole_graph(project: Path, data: Path, server) -> None:
    """Ingest, the `rules` and an LLM experiment over every batch, metrics, leaderboard, report, exports."""
    source = write_long_csv(project / "input.csv", 30, placeholders=2)
    write_experiment(project / "experiments", "llm", server.base_url)
    defs = build_definitions(settings=NarrSettings(source=str(source), data_dir=str(data), batch_size=20))
    with dg.instance_for_test() as instance:
        materialize(defs, instance, INGEST_KEYS)
        for name in ("rules", "llm"):
            materialize(defs, instance, [dg.AssetKey([name, "classifications"])], ("b00000", "b00002"))
        keys = [dg.AssetKey([n, "metrics"]) for n in ("rules", "llm")]
        materialize(defs, instance, [*keys, dg.AssetKey("leaderboard"), dg.AssetKey("report"), dg.AssetKey("exports")])


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("share", "file_mode", "dir_mode"), [(None, "0o600", "0o700"), ("1", "0o640", "0o750")], ids=["private", "group"]
)
def test_every_file_and_folder_of_a_materialised_data_folder_is_restricted(
    project, data_folder, server, monkeypatch, share, file_mode, dir_mode
):
    if share:
        monkeypatch.setenv("NARR_SHARE_GROUP", share)
    run_whole_graph(project, data_folder, server)
    found = modes(data_folder)
    # Everything that holds or names narratives is there (else the walk would prove little).
    for expected in ("narr.duckdb", "journal", "locks", "reports/report.html", "exports/llm.csv", "exports/rules.csv"):
        assert expected in found, f"{expected} not written; found {sorted(found)}"
    assert any(p.endswith(".jsonl") for p in found) and any(p.endswith(".lock") for p in found)
    folders = {p for p in found if (data_folder / p).is_dir()}
    wrong = {p: m for p, m in found.items() if m != (dir_mode if p in folders else file_mode)}
    assert wrong == {}


@pytest.mark.reliability
def test_report_copies_are_bounded(project, data_folder):
    defs = build_definitions(
        settings=NarrSettings(source=str(write_long_csv(project / "input.csv", 5)), data_dir=str(data_folder))
    )
    run_ids = []
    with dg.instance_for_test() as instance:
        materialize(defs, instance, INGEST_KEYS)
        materialize(defs, instance, [dg.AssetKey(["rules", "classifications"])], ("b00000", "b00000"))
        materialize(defs, instance, [dg.AssetKey(["rules", "metrics"]), dg.AssetKey("leaderboard")])
        for _ in range(REPORT_COPIES + 2):
            run_ids.append(materialize(defs, instance, [dg.AssetKey("report")]).run_id[:8])
    kept = sorted(p.name for p in (data_folder / "reports").iterdir())
    assert REPORT_COPIES == 5
    assert kept == sorted(["report.html", *(f"report-{r}.html" for r in run_ids[-REPORT_COPIES:])])
    newest = (data_folder / "reports" / f"report-{run_ids[-1]}.html").read_bytes()
    assert (data_folder / "reports" / "report.html").read_bytes() == newest


def loosen(path: Path, mode: int) -> Path:
    path.chmod(mode)
    return path


def test_existing_loose_files_are_tightened_when_next_written(tmp_path, loose_umask):
    report = tmp_path / "reports" / "report.html"
    report.parent.mkdir()
    loosen(report.parent, 0o755)
    report.write_text("old")
    loosen(report, 0o644)
    private.write_private_bytes(report, b"new", tighten_parent=True)
    assert (report.read_bytes(), oct(report.stat().st_mode & 0o777)) == (b"new", "0o600")
    assert oct(report.parent.stat().st_mode & 0o777) == "0o700"

    db = tmp_path / "narr.duckdb"
    Store(db).query_rows("SELECT 1")
    loosen(db, 0o644)
    Store(db).query_rows("SELECT 1")  # a new Store sets the schema up again, and the mode
    assert oct(db.stat().st_mode & 0o777) == "0o600"

    locks = tmp_path / "locks"
    (locks / "exp").mkdir(parents=True)
    lock = locks / "exp" / "b00000.lock"
    lock.touch()
    loosen(lock, 0o644)
    loosen(locks / "exp", 0o755)
    with partition_locks(locks, "exp", ["b00000"]):
        pass
    assert oct(lock.stat().st_mode & 0o777) == "0o600"
    assert oct((locks / "exp").stat().st_mode & 0o777) == "0o700"


def test_journal_folders_created_owner_only(tmp_path, loose_umask):
    with Journal.for_experiment(tmp_path / "journal", "exp", "abc123") as journal:
        journal.append({"key": ["1", "cme"], "text_hash": "h", "response": {}})
    assert set(modes(tmp_path / "journal").values()) <= {"0o700", "0o600"}
    assert len(modes(tmp_path / "journal")) == 4  # journal/, exp/, abc123/, one segment


def test_a_folder_the_user_named_is_left_alone(tmp_path, loose_umask):
    shared = tmp_path / "shared"
    shared.mkdir()
    loosen(shared, 0o755)
    out = private.write_private_bytes(shared / "copy.html", b"x")
    assert oct(shared.stat().st_mode & 0o777) == "0o755"  # the user's folder: not ours to change
    assert oct(out.stat().st_mode & 0o777) == "0o600"  # the file: restricted all the same
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    loosen(sticky, 0o1777)
    private.private_dir(sticky)  # a /tmp-like folder is never tightened, even when asked
    assert oct(sticky.stat().st_mode & 0o7777) == "0o1777"
    assert [p.name for p in shared.iterdir()] == ["copy.html"]  # no temporary file left behind


@pytest.mark.parametrize(("value", "shared"), [("", False), ("0", False), ("1", True), ("yes", True)])
def test_share_group_setting(monkeypatch, value, shared):
    monkeypatch.setenv("NARR_SHARE_GROUP", value)
    assert settings.share_group() is shared
    assert (private.file_mode(), private.dir_mode()) == ((0o640, 0o750) if shared else (0o600, 0o700))


def test_share_group_setting_refuses_other_values(monkeypatch):
    monkeypatch.setenv("NARR_SHARE_GROUP", "group")
    with pytest.raises(ValueError, match="NARR_SHARE_GROUP must be 1 or 0, got 'group'"):
        private.file_mode()


def test_pruning_keeps_the_copy_just_written_when_timestamps_tie(tmp_path):
    copies = [tmp_path / f"report-{name}.html" for name in ("aaaa", "bbbb", "cccc")]
    for path in copies:
        path.write_text("r")
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a file system with coarse timestamps
    (tmp_path / "report.html").write_text("latest")
    deleted = prune_report_copies(tmp_path, keep=1, current=copies[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-aaaa.html", "report.html"]
    assert sorted(deleted) == copies[1:]
