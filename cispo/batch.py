"""The rollout batch: one `Sample` per response, mini-batches of whole prompt groups, packed micro-batches.

Imports torch only. A micro-batch is one packed sequence (no padding tokens): the prompt + response of several
samples laid end to end, with position ids restarting at 0 for each sample, which is how transformers builds a
block-diagonal causal mask when no attention mask is given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cispo.loss import sequence_coefficients


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_len: int  # leading response tokens that enter the loss (0 = left out, e.g. a masked truncation)
    rollout_logp: Tensor  # [loss_len] sampling logprobs reported by the rollout engine
    adv: float
    group: int  # index of the prompt within the step
    old_logp: Tensor | None = None  # [loss_len] log pi_old, recomputed by the trainer before the updates


@dataclass
class MicroBatch:
    input_ids: Tensor  # [1, S] packed prompt + response tokens
    position_ids: Tensor  # [1, S]
    logit_pos: Tensor  # [N] positions whose next-token distribution scores a loss token
    targets: Tensor  # [N] the loss tokens
    adv: Tensor  # [N]
    coef: Tensor  # [N] aggregation coefficient (see cispo.loss.sequence_coefficients)
    rollout_logp: Tensor  # [N]
    old_logp: Tensor | None  # [N]
    sample_ids: list[int]  # which samples, in order
    lengths: list[int]  # loss_len of each

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device) -> MicroBatch:
        if device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, **{k: move(getattr(self, k)) for k in
                                ("input_ids", "position_ids", "logit_pos", "targets", "adv", "coef", "rollout_logp",
                                 "old_logp")})


def split_groups(samples: list[Sample], parts: int) -> list[list[int]]:
    """Indices of samples in `parts` mini-batches of whole prompt groups (as even as the groups allow).
    Fewer parts come back when there are fewer groups than parts."""
    groups = sorted({s.group for s in samples})
    parts = min(parts, len(groups))
    chunks = [set(groups[k::parts]) for k in range(parts)]
    return [[i for i, s in enumerate(samples) if s.group in chunk] for chunk in chunks]


def micro_batches(samples: list[Sample], indices: list[int], tokens_per_micro: int, loss_agg: str | None,
                  norm_over: list[int] | None = None) -> list[MicroBatch]:
    """Pack the samples `indices` into micro-batches of at most `tokens_per_micro` tokens each (a longer sample
    goes alone). The aggregation coefficients are computed over all of `norm_over` (default: `indices`) first,
    so the micro-batch losses add up to the loss of that whole mini-batch: a data-parallel rank packs its share
    `indices` of the mini-batch `norm_over`, and the sum over ranks and micro-batches is the single-process loss.
    loss_agg=None leaves coef at 0 (forward-only use)."""
    norm_over = indices if norm_over is None else norm_over
    if loss_agg:
        lengths = torch.tensor([samples[i].loss_len for i in norm_over])
        groups = torch.tensor([samples[i].group for i in norm_over])
        every = dict(zip(norm_over, sequence_coefficients(lengths, groups, loss_agg).tolist()))
        coef = torch.tensor([every[i] for i in indices], dtype=torch.float32)
    else:
        coef = torch.zeros(len(indices))
    bins, current, used = [], [], 0
    for k, i in enumerate(indices):
        size = len(samples[i].prompt_ids) + len(samples[i].response_ids)
        if current and used + size > tokens_per_micro:
            bins.append(current)
            current, used = [], 0
        current.append(k)
        used += size
    if current:
        bins.append(current)
    return [_collate(samples, [indices[k] for k in b], coef[b]) for b in bins]


def empty_micro_batch() -> MicroBatch:
    """One token, no sample, coefficient 0: a pass that contributes nothing but keeps the collectives aligned."""
    zero = torch.zeros(1)
    return MicroBatch(
        input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=torch.zeros(1, 1, dtype=torch.long),
        logit_pos=torch.zeros(1, dtype=torch.long), targets=torch.zeros(1, dtype=torch.long), adv=zero, coef=zero,
        rollout_logp=zero, old_logp=zero, sample_ids=[], lengths=[],
    )


def even(mbs: list[MicroBatch], dist) -> list[MicroBatch]:
    """Pad this rank's micro-batches with empty ones up to the largest count over the ranks of `dist`
    (cispo.collective.Dist): ZeRO-3 gathers parameters in every forward and ZeRO-2/3 reduce in every backward, so
    all ranks must run the same number of passes."""
    n = dist.max(len(mbs))
    return mbs + [empty_micro_batch() for _ in range(n - len(mbs))]


def _collate(samples: list[Sample], ids: list[int], coef: Tensor) -> MicroBatch:
    tokens, positions, logit_pos, targets, adv, tok_coef, rollout, old = [], [], [], [], [], [], [], []
    for i, c in zip(ids, coef.tolist()):
        s = samples[i]
        start = len(tokens)
        seq = s.prompt_ids + s.response_ids
        tokens += seq
        positions += range(len(seq))
        # the response token at packed index start + len(prompt) + t is predicted at the position before it
        first = start + len(s.prompt_ids) - 1
        logit_pos += range(first, first + s.loss_len)
        targets += s.response_ids[: s.loss_len]
        adv += [s.adv] * s.loss_len
        tok_coef += [c] * s.loss_len
        rollout.append(s.rollout_logp)
        if s.old_logp is not None:
            old.append(s.old_logp)
    return MicroBatch(
        input_ids=torch.tensor([tokens]),
        position_ids=torch.tensor([positions]),
        logit_pos=torch.tensor(logit_pos, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        adv=torch.tensor(adv, dtype=torch.float32),
        coef=torch.tensor(tok_coef, dtype=torch.float32),
        rollout_logp=torch.cat(rollout) if rollout else torch.zeros(0),
        old_logp=torch.cat(old) if len(old) == len(ids) else None,
        sample_ids=ids,
        lengths=[samples[i].loss_len for i in ids],
    )
