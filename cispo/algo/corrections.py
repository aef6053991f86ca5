"""Corrections of the train/inference mismatch: a weight per loss token from r_t = pi_old(o_t) / pi_rollout(o_t),
the trainer's probability of a sampled token against the rollout engine's (DESIGN.md §3).

Imports torch only. The corrections are a table, `CORRECTIONS`: name -> `Correction`, whose function maps
`(old_logp [N], rollout_logp [N], seq_ids [N], *, knobs) -> weight [N]` (no gradient; seq_ids as in
cispo.algo.loss.sequence_ids). A correction's knobs are its keyword-only parameters, read by name from the config's
fields (`AlgoConfig`, where every default lives). The active ones (`active`) multiply into one weight
(`correction_weight`), which multiplies each token's aggregation coefficient in `cispo.algo.loss.policy_loss`.

    tis       min(r_t, tis_cap)                                     Yao et al. 2025 (switched on by algo.tis_cap)
    icepop    r_t if icepop_low <= r_t <= icepop_high, else 0       IcePop (Ling Team 2025, arXiv 2510.18855):
                                                                    band [0.5, 5], as OpenRLHF's icepop default
    mis       rho_i if mis_low <= rho_i <= mis_high, else 0,        sequence-level masked IS, verl's rollout
              rho_i = prod_t r_t over response i's loss tokens      correction preset seq_is_rs (alias seq_mis):
                                                                    IS weight rho_i truncated at 2, responses
                                                                    outside [1/2, 2] rejected
    geo_mask  1 if geo_mask_low <= exp(mean_t log r_t) <= geo_mask_high over response i, else 0
                                                                    verl's geometric rejection (preset geo_rs):
                                                                    band [0.999, 1.001], no IS weight

tis, icepop and mis weight a token by the ratio itself, so at most one of them may be on (two would count r
twice); geo_mask only masks, and goes with any of them (with tis it is OpenRLHF's seq-mask-tis, but for the band).
With algo.pi_old=engine pi_old is pi_rollout and every r is 1: the config refuses any correction there.

Deviations from the sources:
- Every log-ratio is clamped to +-20 before exp (cispo.algo.loss.LOG_RATIO_BOUND), for mis the response's sum, as
  verl bounds them; without it a long response's product overflows.
- verl's geo_rs preset also vetoes a response with any token ratio below 1e-4; that veto is not here.
- mis keeps the weight rho_i inside the band; verl's truncation at the upper threshold cannot bind there, since a
  response above it is rejected.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from cispo.algo.loss import LOG_RATIO_BOUND, sequence_mean, tis_weights


@dataclass(frozen=True)
class Correction:
    fn: Callable[..., Tensor]  # (old_logp [N], rollout_logp [N], seq_ids [N], *, knobs) -> weight [N]
    sequence: bool  # needs whole responses (its weight of a token depends on the response's other tokens)
    weights: bool  # multiplies by the ratio (True) or only masks (False)


CORRECTIONS: dict[str, Correction] = {}


def register_correction(name: str, *, sequence: bool, weights: bool):
    """Decorator: make `fn(old_logp [N], rollout_logp [N], seq_ids [N], *, knobs) -> weight [N]` the correction
    `name`. sequence: the weight of a token depends on its whole response; weights: it multiplies by the ratio
    (at most one such correction may be on)."""

    def register(fn):
        if CORRECTIONS.get(name, Correction(fn, sequence, weights)).fn is not fn:
            raise ValueError(f"a correction named {name!r} is already registered")
        CORRECTIONS[name] = Correction(fn, sequence, weights)
        return fn

    return register


def _log_ratio(old_logp: Tensor, rollout_logp: Tensor) -> Tensor:
    """log(pi_old / pi_rollout) [N], clamped to +-LOG_RATIO_BOUND, no gradient."""
    return (old_logp.detach() - rollout_logp.detach()).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def _in_band(x: Tensor, low: float, high: float) -> Tensor:
    return ((x >= low) & (x <= high)).to(x.dtype)


@register_correction("tis", sequence=False, weights=True)
def tis(old_logp: Tensor, rollout_logp: Tensor, seq_ids: Tensor | None, *, tis_cap: float) -> Tensor:
    """min(r_t, tis_cap) [N] (cispo.algo.loss.tis_weights, the same numbers)."""
    return tis_weights(old_logp, rollout_logp, tis_cap)


@register_correction("icepop", sequence=False, weights=True)
def icepop(old_logp: Tensor, rollout_logp: Tensor, seq_ids: Tensor | None, *, icepop_low: float,
           icepop_high: float) -> Tensor:
    """r_t where icepop_low <= r_t <= icepop_high, else 0 [N]: a token the two engines disagree on by more than
    the band does not train."""
    r = _log_ratio(old_logp, rollout_logp).exp()
    return r * _in_band(r, icepop_low, icepop_high)


@register_correction("mis", sequence=True, weights=True)
def mis(old_logp: Tensor, rollout_logp: Tensor, seq_ids: Tensor, *, mis_low: float, mis_high: float) -> Tensor:
    """rho_i on every token of response i where mis_low <= rho_i <= mis_high, else 0 [N]; rho_i = prod_t r_t,
    from the sum of its tokens' log-ratios clamped to +-LOG_RATIO_BOUND."""
    log_r = _log_ratio(old_logp, rollout_logp)
    if log_r.numel() == 0:
        return log_r
    sums = log_r.new_zeros(int(seq_ids.max()) + 1).index_add_(0, seq_ids, log_r)
    rho = sums.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()[seq_ids]
    return rho * _in_band(rho, mis_low, mis_high)


@register_correction("geo_mask", sequence=True, weights=False)
def geo_mask(old_logp: Tensor, rollout_logp: Tensor, seq_ids: Tensor, *, geo_mask_low: float,
             geo_mask_high: float) -> Tensor:
    """1 on every token of response i where geo_mask_low <= exp(mean_t log r_t) <= geo_mask_high, else 0 [N]."""
    geo = sequence_mean(_log_ratio(old_logp, rollout_logp), seq_ids).exp()
    return _in_band(geo, geo_mask_low, geo_mask_high)


@functools.cache
def _knob_names(fn: Callable) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


def active(tis_cap: float | None, corrections: Sequence[str]) -> list[str]:
    """The corrections on: tis when tis_cap is set, then those named (algo.corrections), in order."""
    return (["tis"] if tis_cap is not None else []) + list(corrections)


def needs_sequences(names: Sequence[str]) -> bool:
    """Whether any of the corrections `names` weighs a token by its whole response."""
    return any(CORRECTIONS[n].sequence for n in names)


def check(corrections: Sequence[str], fields: Mapping[str, object]) -> None:
    """ValueError unless `corrections` (algo.corrections) are known, once each, not tis (its switch is tis_cap),
    with bands low < high, and at most one of them, tis included, weighting by the ratio."""
    listable = sorted(set(CORRECTIONS) - {"tis"})
    for name in corrections:
        if name == "tis":
            raise ValueError(f"tis is switched on by algo.tis_cap (the cap); list only {listable} here")
        if name not in CORRECTIONS:
            raise ValueError(f"unknown correction {name!r}: the registered ones are {listable}")
    if len(set(corrections)) != len(corrections):
        raise ValueError(f"{list(corrections)} names a correction twice")
    names = active(fields.get("tis_cap"), corrections)
    weighting = [n for n in names if CORRECTIONS[n].weights]
    if len(weighting) > 1:
        raise ValueError(f"{' and '.join(weighting)} each weight a token by pi_old / pi_rollout, so together they "
                         "count it twice: keep one (geo_mask only masks, and goes with any)")
    for name in names:
        knobs = _knob_names(CORRECTIONS[name].fn)
        missing = [k for k in knobs if k not in fields]
        if missing:
            raise ValueError(f"correction {name!r} needs the field(s) {missing}")
        lows = [k for k in knobs if k.endswith("_low")]
        for low in lows:
            high = low.removesuffix("_low") + "_high"
            if not 0 <= fields[low] < fields[high]:
                raise ValueError(f"{name}: need 0 <= {low} < {high}, got {fields[low]} and {fields[high]}")


def correction_weight(names: Sequence[str], old_logp: Tensor, rollout_logp: Tensor, seq_ids: Tensor | None,
                      fields: Mapping[str, object]) -> Tensor | None:
    """The product [N] of the corrections `names` (`active`), each given the knobs it names from `fields` (the
    config's fields); None when there are none. old_logp, rollout_logp [N]; seq_ids [N] the response of each token,
    needed by the sequence-level ones (`needs_sequences`)."""
    weight = None
    for name in names:
        fn = CORRECTIONS[name].fn
        w = fn(old_logp, rollout_logp, seq_ids, **{k: fields[k] for k in _knob_names(fn)})
        weight = w if weight is None else weight * w
    return weight
