"""The trainer and logger groups: the optimisation, parallelism and checkpoints of a run (`trainer.*`), and what
it reports (`logger.*`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cispo.config.base import ConfigError, _one_of, _positive


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
