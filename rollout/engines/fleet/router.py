"""The fleet as a rollout engine (`Fleet`): requests routed to the servers of the pool, resent when a server fails.

- Requests are token-in / token-out: one `/v1/completions` request per prompt with `n` = the group size,
  `return_token_ids`, and `logprobs=0` (the sampled token's logprob; the servers run with
  `--logprobs-mode processed_logprobs`, as the colocated engine does). Prompt i's seed is the colocated engine's
  (rollout.base.prompt_seed), so at the same weights both engines draw the same samples.
- Early stop (rollout.early_stop_k): the servers run it (rollout.engines.vllm_worker.ServerRepetitionEarlyStop) and
  report a forced EOS as a "stop"; each request carries a tag, and a sample that may have been stopped (a "stop"
  whose last logprob is 0) is looked up under it on its server: it is reported as the colocated engine reports it.
- Versions (in-flight weight updates, rollout.engines.fleet.in_flight): each request says the version it is sent
  under; when the fleet serves another one by the time it returns, the server's marks of where its tokens changed
  version are read back and each token is labelled (`Completion.versions`, rollout.engines.vllm_versions).
- Balancing: each request goes to the pool member with the fewest requests in flight.
- Failures: a request whose server fails (connection lost, 5xx, a dead process) is sent again, whole, to another
  server; a group is either returned complete or not at all, so nothing is lost or counted twice. The server is
  out of the pool until the pool lets it back (rollout.engines.fleet.servers).
- Sessions (multi-turn, rollout.base.SessionEngine): `complete(ids, sampling, session)` sends one trajectory's
  turn as its own request, to the server that took the session's first turn while that server is in the pool, so
  the trajectory's prefix is in that server's prefix cache. When it is not, the turn goes to the least loaded
  server and the session moves there (`Session.moves`). `run(coro)` runs the trajectories on the fleet's loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx

from rollout.base import Completion, Rollout, SamplingParams, prompt_seed
from rollout.engines.checks import check_request
from rollout.engines.fleet.servers import HEALTH_EVERY_S, FleetError, Server, ServerPool, ServerSink

logger = logging.getLogger(__name__)
TAG_ARG = "cispo_early_stop_tag"  # rollout.engines.vllm_worker.SERVER_TAG_ARG (that module imports vllm)
POP = "cispo_pop_early_stops"  # the servers' worker method that hands over the early stops forced under a tag
VERSION_ARG = "cispo_version"  # rollout.engines.vllm_versions.VERSION_ARG: the version a request is sent under
POP_VERSIONS = "cispo_pop_versions"  # the servers' worker method that hands over a request's version marks


class Fleet:
    """The engine over the servers: generate, sessions, complete, run. `pool`: the processes; `sink`: the weight
    transport, which the trainer's pipeline drives (rollout.base.WeightSink)."""

    def __init__(self, pool: ServerPool, sink: ServerSink, *, max_model_len: int, timeout_s: float):
        self.pool, self.sink = pool, sink
        self.max_model_len, self.timeout_s = max_model_len, timeout_s
        self.retries = 0  # requests sent again after a server failed
        self._tags = (f"{uuid.uuid4().hex[:8]}:{i}" for i in itertools.count())  # a request's early-stop tag
        self._no_early_stop: set[str] = set()  # servers found without the early stop (rollout.early_stop_k = 0)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        prompts = [list(map(int, p)) for p in prompts]
        check_request(prompts, sampling, self.max_model_len)
        start = time.perf_counter()
        groups = self.pool.run(self._generate(prompts, sampling))
        return Rollout([c for group in groups for c in group], time.perf_counter() - start)

    async def _generate(self, prompts, sampling):
        # vLLM refuses n > 1 for greedy sampling: one sample, repeated (as the colocated engine does)
        n_req = 1 if sampling.temperature < 1e-5 else sampling.n
        return await asyncio.gather(*[self._group(i, p, sampling, n_req) for i, p in enumerate(prompts)])

    async def _group(self, i: int, prompt: list[int], sampling: SamplingParams, n_req: int) -> list[Completion]:
        body = _request_body(prompt, sampling, n_req, prompt_seed(sampling.seed, i, sampling.n), next(self._tags),
                             self.sink.served_version, self.sink.model_name)
        server, choices, forced = await self._post_stops(body)
        return _completions(i, choices, n_req, sampling.n, forced, await self._versions(server, body),
                            body["vllm_xargs"][VERSION_ARG])

    async def _versions(self, server: Server, body: dict) -> list:
        """The version marks a server recorded for the request of `body` (rollout.engines.vllm_versions), when the
        fleet served another version while it ran (in-flight weight updates); none when it did not: every token is
        of the version it was sent under."""
        if self.sink.served_version == body["vllm_xargs"][VERSION_ARG]:
            return []
        rpc = {"method": POP_VERSIONS, "args": [body["vllm_xargs"][TAG_ARG]]}
        try:
            r = await self.pool.http.post(f"{server.url}/collective_rpc", json=rpc)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            # a keep-alive connection the server closed before it read the request (as in `_post`): once more
            r = await self.pool.http.post(f"{server.url}/collective_rpc", json=rpc)
        if r.status_code != 200:
            raise RuntimeError(f"rollout server {server.url} did not give the policy versions of a request that ran "
                               f"across a weight sync ({r.status_code}: {r.text[:200]}); in-flight updates need "
                               "servers started with --logits-processors rollout.engines.vllm_versions:VersionMarks")
        return [mark for got in r.json()["results"] for mark in (got or [])]

    async def _post_stops(self, body: dict, prefer: Server | None = None) -> tuple[Server, list[dict], set]:
        """`_post`, then the early stops the server forced in the reply ((tokens before the EOS, their hash), as
        the colocated engine matches them): read through its worker (rollout.engines.vllm_worker.
        ServerRepetitionEarlyStop) when a sample ends in a "stop" whose last token has logprob 0, as a forced EOS
        has. A server whose worker has no such method runs no early stop: it is not asked again. A server that fails
        the read otherwise is a failed server: the request is sent again."""
        while True:
            server, choices = await self._post(body, prefer)
            if server.url in self._no_early_stop or not any(
                    c["finish_reason"] == "stop" and c["logprobs"]["token_logprobs"][-1:] == [0.0] for c in choices):
                return server, choices, set()
            tag = body["vllm_xargs"][TAG_ARG]
            try:
                r = await self.pool.http.post(f"{server.url}/collective_rpc",
                                              json={"method": POP, "args": [tag]})
            except httpx.HTTPError as err:
                self.pool.down(server, f"reading its early stops failed ({type(err).__name__}: {err})")
                self.retries += 1
                continue
            if r.status_code == 200:
                return server, choices, {tuple(s) for got in r.json()["results"] for s in (got or {}).get(tag, ())}
            if POP in r.text:  # vLLM's reply when the worker has no such method: the server runs no early stop
                self._no_early_stop.add(server.url)
                return server, choices, set()
            self.pool.down(server, f"reading its early stops failed ({r.status_code}: {r.text[:200]})")
            self.retries += 1

    async def _pick(self, prefer: Server | None = None) -> Server:
        deadline = time.monotonic() + self.timeout_s
        while True:
            members = self.pool.members()
            if any(s is prefer for s in members):
                return prefer
            if members:
                return min(members, key=lambda s: s.inflight)
            if time.monotonic() > deadline:
                raise FleetError(f"no rollout server answered for rollout.server.timeout_s={self.timeout_s:g} s")
            await self.pool.wait_changed(HEALTH_EVERY_S)

    async def _post(self, body: dict, prefer: Server | None = None) -> tuple[Server, list[dict]]:
        """(the server that answered, its choices): `body` sent to `prefer` when it is in the pool, else to the
        least loaded member, and sent again, whole, to another one when its server fails. A dropped connection to
        a server that still answers /health is a closed keep-alive connection, not a failed server: the request is
        sent again once without taking the server out of the pool (which would push it weights mid-generation)."""
        resent = False
        while True:
            server = await self._pick(prefer)
            server.inflight += 1
            try:
                r = await self.pool.http.post(f"{server.url}/v1/completions", json=body)
                if r.status_code >= 500:
                    raise httpx.HTTPStatusError(f"{r.status_code}: {r.text[:200]}", request=r.request, response=r)
            except httpx.HTTPError as err:
                dropped = isinstance(err, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))
                alive = server.process is None or server.process.poll() is None
                if dropped and not resent and alive and await self.pool.answers(server):
                    resent = True
                    logger.warning("rollout server %s dropped a connection (%s); sending the request again",
                                   server.url, type(err).__name__)
                    continue
                self.pool.down(server, f"a request failed ({type(err).__name__}: {err})")
                self.retries += 1
                continue
            finally:
                server.inflight -= 1
            if r.status_code != 200:
                raise ValueError(f"rollout server {server.url} refused a request ({r.status_code}): {r.text[:500]}")
            return server, r.json()["choices"]

    def session(self) -> Session:
        return Session()

    async def complete(self, ids: list[int], sampling: SamplingParams, session: Session) -> Completion:
        if sampling.n != 1:
            raise ValueError(f"a session request takes one sample, not n={sampling.n}")
        ids = list(map(int, ids))
        check_request([ids], sampling, self.max_model_len)
        body = _request_body(ids, sampling, 1, sampling.seed, next(self._tags), self.sink.served_version,
                             self.sink.model_name)
        server, choices, forced = await self._post_stops(body, prefer=session.server)
        session.server = server
        session.turns.append(server.url)
        return _completions(0, choices, 1, 1, forced, await self._versions(server, body),
                            body["vllm_xargs"][VERSION_ARG])[0]

    def run(self, coro):
        return self.pool.run(coro)

    def close(self) -> None:
        self.pool.close()
        self.sink.close()


@dataclass
class Session:
    """One trajectory's place in the fleet (`Fleet.complete`)."""

    server: Server | None = None  # the server its turns go to
    turns: list[str] = field(default_factory=list)  # the url that served each turn

    @property
    def moves(self) -> int:
        """Turns served elsewhere than the turn before (its server had left the pool)."""
        return sum(a != b for a, b in zip(self.turns, self.turns[1:]))


def _request_body(prompt: list[int], sampling: SamplingParams, n_req: int, seed: int | None, tag: str,
                  version: int, model: str) -> dict:
    return {"model": model, "prompt": prompt, "n": n_req, "max_tokens": sampling.max_tokens,
            "min_tokens": sampling.min_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": True, "seed": seed,
            "vllm_xargs": {TAG_ARG: tag, VERSION_ARG: version}}


def token_versions(sent: int, marks: list, ids: list[int]) -> list[int]:
    """The policy version of each token of a sample (`ids`): `sent`, the version its request was sent under, up to
    the first of its marks (rollout.engines.vllm_versions), each mark's version from its index on. A mark is this
    sample's when it hashes the sample's tokens before it (the other samples of the request have other tokens)."""
    versions = [sent] * len(ids)
    for index, version, digest in sorted(map(tuple, marks)):
        if index <= len(ids) and hash(tuple(ids[:index])) == digest:
            versions[index:] = [version] * (len(ids) - index)
    return versions


def _completions(i: int, choices: list[dict], n_req: int, n: int, forced: set, marks: list,
                 sent: int) -> list[Completion]:
    """The samples of prompt `i`; `forced`: the early stops the server forced, as `_post_stops` reads them (such a
    sample ends in the forced EOS, logprob 0, finish_reason "early_stop", as in the colocated engine); each token's
    policy version from `sent`, the version the request was sent under, and `marks`, where its tokens changed
    version (`Fleet._versions`)."""
    if len(choices) != n_req:
        raise RuntimeError(f"a rollout server returned {len(choices)} samples for prompt {i}, expected {n_req}")
    out = []
    for c in sorted(choices, key=lambda c: c["index"]):
        ids, logprobs = c["token_ids"], c["logprobs"]["token_logprobs"]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"a rollout server returned {len(logprobs)} logprobs for {len(ids)} tokens")
        if c["finish_reason"] not in ("stop", "length"):
            raise RuntimeError(f"a rollout server finished a sample of prompt {i} with {c['finish_reason']!r}")
        reason = c["finish_reason"]
        if reason == "stop" and ids and (len(ids) - 1, hash(tuple(ids[:-1]))) in forced:
            reason = "early_stop"
        out.append(Completion(i, list(ids), [float(x) for x in logprobs], reason, c["text"],
                              token_versions(sent, marks, ids)))
    return out * (n // n_req)
