"""The single-process optimizer step: AdamW, warm-up + constant/cosine schedule, explicit gradient clipping.

`TorchUpdater` and `cispo.train.distributed.DeepSpeedUpdater` are both an `Updater`, so the trainer's update loop is
the same for both.

The LR schedule runs over RL steps, not over a count of optimizer updates fixed in advance: update j of the k
that step s actually makes sits at position (s - 1 + j / k) * algo.updates_per_step. When every step makes its
algo.updates_per_step updates this is the update index; when dropped zero-variance groups leave fewer, a cosine
still reaches its floor at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from cispo.train.collective import Dist
from cispo.config import TrainerConfig


class Updater(Protocol):
    """What the trainer needs from an optimizer backend."""

    model: torch.nn.Module  # what cispo.model.policy.micro_batch_logprobs is called with
    policy: torch.nn.Module  # the Hugging Face model (parameter names for weight sync and export)
    dist: Dist  # the data-parallel world (one process for TorchUpdater)
    zero_stage: int | None  # None: plain torch; the DeepSpeed ZeRO stage otherwise (checkpoints record it)
    lora: object | None  # cispo.model.lora.LoraPolicy when model.lora.rank > 0: only the adapter trains

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's share of the mini-batch loss."""

    def step(self, lr: float) -> float:
        """Clip, update at learning rate `lr`, zero the gradients; returns the pre-clip gradient norm."""

    @property
    def lr(self) -> float:
        """The learning rate of the last step."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save(self, path: Path) -> None:
        """Model + optimizer (a checkpoint's policy part)."""

    def load(self, path: Path) -> None: ...

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What training changes, for weight sync and export: (HF name, tensor) of every parameter; with LoRA
        (`lora` set) the adapter's tensors only, under PEFT keys (cispo.model.lora)."""


def warmup_lambda(warmup_steps: int):
    """Linear warm-up over `warmup_steps` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def lr_lambda(cfg: TrainerConfig, total_updates: int):
    """LR multiplier at a position (in optimizer updates, fractional allowed; see the module docstring): linear
    warm-up over trainer.warmup_steps, then constant, or a cosine from 1 down to trainer.min_lr_ratio at
    position `total_updates` (trainer.lr_schedule)."""
    warmup = warmup_lambda(cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return warmup
    floor, span = cfg.min_lr_ratio, max(1, total_updates - cfg.warmup_steps)

    def cosine(step: float) -> float:
        if step < cfg.warmup_steps:
            return warmup(step)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


def update_position(step: int, update: int, updates: int, per_step: int) -> float:
    """Where update `update` (0-based) of the `updates` that RL step `step` (1-based) makes sits on the LR
    schedule, in nominal optimizer updates (per_step = algo.updates_per_step a step): the update index when
    every step makes per_step updates; spread evenly over the step's share of the schedule when it makes fewer."""
    return (step - 1) * per_step + update * per_step / updates


class TorchUpdater:
    """Plain torch AdamW in one process (trainer.zero_stage null). `lora`: the policy's adapter
    (cispo.model.lora.LoraPolicy); then the checkpoints hold the adapter and the optimizer, not the base."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, dist: Dist | None = None, lora=None):
        self.model = self.policy = model
        self.dist, self.grad_clip = dist or Dist(), cfg.grad_clip
        self.zero_stage = None
        self.lora = lora
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self._lr = cfg.lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._lr = lr
        return float(norm)

    @property
    def lr(self) -> float:
        return self._lr

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            from cispo.model.lora import save_adapter

            save_adapter(self.lora, path)  # the base is the model folder's, unchanged
        else:
            save_model(self.policy, str(path / "model.safetensors"))  # handles tied weights
        torch.save(self.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        if self.lora is not None:
            from cispo.model.lora import load_adapter

            load_adapter(self.lora, path)
        else:
            load_model(self.policy, str(path / "model.safetensors"), strict=True)
        self.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))

    def named_weights(self):
        if self.lora is not None:
            yield from self.lora.named_tensors()
            return
        for name, p in self.policy.named_parameters():
            yield name, p.detach()
