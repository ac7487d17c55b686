"""Screenshots of the Dagster UI on a demo project: the asset graph and a partially run experiment.

Usage::

    python -m scripts.ui_screenshots OUTDIR [--experiment llm_indicators] [--batch-size 20] [--palette]

What it does, in a temporary project (never the repository's ``data/`` or ``.dagster_home/``):

1. ``narr materialize`` on the sample (``$NARR_SOURCE``, default ``data/sample_labelled.xlsx``):
   ingestion, the offline ``rules`` experiment, leaderboard and report;
2. starts the project's fault-injecting test server and points the LLM experiments at it through
   ``NARR_BASE_URL`` (the repository's experiment files read their endpoint from it), then runs
   ``narr run EXPERIMENT --partitions b00000,b00001`` (the first two batches: materialised) and,
   with the server demanding an API key the experiment does not send, ``--partitions b00003``
   (the fourth batch: fails at once with HTTP 401, a *failed* partition). The rest stay *missing*;
3. starts ``dagster-webserver -m narr_assets.definitions`` on a free 127.0.0.1 port with the
   same environment, waits for ``/server_info``, and drives headless Chromium (see
   ``scripts.screenshot_report``) to ``/asset-groups`` (the global asset graph) and
   ``/assets/EXPERIMENT/classifications?view=partitions`` (partition b00000 selected, so its
   metadata shows) and ``/assets``, waiting until each page shows what it should before
   taking the shot;
4. stops the webserver and the test server, checks the PNGs are not blank and prints their paths.

Writes ``OUTDIR/asset_graph.png``, ``OUTDIR/classifications_partitions.png`` and
``OUTDIR/asset_catalog.png`` (the catalog lists every asset with its partition counts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scripts.screenshot_report import BrowserError, Chromium, find_chromium, image_stats, to_palette

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The API key the test server demands for the failing run; the experiment sends none.
DEMO_KEY = "ui-screenshots-demo-key"
# No proxy for loopback calls, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ScreenshotError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


@dataclass(frozen=True)
class PartitionPlan:
    """Which batches of the demo experiment end up in which state.

    Attributes:
        keys: Every batch key, in order.
        done: Materialised (the first two).
        failed: Failed in Dagster (the fourth; the third stays missing between them).
    """

    keys: tuple[str, ...]
    done: tuple[str, ...]
    failed: tuple[str, ...]

    @classmethod
    def from_keys(cls, keys: list[str]) -> PartitionPlan:
        if len(keys) < 4:
            raise ScreenshotError(
                f"the sample makes {len(keys)} batch(es); the demo needs at least 4 (lower --batch-size)"
            )
        return cls(keys=tuple(keys), done=tuple(keys[:2]), failed=(keys[3],))


def _tool(name: str) -> str:
    """A console script of this virtual environment, else from PATH."""
    candidate = BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise ScreenshotError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _narr(env: Mapping[str, str], log: Path, *args: str, expect_failure: str | None = None) -> float:
    """Run `narr ARGS`, appending its output to `log`; returns the seconds it took.

    Args:
        env: Its environment.
        log: File collecting the output.
        *args: Command-line arguments.
        expect_failure: If given, the command must fail and print this text.
    """
    started = time.monotonic()
    proc = subprocess.run(
        [_tool("narr"), *args],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    with open(log, "a") as out:
        out.write(f"\n$ narr {' '.join(args)}\n{proc.stdout}")
    if expect_failure is None and proc.returncode != 0:
        raise ScreenshotError(f"narr {' '.join(args)} exited with {proc.returncode}; see {log}")
    if expect_failure is not None and (proc.returncode == 0 or expect_failure not in proc.stdout):
        raise ScreenshotError(
            f"narr {' '.join(args)} should have failed with {expect_failure!r} (exit code {proc.returncode}); see {log}"
        )
    return time.monotonic() - started


def batch_keys(db: Path) -> list[str]:
    """The partition keys of the demo database's batches (`b00000-<content version>`, ...), in batch order."""
    from narr_assets.status import partition_keys
    from narr_assets.store import Store

    return [key for _, key in sorted(partition_keys(Store(db)).items())]


def prepare_project(
    project: Path, env: dict[str, str], experiment: str, log: Path
) -> tuple[PartitionPlan, dict[str, float]]:
    """Materialise the sample and run `experiment` partially against the test server.

    Args:
        project: Empty folder for the database, journal and Dagster instance.
        env: Environment for the children; ``NARR_BASE_URL`` is added to it.
        experiment: The LLM experiment to run partially.
        log: File collecting the children's output.

    Returns:
        The partition plan carried out, and seconds per step.
    """
    from narr_assets.testing.server import serve_in_subprocess

    timings = {"materialize": _narr(env, log, "materialize")}
    plan = PartitionPlan.from_keys(batch_keys(Path(env["NARR_DB"])))
    with serve_in_subprocess() as server:
        env["NARR_BASE_URL"] = server.base_url
        check_endpoint(env, experiment, server.base_url)
        timings["run_done"] = _narr(env, log, "run", experiment, "--partitions", ",".join(plan.done))
        server.configure(api_key=DEMO_KEY)
        timings["run_failed"] = _narr(
            env, log, "run", experiment, "--partitions", ",".join(plan.failed), "--no-metrics", expect_failure="401"
        )
    return plan, timings


def check_endpoint(env: Mapping[str, str], experiment: str, base_url: str) -> None:
    """Fail early unless `experiment` is an LLM experiment that takes its endpoint from NARR_BASE_URL."""
    code = (
        "import json, sys\nfrom narr_assets.experiments import load_experiments\n"
        "by_name = {c.name: c for c in load_experiments()}\n"
        "cfg = by_name.get(sys.argv[1])\n"
        "print(json.dumps(None if cfg is None else "
        "[cfg.backend, cfg.model.base_url if cfg.backend == 'openai' else None]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, experiment], env=dict(env), capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise ScreenshotError(f"cannot load the experiment files in {env['NARR_EXPERIMENTS']}:\n{proc.stderr[-2000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if found is None:
        raise ScreenshotError(f"no experiment {experiment!r} in {env['NARR_EXPERIMENTS']}")
    if found[0] != "openai" or found[1] != base_url:
        raise ScreenshotError(
            f"experiment {experiment!r} must be an openai experiment whose model.base_url is "
            f"${{NARR_BASE_URL:-...}}; it has backend {found[0]}, base_url {found[1]}"
        )


@contextmanager
def webserver(env: Mapping[str, str], log: Path, *, timeout_s: float = 90.0) -> Iterator[str]:
    """Run dagster-webserver on a free loopback port until the block ends.

    Args:
        env: Its environment (``DAGSTER_HOME`` and the ``NARR_*`` settings).
        log: File collecting its output.
        timeout_s: How long to wait for ``/server_info``.

    Yields:
        The base URL, e.g. ``http://127.0.0.1:PORT``.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "a") as out:
        # Own session: stopping it stops the code server it spawns too, and nothing else.
        proc = subprocess.Popen(
            [_tool("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "narr_assets.definitions"],
            env=dict(env),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ScreenshotError(f"dagster-webserver exited with {proc.returncode}; see {log}")
            try:
                with _OPENER.open(f"{url}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ScreenshotError(
                    f"dagster-webserver did not answer /server_info within {timeout_s:.0f} s; see {log}"
                )
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _page_has(*texts: str) -> str:
    """A JavaScript test that the page's visible text contains every one of ``texts``."""
    return " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)


# Cosmetics only (more room for the graph); skipped silently if a Dagster release renames them.
_COLLAPSE_NAV = "localStorage.setItem('dagster-nav-collapsed', 'true')"
_HIDE_GRAPH_SIDEBAR = (
    "(() => { const icon = document.querySelector("
    "'button:not([class*=MainNavigation]) [aria-label=\"panel_show_right\"]');"
    " if (icon) icon.closest('button').click(); return !!icon; })()"
)
# Dagster draws big graphs with each group collapsed into a box; Alt+E expands them all.
_COLLAPSED_GROUPS = "document.querySelector('[class*=CollapsedGroupNode]') !== null"
# Until its status arrives an asset node is drawn in the neutral "loading" colours.
_STATUSES_LOADED = (
    "Array.from(document.querySelectorAll('[class*=minimalAssetNodeBox][class*=materializable]'))"
    ".every(n => !(n.getAttribute('style') || '').includes('--color-background-light'))"
)


def _settle(browser: Chromium) -> None:
    # The UI fetches statuses after the first paint and animates the graph's zoom-to-fit.
    browser.wait_network_idle(idle_s=1.0, timeout_s=15)
    time.sleep(1.0)


def take_screenshots(
    base_url: str,
    outdir: Path,
    experiment: str,
    plan: PartitionPlan,
    *,
    binary: str,
    palette: bool,
    timeout_s: float = 45.0,
) -> tuple[list[Path], list[str]]:
    """Open the asset graph, the experiment's partitions page and the catalog; save a PNG of each.

    Each page is shot only once its text shows the data it is about (asset names, partition
    keys, the selected partition's metadata) and the network has gone quiet.

    Args:
        base_url: The webserver's URL.
        outdir: Folder for the PNGs.
        experiment: Experiment whose classifications partitions are shown.
        plan: The partition states to expect on its partitions page.
        binary: Chromium executable.
        palette: Save 256-colour PNGs (a third of the size; for the docs).
        timeout_s: Time limit for each page to show its data.

    Returns:
        ``(pngs, browser_problems)``; problems are console errors and failed loads the UI
        reported (informative: the UI's own errors are not this project's to fix).
    """
    with Chromium(binary, width=1440, height=900, timeout_s=timeout_s) as browser:
        browser.navigate(f"{base_url}/server_info")
        browser.evaluate(_COLLAPSE_NAV)
        pngs = [
            _shoot_asset_graph(browser, base_url, outdir, timeout_s),
            _shoot_partitions(browser, base_url, outdir, experiment, plan, timeout_s),
            _shoot_catalog(browser, base_url, outdir, experiment, timeout_s),
        ]
        problems = browser.problems()
    if palette:
        for png in pngs:
            to_palette(png)
    return pngs, problems


def _shoot_asset_graph(browser: Chromium, base_url: str, outdir: Path, timeout_s: float) -> Path:
    """``/asset-groups`` with every group expanded and every node's status loaded."""
    browser.navigate(f"{base_url}/asset-groups", timeout_s=timeout_s)
    graph_drawn = f"({_page_has('narrative_batches')}) || {_COLLAPSED_GROUPS}"
    browser.wait_for(graph_drawn, timeout_s=timeout_s, what="the asset graph on /asset-groups")
    if browser.evaluate(_COLLAPSED_GROUPS):
        browser.press("e", alt=True)
        browser.wait_for(
            "location.search.includes('expanded')",
            timeout_s=timeout_s,
            what="Alt+E to expand the asset groups on /asset-groups",
        )
        # Reload the expanded view: statuses of nodes inside groups expanded after the
        # first load only arrive with the UI's next refresh, a minute later.
        browser.navigate(browser.evaluate("location.href"), timeout_s=timeout_s)
    browser.wait_for(
        f"{_page_has('narrative_batches', 'leaderboard')} && !({_COLLAPSED_GROUPS}) && {_STATUSES_LOADED}",
        timeout_s=timeout_s,
        what="the expanded asset graph with statuses on /asset-groups",
    )
    browser.evaluate(_HIDE_GRAPH_SIDEBAR)
    _settle(browser)
    return browser.screenshot(outdir / "asset_graph.png")


def _shoot_partitions(
    browser: Chromium, base_url: str, outdir: Path, experiment: str, plan: PartitionPlan, timeout_s: float
) -> Path:
    """The experiment's classifications partitions page, its first materialised partition selected."""
    first = plan.done[0]
    path = f"/assets/{experiment}/classifications?view=partitions&partition={first}"
    browser.navigate(base_url + path, timeout_s=timeout_s)
    # The counts prove the UI sees the states made above; config_hash is metadata of the
    # selected partition, so its panel has loaded too.
    missing = len(plan.keys) - len(plan.done) - len(plan.failed)
    counts = (f"Materialized ({len(plan.done)})", f"Failed ({len(plan.failed)})", f"Missing ({missing})")
    browser.wait_for(
        _page_has(*plan.done, *plan.failed, *counts, "config_hash"),
        timeout_s=timeout_s,
        what=f"partition keys, {', '.join(counts)} and {first}'s metadata on {path}",
    )
    _settle(browser)
    return browser.screenshot(outdir / "classifications_partitions.png")


def _shoot_catalog(browser: Chromium, base_url: str, outdir: Path, experiment: str, timeout_s: float) -> Path:
    """The asset catalog, ``/assets``."""
    browser.navigate(f"{base_url}/assets", timeout_s=timeout_s)
    browser.wait_for(
        _page_has(f"{experiment} / classifications", "narrative_batches", "leaderboard"),
        timeout_s=timeout_s,
        what="the asset catalog on /assets",
    )
    _settle(browser)
    return browser.screenshot(outdir / "asset_catalog.png")


def run(outdir: Path, *, experiment: str, batch_size: int, palette: bool, keep: Path | None) -> int:
    """Build the demo project, take the screenshots and report; the command-line entry point.

    Args:
        outdir: Folder for the PNGs (created).
        experiment: LLM experiment to run partially.
        batch_size: ``NARR_BATCH_SIZE`` of the demo project.
        palette: Save 256-colour PNGs.
        keep: Build the project in this (empty) folder and keep it, instead of a temporary one.

    Returns:
        Exit status: 0 on success, 1 on a failed step or a blank screenshot, 2 without Chromium.
    """
    binary = find_chromium()
    if binary is None:
        print("ui_screenshots: no Chromium found (set CHROMIUM or `apt-get install chromium`)", file=sys.stderr)
        return 2
    source = Path(os.environ.get("NARR_SOURCE") or ROOT / "data" / "sample_labelled.xlsx")
    if not source.is_file():
        print(f"ui_screenshots: source file not found: {source} (set NARR_SOURCE)", file=sys.stderr)
        return 1
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="narr-ui-") as tmp:
        project = keep or Path(tmp)
        project.mkdir(parents=True, exist_ok=True)
        log = project / "ui_screenshots.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NARR_")}
        env.update(
            NARR_SOURCE=str(source),
            NARR_DB=str(project / "narr.duckdb"),
            NARR_DATA_DIR=str(project),
            NARR_EXPERIMENTS=os.environ.get("NARR_EXPERIMENTS") or str(ROOT / "configs" / "experiments"),
            NARR_BATCH_SIZE=str(batch_size),
            DAGSTER_HOME=str(project / "dagster_home"),
        )
        home = project / "dagster_home"
        home.mkdir(exist_ok=True)
        # Written before `narr` creates a default one: no telemetry (as `narr` does) and no
        # "join the community" dialog over the screenshots (Dagster shows it on localhost).
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
        try:
            plan, timings = prepare_project(project, env, experiment, log)
            ws_started = time.monotonic()
            with webserver(env, log) as url:
                timings["webserver_start"] = time.monotonic() - ws_started
                shots_started = time.monotonic()
                pngs, problems = take_screenshots(url, outdir, experiment, plan, binary=binary, palette=palette)
                timings["screenshots"] = time.monotonic() - shots_started
        except (ScreenshotError, BrowserError, subprocess.SubprocessError) as exc:
            message = str(exc)
            if keep is None and log.exists():
                # The project folder is about to be deleted; keep the children's output.
                shutil.copy(log, outdir / "ui_screenshots.log")
                message += f" (the log of narr and dagster-webserver is in {outdir / 'ui_screenshots.log'})"
            print(f"ui_screenshots: {message}", file=sys.stderr)
            return 1
    blank = []
    for png in pngs:
        stats = image_stats(png)
        print(
            f"ui_screenshots: wrote {png} ({stats.width}x{stats.height}, {png.stat().st_size / 1024:.0f} KB, "
            f"{stats.ink_share:.1%} non-white, std {stats.std:.1f})"
        )
        if stats.blank:
            blank.append(png.name)
    for problem in problems:
        print(f"ui_screenshots: browser reported: {problem}", file=sys.stderr)
    print(
        "ui_screenshots: timings "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + f", total {time.monotonic() - started:.1f} s"
    )
    if blank:
        print(f"ui_screenshots: blank screenshot(s): {', '.join(blank)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="folder for the PNG files")
    parser.add_argument(
        "--experiment", default="llm_indicators", help="LLM experiment to run partially (default llm_indicators)"
    )
    parser.add_argument("--batch-size", type=int, default=20, help="NARR_BATCH_SIZE of the demo project (default 20)")
    parser.add_argument("--palette", action="store_true", help="save 256-colour PNGs (smaller; for docs/screenshots)")
    parser.add_argument(
        "--keep", type=Path, help="build the demo project in this empty folder and keep it (for debugging)"
    )
    args = parser.parse_args(argv)
    return run(
        args.outdir, experiment=args.experiment, batch_size=args.batch_size, palette=args.palette, keep=args.keep
    )


if __name__ == "__main__":
    sys.exit(main())
