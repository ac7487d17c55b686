"""Classifier backends: one call for one narrative, returning the raw answer.

A backend makes exactly one attempt per `complete()`; retrying is the engine's job (see
`narr_assets.classify`) so every attempt is counted and the shared rate limit sees it. Errors are
sorted into two kinds: `TransientError` (429, 5xx, timeouts, dropped connections - worth
retrying, possibly after a server-given `Retry-After`) and `FatalError` (bad key, unknown
model, malformed request - retrying cannot help, so the run stops at once and says what to fix).
"""

from __future__ import annotations

import time
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RawResponse:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


class TransientError(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(Exception):
    """A failure no retry can fix; the message says what to change."""


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


def _describe_fatal(exc: openai.APIStatusError, cfg: ExperimentConfig) -> str:
    where = f"{cfg.source_file}: endpoint {cfg.model.base_url}, model {cfg.model.name!r}"
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
    return f"{where}: HTTP {exc.status_code}: {hint} ({_error_message(exc)})"


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if message:
            return str(message)[:200]
    return str(exc)[:200]


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
            raise TransientError(_describe_transport_error(exc, self.cfg.run.timeout_s)) from None
        except openai.APIStatusError as exc:
            if exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500:
                raise TransientError(f"HTTP {exc.status_code}", _retry_after(exc.response.headers)) from None
            raise FatalError(_describe_fatal(exc, self.cfg)) from None
        except ValueError as exc:
            # A 200 whose body is not JSON: a proxy or server hiccup, worth another try.
            raise TransientError(f"malformed response body ({type(exc).__name__})") from None
        return raw_from_body(body, time.perf_counter() - start)

    async def aclose(self) -> None:
        await self.client.close()


def raw_from_body(body: Any, latency_s: float) -> RawResponse:
    """The fields we keep from a chat.completion JSON body; anything malformed is transient."""
    try:
        choice = body["choices"][0]
        message = choice.get("message") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise TransientError("response without choices") from None
    # Servers put reasoning text in different fields (vLLM/LM Studio: reasoning_content,
    # Ollama and others: reasoning); keep whichever is present.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    usage = body.get("usage") or {}
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
