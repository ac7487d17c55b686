"""Classifier backends: one call for one narrative, returning the raw answer.

A backend makes exactly one attempt per `complete()`; retrying is the engine's job (see
`narr_assets.classify`) so every attempt is counted and the shared rate limit sees it. Errors are
sorted into three kinds: `TransientError` (429, 5xx, timeouts, dropped connections - worth
retrying, possibly after a server-given `Retry-After`), `RejectedError` (HTTP 400/413/422: the
server refused this one request - too long, filtered - which becomes a `rejected` row unless
every request gets it) and `FatalError` (bad key, unknown model - retrying cannot help, so the
run stops at once and says what to fix).

Every message built from what a server sent goes through `redact` before it is raised, logged
or stored: the API key (and any `Bearer` token or long fragment of the key) is cut out, and so
is any stretch of the narrative a server echoes back (FastAPI validation errors quote the input).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import openai

from narr_assets.experiments import ExperimentConfig, ExperimentError, build_messages
from narr_assets.parsing import RESULT_SCHEMA


@dataclass
class RawResponse:
    """What came back from one successful call, before any parsing."""

    content: str | None
    reasoning: str | None = None
    finish_reason: str | None = None
    refusal: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    latency_s: float | None = None
    # Set when the server refused this one request (HTTP 400/413/422): its status and message,
    # redacted; such an answer becomes a `rejected` row and is journalled like any other.
    rejected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RawResponse:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


class TransientError(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait, if any.

    `unreachable` marks failures that say nothing came back from the server (connection
    refused or dropped, timeout, a gateway's 502/503/504): a run that only ever sees these
    is talking to a dead endpoint.
    """

    def __init__(self, message: str, retry_after: float | None = None, *, unreachable: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


class FatalError(Exception):
    """A failure no retry can fix; the message says what to change."""


class RejectedError(Exception):
    """The server refused one request with HTTP 400/413/422 (`str()` is the row's `error`).

    Usually about that input (context length, content filter); when every request gets the
    same refusal it is about the experiment, and `experiment_wide` is the FatalError to raise.
    """

    def __init__(self, message: str, *, status: int, signature: str, where: str, server_message: str):
        super().__init__(message)
        self.status = status
        # The refusal with its numbers blanked (token counts differ per narrative): equal
        # signatures on every narrative asked mean the request, not the input, is refused.
        self.signature = signature
        self.where = where
        self.server_message = server_message

    def experiment_wide(self, narratives: int) -> FatalError:
        """The FatalError for a refusal that the first `narratives` narratives all got."""
        return FatalError(
            f"{self.where}: HTTP {self.status}: the server refused the first {narratives} narratives asked "
            "with the same error and answered none, so the request itself is refused, not the narratives; "
            "check output.mode (not every server supports json_schema), model.max_tokens and model.extra_body; "
            f"if the narratives are simply too long, set run.max_input_chars ({self.server_message})"
        )


# A server message is cut to this many characters (after redaction, so no key is cut in half
# and left half visible).
MESSAGE_CHARS = 200
# A stretch of this many characters shared with the narrative is taken as an echo of it.
_ECHO_CHARS = 16
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",;]+")
_TOKEN = re.compile(r"[A-Za-z0-9_\-.~+/=]{8,}")


def redact(message: str, secrets: Sequence[str] = (), text: str | None = None, limit: int = MESSAGE_CHARS) -> str:
    """A server's message made safe to log, store or raise, on one line.

    Args:
        message: The message as the server (or the SDK) wrote it.
        secrets: Values that must never appear (the API key): each is replaced by its first
            three characters and `...[redacted]`, and so is any 8+ character fragment of one.
        text: The narrative the request carried: any 16+ character stretch of it is replaced
            by `[narrative text]`.
        limit: Characters kept, after redaction.

    Returns:
        The redacted message, whitespace collapsed, at most `limit` characters (plus `...`).
    """
    out = " ".join(str(message).split())
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        out = out.replace(secret, f"{secret[:3]}...[redacted]")

        def fragment(match: re.Match[str], secret: str = secret) -> str:
            # A piece of the key (a server that truncates what it echoes) is the key too.
            token = match.group()
            return f"{token[:3]}...[redacted]" if token in secret else token

        out = _TOKEN.sub(fragment, out)
    out = _BEARER.sub(lambda m: f"{m.group(1)}[redacted]", out)
    if text:
        out = _without_echo(out, text)
    return out if len(out) <= limit else out[:limit] + "..."


def _without_echo(message: str, text: str) -> str:
    """`message` with every stretch it shares with `text` (16+ characters) cut out."""
    # Server messages are short and this only runs on errors, so a window scan is cheap enough;
    # only the part that can survive truncation is scanned (a 1 MB echo stays fast).
    message = message[: 4 * MESSAGE_CHARS]
    text = " ".join(text.split())  # the message's whitespace was collapsed too
    echoed = [False] * len(message)
    for start in range(len(message) - _ECHO_CHARS + 1):
        if message[start : start + _ECHO_CHARS] in text:
            echoed[start : start + _ECHO_CHARS] = [True] * _ECHO_CHARS
    if not any(echoed):
        return message
    out: list[str] = []
    for char, hidden in zip(message, echoed, strict=True):
        if not hidden:
            out.append(char)
        elif not out or out[-1] != "\0":
            out.append("\0")
    return "".join(out).replace("\0", "[narrative text]")


class Backend(Protocol):
    journaled: bool

    async def complete(self, text: str) -> RawResponse: ...

    async def aclose(self) -> None: ...


class RulesBackend:
    """The offline lexicon classifier behind the same interface as an LLM."""

    journaled = False  # deterministic and free: nothing to save from a crash

    def __init__(self, cfg: ExperimentConfig):
        from narr_assets.rules import load_lexicon

        if cfg.lexicon is None:
            # load_experiment always resolves it; only a config built by hand can lack it.
            raise ExperimentError(f"{cfg.source_file}: backend 'rules' needs a lexicon file")
        self.lexicon = load_lexicon(cfg.lexicon)

    async def complete(self, text: str) -> RawResponse:
        from narr_assets.rules import classify

        start = time.perf_counter()
        verdict = classify(text, self.lexicon)
        return RawResponse(
            content=verdict.as_answer_json(),
            finish_reason="stop",
            model="rules",
            latency_s=time.perf_counter() - start,
        )

    async def aclose(self) -> None:
        return None


def _describe_transport_error(exc: openai.APIConnectionError, timeout_s: float) -> str:
    """`timed out after N s` or `connection error: <cause>`, from what really happened.

    The SDK's exception class is not enough: its aiohttp transport maps every aiohttp
    connection error (refused, reset, server disconnected) to a connect *timeout*, so a server
    that is not running would read "timed out". The innermost cause tells them apart.
    """
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    # httpx's timeouts (the SDK's default transport) are not TimeoutError subclasses.
    timed_out = isinstance(root, TimeoutError) or type(root).__name__.endswith("Timeout")
    if timed_out or (root is exc and isinstance(exc, openai.APITimeoutError)):
        return f"timed out after {timeout_s:g} s"
    return f"connection error: {type(root).__name__}"


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None  # an HTTP date: rare from LLM servers; fall back to our own backoff
    return None


def _where(cfg: ExperimentConfig) -> str:
    return f"{cfg.source_file}: endpoint {cfg.model.base_url}, model {cfg.model.name!r}"


def _describe_fatal(exc: openai.APIStatusError, cfg: ExperimentConfig, message: str) -> str:
    if exc.status_code == 401:
        hint = (
            f"the server rejected the API key; check the variable {cfg.model.api_key_env}"
            if cfg.model.api_key_env
            else "the server wants an API key; name its environment variable in model.api_key_env"
        )
    elif exc.status_code == 403:
        hint = "the key is not allowed to use this model or endpoint"
    elif exc.status_code == 404:
        hint = (
            "model or endpoint not found; check model.name (see the server's /v1/models) "
            "and model.base_url (usually ends in /v1)"
        )
    else:
        hint = (
            "the server refused the request; check output.mode (not every server supports "
            "json_schema) and the model parameters"
        )
    return f"{_where(cfg)}: HTTP {exc.status_code}: {hint} ({message})"


def _error_message(exc: openai.APIStatusError) -> str:
    """The server's own words, unredacted: callers pass it through `redact`."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message") or body.get("detail")
        if isinstance(message, list):
            # FastAPI's validation errors (vLLM and others): the `msg` of each, without the
            # `input` it quotes - the request, narrative included.
            texts = [d["msg"] for d in message if isinstance(d, dict) and isinstance(d.get("msg"), str)]
            message = "; ".join(texts) or message
        if message:
            return str(message)
    return str(exc)


_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def error_code(exc: openai.APIStatusError) -> str | None:
    """The error's `code` (e.g. `context_length_exceeded`) when it is a plain identifier."""
    body = exc.body  # the SDK already unwraps `{"error": {...}}` to the inner object
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) and _CODE.fullmatch(code) else None


# Refusals that can concern one request: its input too long (413), invalid or filtered (400, 422).
_REJECTABLE = (400, 413, 422)


def request_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The chat completion body of an experiment's requests, apart from the messages."""
    m = cfg.model
    params: dict[str, Any] = {"model": m.name, "temperature": m.temperature}
    if m.max_tokens is not None:
        params["max_tokens"] = m.max_tokens
    if m.seed is not None:
        params["seed"] = m.seed
    mode = cfg.output.mode
    if mode == "json_schema":
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "ipv_verdict", "schema": RESULT_SCHEMA, "strict": True},
        }
    elif mode == "json_object":
        params["response_format"] = {"type": "json_object"}
    # Server-specific fields (e.g. top_k, chat_template_kwargs) go into the body as given.
    params.update(m.extra_body)
    return params


class OpenAIBackend:
    """Any OpenAI-compatible chat completions endpoint, through the async `openai` SDK."""

    journaled = True

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        # One client per run: its connection pool (keep-alive) is shared by every worker, and
        # the engine's worker count, not the pool, bounds the requests in flight. The SDK's
        # aiohttp transport (`openai[aiohttp]`, its documented choice for high concurrency)
        # spends about half the client CPU per request of the default httpx one (measured in
        # benchmarks/); proxies from the environment and timeouts apply the same way.
        self.client = openai.AsyncOpenAI(
            base_url=cfg.model.base_url,
            api_key=cfg.api_key(),
            max_retries=0,  # the engine retries, so attempts are counted and rate-limited together
            timeout=cfg.run.timeout_s,
            http_client=openai.DefaultAioHttpClient(),
        )
        self.params = request_params(cfg)
        # The one value `redact` must cut out of everything the server sends back; the dummy
        # key of local servers is no secret.
        self.secrets: tuple[str, ...] = (cfg.api_key(),) if cfg.model.api_key_env else ()

    async def complete(self, text: str) -> RawResponse:
        start = time.perf_counter()
        try:
            # `client.post` is the SDK's documented call for custom requests: same transport,
            # auth, timeouts and error classes as `chat.completions.create`, without its typed
            # request transform and response models (~1 ms of client CPU per call, measured;
            # at 32+ requests in flight the client's CPU is the bottleneck).
            body = await self.client.post(
                "/chat/completions", body={"messages": build_messages(self.cfg, text), **self.params}, cast_to=object
            )
        except openai.APIConnectionError as exc:  # APITimeoutError included
            message = redact(_describe_transport_error(exc, self.cfg.run.timeout_s), self.secrets, text)
            raise TransientError(message, unreachable=True) from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc, text) from None
        except ValueError as exc:
            # A 200 whose body is not JSON: a proxy or server hiccup, worth another try.
            raise TransientError(f"malformed response body ({type(exc).__name__})") from None
        return self._without_secrets(raw_from_body(body, time.perf_counter() - start))

    def _status_error(self, exc: openai.APIStatusError, text: str) -> Exception:
        """The error kind an HTTP error status stands for, its message redacted."""
        status = exc.status_code
        if status in (408, 409, 425, 429) or status >= 500:
            # A gateway with nothing behind it answers 502/503/504 for ever: as good as no answer.
            return TransientError(
                f"HTTP {status}", _retry_after(exc.response.headers), unreachable=status in (502, 503, 504)
            )
        message = redact(_error_message(exc), self.secrets, text)
        if status not in _REJECTABLE:
            return FatalError(_describe_fatal(exc, self.cfg, message))
        code = error_code(exc)
        return RejectedError(
            f"HTTP {status}{f' ({code})' if code else ''}: {message}",
            status=status,
            signature=f"{status} {code} {re.sub(r'[0-9]+', '#', message)}",
            where=_where(self.cfg),
            server_message=message,
        )

    def _without_secrets(self, raw: RawResponse) -> RawResponse:
        """`raw` with the API key cut out of its text fields (a hostile server may echo it)."""
        for secret in self.secrets:
            for name in ("content", "reasoning", "refusal", "model", "finish_reason"):
                value = getattr(raw, name)
                if isinstance(value, str) and secret in value:
                    setattr(raw, name, value.replace(secret, f"{secret[:3]}...[redacted]"))
        return raw

    async def aclose(self) -> None:
        await self.client.close()


def raw_from_body(body: Any, latency_s: float) -> RawResponse:
    """The fields we keep from a chat.completion JSON body; anything malformed is transient."""
    try:
        choice = body["choices"][0]
        message = choice.get("message") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise TransientError("response without choices") from None
    usage = body.get("usage") or {}
    if not isinstance(message, dict) or not isinstance(usage, dict):
        what = "message" if not isinstance(message, dict) else "usage"
        raise TransientError(f"malformed response body ({what} is not an object)")
    # Servers put reasoning text in different fields (vLLM/LM Studio: reasoning_content,
    # Ollama and others: reasoning); keep whichever is present.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    details = usage.get("completion_tokens_details") or {}
    return RawResponse(
        content=message.get("content") if isinstance(message.get("content"), str) else None,
        reasoning=reasoning if isinstance(reasoning, str) else None,
        finish_reason=choice.get("finish_reason"),
        refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else None,
        model=body.get("model"),
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
        reasoning_tokens=_int_or_none(details.get("reasoning_tokens") if isinstance(details, dict) else None),
        latency_s=latency_s,
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def make_backend(cfg: ExperimentConfig) -> Backend:
    return RulesBackend(cfg) if cfg.backend == "rules" else OpenAIBackend(cfg)
