"""The fleet as a rollout engine (`Fleet`): requests routed to the servers of the pool, resent when a server fails.

- Requests are token-in / token-out: one `/v1/completions` request per prompt with `n` = the group size,
  `return_token_ids`, and `logprobs=0` (the sampled token's logprob; the servers run with
  `--logprobs-mode processed_logprobs`, as the colocated engine does). Prompt i's seed is the colocated engine's
  (rollout.base.prompt_seed), so at the same weights both engines draw the same samples.
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
import logging
import time
from dataclasses import dataclass, field

import httpx

from rollout.base import Completion, Rollout, SamplingParams, prompt_seed
from rollout.engines.checks import check_request
from rollout.engines.fleet.servers import HEALTH_EVERY_S, SERVED_NAME, FleetError, Server, ServerPool, ServerSink

logger = logging.getLogger(__name__)


class Fleet:
    """The engine over the servers: generate, sessions, complete, run. `pool`: the processes; `sink`: the weight
    transport, which the trainer's pipeline drives (rollout.base.WeightSink)."""

    def __init__(self, pool: ServerPool, sink: ServerSink, *, max_model_len: int, timeout_s: float):
        self.pool, self.sink = pool, sink
        self.max_model_len, self.timeout_s = max_model_len, timeout_s
        self.retries = 0  # requests sent again after a server failed

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
        body = _request_body(prompt, sampling, n_req, prompt_seed(sampling.seed, i, sampling.n))
        _, choices = await self._post(body)
        return _completions(i, choices, n_req, sampling.n)

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
        server, choices = await self._post(_request_body(ids, sampling, 1, sampling.seed), prefer=session.server)
        session.server = server
        session.turns.append(server.url)
        return _completions(0, choices, 1, 1)[0]

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


def _request_body(prompt: list[int], sampling: SamplingParams, n_req: int, seed: int | None) -> dict:
    return {"model": SERVED_NAME, "prompt": prompt, "n": n_req, "max_tokens": sampling.max_tokens,
            "min_tokens": sampling.min_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": True, "seed": seed}


def _completions(i: int, choices: list[dict], n_req: int, n: int) -> list[Completion]:
    if len(choices) != n_req:
        raise RuntimeError(f"a rollout server returned {len(choices)} samples for prompt {i}, expected {n_req}")
    out = []
    for c in sorted(choices, key=lambda c: c["index"]):
        ids, logprobs = c["token_ids"], c["logprobs"]["token_logprobs"]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"a rollout server returned {len(logprobs)} logprobs for {len(ids)} tokens")
        if c["finish_reason"] not in ("stop", "length"):
            raise RuntimeError(f"a rollout server finished a sample of prompt {i} with {c['finish_reason']!r}")
        out.append(Completion(i, list(ids), [float(x) for x in logprobs], c["finish_reason"], c["text"]))
    return out * (n // n_req)
