"""Losses defined outside the cispo package, as a user's own module defines them (tests/test_loss.py)."""

import torch

from cispo.algo.loss import TokenLoss, ratio_with_grad, register_loss


@register_loss("capped_reinforce")
def capped_reinforce(logp, ratio, adv, coef, *, clip_high):
    """Registered by decorator: loss_t = -min(r_t, 1 + clip_high) * A_t * log pi(o_t), the weight differentiated
    through the ratio; it takes one of the config's knobs and flags the tokens whose weight was capped."""
    high = ratio > 1.0 + clip_high
    weight = ratio_with_grad(ratio, logp).clamp(max=1.0 + clip_high)
    return TokenLoss(-coef * weight * adv * logp, high, torch.zeros_like(high), ~high)


def signed_log_ratio(logp, ratio, adv, coef, *, scale=2.0):
    """Not registered: reached by import path. loss_t = -scale * A_t * log r_t, a knob with a default only."""
    return TokenLoss.unclipped(-coef * scale * adv * torch.log(ratio_with_grad(ratio, logp)))


def needs_beta(logp, ratio, adv, coef, *, beta):
    """A knob no config field provides."""
    return TokenLoss.unclipped(-coef * beta * adv * logp)


def two_args(logp, ratio, adv):
    """Not a loss: the wrong signature."""
    return TokenLoss.unclipped(logp)
