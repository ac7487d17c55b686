"""Real-browser checks in headless Chromium: the HTML report renders, the Dagster UI shows the project.

Skipped only when no Chromium binary is found (`apt-get install chromium`; CI installs it).
The scripts under test are `python -m scripts.screenshot_report` and `python -m scripts.ui_screenshots`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE

BIN = Path(sys.executable).parent
SCRIPTS = ROOT / "scripts"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


shots = _load_script("screenshot_report")
CHROMIUM = shots.find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary found (set CHROMIUM or `apt-get install chromium`; CI installs it)"
)

# A page that passes every check: text and a 400x300 plot (about a tenth of the viewport).
GOOD_BODY = (
    "<h1>narr_assets report</h1><p>Leaderboard and plots.</p>"
    '<svg width="400" height="300" xmlns="http://www.w3.org/2000/svg">'
    '<rect width="400" height="300" fill="#4477aa"/></svg>'
)


def _env(project: Path, source: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARR_")}
    env.update(
        NARR_DB=str(project / "narr.duckdb"),
        NARR_DATA_DIR=str(project),
        NARR_SOURCE=str(source),
        DAGSTER_HOME=str(project / "dagster_home"),
    )
    return env


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # From the project root, so `python -m scripts.<name>` finds the scripts package.
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)


@pytest.mark.slow
def test_materialized_report_renders_in_chromium(tmp_path):
    env = _env(tmp_path, SAMPLE)
    built = _run([str(BIN / "narr"), "materialize"], env)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    report = tmp_path / "reports" / "report.html"
    out = tmp_path / "report.png"

    checked = _run([sys.executable, "-m", "scripts.screenshot_report", str(report), str(out)], timeout=90)

    assert checked.returncode == 0, checked.stderr
    plots = int(re.search(r"(\d+) plot\(s\)", checked.stdout).group(1))
    assert plots >= 1
    stats = shots.image_stats(out)
    assert not stats.blank
    # The whole page, not just the first screen: the report is far taller than 900 px.
    assert stats.width == 1280 and stats.height > 1500


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", None),
        ("<script>throw new Error('boom')</script>", "uncaught exception: Error: boom"),
        ("<script>console.error('plot data missing')</script>", "console.error: plot data missing"),
        ('<img src="missing.png">', "failed load: net::ERR_FILE_NOT_FOUND"),
        ('<img src="missing.png">', "request for an external resource"),
    ],
    ids=["clean", "uncaught", "console-error", "failed-load", "not-self-contained"],
)
def test_checker_reports_page_errors(tmp_path, extra, expected):
    page = tmp_path / "report.html"
    page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{GOOD_BODY}{extra}</body></html>")

    problems, facts = shots.check_report(page, tmp_path / "out.png", binary=CHROMIUM)

    if expected is None:
        assert problems == [] and facts["svgs"] == 1 and facts["title"] == "t"
    else:
        assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", "the screenshot looks blank"),
        (
            "<h1>x</h1>" + GOOD_BODY.replace('width="400" height="300" xmlns', 'width="0" height="0" xmlns'),
            "expected at least 1 rendered <svg> plot(s), found 0 (of 1 <svg> elements)",
        ),
    ],
    ids=["blank", "zero-size-plot"],
)
def test_script_fails_on_blank_page_or_missing_plot(tmp_path, body, expected):
    page = tmp_path / "report.html"
    page.write_text(f"<!DOCTYPE html><html><body>{body}</body></html>")

    checked = _run(
        [sys.executable, "-m", "scripts.screenshot_report", str(page), str(tmp_path / "out.png")], timeout=60
    )

    assert checked.returncode == 1
    assert expected in checked.stderr


def test_script_fails_on_missing_report(tmp_path):
    checked = _run(
        [sys.executable, "-m", "scripts.screenshot_report", str(tmp_path / "nope.html"), str(tmp_path / "out.png")],
        timeout=60,
    )
    assert checked.returncode == 1 and "no such file" in checked.stderr


@pytest.mark.slow
def test_ui_screenshots_show_graph_and_partitions(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARR_")}
    out = tmp_path / "shots"

    done = _run([sys.executable, "-m", "scripts.ui_screenshots", str(out)], env, timeout=170)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in ("asset_graph.png", "classifications_partitions.png", "asset_catalog.png"):
        stats = shots.image_stats(out / name)
        assert (stats.width, stats.height) == (1440, 900)
        assert not stats.blank, (name, stats)
