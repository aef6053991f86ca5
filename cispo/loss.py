"""Policy losses on packed tokens: CISPO (MiniMax-M1, arXiv 2506.13585 §3.1) and the losses it is compared with.

Imports torch only. Every function takes tensors and floats, never a config object.

Tokens arrive packed: all response tokens of a micro-batch in one flat vector of N entries, each carrying the
advantage of the response it belongs to (`adv [N]`) and an aggregation coefficient (`coef [N]`, see
`sequence_coefficients`). The loss of a micro-batch is `sum_t coef_t * loss_t`; because the coefficients are
computed over the whole optimizer batch before it is split, micro-batches, gradient accumulation and
data-parallel ranks add up to exactly the gradient of the whole batch.

Per token (CISPO, Eq. 4-5):  loss_t = - sg(clip(r_t, is_weight_min, is_weight_max)) * A_t * log pi(o_t),
r_t = pi(o_t) / pi_old(o_t).

Deviations from the paper, on purpose:
1. Bounds are absolute values of the weight (`is_weight_max` = the paper's 1 + eps_high), because frameworks
   disagree on what "eps_high" means (TRL: the cap itself; verl, NeMo, SkyRL: 1 + eps). M1 published no value;
   the default cap 5.0 is ScaleRL's / TRL's.
2. The normaliser is a named choice (`loss_agg`); `token_group` is Eq. 4's 1 / sum_i |o_i| per prompt.
3. An optional truncated importance weight for the trainer/rollout-engine mismatch (`tis_weight`, Yao et al.
   2025) multiplies the loss; it is a different factor from CISPO's staleness weight pi / pi_old.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSSES = ("cispo", "dapo", "grpo", "reinforce")
AGGREGATIONS = ("token_group", "token_batch", "sequence", "prompt")


@dataclass
class LossOut:
    loss: Tensor  # [] sum_t coef_t * loss_t
    ratio: Tensor  # [N] pi / pi_old, detached
    clipped_high: Tensor  # [N] bool: the upper bound acted on this token
    clipped_low: Tensor  # [N] bool: the lower bound acted on this token
    kept: Tensor  # [N] bool: the token passes gradient to log pi (False: masked by Eq. 7 or by the PPO clip)


def sequence_coefficients(lengths: Tensor, group_ids: Tensor, mode: str) -> Tensor:
    """Per-response weight c_i of each of its tokens, so that the batch loss is sum_i c_i * sum_t loss_it.

    lengths [B] loss tokens per response (0 for a response left out of the loss); group_ids [B] prompt index.
    With P prompts that have loss tokens, B' responses that have loss tokens, N tokens in all, N_g in group g
    and B'_g responses with tokens in group g:
      token_group:  1 / (P * N_g)          M1 Eq. 4: token mean inside a prompt's group, mean over prompts
      token_batch:  1 / N                  DAPO / TRL / verl "token-mean"
      sequence:     1 / (B' * |o_i|)       GRPO: token mean per response, mean over responses
      prompt:       1 / (P * B'_g * |o_i|) token mean per response, mean inside the group, mean over prompts
    `sequence` and `prompt` differ once groups keep different numbers of responses (e.g. masked truncations).
    Returns c [B] (float32, 0 where lengths == 0).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {AGGREGATIONS}, got {mode!r}")
    lengths = lengths.to(torch.float32)
    active = lengths > 0
    if not active.any():
        return torch.zeros_like(lengths)
    _, group = torch.unique(group_ids, return_inverse=True)
    group_tokens = torch.zeros(int(group.max()) + 1).index_add_(0, group, lengths)  # [G'] N_g
    group_seqs = torch.zeros_like(group_tokens).index_add_(0, group, active.float())  # [G'] B'_g
    num_prompts = (group_tokens > 0).sum()
    safe_len = lengths.clamp(min=1)
    if mode == "token_batch":
        coef = torch.full_like(lengths, 1.0) / lengths.sum()
    elif mode == "token_group":
        coef = 1.0 / (num_prompts * group_tokens[group].clamp(min=1))
    elif mode == "sequence":
        coef = 1.0 / (active.sum() * safe_len)
    else:
        coef = 1.0 / (num_prompts * group_seqs[group].clamp(min=1) * safe_len)
    return torch.where(active, coef, torch.zeros_like(coef))


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    coef: Tensor,
    *,
    loss: str = "cispo",
    is_weight_max: float | None = 5.0,
    is_weight_min: float | None = None,
    unified_mask: bool = False,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    tis_weight: Tensor | None = None,
) -> LossOut:
    """The loss of one micro-batch of packed tokens.

    logp [N] log pi_theta (with gradient); old_logp [N] log pi_old (the policy that sampled, recomputed by the
    trainer); adv [N] advantage of each token's response; coef [N] aggregation coefficient;
    tis_weight [N] optional truncated IS weight (no gradient).
    cispo: is_weight_max / is_weight_min bound the stop-gradient weight (None = unbounded); unified_mask drops
    the tokens M1 Eq. 7 drops, outside the trust region [1 - clip_low, 1 + clip_high] in the direction the
    advantage pushes (A > 0 and r > 1 + clip_high, A < 0 and r < 1 - clip_low). With unbounded weights the
    masked CISPO gradient is PPO's clipped-surrogate gradient.
    grpo / dapo: PPO's clipped surrogate with r in [1 - clip_low, 1 + clip_high].
    reinforce: -A * log pi (the ratio is reported but not used).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    old_logp = old_logp.detach()  # pi_old is data: no gradient reaches it, whatever the caller passes
    ratio = torch.exp(logp.detach() - old_logp)
    scale = coef if tis_weight is None else coef * tis_weight
    if loss in ("grpo", "dapo"):
        ratio_g = torch.exp(logp - old_logp)  # the PPO surrogate differentiates through the ratio
        lo, hi = 1.0 - clip_low, 1.0 + clip_high
        per_token = -torch.minimum(ratio_g * adv, ratio_g.clamp(lo, hi) * adv)
        high, low = (ratio > hi) & (adv > 0), (ratio < lo) & (adv < 0)
        return LossOut((scale * per_token).sum(), ratio, high, low, ~(high | low))
    none = torch.zeros_like(ratio, dtype=torch.bool)
    high = ratio > is_weight_max if loss == "cispo" and is_weight_max is not None else none
    low = ratio < is_weight_min if loss == "cispo" and is_weight_min is not None else none
    # CISPO's weight is a constant (stop-gradient), so the loss is linear in log pi: every constant folds into
    # one factor and log pi is multiplied once, which keeps the autograd graph to a single product
    factor = -adv * scale
    if loss == "cispo":
        bounded = is_weight_min is not None or is_weight_max is not None
        factor = factor * (ratio.clamp(min=is_weight_min, max=is_weight_max) if bounded else ratio)
    kept = ~none
    if loss == "cispo" and unified_mask:
        # Eq. 7: the token mask has its own trust region, PPO's [1 - clip_low, 1 + clip_high]
        kept = ~(((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0)))
        factor = factor * kept
    return LossOut((factor * logp).sum(), ratio, high, low, kept)


def logp_grad(logp: Tensor, old_logp: Tensor, adv: Tensor, coef: Tensor, **options) -> Tensor:
    """d policy_loss / d logp [N], at these logp values; `options` as for `policy_loss`.

    The loss is a sum of per-token terms, so the gradient on a slice of the tokens is this function of that
    slice alone: `token_logprobs(grad_hint=...)` calls it chunk by chunk to compute the LM head's gradients in
    its forward pass."""
    logp = logp.detach().requires_grad_()
    with torch.enable_grad():
        loss = policy_loss(logp, old_logp, adv, coef, **options).loss
        return torch.autograd.grad(loss, logp, materialize_grads=True)[0]


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """Truncated IS weight min(pi_old / pi_rollout, cap) per token [N]: the trainer's policy vs the engine's."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap)


def loss_metrics(outs: list[LossOut]) -> dict[str, float]:
    """Ratio and clipping statistics over the tokens of several micro-batches; keys namespaced under loss/."""
    ratio = torch.cat([o.ratio for o in outs]) if outs else torch.zeros(0)
    if ratio.numel() == 0:
        return {}
    share = lambda field: torch.cat([getattr(o, field) for o in outs]).float().mean().item()  # noqa: E731
    return {
        "loss/clip_frac_high": share("clipped_high"),
        "loss/clip_frac_low": share("clipped_low"),
        "loss/masked_frac": 1.0 - share("kept"),
        "loss/ratio_mean": ratio.mean().item(),
        "loss/ratio_max": ratio.max().item(),
        "loss/ratio_min": ratio.min().item(),
    }


def mismatch_metrics(old_logp: Tensor, rollout_logp: Tensor) -> dict[str, float]:
    """Trainer vs rollout engine on the same sampled tokens [N]: mean |diff| of logprobs and the Pearson
    correlation of the token probabilities (M1 Fig. 3 reports 0.987 -> 0.997 after its fp32 head fix)."""
    if old_logp.numel() < 2:
        return {}
    p, q = old_logp.double().exp(), rollout_logp.double().exp()
    corr = torch.corrcoef(torch.stack([p, q]))[0, 1]
    return {
        "mismatch/logp_abs_diff": (old_logp - rollout_logp).abs().mean().item(),
        "mismatch/prob_pearson": corr.item(),
    }
