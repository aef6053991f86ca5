"""Group-normalised advantages (GRPO, M1 Eq. 2): one scalar per response, broadcast over its tokens.

Imports torch only. The std is the population std (divide by G, not G - 1): it is defined for a group of one,
and a group whose rewards are all equal gets advantage 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Advantages:
    adv: Tensor  # [P, G]
    zero_variance: Tensor  # [P] bool: every response of the prompt got the same reward (adv == 0)


def group_advantages(rewards: Tensor, *, std_norm: bool = True, level: str = "group", eps: float = 1e-6) -> Advantages:
    """rewards [P, G] -> advantages [P, G].

    A = (R - mean_group(R)) / (std + eps), with std the group's (level="group", GRPO / M1) or the whole
    batch's (level="batch", ScaleRL); std_norm=False leaves A = R - mean_group(R) (Dr. GRPO).
    """
    if level not in ("group", "batch"):
        raise ValueError(f"adv_norm must be 'group' or 'batch', got {level!r}")
    rewards = rewards.to(torch.float32)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    zero_variance = (rewards == rewards[:, :1]).all(dim=1)
    if std_norm:
        std = rewards.std(dim=1, keepdim=True, correction=0) if level == "group" else rewards.std(correction=0)
        centred = centred / (std + eps)
    return Advantages(centred.masked_fill(zero_variance[:, None], 0.0), zero_variance)
