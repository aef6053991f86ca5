"""The single-process optimizer step: AdamW, warm-up schedule, explicit gradient clipping.

`TorchUpdater` and the DeepSpeed updater in `cispo.distributed` share one small interface (backward, step,
state_dict), so the trainer's update loop is the same for both.
"""

from __future__ import annotations

import torch

from cispo.config import TrainerConfig


def warmup_lambda(warmup_steps: int):
    """Linear warm-up over `warmup_steps` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class TorchUpdater:
    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig):
        self.model, self.grad_clip = model, cfg.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(cfg.warmup_steps))

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
