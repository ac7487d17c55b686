"""Fault-injecting OpenAI-compatible HTTP server for tests and benchmarks.

A pure-asyncio HTTP/1.1 server (no third-party dependencies) that speaks just
enough of the OpenAI API for the pipeline's classifier: ``GET /v1/models`` and
non-streaming ``POST /v1/chat/completions``. Writing the HTTP layer by hand is
deliberate: it lets tests drop connections, hang, and send broken bodies in
ways a framework would hide. It only ever binds to a loopback address.

Answers are deterministic. The narrative is taken from the last user message
(the text between ``<narrative>`` and ``</narrative>`` if both markers are
present, else the whole message, whitespace-stripped) and judged by a keyword
oracle (see :func:`oracle_answer`); it is a stand-in, not a classifier.

Faults are drawn per chat request from ``random.Random(seed)``: exactly one
``rng.random()`` draw per request that passes the down/auth/body/model checks
(plus one ``rng.uniform`` when ``jitter_s > 0``), so a run with the same seed
and the same request order is reproducible. The fault rates are mutually
exclusive and tested in this fixed order on the one draw: ``rate_limit``,
``server_error``, ``hang``, ``drop``, ``malformed``, ``reasoning_only``,
``refusal``, ``truncated``, ``prose`` (if the rates add up to more than 1 the
later ones are starved).

Per chat request the checks run in this order: down window (connection closed),
``api_key`` (401), body and user message (400), ``models`` (404), ``reject_param``
(400, every request carrying that body field), ``max_prompt_chars`` (400
``context_length_exceeded``, per request), ``reject_text`` (400 ``content_filter``, per
narrative), ``fail_first_n`` (500), then the random draw. With ``echo_key`` every error
message of a chat request repeats the request's ``Authorization`` header (a careless
server leaking the key back); with ``echo_input`` the two per-request refusals answer 422
in FastAPI's validation shape, quoting the user message as ``input`` (as vLLM does). ``latency_s`` + jitter is slept
for every request that gets past the checks, faulted or not. A
``max_tokens``/``max_completion_tokens`` smaller than the answer cuts it with
``finish_reason="length"``, like a real server.

Control endpoints (no auth, never faulted):

* ``GET /_stats``: counters (see :meth:`Stats.snapshot`).
* ``POST /_config``: JSON object merged into the fault config; answers the
  effective config (``api_key`` masked) or 400 naming the bad key.
* ``POST /_reset``: zero the counters, re-seed the RNG, end any down window;
  with body ``{"config": true}`` also restore the startup config.
* ``POST /_down`` ``{"seconds": N}``: for N seconds every chat request gets its
  connection closed without a response, then the server recovers.

Start it with the CLI (``python -m narr_assets.testing.server --port 0``), with
:func:`serve_in_subprocess` (benchmarks: own process, own core) or with
:func:`serve_in_thread` (light unit tests).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ANSWER_STYLES",
    "DEFAULT_MODEL",
    "OUTCOMES",
    "REFUSAL_TEXT",
    "FakeOpenAIServer",
    "FaultConfig",
    "ServerHandle",
    "Stats",
    "extract_narrative",
    "main",
    "narrative_key",
    "oracle_answer",
    "render_answer",
    "serve_in_subprocess",
    "serve_in_thread",
]

#: Every key of ``/_stats`` ``by_outcome``; each chat request counts in exactly one.
OUTCOMES: tuple[str, ...] = (
    "ok",
    "reasoning_only",
    "refusal",
    "truncated",
    "prose",
    "rate_limited",
    "server_error",
    "fail_first",
    "fail_text",
    "hang",
    "drop",
    "malformed",
    "down",
    "unauthorized",
    "not_found",
    "bad_request",
    "bad_param",
    "too_long",
    "filtered",
)
ANSWER_STYLES: tuple[str, ...] = ("json", "fenced", "prose", "harmony")
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
#: Model listed by ``/v1/models`` when the config has no ``models``.
DEFAULT_MODEL = "fake-llm"
#: Short fixed reasoning text used by ``include_reasoning`` (never narrative text).
REASONING_TEXT = "Checked the narrative for intimate-partner terms and abuse terms."

_RATE_FIELDS = (
    "rate_limit",
    "server_error",
    "hang",
    "drop",
    "malformed",
    "reasoning_only",
    "refusal",
    "truncated",
    "prose",
)
# Outcome name for each rate, in the order the single draw is tested.
_RATE_OUTCOMES = dict(zip(_RATE_FIELDS, ("rate_limited", *_RATE_FIELDS[1:]), strict=True))
_SECONDS_FIELDS = ("latency_s", "jitter_s", "retry_after_s", "hang_s")
_COUNT_FIELDS = ("fail_first_n", "seed", "max_prompt_chars")
_MAX_BODY_BYTES = 16 * 1024 * 1024
_HEADER_LIMIT = 64 * 1024


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """Fault configuration; the defaults inject no faults.

    Attributes:
        latency_s: Fixed delay before answering a chat request that passed validation.
        jitter_s: Extra uniform delay in ``[0, jitter_s]``.
        rate_limit: Rate of 429 answers carrying ``Retry-After: retry_after_s``.
        retry_after_s: Value of the ``Retry-After`` header.
        server_error: Rate of 500 answers.
        hang: Rate of requests that sleep ``hang_s`` before answering normally
            (no answer at all if the client has hung up meanwhile).
        hang_s: Length of a hang.
        drop: Rate of connections closed without a response.
        malformed: Rate of 200 answers whose JSON body is cut in half.
        reasoning_only: Rate of answers with empty content and the answer in
            ``reasoning`` and ``reasoning_content``.
        refusal: Rate of answers whose content is :data:`REFUSAL_TEXT`.
        truncated: Rate of answers cut mid-JSON with ``finish_reason="length"``.
        prose: Rate of answers in the ``prose`` style whatever ``answer_style`` is.
        fail_first_n: The first N chat requests per distinct narrative (counting
            those that pass the down/auth/body/model checks) get a 500.
        models: Accepted model names; empty accepts any. Unknown names get 404.
        api_key: If set, requests to ``/v1/*`` need ``Authorization: Bearer <api_key>``.
        echo_key: Error messages of chat requests repeat the ``Authorization`` header sent.
        reject_param: Every chat request whose body has this top-level field gets a 400
            ``Unrecognized request argument supplied: <field>`` (e.g. ``response_format``).
        max_prompt_chars: A chat request whose messages hold more characters than this gets
            a 400 ``context_length_exceeded`` (0: no limit).
        reject_text: A narrative containing this text (case-insensitive) gets a 400
            ``content_filter``.
        fail_text: A narrative containing this text (case-insensitive) gets a 500 on every
            request (a failure that outlasts any number of retries).
        echo_input: The ``max_prompt_chars`` and ``reject_text`` refusals are 422s in
            FastAPI's validation-error shape, quoting the whole user message.
        answer_style: One of :data:`ANSWER_STYLES`.
        include_reasoning: Add :data:`REASONING_TEXT` as ``reasoning`` and
            ``reasoning_content`` to normal answers.
        seed: Seed of the fault RNG.
    """

    latency_s: float = 0.0
    jitter_s: float = 0.0
    rate_limit: float = 0.0
    retry_after_s: float = 1.0
    server_error: float = 0.0
    hang: float = 0.0
    hang_s: float = 30.0
    drop: float = 0.0
    malformed: float = 0.0
    reasoning_only: float = 0.0
    refusal: float = 0.0
    truncated: float = 0.0
    prose: float = 0.0
    fail_first_n: int = 0
    models: tuple[str, ...] = ()
    api_key: str | None = None
    echo_key: bool = False
    reject_param: str | None = None
    max_prompt_chars: int = 0
    reject_text: str | None = None
    fail_text: str | None = None
    echo_input: bool = False
    answer_style: str = "json"
    include_reasoning: bool = False
    seed: int = 0

    def merged(self, updates: Mapping[str, Any]) -> FaultConfig:
        """Return a copy with ``updates`` applied, validating every value.

        Args:
            updates: Field names to new values (JSON-compatible types).

        Returns:
            The new config.

        Raises:
            ValueError: On an unknown key or an invalid value (the message names the key).
        """
        known = {f.name for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for key, value in updates.items():
            if key not in known:
                raise ValueError(f"unknown fault config key {key!r}; known: {sorted(known)}")
            clean[key] = _validate_field(key, value)
        return dataclasses.replace(self, **clean)

    def public_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-able dict with ``api_key`` masked."""
        data = dataclasses.asdict(self)
        data["models"] = list(self.models)
        if self.api_key is not None:
            data["api_key"] = "***"
        return data


def _validate_field(key: str, value: Any) -> Any:
    """Validate one config value; raise ValueError naming ``key`` if invalid."""
    if key in _RATE_FIELDS or key in _SECONDS_FIELDS or key in _COUNT_FIELDS:
        return _validate_number(key, value)
    if key == "models":
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ValueError(f"fault config 'models' must be a list of names, got {value!r}")
        names = tuple(value)
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError("fault config 'models' must contain non-empty strings")
        return names
    if key in ("api_key", "reject_param", "reject_text", "fail_text"):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"fault config {key!r} must be a non-empty string or null")
        return value
    if key == "answer_style":
        if value not in ANSWER_STYLES:
            raise ValueError(f"fault config 'answer_style' must be one of {ANSWER_STYLES}, got {value!r}")
        return value
    if key in ("include_reasoning", "echo_key", "echo_input"):
        if not isinstance(value, bool):
            raise ValueError(f"fault config {key!r} must be a boolean, got {value!r}")
        return value
    raise ValueError(f"unknown fault config key {key!r}")  # pragma: no cover - guarded by merged()


def _validate_number(key: str, value: Any) -> float | int:
    """Validate a rate, a duration in seconds or a count (see :func:`_validate_field`)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if key in _RATE_FIELDS:
        if not is_number or not 0.0 <= value <= 1.0:
            raise ValueError(f"fault config {key!r} must be a number in [0, 1], got {value!r}")
        return float(value)
    if key in _SECONDS_FIELDS:
        if not is_number or value < 0:
            raise ValueError(f"fault config {key!r} must be a number >= 0, got {value!r}")
        return float(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"fault config {key!r} must be an integer >= 0, got {value!r}")
    return value


# --------------------------------------------------------------------------- answers

_OPEN, _CLOSE = "<narrative>", "</narrative>"
# Patterns run on lower-cased text, each behind a plain substring test: regex scans of
# ~4 KB prompts dominated the server's per-request CPU before (benchmarked on one core).
_PARTNER_WORDS = ("husband", "wife", "wives", "boyfriend", "girlfriend", "partner", "spouse", "ex-")
_PARTNER_RE = re.compile(r"\b(?:husband|wife|wives|boyfriend|girlfriend|partner|spouse|ex-)")
# (indicator label, literal prefilter, pattern); labels come from this fixed list, never the narrative.
_ABUSE_TERMS: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (label, literal, re.compile(pattern))
    for label, literal, pattern in (
        ("abuse", "abus", r"\babus"),
        ("assault", "assault", r"\bassault"),
        ("violence", "violen", r"\bviolen"),
        ("restraining order", "restraining", r"\brestraining\s+order"),
        ("protective order", "protective", r"\bprotective\s+order"),
        ("domestic", "domestic", r"\bdomestic"),
        ("threat", "threat", r"\bthreat"),
        ("hit", "hit", r"\bhit(?:s|ting)?\b"),
        ("strangulation", "strangl", r"\bstrangl"),
    )
)


def _content_text(content: Any) -> str:
    """Flatten an OpenAI message ``content`` (string or list of parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def extract_narrative(messages: Any) -> str | None:
    """Return the narrative the server judges for a ``messages`` list.

    Args:
        messages: The request's ``messages`` (OpenAI chat format).

    Returns:
        The whitespace-stripped text between the first ``<narrative>`` and
        ``</narrative>`` of the last user message, else that whole message
        stripped; ``None`` if there is no user message.
    """
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _content_text(message.get("content"))
            start = text.find(_OPEN)
            end = text.find(_CLOSE, start + len(_OPEN)) if start >= 0 else -1
            if end >= 0:
                text = text[start + len(_OPEN) : end]
            return text.strip()
    return None


def narrative_key(text: str) -> str:
    """Return the ``by_text`` key of a narrative: ``sha256(text.strip())`` hex, first 16 chars.

    Args:
        text: The narrative as stored (markers excluded).

    Returns:
        16 lowercase hex characters.
    """
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def oracle_answer(narrative: str) -> dict[str, Any]:
    """Judge a narrative with the deterministic keyword oracle.

    ``detected`` is true iff the text has a partner word (husband, wife, wives,
    boyfriend, girlfriend, partner, spouse, or a word starting with ``ex-``)
    AND an abuse word (abus*, assault*, violen*, restraining order, protective
    order, domestic*, threat*, hit/hits/hitting, strangl*), matched
    case-insensitively at word starts. ``confidence`` is
    ``min(0.95, 0.6 + 0.1 * len(indicators))`` when detected, 0.25 when only
    one of the two kinds is present, 0.05 when neither is. ``indicators`` are
    labels of the abuse terms found, from a fixed list; ``rationale`` is one of
    four fixed sentences. Nothing of the narrative is echoed.

    Args:
        narrative: The narrative text.

    Returns:
        ``{"detected": bool, "confidence": float, "indicators": [str], "rationale": str}``.
    """
    lower = narrative.lower()
    partner = any(word in lower for word in _PARTNER_WORDS) and _PARTNER_RE.search(lower) is not None
    indicators = [label for label, literal, pattern in _ABUSE_TERMS if literal in lower and pattern.search(lower)]
    detected = partner and bool(indicators)
    if detected:
        confidence = round(min(0.95, 0.6 + 0.1 * len(indicators)), 2)
        rationale = "Keyword oracle: an intimate-partner term and an abuse term both appear."
    elif partner:
        confidence = 0.25
        rationale = "Keyword oracle: a partner term appears but no abuse term."
    elif indicators:
        confidence = 0.25
        rationale = "Keyword oracle: an abuse term appears but no partner term."
    else:
        confidence = 0.05
        rationale = "Keyword oracle: no partner or abuse terms found."
    return {"detected": detected, "confidence": confidence, "indicators": indicators, "rationale": rationale}


def render_answer(answer: Mapping[str, Any], style: str) -> str:
    """Render an answer dict as message content in one of :data:`ANSWER_STYLES`.

    Args:
        answer: The verdict, e.g. from :func:`oracle_answer`.
        style: ``json`` (the bare object), ``fenced`` (in a json code fence),
            ``prose`` (a sentence, the object, a sentence) or ``harmony``
            (``<|channel|>final<|message|>`` then the object).

    Returns:
        The content string.
    """
    body = json.dumps(answer)
    if style == "json":
        return body
    if style == "fenced":
        return f"```json\n{body}\n```"
    if style == "prose":
        return f"Based on the narrative, here is my assessment: {body} Let me know if you need more detail."
    if style == "harmony":
        return f"<|channel|>final<|message|>{body}"
    raise ValueError(f"unknown answer style {style!r}; expected one of {ANSWER_STYLES}")


def _prompt_chars(request: Mapping[str, Any]) -> int:
    """Characters of every message's content (the server's stand-in for prompt tokens x 4)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))


def _error_body(message: str, err_type: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}}).encode()


# --------------------------------------------------------------------------- stats


class Stats:
    """Counters served by ``GET /_stats``."""

    def __init__(self) -> None:
        self.http_requests = 0
        self.connections = 0
        self.chat_requests = 0
        self.by_outcome: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.completions_ok = 0
        self.client_gone = 0
        self.by_text: dict[str, int] = {}
        self.ok_by_text: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def snapshot(self) -> dict[str, Any]:
        """Return the counters as a JSON-able dict.

        Keys: ``http_requests`` (all endpoints but ``/_*``), ``connections``
        (TCP connections that carried a ``/v1`` request), ``chat_requests``, ``by_outcome`` (every
        name of :data:`OUTCOMES`; sums to ``chat_requests``), ``completions_ok``
        (200 chat answers with a well-formed chat.completion body written to a
        still-open connection, whatever the content's quality: refusals and
        truncations count), ``client_gone`` (answers not written because the
        client had hung up), ``by_text`` (chat requests per :func:`narrative_key`,
        every outcome), ``ok_by_text`` (``completions_ok`` per key),
        ``by_model``, ``prompt_tokens`` / ``completion_tokens`` (sums over
        ``completions_ok``), ``in_flight``, ``max_in_flight`` (chat requests).
        """
        return {
            "http_requests": self.http_requests,
            "connections": self.connections,
            "chat_requests": self.chat_requests,
            "by_outcome": dict(self.by_outcome),
            "completions_ok": self.completions_ok,
            "client_gone": self.client_gone,
            "by_text": dict(self.by_text),
            "ok_by_text": dict(self.ok_by_text),
            "by_model": dict(self.by_model),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


# --------------------------------------------------------------------------- HTTP server

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
}


@dataclasses.dataclass
class _Reply:
    """A response to write, or ``None`` in its place to close without answering."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    # Narrative key and token counts of a well-formed 200 chat answer, for the ok counters.
    ok_key: str | None = None
    tokens: tuple[int, int] = (0, 0)


def _http_bytes(reply: _Reply, close: bool) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in reply.headers)
    head = (
        f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(reply.body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + reply.body


def _unauthorized(echo: str | None = None) -> _Reply:
    message = "Incorrect API key provided." if echo is None else f"Incorrect API key provided: {echo}."
    return _Reply(401, _error_body(message, "invalid_request_error", "invalid_api_key"))


def _json_reply(status: int, payload: Any) -> _Reply:
    return _Reply(status, json.dumps(payload).encode())


def _check_loopback(host: str) -> None:
    """Raise ValueError unless ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"refusing to bind to non-loopback host {host!r}; use 127.0.0.1")


class _BadRequest(Exception):
    """The request cannot be parsed; answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FakeOpenAIServer:
    """The fault-injecting server on the current event loop.

    Use ``async with FakeOpenAIServer(config) as server:`` or
    ``await server.start()`` / ``await server.close()``.

    Args:
        config: Startup fault config (``/_reset {"config": true}`` restores it).
    """

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.initial_config = config or FaultConfig()
        self.config = self.initial_config
        self.stats = Stats()
        self._rng = random.Random(self.config.seed)
        self._down_until = 0.0
        self._valid_by_text: dict[str, int] = {}
        self._next_id = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.host = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, the OpenAI client's ``base_url``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start serving.

        Args:
            host: A loopback address (anything else raises ValueError).
            port: TCP port; 0 picks a free one (read it from ``.port``).
        """
        _check_loopback(host)
        self._server = await asyncio.start_server(self._on_connection, host, port, limit=_HEADER_LIMIT)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and abort open connections and pending handlers."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- control

    def configure(self, updates: Mapping[str, Any]) -> FaultConfig:
        """Merge ``updates`` into the config (re-seeding the RNG if ``seed`` is given).

        Args:
            updates: Fault config fields.

        Returns:
            The effective config.
        """
        self.config = self.config.merged(updates)
        if "seed" in updates:
            self._rng.seed(self.config.seed)
        return self.config

    def reset(self, *, config: bool = False) -> None:
        """Zero counters, re-seed the RNG, end any down window.

        Args:
            config: Also restore the startup config.
        """
        if config:
            self.config = self.initial_config
        self.stats = Stats()
        self._valid_by_text = {}
        self._rng.seed(self.config.seed)
        self._down_until = 0.0

    def down(self, seconds: float) -> None:
        """Close every chat request's connection unanswered for ``seconds`` from now."""
        self._down_until = time.monotonic() + seconds

    # ----------------------------------------------------------------- connection loop

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        counted = False
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # client closed the (idle) connection
                except asyncio.LimitOverrunError:
                    refused = _Reply(431, _error_body("request headers too large", "invalid_request_error", None))
                    writer.write(_http_bytes(refused, close=True))
                    return
                try:
                    method, path, headers, close = self._parse_head(head)
                    body = await self._read_body(reader, headers)
                except _BadRequest as exc:
                    refused = _Reply(exc.status, _error_body(str(exc), "invalid_request_error", None))
                    writer.write(_http_bytes(refused, close=True))
                    return
                if not counted and not path.startswith("/_"):
                    # Count API connections only, so keep-alive reuse is visible in the stats.
                    counted = True
                    self.stats.connections += 1
                reply = await self._dispatch(method, path, headers, body)
                if reply is None:
                    return  # drop: close without a response
                if reader.at_eof():
                    # The client hung up while we were delaying (its timeout): the answer is lost.
                    if reply.ok_key is not None:
                        self.stats.client_gone += 1
                    return
                writer.write(_http_bytes(reply, close))
                if reply.ok_key is not None:
                    self._count_ok(reply)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only close() cancels these tasks. Ending normally matters on Python 3.11, whose
            # stream callback logs a traceback for every cancelled connection task.
            return
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _count_ok(self, reply: _Reply) -> None:
        stats = self.stats
        stats.completions_ok += 1
        key = reply.ok_key or ""
        stats.ok_by_text[key] = stats.ok_by_text.get(key, 0) + 1
        stats.prompt_tokens += reply.tokens[0]
        stats.completion_tokens += reply.tokens[1]

    @staticmethod
    def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], bool]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        return method, target.split("?", 1)[0], headers, close

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            size_total = 0
            while True:
                size_line = await reader.readuntil(b"\r\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest(400, "malformed chunk size") from None
                if size == 0:
                    # Skip optional trailers up to the blank line.
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return b"".join(chunks)
                size_total += size
                if size_total > _MAX_BODY_BYTES:
                    raise _BadRequest(413, "body too large")
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        length_text = headers.get("content-length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise _BadRequest(400, "malformed Content-Length") from None
        if length < 0:
            raise _BadRequest(400, "malformed Content-Length")
        if length > _MAX_BODY_BYTES:
            raise _BadRequest(413, "body too large")
        return await reader.readexactly(length) if length else b""

    # ----------------------------------------------------------------- routing

    async def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Reply | None:
        if path.startswith("/_"):
            return self._control(method, path, body)
        self.stats.http_requests += 1
        if path == "/v1/chat/completions":
            if method != "POST":
                return _Reply(405, _error_body("use POST", "invalid_request_error", None))
            # A local reference: a /_reset during the request must not leave in_flight at -1.
            stats = self.stats
            stats.chat_requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                return await self._chat(headers, body)
            finally:
                stats.in_flight -= 1
        if path == "/v1/models":
            if method != "GET":
                return _Reply(405, _error_body("use GET", "invalid_request_error", None))
            if not self._authorized(headers):
                return _unauthorized()
            names = self.config.models or (DEFAULT_MODEL,)
            data = [{"id": name, "object": "model", "created": 0, "owned_by": "narr-fake"} for name in names]
            return _json_reply(200, {"object": "list", "data": data})
        return _Reply(404, _error_body(f"Unknown request URL: {method} {path}", "invalid_request_error", "unknown_url"))

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        if path == "/_stats" and method == "GET":
            return _json_reply(200, self.stats.snapshot())
        if method != "POST" or path not in ("/_config", "/_reset", "/_down"):
            return _Reply(404, _error_body(f"Unknown control URL: {method} {path}", "invalid_request_error", None))
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            return _Reply(400, _error_body("control body is not JSON", "invalid_request_error", None))
        if not isinstance(payload, dict):
            return _Reply(400, _error_body("control body must be a JSON object", "invalid_request_error", None))
        if path == "/_config":
            try:
                config = self.configure(payload)
            except ValueError as exc:
                return _Reply(400, _error_body(str(exc), "invalid_request_error", None))
            return _json_reply(200, config.public_dict())
        if path == "/_reset":
            self.reset(config=bool(payload.get("config", False)))
            return _json_reply(200, {"reset": True})
        seconds = payload.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            return _Reply(400, _error_body("'seconds' must be a number >= 0", "invalid_request_error", None))
        self.down(float(seconds))
        return _json_reply(200, {"down_for_s": seconds})

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.config.api_key is None or headers.get("authorization") == f"Bearer {self.config.api_key}"

    # ----------------------------------------------------------------- chat completions

    async def _chat(self, headers: dict[str, str], body: bytes) -> _Reply | None:
        stats = self.stats
        cfg = self.config
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        messages = request.get("messages") if isinstance(request, dict) else None
        narrative = extract_narrative(messages)
        key = narrative_key(narrative) if narrative is not None else None
        if key is not None:
            stats.by_text[key] = stats.by_text.get(key, 0) + 1

        if time.monotonic() < self._down_until:
            stats.by_outcome["down"] += 1
            return None
        invalid = self._invalid(headers, request, narrative)
        if invalid is not None:
            return invalid
        assert isinstance(request, dict) and narrative is not None and key is not None  # checked by _invalid
        model = request["model"]

        seen = self._valid_by_text.get(key, 0)
        self._valid_by_text[key] = seen + 1
        draw = self._rng.random()
        delay = cfg.latency_s + (self._rng.uniform(0.0, cfg.jitter_s) if cfg.jitter_s > 0 else 0.0)
        if seen < cfg.fail_first_n:
            outcome = "fail_first"
        elif cfg.fail_text is not None and cfg.fail_text.lower() in narrative.lower():
            outcome = "fail_text"
        else:
            outcome = "ok"
            threshold = 0.0
            for field in _RATE_FIELDS:
                rate = getattr(cfg, field)
                threshold += rate
                if rate > 0 and draw < threshold:
                    outcome = _RATE_OUTCOMES[field]
                    break
        stats.by_outcome[outcome] += 1
        if delay > 0:
            await asyncio.sleep(delay)

        if outcome == "drop":
            return None
        if outcome == "rate_limited":
            retry = f"{cfg.retry_after_s:g}"
            return _Reply(
                429,
                _error_body("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
                (("Retry-After", retry),),
            )
        if outcome in ("server_error", "fail_first", "fail_text"):
            return _Reply(500, _error_body("The server had an error processing your request.", "server_error", None))
        if outcome == "hang":
            # Answered normally afterwards, unless the client has gone (checked before writing).
            await asyncio.sleep(cfg.hang_s)
        return self._completion(request, model, narrative, key, outcome, cfg)

    def _invalid(self, headers: dict[str, str], request: Any, narrative: str | None) -> _Reply | None:
        """The refusal of a chat request that passed the down window, if it gets one before the draw."""
        cfg, stats = self.config, self.stats
        echo = f" [Authorization: {headers.get('authorization', '')}]" if cfg.echo_key else ""
        if not self._authorized(headers):
            stats.by_outcome["unauthorized"] += 1
            return _unauthorized(headers.get("authorization", "") if cfg.echo_key else None)
        if not isinstance(request, dict) or narrative is None:
            stats.by_outcome["bad_request"] += 1
            message = "body must be JSON with a user message" + echo
            return _Reply(400, _error_body(message, "invalid_request_error", None))
        model = request.get("model")
        if not isinstance(model, str) or (cfg.models and model not in cfg.models):
            stats.by_outcome["not_found"] += 1
            message = f"The model `{model}` does not exist or you do not have access to it.{echo}"
            return _Reply(404, _error_body(message, "invalid_request_error", "model_not_found"))
        stats.by_model[model] = stats.by_model.get(model, 0) + 1
        return self._refusal(request, narrative, echo)

    def _refusal(self, request: dict[str, Any], narrative: str, echo: str) -> _Reply | None:
        """The 400 of ``reject_param``, ``max_prompt_chars`` or ``reject_text``, if one applies."""
        cfg, stats = self.config, self.stats
        if cfg.reject_param is not None and cfg.reject_param in request:
            stats.by_outcome["bad_param"] += 1
            message = f"Unrecognized request argument supplied: {cfg.reject_param}{echo}"
            return _Reply(400, _error_body(message, "invalid_request_error", None))
        prompt_chars = _prompt_chars(request)
        if cfg.max_prompt_chars and prompt_chars > cfg.max_prompt_chars:
            stats.by_outcome["too_long"] += 1
            message = (
                f"This model's maximum context length is {cfg.max_prompt_chars // 4} tokens. However, your "
                f"messages resulted in {prompt_chars // 4} tokens. Please reduce the length of the messages.{echo}"
            )
            return self._refused(request, message, "context_length_exceeded")
        if cfg.reject_text is not None and cfg.reject_text.lower() in narrative.lower():
            stats.by_outcome["filtered"] += 1
            message = (
                "The prompt was filtered due to triggering the content management policy. "
                f"Please modify your prompt and retry.{echo}"
            )
            return self._refused(request, message, "content_filter")
        return None

    def _refused(self, request: dict[str, Any], message: str, code: str) -> _Reply:
        """A per-request refusal: OpenAI's error shape, or FastAPI's quoting the input (``echo_input``)."""
        if not self.config.echo_input:
            return _Reply(400, _error_body(message, "invalid_request_error", code))
        messages = request.get("messages") or []
        user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {"content": ""})
        detail = [
            {
                "type": "value_error",
                "loc": ["body", "messages", len(messages) - 1, "content"],
                "msg": f"Value error, {message}",
                "input": _content_text(user.get("content")),
            }
        ]
        return _Reply(422, json.dumps({"detail": detail}).encode())

    def _completion(
        self, request: dict[str, Any], model: str, narrative: str, key: str, outcome: str, cfg: FaultConfig
    ) -> _Reply:
        style = "prose" if outcome == "prose" else cfg.answer_style
        text = render_answer(oracle_answer(narrative), style)
        content, reasoning, finish = text, REASONING_TEXT if cfg.include_reasoning else None, "stop"
        if outcome == "reasoning_only":
            content, reasoning = "", (f"{REASONING_TEXT} {text}" if cfg.include_reasoning else text)
        elif outcome == "refusal":
            content = REFUSAL_TEXT
        elif outcome == "truncated":
            content, finish = text[: len(text) // 2], "length"
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > 0 and len(content) // 4 > max_tokens:
            # Like a real server, stop generating at the token budget.
            content, finish = content[: max_tokens * 4], "length"

        prompt_tokens = _prompt_chars(request) // 4
        reasoning_tokens = len(reasoning) // 4 if reasoning else 0
        completion_tokens = len(content) // 4 + reasoning_tokens
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning"] = reasoning
            message["reasoning_content"] = reasoning
        self._next_id += 1
        payload = {
            "id": f"chatcmpl-fake{self._next_id:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            },
        }
        body = json.dumps(payload).encode()
        if outcome == "malformed":
            # Cut mid-body: a 200 with Content-Length matching but JSON that does not parse.
            return _Reply(200, body[: len(body) // 2])
        return _Reply(200, body, ok_key=key, tokens=(prompt_tokens, completion_tokens))


# --------------------------------------------------------------------------- handles


class ServerHandle:
    """Control a running server over its HTTP control endpoints (stdlib only).

    Returned by :func:`serve_in_subprocess` and :func:`serve_in_thread`; also a
    context manager that stops the server on exit.

    Attributes:
        base_url: ``http://127.0.0.1:PORT/v1`` for the OpenAI client.
        root_url: ``http://127.0.0.1:PORT``.
        process: The child process (subprocess handles only).
        server: The in-process server object (thread handles only).
    """

    def __init__(
        self,
        base_url: str,
        stopper: Callable[[], None],
        *,
        process: subprocess.Popen[bytes] | None = None,
        server: FakeOpenAIServer | None = None,
    ) -> None:
        self.base_url = base_url
        self.process = process
        self.server = server
        self.root_url = base_url.removesuffix("/v1")
        self._stopper = stopper
        self._stopped = False
        # An empty ProxyHandler: proxy environment variables must not capture loopback calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(dict(payload or {})).encode() if method == "POST" else None
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("error", {})
            message = detail.get("message", str(exc)) if isinstance(detail, dict) else str(detail)
            raise ValueError(f"{method} {path} failed ({exc.code}): {message}") from None

    def stats(self) -> dict[str, Any]:
        """Return the ``/_stats`` counters (see :meth:`Stats.snapshot`)."""
        return self._call("GET", "/_stats")

    def configure(self, **faults: Any) -> dict[str, Any]:
        """Merge fault config fields (see :class:`FaultConfig`) into the server's config.

        Args:
            **faults: Fields to change, e.g. ``rate_limit=0.1``.

        Returns:
            The effective config (``api_key`` masked).

        Raises:
            ValueError: Unknown key or invalid value.
        """
        return self._call("POST", "/_config", faults)

    def reset(self, *, config: bool = False) -> None:
        """Zero the counters, re-seed the RNG and end any down window.

        Args:
            config: Also restore the config the server started with.
        """
        self._call("POST", "/_reset", {"config": config})

    def down(self, seconds: float) -> None:
        """Make chat requests fail by connection close for ``seconds``."""
        self._call("POST", "/_down", {"seconds": seconds})

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if not self._stopped:
            self._stopped = True
            self._stopper()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server process, escalating to SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def serve_in_subprocess(
    *, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 20.0, **config: Any
) -> ServerHandle:
    """Start the server CLI in a child process (``sys.executable``) and wait until it listens.

    The child also exits when this process dies (it watches its stdin), so no
    orphan servers survive a killed test run.

    Args:
        host: Loopback address to bind.
        port: TCP port; 0 picks a free one.
        startup_timeout_s: How long to wait for the ``listening`` line.
        **config: :class:`FaultConfig` fields (including ``seed``).

    Returns:
        A started :class:`ServerHandle` (``.stop()`` or use it as a context manager).

    Raises:
        ValueError: Invalid config or non-loopback host.
        RuntimeError: The child did not start in time or exited.
    """
    _check_loopback(host)
    FaultConfig().merged(config)  # fail here with a clear message, not in the child
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "narr_assets.testing.server",
        "--host",
        host,
        "--port",
        str(port),
        "--config",
        json.dumps(config),
        "--exit-on-stdin-eof",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    # A pipe with the default buffering is a BufferedReader, whose read1() returns what is
    # there without waiting for more; typeshed only knows it as IO[bytes].
    stdout = proc.stdout
    assert isinstance(stdout, io.BufferedReader)
    deadline = time.monotonic() + startup_timeout_s
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([stdout], [], [], max(remaining, 0))
        if not ready:
            _terminate(proc)
            raise RuntimeError(f"fake LLM server did not start within {startup_timeout_s} s")
        chunk = stdout.read1(4096)
        if not chunk:
            _terminate(proc)
            raise RuntimeError(f"fake LLM server exited during startup (exit code {proc.returncode})")
        line += chunk
    text = line.decode().strip()
    if not text.startswith("listening "):
        _terminate(proc)
        raise RuntimeError(f"unexpected fake LLM server startup line: {text!r}")
    handle = ServerHandle(text.removeprefix("listening "), lambda: finalizer(), process=proc)
    # Runs once: on stop(), or when the handle is garbage-collected / the interpreter exits unstopped.
    finalizer = weakref.finalize(handle, _terminate, proc)
    return handle


def serve_in_thread(*, host: str = "127.0.0.1", port: int = 0, **config: Any) -> ServerHandle:
    """Start the server on its own event loop in a daemon thread.

    Args:
        host: Loopback address to bind.
        port: TCP port; 0 picks a free one.
        **config: :class:`FaultConfig` fields (including ``seed``).

    Returns:
        A started :class:`ServerHandle`.

    Raises:
        ValueError: Invalid config or non-loopback host.
    """
    _check_loopback(host)
    server = FakeOpenAIServer(FaultConfig().merged(config))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start(host, port))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name=f"fake-llm-{id(server):x}", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    return ServerHandle(server.base_url, stop, server=server)


# --------------------------------------------------------------------------- CLI


async def _serve_forever(server: FakeOpenAIServer, host: str, port: int, watch_stdin: bool) -> None:
    await server.start(host, port)
    print(f"listening {server.base_url}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher: asyncio.Task[None] | None = None
    if watch_stdin:
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

        async def wait_for_parent() -> None:
            await stdin.read()  # returns at EOF, i.e. when the parent closed the pipe or died
            stop.set()

        watcher = asyncio.create_task(wait_for_parent())
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; print ``listening http://HOST:PORT/v1`` once started.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Exit code 0.
    """
    parser = argparse.ArgumentParser(
        prog="python -m narr_assets.testing.server",
        description="Fault-injecting OpenAI-compatible test server (loopback only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port, 0 = any free port (default 0)")
    parser.add_argument("--latency", type=float, default=None, help="latency_s: delay before each answer")
    parser.add_argument("--config", default="{}", help="JSON object of fault config fields")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault RNG (default: config seed, 0)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (parent died)")
    args = parser.parse_args(argv)
    try:
        _check_loopback(args.host)
        updates = json.loads(args.config)
        if not isinstance(updates, dict):
            raise ValueError("--config must be a JSON object")
        if args.latency is not None:
            updates["latency_s"] = args.latency
        if args.seed is not None:
            updates["seed"] = args.seed
        config = FaultConfig().merged(updates)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve_forever(FakeOpenAIServer(config), args.host, args.port, args.exit_on_stdin_eof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
