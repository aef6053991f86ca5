"""The single-process optimizer step: AdamW, warm-up + constant/cosine schedule, explicit gradient clipping.

`TorchUpdater` and `cispo.distributed.DeepSpeedUpdater` share one small interface, so the trainer's update loop
is the same for both:
  model              what cispo.policy.micro_batch_logprobs is called with
  policy             the Hugging Face model (parameter names for weight sync and export)
  dist               the data-parallel context (cispo.distributed.Dist; one process here)
  zero_stage         None here; the DeepSpeed ZeRO stage there
  backward(loss)     accumulate the gradient of one micro-batch's share of the mini-batch loss
  step() -> float    clip, update, zero the gradients; returns the pre-clip gradient norm
  lr                 the learning rate of the last step
  state_dict() / load_state_dict()   optimizer + schedule
  save(dir) / load(dir)              model + optimizer + schedule (a checkpoint's policy part)
  named_weights()    (name, tensor) of every parameter, for weight sync and HF export
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cispo.config import TrainerConfig


def warmup_lambda(warmup_steps: int):
    """Linear warm-up over `warmup_steps` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def lr_lambda(cfg: TrainerConfig, total_updates: int):
    """LR multiplier per optimizer step: linear warm-up over trainer.warmup_steps, then constant, or a cosine
    from 1 down to trainer.min_lr_ratio at update `total_updates` (trainer.lr_schedule)."""
    warmup = warmup_lambda(cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return warmup
    floor, span = cfg.min_lr_ratio, max(1, total_updates - cfg.warmup_steps)

    def cosine(step: int) -> float:
        if step < cfg.warmup_steps:
            return warmup(step)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


class TorchUpdater:
    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, total_updates: int = 0, dist=None):
        if dist is None:
            from cispo.distributed import Dist

            dist = Dist()
        self.model = self.policy = model
        self.dist, self.grad_clip = dist, cfg.grad_clip
        self.zero_stage = None  # plain torch (checkpoints record it)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_updates))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip (when grad_clip > 0), step, zero the gradients; returns the pre-clip gradient norm."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.policy, str(path / "model.safetensors"))  # handles tied weights
        torch.save(self.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        load_model(self.policy, str(path / "model.safetensors"), strict=True)
        self.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))

    def named_weights(self):
        for name, p in self.policy.named_parameters():
            yield name, p.detach()
