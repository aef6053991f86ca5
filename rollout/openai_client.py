"""Chat completions against any OpenAI-compatible endpoint (a `vllm serve`, OpenRouter), for evaluation.

Built on the `openai` SDK (`AsyncOpenAI`): it is the client most users of these endpoints already run, and it owns
the transport policy, so none of it is written here: retries of 408, 409, 429, 5xx, timeouts and dropped
connections (`endpoint.max_retries`), exponential backoff with jitter (0.5 s doubling up to 8 s), Retry-After
honoured up to two minutes (a longer one fails at once instead of stalling the run), and the per-request timeout
(`endpoint.timeout_s`). What stays here is what the SDK does not know about evaluation:

- the reasoning is kept apart from the answer: `message.reasoning` (OpenRouter, vLLM >= 0.11) or
  `message.reasoning_content` (older vLLM), read from the SDK objects' extra fields (`model_extra`), as is
  OpenRouter's billed `usage.cost`;
- OpenRouter reports an error raised mid-generation inside a 200 response, its real status in `error.code`: a
  response hook gives such a response that status before the SDK looks at it, so it is retried (or raised) by the
  SDK like any other;
- failures become one `EndpointError` that says what to fix (`ModelNotFound` naming `endpoint.model`, a wrong
  base URL, a rejected key naming its variable);
- the key: read from the environment variable the config names, handed to the SDK and to nothing else, and
  replaced by "***" in any text an error carries (a server that echoes it back cannot leak it into logs). The
  SDK's own environment fallbacks (`OPENAI_API_KEY`, `OPENAI_ORG_ID`, `OPENAI_PROJECT_ID`) are shut off: an
  endpoint is sent the key its config names, or none.

The API is synchronous (`complete`, `complete_all`); inside, one asyncio loop keeps up to `concurrency` requests
in flight (a semaphore) and hands each result to a callback as soon as it arrives, so a caller can persist answers
one by one and an interrupted run loses only the requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import openai
from openai import AsyncOpenAI

if TYPE_CHECKING:
    import httpx2  # the SDK's HTTP client, installed with it

log = logging.getLogger(__name__)

# what the SDK retries besides timeouts and dropped connections (openai._base_client: _should_retry)
RETRY_STATUSES = frozenset({408, 409, 429})
# the longest Retry-After the SDK waits for (openai._constants.MAX_RETRY_AFTER_DELAY); above it, it gives up
MAX_RETRY_AFTER_S = 120.0
_MODEL_MISSING = re.compile(
    r"not found|does not exist|not a valid model|invalid model|unknown model|no endpoints found", re.IGNORECASE
)


class EndpointError(RuntimeError):
    """A request failed for good (after the retries it was allowed)."""


class MissingAPIKey(EndpointError):
    """The environment variable that should hold the key is unset or empty."""


class ModelNotFound(EndpointError):
    """The endpoint does not serve the model the config names."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass(frozen=True)
class ChatResult:
    answer: str  # message.content; "" when the model gave none (e.g. its budget ran out while reasoning)
    reasoning: str | None  # message.reasoning (OpenRouter, vLLM >= 0.11) or .reasoning_content, where returned
    finish_reason: str  # stop | length | ... as the endpoint reports it
    prompt_tokens: int | None  # from usage; None when the endpoint does not report usage
    completion_tokens: int | None  # reasoning tokens included
    cost: float | None  # what the endpoint billed, where it says so (OpenRouter's usage.cost, USD)
    attempts: int  # 1 + retries
    seconds: float  # wall time, waits between retries included


def read_api_key(env_name: str | None, base_url: str) -> str | None:
    """The key from `env_name`; None when no key is configured. Fails naming the variable when it is unset."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise MissingAPIKey(
            f"the API key for {base_url} is read from the environment variable {env_name}, which is not set "
            f"(export {env_name}=... first; the key is never stored in configs, caches or reports)"
        )
    return key


class OpenAIClient:
    """Chat completions at `base_url` (ending in /v1) for `model`, with bounded concurrency; retries by the SDK."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None, api_key_env: str | None, concurrency: int,
                 timeout_s: float, max_retries: int, extra_body: dict | None = None):
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key_env = api_key_env  # named in error messages; the key itself only goes to the SDK
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.extra_body = dict(extra_body or {})
        self._key = api_key

    @classmethod
    def from_config(cls, cfg) -> "OpenAIClient":
        """From an EndpointConfig (cispo.eval_config); the key is read from the environment here, or fails fast."""
        key = read_api_key(cfg.api_key_env, cfg.base_url)
        return cls(cfg.base_url, cfg.model, api_key=key, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                   timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, extra_body=dict(cfg.extra_body))

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self.api_key_env else "none"
        return f"OpenAIClient({self.base_url!r}, model={self.model!r}, key={key})"

    # ---- public, synchronous ---------------------------------------------------------------------------

    def complete(self, request: ChatRequest) -> ChatResult:
        results: list[ChatResult] = []
        self.complete_all([request], lambda _i, r: results.append(r))
        return results[0]

    def complete_all(self, requests: Sequence[ChatRequest], on_result: Callable[[int, ChatResult], None]) -> None:
        """Send every request; `on_result(index, result)` runs as each one finishes (in completion order, on
        this thread). The first request that fails for good cancels the others and its error is raised."""
        if requests:
            asyncio.run(self._complete_all(requests, on_result))

    # ---- inside the event loop ------------------------------------------------------------------------

    def _sdk(self) -> AsyncOpenAI:
        """An AsyncOpenAI for one event loop (its connections belong to the loop that opened them)."""
        # The semaphore (_complete_all), not the connection pool, bounds the requests in flight: a request queued
        # for a pooled connection would count the wait against its timeout, and a long evaluation queues
        # thousands. The SDK's pool (openai.DEFAULT_CONNECTION_LIMITS, 1000) is far above any concurrency used.
        timeout = openai.Timeout(self.timeout_s, connect=min(30.0, self.timeout_s))
        http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._on_response]})
        # No key configured: each request omits the Authorization header (see _complete), and a placeholder key
        # keeps the SDK from reading $OPENAI_API_KEY at all. Organization and project headers are omitted too:
        # nothing of the environment's OPENAI_* reaches a third-party endpoint.
        headers = {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit}
        return AsyncOpenAI(api_key=self._key or "no-key", base_url=self.base_url, timeout=timeout,
                           max_retries=self.max_retries, default_headers=headers, http_client=http)

    async def _on_response(self, response: httpx2.Response) -> None:
        """Runs on every response before the SDK reads it: an error inside a 200 takes the status in its
        error.code (502 when it has none), and a failure the SDK may retry is logged with its reason."""
        if response.status_code == 200:
            await response.aread()
            if b'"error"' in response.content:  # cheap test first: answers are long, errors rare
                data = _json(response)
                error = data.get("error") if isinstance(data, dict) else None
                if error:
                    response.status_code = _error_code(error, default=502)
        if response.status_code in RETRY_STATUSES or response.status_code >= 500:
            await response.aread()
            log.warning("%s: HTTP %d: %s", self.base_url, response.status_code,
                        self._redact(_error_message(_json(response), response.text)))

    async def _complete_all(self, requests, on_result) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        async with self._sdk() as sdk:

            async def one(i: int, request: ChatRequest) -> None:
                async with slots:
                    result = await self._complete(sdk, request)
                on_result(i, result)

            tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(self, sdk: AsyncOpenAI, request: ChatRequest) -> ChatResult:
        start = time.monotonic()
        seed = {} if request.seed is None else {"seed": request.seed}
        no_key = {"Authorization": openai.omit} if self._key is None else None
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=self.model, messages=request.messages, max_tokens=request.max_tokens,
                temperature=request.temperature, top_p=request.top_p, extra_body=self.extra_body or None,
                extra_headers=no_key, **seed)
            completion = raw.parse()
        except openai.APIStatusError as err:
            raise self._status_error(err) from None  # `from None`: the SDK's message quotes the body unredacted
        except openai.APIConnectionError as err:  # timeouts (APITimeoutError), refused or dropped connections
            cause = err.__cause__ or err
            what = f"no response within endpoint.timeout_s={self.timeout_s:g} s ({type(cause).__name__})" \
                if isinstance(err, openai.APITimeoutError) else self._redact(f"{type(cause).__name__}: {cause}")
            raise EndpointError(f"{self.base_url}: gave up after {_attempts(err.request)} attempts: {what}") from None
        return self._result(completion, _attempts(raw.http_request), time.monotonic() - start)

    def _status_error(self, err: openai.APIStatusError) -> EndpointError:
        response, status = err.response, err.status_code
        data = _json(response)
        error = data.get("error") if isinstance(data, dict) else None
        message = self._redact(_error_message(data, response.text))
        if status in RETRY_STATUSES or status >= 500:
            attempts, wait = _attempts(response.request), _retry_after(response.headers)
            if attempts <= self.max_retries and wait is not None:  # the SDK stopped early: too long a wait
                return EndpointError(f"{self.base_url} asks to retry after {wait}, more than the "
                                     f"{MAX_RETRY_AFTER_S:.0f} s the openai SDK waits (a quota or a long outage?): "
                                     f"HTTP {status}: {message}")
            return EndpointError(f"{self.base_url}: gave up after {attempts} attempts: HTTP {status}: {message}")
        if status in (400, 404) and _is_model_missing(error, message, self.model):
            return ModelNotFound(f"endpoint.model={self.model!r} is not served at {self.base_url} "
                                 f"(HTTP {status}: {message})")
        if status in (401, 403):
            source = f"the key in ${self.api_key_env}" if self.api_key_env else "the request (no key was sent)"
            return EndpointError(f"{self.base_url} rejected {source} (HTTP {status}: {message})")
        if status == 404:
            return EndpointError(f"{self.base_url}/chat/completions does not exist (HTTP 404: {message}); "
                                 f"endpoint.base_url usually ends in /v1")
        return EndpointError(f"{self.base_url}: HTTP {status}: {message}")

    def _result(self, completion, attempts: int, seconds: float) -> ChatResult:
        # the SDK builds response objects without validating them: a field the server left out is just missing
        choices = getattr(completion, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        if message is None:
            raise EndpointError(f"{self.base_url}: a 200 response without choices[0].message: "
                                f"{self._redact(str(completion.to_dict()))[:300]}")
        usage = getattr(completion, "usage", None)
        return ChatResult(
            answer=message.content or "",
            reasoning=_extra(message, "reasoning") or _extra(message, "reasoning_content"),
            finish_reason=getattr(choices[0], "finish_reason", None) or "unknown",
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            cost=_extra(usage, "cost") if usage is not None else None,
            attempts=attempts,
            seconds=seconds,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _extra(obj, name: str):
    """A field the SDK's types do not declare (`reasoning`, `reasoning_content`, `cost`), kept in model_extra."""
    return (getattr(obj, "model_extra", None) or {}).get(name)


def _attempts(request: httpx2.Request | None) -> int:
    """1 + the retries behind a request: the SDK numbers each attempt in the x-stainless-retry-count header."""
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


def _retry_after(headers: httpx2.Headers) -> str | None:
    """A Retry-After-Ms / Retry-After the SDK will not wait for, as text ("3600 s", or the HTTP date); else None."""
    for name, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(name)
        if value is not None:
            try:
                seconds = float(value) / scale
            except ValueError:
                return value
            return f"{seconds:.0f} s" if seconds > MAX_RETRY_AFTER_S else None
    return None


def _json(response: httpx2.Response):
    try:
        return response.json()
    except ValueError:
        return None


def _error_code(error, default: int) -> int:
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else default


def _error_message(data, text: str) -> str:
    """The human part of an error body: OpenAI / vLLM / OpenRouter {"error": {"message"}}, FastAPI {"detail"}."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])[:500]
    return text[:500] or "(empty body)"


def _is_model_missing(error, message: str, model: str) -> bool:
    """Unknown-model errors as vLLM (404, param "model"), OpenAI (code "model_not_found") and OpenRouter
    (400, "... is not a valid model ID") word them. A 404 that names no model is a wrong URL instead."""
    if isinstance(error, dict) and (error.get("param") == "model" or error.get("code") == "model_not_found"):
        return True
    return bool(_MODEL_MISSING.search(message)) and ("model" in message.lower() or model in message)
