"""In-flight weight updates (`InFlightSink`, rollout.server.in_flight = keep | recompute): a weight transport around
another (file or group) whose syncs do not wait for the servers' requests to finish.

A sync pauses every server with its running requests kept (vLLM's `/pause?mode=keep`: the scheduler stops and the
requests stay, KV cache included), loads the new weights through the transport it wraps, tells each server the
version it now holds (rollout.engines.vllm_versions: `cispo_set_version`), and resumes it (`/resume`). The requests
then go on under the new weights:
- keep: on the KV cache computed before the update (PipelineRL's choice: no recomputation; a token after the
  update is sampled from the new weights attending to keys and values of the old ones, and its sampling logprob,
  the behaviour policy the loss corrects against, is exactly that);
- recompute: every running request is preempted before the resume (`/reset_prefix_cache?reset_running_requests=
  true`, which also empties the prefix cache), so the scheduler prefills its prompt and tokens so far again under
  the new weights: its later tokens are the new policy's, at the cost of one prefill per running request.
Either way the tokens of a request carry the version that sampled each (the servers' VersionMarks, read back by
the router): the loss's per-token behaviour correction needs nothing more.

New requests wait while the servers load: the fleet serves the new version once `serve` starts (a server is in the
pool only at the served version), as with the transport alone. A server that joins gets the served weights from
the transport (`catch_up`) and its version set; it has no requests to keep.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from rollout.base import SyncReport
from rollout.engines.fleet.servers import Server, ServerPool, ServerSink

logger = logging.getLogger(__name__)
MODES = ("keep", "recompute")


class InFlightSink:
    """`inner`'s syncs with the servers paused instead of drained (module docstring). `mode`: keep | recompute."""

    def __init__(self, pool: ServerPool, inner: ServerSink, mode: str):
        if mode not in MODES:
            raise ValueError(f"rollout.server.in_flight={mode!r}: use one of {MODES} (or off: no InFlightSink)")
        self.pool, self.inner, self.mode = pool, inner, mode
        self.transport = f"{inner.transport}+{mode}"
        self.model_name = inner.model_name
        self.paused_s = 0.0  # the last sync's pause, from the first pause sent to the last resume answered

    @property
    def served_version(self) -> int:
        return self.inner.served_version

    def write(self, named_tensors, version: int) -> None:
        self.inner.write(named_tensors, version)

    def serve(self, version: int) -> SyncReport:
        start = time.perf_counter()
        paused = self.pool.run(self._all("pause"))
        try:
            report = self.inner.serve(version)
            self.pool.run(self._after_load(version))
        finally:
            self.pool.run(self._all("resume", paused))
            self.paused_s = time.perf_counter() - start
        return SyncReport(version, self.transport, report.write_s, self.paused_s, report.bytes, report.tensors,
                          report.engines)

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        return self.inner.probe(ids)

    async def catch_up(self, server: Server) -> None:
        await self.inner.catch_up(server)
        if server.version >= 0:
            await self._set_version(server, server.version)

    def close(self) -> None:
        self.inner.close()

    # ----------------------------------------------------------------------------------------------------------
    async def _all(self, what: str, servers: list[Server] | None = None) -> list[Server]:
        """Pause (keeping requests) or resume `servers` (default: the healthy ones); the servers that answered. A
        server that fails is taken out of the pool (it rejoins through a full catch-up)."""
        route = "/pause?mode=keep" if what == "pause" else "/resume"
        targets = [s for s in self.pool.servers if s.healthy] if servers is None else servers

        async def one(s: Server) -> Server | None:
            try:
                r = await self.pool.http.post(f"{s.url}{route}")
                r.raise_for_status()
                return s
            except httpx.HTTPError as err:
                self.pool.down(s, f"{route} failed ({type(err).__name__}: {err})")
                return None

        return [s for s in await asyncio.gather(*[one(s) for s in targets]) if s is not None]

    async def _after_load(self, version: int) -> None:
        """Every server that loaded `version`: its version told to its VersionMarks; recompute: its running requests
        preempted, to be prefilled again under the new weights when it resumes."""
        loaded = [s for s in self.pool.servers if s.healthy and s.version == version]
        await asyncio.gather(*[self._set_version(s, version) for s in loaded])
        if self.mode == "recompute":
            for s in loaded:
                r = await self.pool.http.post(f"{s.url}/reset_prefix_cache",
                                              params={"reset_running_requests": "true"})
                if r.status_code != 200 or not r.json().get("success", False):
                    self.pool.down(s, f"recomputing its running requests failed ({r.status_code}: {r.text[:200]})")

    async def _set_version(self, s: Server, version: int) -> None:
        r = await self.pool.http.post(f"{s.url}/collective_rpc", json={"method": "cispo_set_version",
                                                                      "args": [version]})
        if r.status_code != 200:
            raise RuntimeError(f"rollout server {s.url} cannot record policy versions ({r.status_code}: "
                               f"{r.text[:200]}): start it with --logits-processors "
                               "rollout.engines.vllm_versions:VersionMarks (server_command adds it)")
