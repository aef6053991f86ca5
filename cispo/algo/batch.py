"""The rollout batch: one `Sample` per response, mini-batches of whole prompt groups, packed micro-batches.

Imports torch only. A micro-batch is one packed sequence (no padding tokens): the prompt + response of several
samples laid end to end, with position ids restarting at 0 for each sample, which is how transformers builds a
block-diagonal causal mask when no attention mask is given.

Shared prompts (`share_prompts=True`, for the policy's own attention, cispo/model/attention.py): a sample whose prompt
is the same as the sample packed before it in the micro-batch lays down its response only, its positions going
on from its prompt's length; the first response token is predicted from the shared prompt's last token. A group
of G responses to a P-token prompt then costs P + sum |o_i| tokens instead of G * P + sum |o_i|, and every loss
token gets the logprob it would get packed whole (tests/test_attention.py).

Loss tokens. A sample's `loss_mask [len(response_ids)]` says which response tokens train: the model's tokens of
a trajectory (rollout.trajectory; a single-turn completion is a one-turn trajectory), less a forced EOS; none when
the response leaves the loss (`trainable=False`: a masked truncation, an ungradable row). `loss_len` is their
count. Masked-out tokens stay in `input_ids` as context and are nowhere else: not a logit position, not a target,
not in `rollout_logp` / `old_logp`, not in any aggregation's normaliser (`lengths` counts loss tokens). So CISPO's
weight, the TIS weight and the Eq. 7 mask only ever see trainable tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from cispo.algo.loss import sequence_coefficients


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[bool]  # [len(response_ids)] True = the token trains (module docstring)
    rollout_logp: Tensor  # [loss_len] sampling logprobs reported by the rollout engine, of the loss tokens
    adv: float
    group: int  # index of the prompt within the step
    old_logp: Tensor | None = None  # [loss_len] log pi_old (algo.pi_old: the trainer's forward or rollout_logp)
    versions: Tensor | None = None  # [loss_len] the policy version that sampled each loss token (None: the current)
    loss_len: int = field(init=False)  # how many tokens train

    def __post_init__(self):
        if len(self.loss_mask) != len(self.response_ids):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.response_ids)} "
                             "response tokens")
        self.loss_len = sum(map(bool, self.loss_mask))
        if len(self.rollout_logp) != self.loss_len:
            raise ValueError(f"rollout_logp has {len(self.rollout_logp)} entries for {self.loss_len} loss tokens")

    @classmethod
    def leading(cls, prompt_ids: list[int], response_ids: list[int], n: int, rollout_logp: Tensor, adv: float,
                group: int) -> Sample:
        """A sample whose first `n` response tokens train (a single-turn completion; tests and benchmarks)."""
        return cls(prompt_ids, response_ids, [t < n for t in range(len(response_ids))], rollout_logp, adv, group)

    def loss_positions(self) -> list[int]:
        """Indices into response_ids of the loss tokens, in order: loss_len of them."""
        return [t for t, m in enumerate(self.loss_mask) if m]


@dataclass
class MicroBatch:
    input_ids: Tensor  # [1, S] packed prompt + response tokens
    position_ids: Tensor  # [1, S]
    logit_pos: Tensor  # [N] positions whose next-token distribution scores a loss token
    targets: Tensor  # [N] the loss tokens
    adv: Tensor  # [N]
    coef: Tensor  # [N] aggregation coefficient (see cispo.algo.loss.sequence_coefficients)
    rollout_logp: Tensor  # [N]
    old_logp: Tensor | None  # [N]
    versions: Tensor | None  # [N] the policy version of each loss token (None: every sample's is the current)
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


def trajectory_sample(trajectory, adv: float, group: int, trainable: bool = True) -> Sample:
    """The Sample of a trajectory (duck-typed: `prompt_ids`, and `token_ids`, `logprobs` and `loss_mask` with one
    entry per token, as rollout.trajectory.Trajectory has): its own prompt, every token context, the masked-in ones
    loss tokens with their sampling logprobs as rollout_logp; no loss token when not `trainable`."""
    mask = [bool(m) and trainable for m in trajectory.loss_mask]
    logp = [lp for lp, m in zip(trajectory.logprobs, mask) if m]
    versions = torch.tensor([v for v, m in zip(trajectory.versions, mask) if m], dtype=torch.long)
    return Sample(list(trajectory.prompt_ids), list(trajectory.token_ids), mask,
                  torch.tensor(logp, dtype=torch.float32), adv, group, versions=versions)


def split_groups(samples: list[Sample], parts: int) -> list[list[int]]:
    """Indices of samples in `parts` mini-batches of whole prompt groups (as even as the groups allow).
    Fewer parts come back when there are fewer groups than parts."""
    groups = sorted({s.group for s in samples})
    parts = min(parts, len(groups))
    chunks = [set(groups[k::parts]) for k in range(parts)]
    return [[i for i, s in enumerate(samples) if s.group in chunk] for chunk in chunks]


def micro_batches(samples: list[Sample], indices: list[int], tokens_per_micro: int, loss_agg: str | None,
                  norm_over: list[int] | None = None, share_prompts: bool = False) -> list[MicroBatch]:
    """Pack the samples `indices` into micro-batches of at most `tokens_per_micro` tokens each (a longer sample
    goes alone). The aggregation coefficients are computed over all of `norm_over` (default: `indices`) first,
    so the micro-batch losses add up to the loss of that whole mini-batch: a data-parallel rank packs its share
    `indices` of the mini-batch `norm_over`, and the sum over ranks and micro-batches is the single-process loss.
    loss_agg=None leaves coef at 0 (forward-only use). share_prompts: consecutive samples with the same prompt
    share one copy of it within a micro-batch (module docstring)."""
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
        s = samples[i]
        shared = share_prompts and current and samples[indices[current[-1]]].prompt_ids == s.prompt_ids
        size = len(s.response_ids) + (0 if shared else len(s.prompt_ids))
        if current and used + size > tokens_per_micro:
            bins.append(current)
            current, used, size = [], 0, len(s.prompt_ids) + len(s.response_ids)
        current.append(k)
        used += size
    if current:
        bins.append(current)
    return [_collate(samples, [indices[k] for k in b], coef[b], share_prompts) for b in bins]


def empty_micro_batch() -> MicroBatch:
    """One token, no sample, coefficient 0: a pass that contributes nothing but keeps the collectives aligned."""
    zero = torch.zeros(1)
    return MicroBatch(
        input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=torch.zeros(1, 1, dtype=torch.long),
        logit_pos=torch.zeros(1, dtype=torch.long), targets=torch.zeros(1, dtype=torch.long), adv=zero, coef=zero,
        rollout_logp=zero, old_logp=zero, versions=None, sample_ids=[], lengths=[],
    )


def even(mbs: list[MicroBatch], dist) -> list[MicroBatch]:
    """Pad this rank's micro-batches with empty ones up to the largest count over the ranks of `dist`
    (cispo.train.collective.Dist): ZeRO-3 gathers parameters in every forward and ZeRO-2/3 reduce in every backward, so
    all ranks must run the same number of passes."""
    n = dist.max(len(mbs))
    return mbs + [empty_micro_batch() for _ in range(n - len(mbs))]


def _collate(samples: list[Sample], ids: list[int], coef: Tensor, share_prompts: bool) -> MicroBatch:
    tokens, positions, logit_pos, targets, adv, tok_coef, rollout, old, versions = [], [], [], [], [], [], [], [], []
    prompt, prompt_end = None, 0  # the prompt laid down last, and the packed index after it
    for i, c in zip(ids, coef.tolist()):
        s = samples[i]
        if not (share_prompts and s.prompt_ids == prompt):
            tokens += s.prompt_ids
            positions += range(len(s.prompt_ids))
            prompt, prompt_end = s.prompt_ids, len(tokens)
        start = len(tokens)
        tokens += s.response_ids
        positions += range(len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids))
        # response token t is predicted at the position before it: the prompt's last token, then its own tokens
        loss_at = s.loss_positions()
        logit_pos += [start + t - 1 if t else prompt_end - 1 for t in loss_at]
        targets += [s.response_ids[t] for t in loss_at]
        adv += [s.adv] * s.loss_len
        tok_coef += [c] * s.loss_len
        rollout.append(s.rollout_logp)
        if s.old_logp is not None:
            old.append(s.old_logp)
        if s.versions is not None:
            versions.append(s.versions)
    return MicroBatch(
        input_ids=torch.tensor([tokens]),
        position_ids=torch.tensor([positions]),
        logit_pos=torch.tensor(logit_pos, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        adv=torch.tensor(adv, dtype=torch.float32),
        coef=torch.tensor(tok_coef, dtype=torch.float32),
        rollout_logp=torch.cat(rollout) if rollout else torch.zeros(0),
        old_logp=torch.cat(old) if len(old) == len(ids) else None,
        versions=torch.cat(versions) if ids and len(versions) == len(ids) else None,
        sample_ids=ids,
        lengths=[samples[i].loss_len for i in ids],
    )
