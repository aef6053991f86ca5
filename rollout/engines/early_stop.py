"""M1's repetition early stop (arXiv 2506.13585 §3.2), the engine-independent part: the rule and the two tensor
steps that every engine's logits processor is made of (rollout.engines.vllm_engine.RepetitionEarlyStop,
rollout.engines.hf_engine.HFRepetitionEarlyStop).

The rule: once `k` consecutive sampled tokens each had probability > `p` (M1: k=3000, p=0.99), the next token is
forced to be EOS. Probability = of the sampled token under the model's raw next-token distribution (softmax of the
logits before temperature and top-p), so the rule is a property of the policy, whatever the sampling temperature.
Forcing sets every logit but EOS's to -inf and EOS's to 0, so the forced EOS has log-probability exactly 0 under
every temperature and top-p: engines report it with logprob 0.0 and finish_reason "early_stop", and the trainer
leaves it out of the loss (rollout.trajectory.Trajectory.single_turn masks it): it was not sampled from the policy.

Since p >= 0.5, "the sampled token had probability > p" is exactly "it was the argmax and the argmax had
probability > p": an engine keeps two numbers per sequence and step (`top_token`), never a vocabulary-sized row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_early_stop(k: int, p: float) -> None:
    """ValueError naming the key when rollout.early_stop_k / early_stop_p cannot be run (k = 0 turns it off)."""
    if k < 0:
        raise ValueError(f"rollout.early_stop_k must be >= 0 (0 = off), got {k}")
    if k and not 0.5 <= p < 1.0:
        raise ValueError(
            f"rollout.early_stop_p must be in [0.5, 1) (M1: 0.99), got {p}: "
            "the early stop relies on a token with p > 0.5 being the argmax"
        )


@dataclass(frozen=True)
class EarlyStopRule:
    """Force `eos` once `k` consecutive sampled tokens each had raw probability > `p`."""

    k: int
    p: float
    eos: int

    def __post_init__(self):
        check_early_stop(self.k, self.p)
        if self.k < 1:
            raise ValueError(f"EarlyStopRule needs k >= 1, got {self.k} (k = 0 is no rule: from_settings gives None)")

    @classmethod
    def from_settings(cls, k: int, p: float, eos_token_id: int | None) -> EarlyStopRule | None:
        """The rule rollout.early_stop_k / early_stop_p ask for, None when it is off (k = 0)."""
        check_early_stop(k, p)
        if not k:
            return None
        if eos_token_id is None:
            raise ValueError("rollout.early_stop_k > 0 needs a tokenizer with an eos_token_id")
        return cls(int(k), float(p), int(eos_token_id))


def top_token(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of raw `logits` [B, V]: the argmax token [B] and its probability [B]."""
    top_logit, top_tok = logits.max(dim=-1)
    return top_tok, torch.exp(top_logit - torch.logsumexp(logits, dim=-1))


def force_eos(logits: torch.Tensor, rows: torch.Tensor, eos: torch.Tensor | int) -> None:
    """In place: rows `rows` of `logits` [B, V] allow only their EOS (`eos`: one id, or one per row)."""
    logits.index_fill_(0, rows, float("-inf"))
    logits[rows, eos] = 0.0
