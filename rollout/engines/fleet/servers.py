"""The rollout servers as processes (`ServerPool`): started here or named in rollout.server.urls, checked at start-up,
watched, restarted, and let back into the pool once they hold the weights the fleet serves.

A server is in the pool when it answers and serves the weight sink's version (`members`). When one (re)joins, the
pool asks the sink to bring it up to date (`ServerSink.catch_up`) before it takes requests: that call is the whole
contract between the processes and a weight transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from rollout.base import WeightSink

if TYPE_CHECKING:
    from cispo.config import RolloutConfig, ServerConfig

logger = logging.getLogger(__name__)

SERVED_NAME = "policy"
HEALTH_EVERY_S = 2.0
# start-up check of --logprobs-mode: the temperature compared with 1, and a prompt any vocabulary has
CHECK_TEMPERATURE = 0.5
CHECK_PROMPT = list(range(1, 9))


class FleetError(RuntimeError):
    """No server could serve (all down past rollout.server.timeout_s), or a server misconfigured."""


def server_command(model_dir: str, cfg: RolloutConfig, *, port: int, dtype: str, seed: int, on_cpu: bool,
                   host: str = "127.0.0.1", fp32_lm_head: bool = False) -> list[str]:
    """The command line of one rollout server (run it with VLLM_SERVER_DEV_MODE=1). `fp32_lm_head`: M1's fp32 LM
    head (model.fp32_lm_head), as the colocated engine gets it (rollout.engines.vllm_engine)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port), "--dtype", dtype,
           "--seed", str(seed), "--max-model-len", str(cfg.max_model_len), "--logprobs-mode", "processed_logprobs",
           "--weight-transfer-config", json.dumps({"backend": "cispo_file"}),
           "--worker-extension-cls", "rollout.engines.vllm_transfer.TransferWorkerExtension",
           "--disable-log-stats", "--disable-uvicorn-access-log"]
    if on_cpu:  # the colocated engine's CPU settings (rollout.engines.vllm_engine): eager, sized KV cache, whole prefills
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(cfg.kv_cache_gb * (1 << 30))),
                "--no-enable-chunked-prefill"]
    else:
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
                "--tensor-parallel-size", str(cfg.tensor_parallel_size)] + (["--enforce-eager"] * cfg.enforce_eager)
    if fp32_lm_head:
        cmd += ["--hf-overrides", json.dumps({"head_dtype": "float32"})]
    processors = []
    if cfg.early_stop_k:  # M1's repetition early stop, the server's rule (rollout.engines.vllm_worker)
        processors.append("rollout.engines.vllm_worker:ServerRepetitionEarlyStop")
        cmd += ["--additional-config", json.dumps({"cispo_early_stop": {"k": cfg.early_stop_k, "p": cfg.early_stop_p}})]
    if cfg.server.in_flight != "off":  # where each request's tokens change version (rollout.engines.vllm_versions)
        processors.append("rollout.engines.vllm_versions:VersionMarks")
        cmd += ["--no-async-scheduling"]  # the marks are exact under the synchronous scheduler
    if processors:
        cmd += ["--logits-processors", *processors]
    return cmd + list(cfg.server.args)


def parse_cpus(spec: str) -> set[int]:
    """"0", "2-3", "0,4-5" -> CPU ids (taskset's list format)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None = None  # started here (restartable), or None for an external server
    command: list[str] = field(default_factory=list)
    cpus: set[int] | None = None
    log: Path | None = None
    healthy: bool = False  # in the pool's rotation (answers, and caught up when it last joined)
    version: int = -1  # the weight version it holds; -1: unknown (restarted, mid-load, or a load failed)
    inflight: int = 0
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # more environment for a process started here


def configured_servers(model_dir: str, cfg: RolloutConfig, *, dtype: str, seed: int, on_cpu: bool,
                       log_dir: Path, fp32_lm_head: bool = False) -> list[Server]:
    """rollout.server.urls as external servers, or rollout.server.count servers to start on localhost."""
    if cfg.server.urls:
        return [Server(url.rstrip("/")) for url in cfg.server.urls]
    log_dir.mkdir(parents=True, exist_ok=True)
    cpus = [parse_cpus(c) for c in cfg.server.cpus] or [None] * cfg.server.count
    return [Server(f"http://127.0.0.1:{cfg.server.port + i}",
                   command=server_command(model_dir, cfg, port=cfg.server.port + i, dtype=dtype, seed=seed,
                                          on_cpu=on_cpu, fp32_lm_head=fp32_lm_head),
                   cpus=cpus[i], log=log_dir / f"server-{i}.log")
            for i in range(cfg.server.count)]


class ServerSink(WeightSink, Protocol):
    """A weight transport of the server pool: the trainer's WeightSink, plus what the pool needs of it."""

    model_name: str  # the model the fleet's requests name: SERVED_NAME, or an adapter's name on the servers

    async def catch_up(self, server: Server) -> None:
        """Run on the pool's event loop when `server` (re)joins, before it takes requests: give it the weights of
        `served_version` in full, and leave `server.version` at the version it then holds (a sync may serve a newer
        one meanwhile; the server is not in the pool, so that sync skips it)."""
        ...

    def close(self) -> None:
        """Release what the transport holds (files, a process group); the servers are already stopped."""
        ...


class ServerPool:
    """The servers, their processes and health, and the one asyncio loop (a background thread) with the HTTP
    client that every part of the fleet talks to them through. `sink` (set before `start`) is the weight transport:
    the pool admits a server once `sink.catch_up(server)` returns, and `members` are the healthy servers at
    `sink.served_version`."""

    def __init__(self, servers: list[Server], cfg: ServerConfig):
        self.servers, self.cfg = servers, cfg
        self.sink: ServerSink | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-http", daemon=True)
        self._thread.start()
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request: hundreds a step
        # idle connections are dropped before the server's keep-alive timeout (vLLM's uvicorn: 5 s), so a request
        # rarely goes out on a connection the server is closing
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=5.0),
                                      limits=httpx.Limits(keepalive_expiry=2.0))
        self.changed = asyncio.Event()  # set when a server joins or leaves the pool, or a sync ends
        self._monitor = None

    def run(self, coro, timeout: float | None = None):
        """Run `coro` on the pool's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def healthy(self) -> int:
        return sum(s.healthy for s in self.servers)

    def members(self) -> list[Server]:
        """The servers a request may go to: healthy, holding the weights the fleet serves."""
        return [s for s in self.servers if s.healthy and s.version == self.sink.served_version]

    async def wait_changed(self, timeout: float) -> None:
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            pass

    def down(self, s: Server, why: str) -> None:
        """Take `s` out of the pool; it rejoins through the health watch, with the served weights loaded in full."""
        if s.healthy:
            logger.warning("rollout server %s is out of the pool: %s", s.url, why)
        s.healthy, s.version = False, -1
        self.changed.set()

    # ------------------------------------------------------------------------------------------- processes
    def _spawn(self, server: Server) -> None:
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **server.env)
        if server.cpus:
            env["OMP_NUM_THREADS"] = str(len(server.cpus))
        log = open(server.log, "ab")
        cpus = server.cpus
        server.process = subprocess.Popen(
            server.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        log.close()

    @staticmethod
    def _signal_group(server: Server, sig: int) -> None:
        """Signal a started server's whole process group (it leads its own session): the API server and the
        engine-core and worker processes it spawned. Killing the API server alone leaves those running, holding
        the server's memory (on GPUs its device memory) after the server is gone or restarted."""
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:  # every process of the group has exited
            pass

    # ------------------------------------------------------------------------------------------- start-up
    def start(self) -> None:
        """Start the servers this pool owns, wait until all answer (a line every 10 s), check each one's routes and
        logprobs, have the sink bring each up to date, then watch their health."""
        if self.sink is None:
            raise RuntimeError("ServerPool.start: set pool.sink (the weight transport) first")
        for s in self.servers:
            if s.command:
                self._spawn(s)
        self.run(self._start())
        self._monitor = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    async def _start(self) -> None:
        await self._wait_all()
        for s in self.servers:
            await self._check_routes(s)
            await self._check_logprobs(s)
            await self.sink.catch_up(s)
            s.healthy = True

    async def _wait_all(self) -> None:
        started = said = time.monotonic()
        up: set[str] = set()
        while len(up) < len(self.servers):
            for s in self.servers:
                if s.process is not None and s.process.poll() is not None:
                    raise FleetError(f"rollout server {s.url} exited with code {s.process.returncode} while "
                                     f"starting; its log ends:\n{_tail(s.log)}")
                if s.url not in up and await self.answers(s):
                    up.add(s.url)
            if time.monotonic() - started > self.cfg.timeout_s:
                down = [s.url for s in self.servers if s.url not in up]
                log = self.servers[0].log
                raise FleetError(f"rollout servers {down} did not answer /health within rollout.server.timeout_s="
                                 f"{self.cfg.timeout_s:g} s" + (f"; log: {log}" if log else ""))
            if time.monotonic() - said >= 10:
                said = time.monotonic()
                print(f"waiting for rollout servers: {len(up)}/{len(self.servers)} up after {said - started:.0f} s",
                      flush=True)
            await asyncio.sleep(0.5)

    async def answers(self, s: Server) -> bool:
        try:
            return (await self.http.get(f"{s.url}/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _check_routes(self, s: Server) -> None:
        r = await self.http.post(f"{s.url}/init_weight_transfer_engine", json={"init_info": {}})
        if r.status_code == 404:
            raise FleetError(f"rollout server {s.url} has no weight-transfer routes: start it with "
                             "VLLM_SERVER_DEV_MODE=1 (rollout.engines.fleet.server_command builds the command line)")
        if r.status_code != 200:
            raise FleetError(f"rollout server {s.url} refused the cispo_file weight-transfer backend ({r.status_code}:"
                             f" {r.text[:300]}): start it with --weight-transfer-config '{{\"backend\": \"cispo_file\"}}'"
                             " and cispo-rl installed in its environment")
        models = (await self.http.get(f"{s.url}/v1/models")).json()["data"]
        if SERVED_NAME not in [m["id"] for m in models]:
            raise FleetError(f"rollout server {s.url} serves {[m['id'] for m in models]}, not {SERVED_NAME!r}: "
                             f"start it with --served-model-name {SERVED_NAME}")

    async def _check_logprobs(self, s: Server) -> None:
        """The server must report the logprobs of the distribution it samples from (after temperature), as the
        loss's behaviour correction assumes; vLLM's default reports the raw model's. Measured, not read from its
        flags: the top tokens' logprob gaps at temperature t are 1/t times those at temperature 1 only when it runs
        with --logprobs-mode processed_logprobs, and then they are log-probabilities (their logsumexp <= 0)."""
        tops = []
        for temperature in (1.0, CHECK_TEMPERATURE):
            r = await self.http.post(f"{s.url}/v1/completions", json={
                "model": SERVED_NAME, "prompt": CHECK_PROMPT, "max_tokens": 1, "temperature": temperature,
                "logprobs": 5, "return_tokens_as_token_ids": True, "seed": 0})
            r.raise_for_status()
            tops.append(r.json()["choices"][0]["logprobs"]["top_logprobs"][0])
        shared = tops[0].keys() & tops[1].keys()
        gap1, gap_t = (max(top[k] for k in shared) - min(top[k] for k in shared) for top in tops)
        if gap1 < 1e-3:
            logger.warning("rollout server %s: its top logprobs are all equal, so --logprobs-mode cannot be checked",
                           s.url)
            return
        ratio, total = gap_t / gap1, math.log(sum(math.exp(v) for v in tops[0].values()))
        if abs(ratio * CHECK_TEMPERATURE - 1) > 0.02 or total > 1e-4:
            raise FleetError(
                f"rollout server {s.url} does not report the logprobs it samples from: at temperature "
                f"{CHECK_TEMPERATURE:g} its top logprob gaps are {ratio:.3g}x those at temperature 1 (expected "
                f"{1 / CHECK_TEMPERATURE:g}x; 1x are the raw model's, vLLM's default), logsumexp {total:.3g}. Start "
                "it with --logprobs-mode processed_logprobs (rollout.engines.fleet.server_command builds the line)")

    # ------------------------------------------------------------------------------------------- health
    async def _watch(self) -> None:
        """Every HEALTH_EVERY_S: a server that stopped answering leaves the pool; a dead process started here is
        restarted; a server that answers again, with no request of its own in flight, is brought up to date by the
        sink, then rejoins."""
        while True:
            await asyncio.sleep(HEALTH_EVERY_S)
            for s in self.servers:
                try:
                    await self._check(s)
                except Exception:  # noqa: BLE001 - the watcher must outlive any one server's trouble
                    logger.exception("rollout server %s: health check failed", s.url)

    async def _check(self, s: Server) -> None:
        if s.process is not None and s.process.poll() is not None:
            self.down(s, f"its process exited with code {s.process.returncode}")
            self._signal_group(s, signal.SIGKILL)  # the engine processes of the dead server
            s.restarts += 1
            logger.warning("restarting rollout server %s (restart %d)", s.url, s.restarts)
            self._spawn(s)
            return
        answers = await self.answers(s)
        if s.healthy and not answers:
            self.down(s, "it stopped answering /health")
        if s.healthy or not answers or s.inflight:
            return  # in flight: a server that left the pool while busy rejoins once its requests end, not mid-load
        await self._check_routes(s)
        await self.sink.catch_up(s)
        s.healthy = True
        logger.warning("rollout server %s is back (weights v%d)", s.url, s.version)
        self.changed.set()

    # ------------------------------------------------------------------------------------------- reads
    async def probe(self, ids: list[int]) -> dict[str, list[float]]:
        """Each healthy server's log-probabilities of ids[1:] given the tokens before (temperature 1)."""
        async def one(s: Server):
            r = await self.http.post(f"{s.url}/v1/completions", json={
                "model": SERVED_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
            r.raise_for_status()
            entries = r.json()["choices"][0]["prompt_logprobs"][1:]
            return s.url, [e[str(t)]["logprob"] for e, t in zip(entries, ids[1:], strict=True)]

        return dict(await asyncio.gather(*[one(s) for s in self.servers if s.healthy]))

    def close(self) -> None:
        """Stop the watch and the loop, then every server started here (its whole process group)."""
        if self._monitor is not None:
            self._monitor.cancel()
        try:  # requests still out (in-flight groups) end now: their callers' threads must not wait forever
            self.run(_cancel_others(), timeout=10)
            self.run(self.http.aclose(), timeout=10)
        except Exception:  # noqa: BLE001 - closing must go on
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        started = [s for s in self.servers if s.process is not None]
        for s in started:
            self._signal_group(s, signal.SIGTERM)
        for s in started:
            try:
                s.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(s, signal.SIGKILL)  # whatever of the group did not exit on SIGTERM


async def _cancel_others() -> None:
    """Cancel every task of the running loop but this one, and wait until they have ended."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
