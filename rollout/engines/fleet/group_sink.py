"""The process-group transport of the server fleet (`GroupSink`, a rollout.base.WeightSink; rollout.server.
weight_transport=group): the trainer (rank 0) and the servers join one gloo group (rollout.engines.group_transfer;
the servers run the `cispo_group` backend of rollout.engines.vllm_transfer), and a version's weights are broadcast
to all of them at once in packed buckets of rollout.server.bucket_mb.

- `write(v)` packs the weights into buckets as the iterator yields them (one copy of the model, as FileSink's files
  are; a ZeRO-3 updater gathers its parameters one by one while this runs; why it sends nothing: below).
- `serve(v)` posts `/start_weight_update`, `/update_weights {"update_info": {"group", "layout"}}` and
  `/finish_weight_update` to every healthy server concurrently while the buckets are broadcast; a server loads
  bucket i while bucket i + 1 arrives. The group is built (each server's `/init_weight_transfer_engine`) before the
  first sync and again whenever its members change.
- A server that dies mid-broadcast: every operation of the group has its timeout (`timeout_s`, rollout.server.
  sync_timeout_s), so the broadcast fails within it instead of hanging (at once when the member's connection
  drops, as a killed process's does). The trainer then releases its end of the group, which closes its
  connections: the other servers' receives fail at once instead of each waiting out the timeout for a bucket that
  will not come. The servers whose load failed are taken out of the pool, and the pool restarts or readmits them
  through `catch_up`.
- `catch_up(server)` builds a group of two, the trainer and that server, and broadcasts the served version to it
  alone (the next sync builds a group of all the servers again).

Versions, the labelling of a server that (re)joins while a sync runs, and what is kept follow FileSink
(file_sink.py): the packed buckets of versions older than the last completed sync's are dropped, except while a
catch-up sends them.

Why `write` packs the whole model and `serve` sends it, rather than `write` streaming each bucket to the servers
as its tensors arrive:
- `serve` is the point where the servers are told to receive. The WeightSink contract lets `write` run while the
  servers generate (rollout.mode=server: the trainer's thread writes v + 1 while the producer's generates under v)
  and makes `serve` the switch after which every sample is of the new version; with rollout.server.in_flight the
  servers are paused inside `serve`. The `cispo_group` backend loads each bucket into the live model as it arrives
  (vLLM's layerwise reload, in place, from /start_weight_update to /finish_weight_update), so buckets sent during
  `write` would change the weights under requests labelled with the old version. Receiving them into a buffer and
  loading in `serve` would move the same full copy into every server (behind routes vLLM does not have), not
  remove it.
- The copy is what catch-ups send: a server that restarts or rejoins later gets the served version in full
  (`catch_up`, as FileSink keeps its files). By then the trainer's parameters have changed, and under ZeRO-3
  gathering them is collective over every trainer rank, which the pool's loop cannot start.
- `write` runs on the trainer's thread, `serve` on the producer's and `catch_up` on the pool's loop: streaming in
  `write` would put two senders on one group, and a server failing during `write` would have no sync to fail (no
  SyncReport, no served version to fall back to).
What `write` does overlap: `pack` copies each tensor as the iterator yields it, so a ZeRO-3 updater's gathered
buckets (trainer.sync_bucket_mb) are released as they are copied, never held beside the whole model. The copy
costs the trainer's thread `write_s` and one model's bytes of host memory per version held (the served one and
the one written next). Measured (scripts/bench_sync.py --models tiny,smollm2: one local server, two shared cores,
medians of 5): SmolLM2-135M in fp32 (538 MB) packs in 0.29-0.36 s for 16, 64 and 256 MB buckets (FileSink writes
the same weights to /dev/shm in 1.76 s), against a server pause (broadcast and load) of 1.1-1.9 s; the tiny model
(3.5 MB) in 1-2 ms.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import httpx
import torch

from rollout.base import SyncReport
from rollout.engines import group_transfer as gt
from rollout.engines.fleet.servers import SERVED_NAME, FleetError, Server, ServerPool

logger = logging.getLogger(__name__)


@dataclass
class Packed:
    """One version's weights in buckets."""

    buckets: list[torch.Tensor]
    layout: list[dict]
    bytes: int
    tensors: int
    write_s: float


class Group:
    """The trainer's end of one gloo group: its process group, its name, and its members (server urls, rank
    i + 1 for members[i])."""

    def __init__(self, name: str, pg, store, members: tuple[str, ...]):
        self.name, self.pg, self.store, self.members = name, pg, store, members
        self.broken = False


class GroupSink:
    """The servers' weights over a gloo process group (see the module docstring)."""

    transport = "group"
    model_name = SERVED_NAME  # what requests name: the servers' full weights

    def __init__(self, pool: ServerPool, bucket_mb: float = 64, timeout_s: float = 120.0):
        self.pool = pool
        self.bucket_bytes = max(1, int(bucket_mb * (1 << 20)))
        self.timeout_s = timeout_s
        self._packed: dict[int, Packed] = {}
        self._lock = threading.Lock()  # `_packed`: write() runs on the trainer's thread, serve() on the producer's
        self._served: tuple[int, Packed | None] = (0, None)
        self._reading: Counter[int] = Counter()
        self._kept = 0
        self._group: Group | None = None  # the group of all the servers, for syncs
        self._member_of: dict[str, str] = {}  # server url -> the group it joined last
        self._syncs = 0

    @property
    def served_version(self) -> int:
        return self._served[0]

    def write(self, named_tensors, version: int) -> None:
        """Pack the weights of `version` into buckets; may run while the servers generate."""
        start = time.perf_counter()
        buckets, layout, nbytes, count = gt.pack(named_tensors, self.bucket_bytes)
        if not count:
            raise ValueError("GroupSink.write: no tensors were given")
        with self._lock:
            self._packed[version] = Packed(buckets, layout, nbytes, count, time.perf_counter() - start)

    def serve(self, version: int) -> SyncReport:
        """Broadcast the buckets `write` packed for `version` to every healthy server."""
        with self._lock:
            if version not in self._packed:
                raise ValueError(f"GroupSink.serve(v{version}): no weights were written for v{version} (write first)")
            packed = self._packed[version]
        start = time.perf_counter()
        previous, self._served = self._served, (version, packed)
        try:
            engines = self.pool.run(self._push_all(packed, version))
        except FleetError:
            self._served = previous
            raise
        load_s = time.perf_counter() - start
        self._kept = version
        self._prune()
        report = SyncReport(version, self.transport, packed.write_s, load_s, packed.bytes, packed.tensors, engines)
        logger.log(logging.INFO if self._syncs == 0 else logging.DEBUG,
                   "weight sync v%d over the group: %d tensors, %.1f MB in %d buckets to %d servers in %.3fs "
                   "(pack %.3fs, broadcast and load %.3fs)", version, packed.tensors, packed.bytes / 1e6,
                   len(packed.buckets), engines, report.seconds, packed.write_s, load_s)
        self._syncs += 1
        return report

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        return self.pool.run(self.pool.probe(ids))

    async def catch_up(self, s: Server) -> None:
        """The served version, broadcast to `s` alone over a fresh group of two (the pool calls it before `s`
        rejoins); again while a sync served a newer version meanwhile."""
        self._member_of.pop(s.url, None)  # restarted, or its group re-made: the next sync builds a new one
        while True:
            version, packed = self._served
            if packed is None:
                s.version = version
                return
            s.version = -1
            self._reading[version] += 1
            try:
                group = await self._build([s])
                try:
                    errors = await self._broadcast(group, [s], packed, version)
                finally:
                    group.pg = group.store = None
                if errors:
                    raise FleetError(f"catching up {s.url} to v{version} failed: {errors[0]}")
            finally:
                self._reading[version] -= 1
                self._prune()
            s.version = version
            if version == self.served_version:
                return
            logger.warning("rollout server %s loaded v%d while v%d was served; loading v%d", s.url, version,
                           self.served_version, self.served_version)

    # ------------------------------------------------------------------------------------------- the group
    def _current(self, servers: list[Server]) -> Group | None:
        g = self._group
        if g is None or g.broken or g.members != tuple(s.url for s in servers):
            return None
        if any(self._member_of.get(url) != g.name for url in g.members):
            return None
        return g

    async def _build(self, servers: list[Server]) -> Group:
        """A new group of the trainer and `servers` (each joins through its /init_weight_transfer_engine)."""
        address = gt.address_towards(gt.url_host(servers[0].url))
        world = len(servers) + 1
        store = await asyncio.to_thread(gt.master_store, address, world, self.timeout_s)
        name = uuid.uuid4().hex[:12]

        async def init(rank: int, s: Server):
            r = await self.pool.http.post(f"{s.url}/init_weight_transfer_engine", json={"init_info": {
                "master_address": address, "master_port": store.port, "rank": rank, "world_size": world,
                "timeout_s": self.timeout_s, "group": name}}, timeout=self.timeout_s + 30)
            if r.status_code != 200:
                raise FleetError(f"rollout server {s.url} did not join the weight group ({r.status_code}: "
                                 f"{r.text[:300]}); start it with --weight-transfer-config '{{\"backend\": "
                                 "\"cispo_group\"}' (rollout.server.weight_transport=group does for servers it starts)")

        results = await asyncio.gather(asyncio.to_thread(gt.join, store, 0, world, address, self.timeout_s),
                                       *[init(i + 1, s) for i, s in enumerate(servers)], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s, r in zip(servers, results[1:]):
                if isinstance(r, BaseException):
                    self.pool.down(s, f"joining the weight group failed ({type(r).__name__}: {r})")
            raise errors[0] if isinstance(errors[0], FleetError) else FleetError(
                f"building the weight group failed: {type(errors[0]).__name__}: {errors[0]}")
        for s in servers:
            self._member_of[s.url] = name
        return Group(name, results[0], store, tuple(s.url for s in servers))

    async def _broadcast(self, group: Group, servers: list[Server], packed: Packed, version: int) -> list[str]:
        """Every server of `group` loads `packed` while rank 0 broadcasts it; the errors of those that failed (each
        taken out of the pool). Any failure breaks the group."""
        errors: list[str] = []
        info = {"group": group.name, "layout": packed.layout}
        # each receive fails within the group's timeout; the whole load may take longer on a large model (at 10 MB/s
        # at least), so a request waits that long before the server counts as stuck
        timeout = self.timeout_s + 30 + packed.bytes / 1e7

        async def one(s: Server):
            try:
                for route, body in (("/start_weight_update", None), ("/update_weights", {"update_info": info}),
                                    ("/finish_weight_update", {"weight_version": str(version)}),
                                    ("/reset_prefix_cache", None)):
                    r = await self.pool.http.post(f"{s.url}{route}", json=body, timeout=timeout)
                    if r.status_code != 200:
                        raise httpx.HTTPStatusError(f"{route}: {r.status_code} {r.text[:300]}", request=r.request,
                                                    response=r)
                return True
            except httpx.HTTPError as err:
                errors.append(f"{s.url}: {type(err).__name__}: {err}")
                self.pool.down(s, f"loading v{version} failed ({errors[-1]})")
                return False

        async def send():
            try:
                await asyncio.to_thread(gt.send_buckets, group.pg, packed.buckets)
                return True
            except Exception as err:  # noqa: BLE001 - a member died or timed out: the servers' own errors follow
                errors.append(f"broadcast: {type(err).__name__}: {err}")
            # The broadcast stopped, so no member can complete this load; those still receiving would wait out the
            # group's timeout for the next bucket (every server paused that long for one dead member). Releasing
            # the trainer's end closes its connections: their receives fail at once. (Outside the except block: the
            # error's traceback holds the process group until the block ends.)
            group.broken = True
            await self._release(group)
            return False

        results = await asyncio.gather(send(), *[one(s) for s in servers], return_exceptions=True)
        if errors or any(r is not True for r in results):
            group.broken = True
        for s, ok in zip(servers, results[1:]):
            if ok is True and results[0] is not True:
                ok = False  # cannot happen (the server received every bucket), but never label a doubtful load
                self.pool.down(s, f"loading v{version}: the broadcast failed")
            if ok is True:
                s.version = version
        return errors

    @staticmethod
    async def _release(group: Group) -> None:
        """Drop the trainer's end of `group` (its process group and store) on a worker thread: the process group's
        destructor waits for its queued operations (each may run until the group's timeout), then closes its
        connections, and the pool's loop must not wait on that."""
        held = [group.pg, group.store]
        group.pg = group.store = None
        await asyncio.to_thread(held.clear)

    async def _push_all(self, packed: Packed, version: int) -> int:
        servers = [s for s in self.pool.servers if s.healthy]
        errors: list[str] = []
        if servers:
            group = self._current(servers)
            if group is None:
                self._group = None
                try:
                    group = self._group = await self._build(servers)
                except FleetError as err:
                    errors.append(str(err))
                    group = None
            if group is not None:
                errors += await self._broadcast(group, servers, packed, version)
                if group.broken:
                    self._group = None
        self.pool.changed.set()
        loaded = sum(s.healthy and s.version == version for s in self.pool.servers)
        if not loaded:
            raise FleetError(f"no rollout server loaded v{version} over the weight group "
                             f"({'; '.join(errors) or 'none up'})")
        return loaded

    def _prune(self) -> None:
        served = self._served[0]
        with self._lock:
            for v in [v for v in self._packed if v < self._kept and v != served and not self._reading[v]]:
                del self._packed[v]

    def close(self) -> None:
        self._group = None
        with self._lock:
            self._packed.clear()
