"""rollout/openai_client.py (on the openai SDK) against real HTTP servers on 127.0.0.1: retries (429 with
Retry-After, 5xx, an error inside a 200, timeouts), giving up, a missing key, an unknown model, the concurrency
limit, the key kept out of errors, and nothing of the environment's OPENAI_* variables sent.

`ChatServer` is a real stdlib HTTP server speaking just enough of /v1/chat/completions; tests script the failures
it answers with (the only way to provoke a 429 or a 500 on purpose). tests/test_evaluate.py reuses it, and
runs vLLM's own OpenAI server for the end-to-end check.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cispo.eval_config import EndpointConfig
from rollout.openai_client import (
    ChatRequest, EndpointError, MissingAPIKey, ModelNotFound, OpenAIClient,
)

SERVED = "fake-model"


@dataclass
class Reply:
    status: int
    body: dict | str
    headers: dict = field(default_factory=dict)
    sleep_s: float = 0.0


def arithmetic_reply(body: dict, nth: int) -> dict:
    """The default 200 message: the first request for a prompt is answered right, later ones wrong, so each
    prompt ends with exactly one correct sample; the reasoning comes in its own field, as OpenRouter sends it."""
    question = body["messages"][-1]["content"]
    a, b = map(int, re.search(r"(\d+)\+(\d+)", question).groups())
    answer = a + b if nth == 0 else -1
    return {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}.", "reasoning": f"Adding {a} and {b}."}


class ChatServer:
    """Scripted replies first (in order), then 404 for an unknown model, else `reply(body, nth request for this
    prompt)` with usage (prompt tokens = words of the prompt, 7 completion tokens) and a cost of 0.001."""

    def __init__(self, script: list[Reply] | None = None, reply=arithmetic_reply, key: str | None = None):
        self.script, self.reply, self.key = list(script or []), reply, key
        self.requests: list[tuple[dict, dict]] = []  # (headers, body) of every POST
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.per_prompt: dict[str, int] = {}
        self.delay_s = 0.0  # added to every default reply (to observe concurrency)
        self.fail_after: int | None = None  # answer HTTP 400 to every request past this many default replies
        handler = type("Handler", (_Handler,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.handle_error = lambda *a: None  # a client that timed out and hung up is expected here
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def respond(self, path: str, headers: dict, body: dict) -> Reply:
        with self.lock:
            self.requests.append((headers, body))
            if self.script:
                return self.script.pop(0)
        if path != "/v1/chat/completions":
            return Reply(404, {"detail": "Not Found"})
        if self.key is not None and headers.get("authorization") != f"Bearer {self.key}":
            # like servers that quote what they were sent: the client must keep it out of its own errors
            sent = headers.get("authorization")
            return Reply(401, {"error": {"message": f"invalid credentials: {sent}", "code": 401}})
        if body.get("model") != SERVED:
            return Reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                         "type": "NotFoundError", "param": "model", "code": 404}})
        prompt = json.dumps(body["messages"])
        with self.lock:
            served = sum(self.per_prompt.values())
            if self.fail_after is not None and served >= self.fail_after:
                return Reply(400, {"error": {"message": "the server is told to refuse this one", "code": 400}})
            nth = self.per_prompt.get(prompt, 0)
            self.per_prompt[prompt] = nth + 1
        usage = {"prompt_tokens": len(body["messages"][-1]["content"].split()), "completion_tokens": 7,
                 "total_tokens": 0, "cost": 0.001}
        return Reply(200, {"choices": [{"index": 0, "message": self.reply(body, nth), "finish_reason": "stop"}],
                           "usage": usage}, sleep_s=self.delay_s)


class _Handler(BaseHTTPRequestHandler):
    owner: ChatServer

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.owner.lock:
            self.owner.in_flight += 1
            self.owner.max_in_flight = max(self.owner.max_in_flight, self.owner.in_flight)
        try:
            reply = self.owner.respond(self.path, headers, body)
            time.sleep(reply.sleep_s)
            data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
            self.send_response(reply.status)
            for name, value in {"content-type": "application/json", **reply.headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data.encode())))
            self.end_headers()
            self.wfile.write(data.encode())
        finally:
            with self.owner.lock:
                self.owner.in_flight -= 1

    def log_message(self, *args):
        pass


def client(url: str, **kw) -> OpenAIClient:
    options = dict(api_key=None, api_key_env=None, concurrency=4, timeout_s=10.0, max_retries=3)
    return OpenAIClient(url, SERVED, **(options | kw))


def question(a: int = 12, b: int = 34) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": f"What is {a}+{b}?"}], max_tokens=16, temperature=1.0, top_p=0.95,
                       seed=7)


def test_a_plain_request_parses_answer_reasoning_usage_and_cost():
    with ChatServer() as server:
        result = client(server.url).complete(question())
    assert result.answer == "The answer is \\boxed{46}." and result.reasoning == "Adding 12 and 34."
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens, result.cost) == ("stop", 3, 7, 0.001)
    assert result.attempts == 1
    sent = server.requests[0][1]
    assert [sent[k] for k in ("model", "max_tokens", "temperature", "top_p", "seed")] == [SERVED, 16, 1.0, 0.95, 7]


def test_429_then_200_waits_as_long_as_retry_after_says():
    script = [Reply(429, {"error": {"message": "rate limited", "code": 429}}, headers={"retry-after": "1"})]
    with ChatServer(script) as server:
        start = time.monotonic()
        result = client(server.url).complete(question())
        waited = time.monotonic() - start
    assert result.answer.endswith("\\boxed{46}.") and result.attempts == 2 and len(server.requests) == 2
    assert waited >= 1.0  # the SDK's first backoff alone would have waited 0.375-0.5 s


def test_500_then_200_is_retried():
    with ChatServer([Reply(500, "Internal Server Error")]) as server:
        result = client(server.url).complete(question())
    assert result.attempts == 2 and len(server.requests) == 2


def test_an_error_inside_a_200_is_retried_by_its_code():
    # OpenRouter: "any error occurred while the LLM is producing the output will be emitted in the response body"
    script = [Reply(200, {"error": {"message": "provider returned error", "code": 502}})]
    with ChatServer(script) as server:
        assert client(server.url).complete(question()).attempts == 2


def test_a_timeout_is_retried():
    with ChatServer([Reply(200, {"choices": []}, sleep_s=1.5)]) as server:
        result = client(server.url, timeout_s=0.5).complete(question())
    assert result.attempts == 2 and result.answer.endswith("\\boxed{46}.")


def test_timeouts_give_up_naming_the_timeout():
    with ChatServer([Reply(200, {"choices": []}, sleep_s=1.5)] * 2) as server:
        with pytest.raises(EndpointError, match=r"after 2 attempts: no response within endpoint.timeout_s=0.5 s"):
            client(server.url, timeout_s=0.5, max_retries=1).complete(question())
    assert len(server.requests) == 2


def test_gives_up_after_max_retries():
    with ChatServer([Reply(503, {"error": {"message": "no provider available", "code": 503}})] * 3) as server:
        with pytest.raises(EndpointError, match=r"gave up after 3 attempts: HTTP 503: no provider available"):
            client(server.url, max_retries=2).complete(question())
    assert len(server.requests) == 3


def test_a_retry_after_longer_than_the_sdk_waits_fails_instead_of_stalling():
    script = [Reply(429, {"error": {"message": "daily quota", "code": 429}}, headers={"retry-after": "3600"})]
    outcome: list[BaseException | None] = []

    def call():
        try:
            client(server.url).complete(question())
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 (handed to the test thread)
            outcome.append(err)

    with ChatServer(script) as server:
        worker = threading.Thread(target=call, daemon=True)  # a client that waits instead would hang the test
        worker.start()
        worker.join(timeout=10)
    assert outcome, "the client is still waiting for the Retry-After of an hour"
    assert isinstance(outcome[0], EndpointError)
    assert "asks to retry after 3600 s, more than the 120 s the openai SDK waits" in str(outcome[0])
    assert "HTTP 429: daily quota" in str(outcome[0]) and len(server.requests) == 1


def test_an_error_inside_every_200_gives_up_with_its_status_and_message():
    script = [Reply(200, {"error": {"message": "provider returned error", "code": 503}})] * 3
    with ChatServer(script) as server:
        with pytest.raises(EndpointError, match=r"gave up after 3 attempts: HTTP 503: provider returned error"):
            client(server.url, max_retries=2).complete(question())
    assert len(server.requests) == 3


def test_a_refused_connection_is_retried_then_reported():
    with ChatServer() as server:
        url = server.url
    # the server is closed: nothing listens on its port any more
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1:\d+/v1: gave up after 2 attempts: \w*Connect"):
        client(url, max_retries=1).complete(question())


def test_a_200_without_choices_is_an_error_and_missing_usage_is_none():
    def bare(body, nth):
        return {"role": "assistant", "content": None}

    script = [Reply(200, {"id": "x", "choices": []})]
    with ChatServer(script) as server:
        with pytest.raises(EndpointError, match=r"a 200 response without choices\[0\]\.message"):
            client(server.url).complete(question())
    no_usage = [Reply(200, {"choices": [{"index": 0, "message": bare({}, 0), "finish_reason": "length"}]})]
    with ChatServer(no_usage) as server:
        result = client(server.url).complete(question())
    assert (result.answer, result.reasoning, result.finish_reason) == ("", None, "length")
    assert (result.prompt_tokens, result.completion_tokens, result.cost) == (None, None, None)


def test_other_4xx_are_not_retried():
    with ChatServer([Reply(400, {"error": {"message": "max_tokens is too large", "code": 400}})]) as server:
        with pytest.raises(EndpointError, match="HTTP 400: max_tokens is too large") as err:
            client(server.url).complete(question())
    assert not isinstance(err.value, ModelNotFound) and len(server.requests) == 1


def test_unknown_model_is_one_clear_error_naming_endpoint_model():
    with ChatServer() as server:
        c = OpenAIClient(server.url, "minimax/nope", api_key=None, api_key_env=None, concurrency=4, timeout_s=10.0,
                         max_retries=3)
        with pytest.raises(ModelNotFound, match=r"endpoint.model='minimax/nope' is not served at http://127"):
            c.complete_all([question(a) for a in range(10, 30)], lambda i, r: None)
    assert len(server.requests) <= 4  # the requests already in flight, no retries, the rest cancelled


def test_openrouter_style_invalid_model_is_recognised():
    script = [Reply(400, {"error": {"message": "minimax/nope is not a valid model ID", "code": 400}})]
    with ChatServer(script) as server:
        with pytest.raises(ModelNotFound):
            client(server.url).complete(question())


def test_a_wrong_path_is_not_reported_as_an_unknown_model():
    with ChatServer() as server:
        with pytest.raises(EndpointError, match="usually ends in /v1") as err:
            client(server.url.removesuffix("/v1")).complete(question())
    assert not isinstance(err.value, ModelNotFound)


def test_missing_key_fails_before_any_request_naming_the_variable(monkeypatch):
    monkeypatch.delenv("CISPO_TEST_KEY", raising=False)
    with ChatServer() as server:
        cfg = EndpointConfig(base_url=server.url, model=SERVED, api_key_env="CISPO_TEST_KEY")
        with pytest.raises(MissingAPIKey, match=r"environment variable CISPO_TEST_KEY, which is not set"):
            OpenAIClient.from_config(cfg)
    assert server.requests == []


def test_the_key_is_sent_and_kept_out_of_errors_and_repr(monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("CISPO_TEST_KEY", secret)
    script = [Reply(401, {"error": {"message": f"key {secret} is disabled", "code": 401}})]
    with ChatServer(script, key=secret) as server:
        c = OpenAIClient.from_config(EndpointConfig(base_url=server.url, model=SERVED, api_key_env="CISPO_TEST_KEY"))
        with pytest.raises(EndpointError) as err:
            c.complete(question())
        assert c.complete(question()).answer  # the right key, accepted
    assert server.requests[0][0]["authorization"] == f"Bearer {secret}"
    assert secret not in str(err.value) and "key *** is disabled" in str(err.value)
    assert "$CISPO_TEST_KEY" in str(err.value) and secret not in repr(c)


def test_concurrency_is_bounded_and_used():
    with ChatServer() as server:
        server.delay_s = 0.2
        done = []
        client(server.url, concurrency=3).complete_all([question(a) for a in range(10, 22)],
                                                       lambda i, r: done.append(i))
    assert sorted(done) == list(range(12)) and server.max_in_flight == 3


def test_reasoning_content_is_read_where_reasoning_is_absent():
    def old_vllm(body, nth):
        return {"role": "assistant", "content": "\\boxed{46}", "reasoning_content": "12 plus 34"}

    with ChatServer(reply=old_vllm) as server:
        assert client(server.url).complete(question()).reasoning == "12 plus 34"


def test_nothing_of_the_environments_openai_variables_is_sent(monkeypatch):
    # the SDK reads these when it is not told otherwise: a key meant for api.openai.com must not go elsewhere
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-this-endpoint")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-not-for-this-endpoint")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-not-for-this-endpoint")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    with ChatServer() as server:
        assert client(server.url).complete(question()).answer  # no key configured
        assert client(server.url, api_key="sk-the-configured-key").complete(question()).answer
    (keyless, _), (keyed, _) = server.requests
    for headers in (keyless, keyed):
        assert not any("not-for-this-endpoint" in value for value in headers.values())
        assert not {"openai-organization", "openai-project"} & set(headers)
    assert "authorization" not in keyless and keyed["authorization"] == "Bearer sk-the-configured-key"

