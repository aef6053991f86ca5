"""The file transport of the server fleet (`FileSink`, a rollout.base.WeightSink): a version's weights are written once
as safetensors shards under rollout.server.weight_dir (default /dev/shm, or the temp dir; across nodes a filesystem
the servers can read), then every server loads them through vLLM's weight-transfer routes (`/start_weight_update`,
`/update_weights {"update_info": {"path": dir}}`, `/finish_weight_update` with the version; the server side is
rollout.engines.vllm_transfer) and its prefix cache is reset.

Versions and files:
- `serve(v)` makes v the version the fleet serves before it pushes, so no request goes out mid-sync (a server is
  in the pool only at the served version). A server that fails to load is taken out of the pool; if none loaded,
  the previous version is served again and the servers rejoin with it.
- A server that (re)joins gets the served version's files in full (`catch_up`, called by the pool). It reads
  (files, version) once per push and is labelled with the version it loaded; if a sync served a newer version
  meanwhile (it skipped the server, which was out of the pool), it loads that one too. A failed load leaves it
  unlabelled (-1) and out of the pool until a later catch-up loads the served weights in full.
- Files of versions older than the last completed sync's are removed, except while a catch-up is reading them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from rollout.base import SyncReport
from rollout.engines.fleet.servers import SERVED_NAME, FleetError, Server, ServerPool
from rollout.engines.weights import Meter, iter_named_tensors, stage_safetensors

logger = logging.getLogger(__name__)


@dataclass
class Written:
    """One version's weights on disk."""

    path: Path
    bytes: int
    tensors: int
    write_s: float


class FileSink:
    """The servers' weights over files (see the module docstring). `after_push`: a test's hook, awaited by a
    catch-up between its push and its labelling, where a sync may slip in (tests/test_fleet.py)."""

    transport = "file"
    model_name = SERVED_NAME  # what requests name: the servers' full weights

    def __init__(self, pool: ServerPool, weight_dir: str | None):
        self.pool = pool
        base = weight_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        self.root = Path(tempfile.mkdtemp(prefix="cispo-fleet-weights-", dir=base))
        self._written: dict[int, Written] = {}
        self._lock = threading.Lock()  # `_written`: write() runs on the trainer's thread, serve() on the producer's
        # the version every server should hold, and its files (None: the checkpoint the servers started from)
        self._served: tuple[int, Path | None] = (0, None)
        self._reading: Counter[int] = Counter()  # versions a catch-up is loading: their files stay
        self._kept = 0  # the last version a sync completed: its files and newer stay (a failing sync falls back to it)
        self.after_push: Callable[[Server, int], Awaitable[None]] | None = None
        self._syncs = 0

    @property
    def served_version(self) -> int:
        return self._served[0]

    def write(self, named_tensors, version: int) -> None:
        """Write the weights of `version` as safetensors shards; may run while the servers generate."""
        meter = Meter(iter_named_tensors(named_tensors))
        start = time.perf_counter()
        out = self.root / f"v{version}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        stage_safetensors(meter, str(out))
        if not meter.names:
            raise ValueError("FileSink.write: no tensors were given")
        with self._lock:
            self._written[version] = Written(out, meter.bytes, len(meter.names), time.perf_counter() - start)

    def serve(self, version: int) -> SyncReport:
        """Have every healthy server load the files `write` wrote for `version`."""
        with self._lock:
            if version not in self._written:
                raise ValueError(f"FileSink.serve(v{version}): no weights were written for v{version} (write first)")
            written = self._written[version]
        start = time.perf_counter()
        previous, self._served = self._served, (version, written.path)
        try:
            engines = self.pool.run(self._push_all(written.path, version))
        except FleetError:  # no server loaded it: they rejoin with the weights served before
            self._served = previous
            raise
        load_s = time.perf_counter() - start
        self._kept = version
        self._prune()
        report = SyncReport(version, self.transport, written.write_s, load_s, written.bytes, written.tensors, engines)
        logger.log(logging.INFO if self._syncs == 0 else logging.DEBUG,
                   "weight sync v%d: %d tensors, %.1f MB to %d servers in %.3fs (write %.3fs, load %.3fs)", version,
                   written.tensors, written.bytes / 1e6, engines, report.seconds, written.write_s, load_s)
        self._syncs += 1
        return report

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        return self.pool.run(self.pool.probe(ids))

    async def catch_up(self, s: Server) -> None:
        """The served version's files, loaded in full into `s` (the pool calls it before `s` rejoins); again while a
        sync served a newer version meanwhile."""
        while True:
            version, path = self._served
            if path is None:  # nothing synced yet: the server holds the checkpoint it started from
                s.version = version
                return
            s.version = -1  # until the load succeeds
            self._reading[version] += 1
            try:
                await self._push(s, path, version)
            finally:
                self._reading[version] -= 1
                self._prune()
            if self.after_push is not None:
                await self.after_push(s, version)
            s.version = version
            if version == self.served_version:
                return
            logger.warning("rollout server %s loaded v%d while v%d was served; loading v%d", s.url, version,
                           self.served_version, self.served_version)

    async def _push_all(self, path: Path, version: int) -> int:
        """Push `version` to every healthy server; the number that loaded it. A server that failed is taken out of
        the pool (its weights may be half-loaded)."""
        errors = []

        async def one(s: Server):
            try:
                await self._push(s, path, version)
                s.version = version
            except httpx.HTTPError as err:
                errors.append(f"{s.url}: {type(err).__name__}: {err}")
                self.pool.down(s, f"loading v{version} failed ({errors[-1]})")

        await asyncio.gather(*[one(s) for s in self.pool.servers if s.healthy])
        self.pool.changed.set()
        loaded = sum(s.healthy and s.version == version for s in self.pool.servers)
        if not loaded:
            raise FleetError(f"no rollout server loaded the weights written to {path} "
                             f"({'; '.join(errors) or 'none up'}). Servers on other machines need "
                             "rollout.server.weight_dir on a filesystem they can read")
        return loaded

    async def _push(self, s: Server, path: Path, version: int) -> None:
        for route, body in (("/start_weight_update", None), ("/update_weights", {"update_info": {"path": str(path)}}),
                            ("/finish_weight_update", {"weight_version": str(version)}), ("/reset_prefix_cache", None)):
            r = await self.pool.http.post(f"{s.url}{route}", json=body)
            if r.status_code != 200:
                raise httpx.HTTPStatusError(f"{route}: {r.status_code} {r.text[:300]}", request=r.request, response=r)

    def _prune(self) -> None:
        """Remove the files of versions older than the last completed sync's that no catch-up is reading."""
        with self._lock:
            old = [v for v in self._written if v < self._kept and not self._reading[v]]
            paths = [self._written.pop(v).path for v in old]
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
