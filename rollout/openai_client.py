"""Chat completions against any OpenAI-compatible endpoint (a `vllm serve`, OpenRouter), for evaluation.

Built on httpx rather than the openai SDK, for four reasons: the retry policy (which statuses, exponential
backoff with jitter, Retry-After honoured or refused when too long) is ours and tested, not the SDK's; the raw
JSON keeps the fields the SDK types do not have (`reasoning` / `reasoning_content`, OpenRouter's `usage.cost`,
OpenRouter's errors inside a 200 response); the key lives in one header built here, so it can be kept out of
every message we raise; and it needs nothing beyond httpx, which the stack already installs.

The API is synchronous (`complete`, `complete_all`); inside, one asyncio loop keeps up to `concurrency`
requests in flight and hands each result to a callback as soon as it arrives, so a caller can persist answers
one by one and an interrupted run loses only the requests in flight.

The key is read from the environment variable the config names, kept in the request headers only, and
replaced by "***" in any text an error carries (a server that echoes it back cannot leak it into logs).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import httpx

log = logging.getLogger(__name__)

# 408 request timeout, 409 conflict (vLLM under load), 425 too early, 429 rate limit; every 5xx is retried too.
RETRY_STATUSES = frozenset({408, 409, 425, 429})
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


def retry_after_seconds(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half of base * 2^attempt fixed, half random, capped at max_s.
    Concurrent requests rejected together then come back spread out instead of in one burst."""
    step = min(max_s, base_s * 2**attempt)
    return step / 2 + rng.uniform(0, step / 2)


class OpenAIClient:
    """Chat completions at `base_url` (ending in /v1) for `model`, with bounded concurrency and retries."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None, api_key_env: str | None, concurrency: int,
                 timeout_s: float, max_retries: int, backoff_s: float, backoff_max_s: float,
                 extra_body: dict | None = None):
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key_env = api_key_env  # named in error messages; the key itself only goes into _headers
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.extra_body = dict(extra_body or {})
        self._key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._rng = random.Random()

    @classmethod
    def from_config(cls, cfg) -> "OpenAIClient":
        """From an EndpointConfig (cispo.config); the key is read from the environment here, or fails fast."""
        key = read_api_key(cfg.api_key_env, cfg.base_url)
        return cls(cfg.base_url, cfg.model, api_key=key, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                   timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                   backoff_max_s=cfg.backoff_max_s, extra_body=dict(cfg.extra_body))

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

    async def _complete_all(self, requests, on_result) -> None:
        # The semaphore, not the connection pool, bounds the requests in flight: a request queued for a pooled
        # connection would count the wait against its timeout, and a long evaluation queues thousands.
        slots = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=min(30.0, self.timeout_s))
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                     limits=limits) as http:

            async def one(i: int, request: ChatRequest) -> None:
                async with slots:
                    result = await self._complete(http, request)
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

    async def _complete(self, http: httpx.AsyncClient, request: ChatRequest) -> ChatResult:
        body = {"model": self.model, "messages": request.messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "top_p": request.top_p, **self.extra_body}
        if request.seed is not None:
            body["seed"] = request.seed
        start = time.monotonic()
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = await http.post("/chat/completions", json=body)
            except httpx.TransportError as err:  # timeouts, refused / dropped connections
                failure = self._redact(f"{type(err).__name__}: {err}")
            else:
                data = _json(response)
                error = data.get("error") if isinstance(data, dict) else None
                if response.status_code == 200 and not error:
                    return self._result(data, attempt + 1, time.monotonic() - start)
                # OpenRouter reports errors raised mid-generation inside a 200, with the real status as error.code
                status = response.status_code if response.status_code != 200 else _error_code(error, default=502)
                message = self._redact(_error_message(data, response.text))
                if not (status in RETRY_STATUSES or status >= 500):
                    raise self._fatal(status, error, message)
                failure, retry_after = f"HTTP {status}: {message}", retry_after_seconds(response.headers)
            if attempt == self.max_retries:
                break
            if retry_after is not None and retry_after > self.backoff_max_s:
                raise EndpointError(
                    f"{self.base_url} asks to retry after {retry_after:.0f} s, more than endpoint.backoff_max_s="
                    f"{self.backoff_max_s:g} (a quota or a long outage?): {failure}")
            # Retry-After is honoured as a lower bound; the jitter spreads out requests that were refused together
            delay = backoff_delay(attempt, self.backoff_s, self.backoff_max_s, self._rng)
            delay = max(delay, retry_after) if retry_after is not None else delay
            log.warning("%s: %s; retry %d/%d in %.1f s", self.base_url, failure, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        raise EndpointError(f"{self.base_url}: gave up after {self.max_retries + 1} attempts: {failure}")

    def _fatal(self, status: int, error, message: str) -> EndpointError:
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

    def _result(self, data: dict, attempts: int, seconds: float) -> ChatResult:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.base_url}: a 200 response without choices[0].message: "
                                f"{self._redact(str(data))[:300]}") from None
        usage = data.get("usage") or {}
        return ChatResult(
            answer=message.get("content") or "",
            reasoning=message.get("reasoning") or message.get("reasoning_content"),
            finish_reason=choice.get("finish_reason") or "unknown",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            cost=usage.get("cost"),
            attempts=attempts,
            seconds=seconds,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _json(response: httpx.Response):
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
