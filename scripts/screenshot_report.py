"""Open the HTML report in headless Chromium, save a screenshot and check that it rendered.

Usage::

    python -m scripts.screenshot_report data/reports/report.html report.png \
        [--width 1280] [--max-height 6000] [--palette]

Checks (exit status 1 with a message naming each failure):

* the page loaded (a missing file is a navigation error, not a blank screenshot);
* no uncaught JavaScript exception, no ``console.error``, no failed resource load, and no
  request for anything but the report itself (the report promises to be self-contained);
* at least one ``<svg>`` plot is in the rendered DOM with a non-zero size;
* the screenshot is not blank: enough non-white pixels and enough pixel variance.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the
browser reads commands on file descriptor 3 and writes replies on 4), with the standard library
only - no Selenium, no driver, no websocket client, no port to pick. Plain
``chromium --headless --screenshot`` cannot do the checks: with ``--enable-logging`` it prints
every console message at INFO level (``console.error`` looks like ``console.log``) and it
reports no failed resource loads at all. ``scripts.ui_screenshots`` reuses :class:`Chromium`
to wait for the Dagster UI (a React app) to render before taking its screenshots.

Chromium is found as ``$CHROMIUM`` or ``chromium`` / ``chromium-browser`` on ``PATH``
(Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

# Flags for a quiet, offline, throw-away browser. --no-sandbox: containers and CI runners
# usually lack the user namespaces Chromium's sandbox needs; the pages we open are our own.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
CHROMIUM_NAMES: tuple[str, ...] = ("chromium", "chromium-browser")
# A pixel counts as "ink" when any channel is darker than this (pure white is 255).
INK_THRESHOLD = 245
# Minimums for a page that shows something; a blank page scores 0 on both.
MIN_INK_SHARE = 0.01
MIN_STD = 8.0


class BrowserError(RuntimeError):
    """Chromium failed to start, answered a command with an error or timed out."""


def find_chromium() -> str | None:
    """Locate a Chromium binary.

    Returns:
        ``$CHROMIUM`` if set, else the first of ``chromium`` / ``chromium-browser`` on ``PATH``,
        else None.
    """
    override = os.environ.get("CHROMIUM")
    if override:
        return shutil.which(override) or (override if os.access(override, os.X_OK) else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol on a pipe.

    Use as a context manager; :meth:`close` ends the browser process it started.

    Args:
        binary: Path of the Chromium executable (see :func:`find_chromium`).
        width: Viewport width in CSS pixels.
        height: Viewport height in CSS pixels.
        timeout_s: Default time limit for one protocol command.
    """

    def __init__(self, binary: str, *, width: int = 1280, height: int = 900, timeout_s: float = 30.0) -> None:
        self.binary = binary
        self.width = width
        self.height = height
        self.timeout_s = timeout_s
        self.events: list[dict[str, Any]] = []
        self._profile = tempfile.TemporaryDirectory(prefix="narr-chromium-")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the browser: closed in close())
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        self._session: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._to_browser: int | None = None
        # Index into self.events where the current page's navigation began.
        self._page_start = 0

    def __enter__(self) -> Chromium:
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Launch the browser and open one page with the configured viewport."""
        cmd_read, cmd_write = os.pipe()
        out_read, out_write = os.pipe()

        def wire_pipe_fds() -> None:
            # The protocol pipe must be exactly fds 3 and 4 in the child; park both ends above
            # 10 first so neither dup2 can overwrite the other when os.pipe() returned 3 or 4.
            high_in = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
            high_out = fcntl.fcntl(out_write, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        # pass_fds=(3, 4) requires fds 3 and 4 to exist here in the parent: they do, since the
        # four pipe ends above took the lowest free numbers.
        args = [
            self.binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile.name}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                pass_fds=(3, 4),
                preexec_fn=wire_pipe_fds,
            )
        except BaseException:
            os.close(cmd_write)
            os.close(out_read)
            raise
        finally:
            os.close(cmd_read)
            os.close(out_write)
        self._to_browser = cmd_write
        threading.Thread(target=self._read_loop, args=(out_read,), daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.set_viewport(self.width, self.height)

    def _read_loop(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    self._replies.put(json.loads(raw))
        self._replies.put(None)  # the browser closed its end: wake any waiter

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").splitlines()
        # D-Bus and similar noise is expected in containers; keep what may explain a failure.
        useful = [line for line in lines if "dbus" not in line.lower() and "unexpected operator" not in line]
        return "\n".join(useful[-15:])

    def _next_message(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        try:
            message = self._replies.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise BrowserError(f"Chromium did not answer {waiting_for} in time") from None
        if message is None:
            self._replies.put(None)
            raise BrowserError(f"Chromium exited while waiting for {waiting_for}:\n{self._stderr_tail()}")
        return message

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        browser: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send one protocol command and wait for its reply, recording events meanwhile.

        Args:
            method: Protocol method, e.g. ``Page.navigate``.
            params: Its parameters.
            browser: Send to the browser target instead of the page session.
            timeout_s: Time limit (default: the instance's).

        Returns:
            The command's ``result`` object.

        Raises:
            BrowserError: The browser answered with an error, exited or timed out.
        """
        if self._to_browser is None:
            raise BrowserError("Chromium is not started")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            reply = self._next_message(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout_s: float) -> dict[str, Any]:
        """Wait for a page event (already recorded or still to come).

        Args:
            method: Event name, e.g. ``Page.loadEventFired``.
            timeout_s: Time limit.

        Returns:
            The event's ``params``.
        """
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event.get("params", {})
            seen = len(self.events)
            message = self._next_message(deadline, method)
            if "method" in message:
                self.events.append(message)

    def pump(self, seconds: float) -> None:
        """Record the page's events for ``seconds`` (no command is sent)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self._replies.get(timeout=left)
            except queue.Empty:
                return
            if message is None:
                self._replies.put(None)
                raise BrowserError(f"Chromium exited:\n{self._stderr_tail()}")
            if "method" in message:
                self.events.append(message)

    def wait_network_idle(self, *, idle_s: float = 1.0, timeout_s: float = 15.0) -> bool:
        """Wait until no fetch/XHR request has been in flight for ``idle_s`` seconds.

        Only data requests of the current page count: Chromium may never report the end of a
        script request it answered from its cache, nor of a request the previous page left
        behind; either would look like a request in flight for ever.

        Args:
            idle_s: Quiet time required.
            timeout_s: Give up after this long (a page may poll for ever).

        Returns:
            True if the network went idle, False on timeout.
        """
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            events = self.events[self._page_start :]
            started = {
                e["params"]["requestId"]
                for e in events
                if e["method"] == "Network.requestWillBeSent" and e["params"].get("type") in ("Fetch", "XHR")
            }
            ended = {
                e["params"]["requestId"]
                for e in events
                if e["method"] in ("Network.loadingFinished", "Network.loadingFailed")
            }
            if started - ended:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= idle_s:
                return True
            self.pump(0.2)
        return False

    def press(self, key: str, *, alt: bool = False) -> None:
        """Press and release a letter key (``"e"``), optionally with Alt, in the page."""
        for kind in ("rawKeyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                {
                    "type": kind,
                    "modifiers": 1 if alt else 0,
                    "key": key,
                    "code": f"Key{key.upper()}",
                    "windowsVirtualKeyCode": ord(key.upper()),
                },
            )

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the page's viewport (CSS pixels, device scale 1)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def navigate(self, url: str, *, timeout_s: float = 30.0) -> None:
        """Load ``url`` and wait for its load event.

        Raises:
            BrowserError: The navigation failed (missing file, refused connection, ...).
        """
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        self._page_start = len(self.events)
        result = self.call("Page.navigate", {"url": url}, timeout_s=timeout_s)
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout_s)

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its JSON value."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluating {expression!r} failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout_s: float, what: str) -> None:
        """Poll a JavaScript expression until it is truthy.

        Args:
            expression: Expression to evaluate.
            timeout_s: Time limit.
            what: What is being waited for, for the error message.

        Raises:
            BrowserError: Still falsy after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.25)

    def content_height(self) -> int:
        """Height of the whole document in CSS pixels."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        return int(size["height"] + 0.999)

    def screenshot(self, out: Path, *, full_page: bool = False, max_height: int = 6000) -> Path:
        """Save a PNG screenshot of the viewport, or of the whole page up to ``max_height``.

        Args:
            out: PNG file to write (parent folders are created).
            full_page: Grow the viewport to the document's height first.
            max_height: Cap on that height, in CSS pixels.

        Returns:
            ``out``.
        """
        if full_page:
            self.set_viewport(self.width, max(self.height, min(self.content_height(), max_height)))
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def problems(self, *, allowed_urls: Sequence[str] | None = None) -> list[str]:
        """Errors the page reported since it was opened.

        Args:
            allowed_urls: If given, any request for a URL not in this list (``data:`` URLs
                excepted) is a problem too.

        Returns:
            One line per uncaught exception, ``console.error``/``console.assert``, error-level
            log entry (which include failed resource loads) and failed request.
        """
        found: list[str] = []
        urls = {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        }
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text", "")
                found.append(f"uncaught exception: {text.splitlines()[0] if text else '?'}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                found.append(f"console.{params['type']}: {args[:300]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                found.append(
                    f"{entry.get('source', 'log')} error: {entry.get('text', '')[:300]} {entry.get('url', '')}".rstrip()
                )
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                url = urls.get(params.get("requestId"), "unknown URL")
                found.append(f"failed load: {params.get('errorText')} {url[:200]}")
            elif method == "Network.requestWillBeSent" and allowed_urls is not None:
                url = params["request"]["url"]
                if not url.startswith("data:") and url.split("#")[0] not in allowed_urls:
                    found.append(f"request for an external resource: {url[:200]}")
        return found

    def close(self) -> None:
        """Close the browser (politely, then by killing its process) and remove its profile."""
        if self._proc is not None:
            try:
                if self._proc.poll() is None:
                    self.call("Browser.close", browser=True, timeout_s=5)
            except BrowserError:
                pass  # already gone or not answering: the kill below handles both
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._to_browser is not None:
            os.close(self._to_browser)
            self._to_browser = None
        self._stderr.close()
        self._profile.cleanup()


@dataclass(frozen=True)
class ImageStats:
    """How much a screenshot shows.

    Attributes:
        width: Pixels across.
        height: Pixels down.
        ink_share: Share of pixels with any RGB channel below ``INK_THRESHOLD``.
        std: Standard deviation of the grey levels (0 for a one-colour image).
    """

    width: int
    height: int
    ink_share: float
    std: float

    @property
    def blank(self) -> bool:
        """True when the image is too uniform to be a rendered page."""
        return self.ink_share < MIN_INK_SHARE or self.std < MIN_STD


def image_stats(png: Path) -> ImageStats:
    """Decode a PNG and measure how much it shows.

    Args:
        png: PNG file.

    Returns:
        Its :class:`ImageStats`.
    """
    import numpy as np

    # Pillow comes with matplotlib, which the report needs anyway; imported here so that
    # `--help` and find_chromium() stay cheap.
    from PIL import Image

    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB"))
    grey = rgb.mean(axis=2)
    ink = (rgb < INK_THRESHOLD).any(axis=2)
    return ImageStats(width=rgb.shape[1], height=rgb.shape[0], ink_share=float(ink.mean()), std=float(grey.std()))


def to_palette(png: Path) -> None:
    """Rewrite a PNG with a 256-colour palette: about a third of the size, for the docs.

    Args:
        png: PNG file, rewritten in place.
    """
    from PIL import Image

    with Image.open(png) as image:
        # Octree, not the default median cut: median cut merges small saturated areas (the
        # UI's red "failed" dots, thin plot lines) into neighbouring colours; octree keeps them.
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(png, optimize=True)


# Plots count only when laid out with a size: an <svg> of 0x0 renders nothing.
_SVG_SIZES = (
    "Array.from(document.querySelectorAll('svg'))"
    ".map(s => { const r = s.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; })"
)


def check_report(
    report: Path, out: Path, *, binary: str, width: int = 1280, max_height: int = 6000, min_svgs: int = 1
) -> tuple[list[str], dict[str, Any]]:
    """Render the report, save its screenshot and list what is wrong with it.

    Args:
        report: The HTML report.
        out: PNG to write.
        binary: Chromium executable.
        width: Viewport width in CSS pixels.
        max_height: Cap on the screenshot's height.
        min_svgs: Number of rendered ``<svg>`` plots required.

    Returns:
        ``(problems, facts)``: problems is empty when the report is fine; facts holds the
        title, plot count, page height and width and image statistics for the summary line.
    """
    url = report.resolve().as_uri()
    problems: list[str] = []
    with Chromium(binary, width=width, height=900) as browser:
        try:
            browser.navigate(url)
        except BrowserError as exc:
            return [str(exc)], {}
        title = browser.evaluate("document.title")
        sizes = browser.evaluate(_SVG_SIZES)
        height = browser.content_height()
        page_width = browser.evaluate("document.documentElement.scrollWidth")
        browser.screenshot(out, full_page=True, max_height=max_height)
        problems += browser.problems(allowed_urls=[url])
    rendered = [s for s in sizes if s[0] > 0 and s[1] > 0]
    if len(rendered) < min_svgs:
        problems.append(
            f"expected at least {min_svgs} rendered <svg> plot(s), found {len(rendered)} "
            f"(of {len(sizes)} <svg> elements)"
        )
    stats = image_stats(out)
    if stats.blank:
        problems.append(
            f"the screenshot looks blank: {stats.ink_share:.2%} non-white pixels "
            f"(need {MIN_INK_SHARE:.0%}), grey-level std {stats.std:.1f} (need {MIN_STD})"
        )
    facts = {"title": title, "svgs": len(rendered), "page_height": height, "page_width": page_width, "stats": stats}
    return problems, facts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the HTML report (e.g. data/reports/report.html)")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    parser.add_argument("--max-height", type=int, default=6000, help="cap on the screenshot height (default 6000)")
    parser.add_argument("--min-svgs", type=int, default=1, help="rendered <svg> plots required (default 1)")
    parser.add_argument("--palette", action="store_true", help="save a 256-colour PNG (smaller; for docs/screenshots)")
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        print("screenshot_report: no Chromium found (set CHROMIUM or `apt-get install chromium`)", file=sys.stderr)
        return 2
    if not args.report.is_file():
        print(f"screenshot_report: {args.report}: no such file", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        problems, facts = check_report(
            args.report, args.out, binary=binary, width=args.width, max_height=args.max_height, min_svgs=args.min_svgs
        )
    except BrowserError as exc:
        print(f"screenshot_report: {args.report}: {exc}", file=sys.stderr)
        return 1
    if problems:
        print(f"screenshot_report: {args.report}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    if facts["page_width"] > args.width:
        # Not a failure (nothing is lost), but worth fixing: some table or plot is too wide.
        print(
            f"screenshot_report: note: the page is {facts['page_width']} px wide in a {args.width} px window "
            "(horizontal scrolling; the screenshot shows the left part)"
        )
    if args.palette:
        to_palette(args.out)
    stats = facts["stats"]
    print(
        f"screenshot_report: {args.report} OK: title {facts['title']!r}, {facts['svgs']} plot(s), page height "
        f"{facts['page_height']} px; wrote {args.out} ({stats.width}x{stats.height}, {stats.ink_share:.1%} "
        f"non-white, std {stats.std:.1f}) in {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
