"""Policy losses on packed tokens: CISPO (MiniMax-M1, arXiv 2506.13585 §3.1) and the losses it is compared with.

Imports torch only. Every function takes tensors, floats and dicts, never a config object.

Tokens arrive packed: all response tokens of a micro-batch in one flat vector of N entries, each carrying the
advantage of the response it belongs to (`adv [N]`) and an aggregation coefficient (`coef [N]`, see
`sequence_coefficients`). The loss of a micro-batch is `sum_t coef_t * loss_t`; because the coefficients are
computed over the whole optimizer batch before it is split, micro-batches, gradient accumulation and
data-parallel ranks add up to exactly the gradient of the whole batch.

Per token (CISPO, Eq. 4-5):  loss_t = - sg(clip(r_t, is_weight_min, is_weight_max)) * A_t * log pi(o_t),
r_t = pi(o_t) / pi_old(o_t).

The losses are a table, `LOSSES`: name -> `fn(logp [N], ratio [N], adv [N], coef [N], *, knobs) -> TokenLoss`,
each token's share coef_t * loss_t of the micro-batch loss (coef already carries the weight of the train/inference
corrections when one is used, cispo.algo.corrections). A loss's knobs are its keyword-only parameters; the built-in
ones have no defaults (those live in the config, `AlgoConfig`). `register_loss(name)` adds a loss from any module, and
`resolve_loss` also accepts an import path "package.module:function" (or "package.module.function").
`policy_loss` computes the clamped ratio, calls the loss with the knobs it names (`loss_knobs`) and aggregates.

Sequence-level losses. A loss that also names the keyword-only parameter `seq_ids` (a data argument, not a knob:
`SEQUENCE_ARGS`) gets `seq_ids [N]`, the response each packed token belongs to (0, 1, ... in packing order; a
response's loss tokens are contiguous, and a micro-batch holds whole responses). GSPO (Zheng et al. 2025, arXiv
2507.18071) is one: its ratio is the response's, s_i = exp(mean_t log r_t), clipped PPO-style with its own range
(`seq_clip_low` / `seq_clip_high`). Its term L_i is the response's, and each of the response's tokens carries
coef_t * L_i, so the response weighs sum_t coef_t: with loss_agg=sequence that is 1 / B', GSPO's mean over
responses; a token-level normaliser would weigh a response by its length.

Deviations from the paper, on purpose:
1. Bounds are absolute values of the weight (`is_weight_max` = the paper's 1 + eps_high), because frameworks
   disagree on what "eps_high" means (TRL: the cap itself; verl, NeMo, SkyRL: 1 + eps). M1 published no value;
   the default cap 5.0 is ScaleRL's / TRL's.
2. The normaliser is a named choice (`loss_agg`); `token_group` is Eq. 4's 1 / sum_i |o_i| per prompt.
3. An optional truncated importance weight for the trainer/rollout-engine mismatch (`tis_weight`, Yao et al.
   2025) multiplies the loss; it is a different factor from CISPO's staleness weight pi / pi_old.
4. The log-ratio log pi - log pi_old is clamped to +-LOG_RATIO_BOUND (20) before exp, for every loss: a
   log-ratio above ~88 is inf in float32, and an unbounded weight (CISPO without a cap, PPO's unclipped side)
   times a zero advantage is then NaN. Past the bound a token gets the value and the gradient it has at the bound.
   GSPO averages the clamped token log-ratios.
5. GSPO's clip flags (`clipped_high` / `clipped_low`) and `kept` are its responses', set on each of their tokens;
   the `ratio` it returns for the metrics is the token ratio, as for every loss.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields as dataclass_fields

import torch
from torch import Tensor

AGGREGATIONS = ("token_group", "token_batch", "sequence", "prompt")
# e^20 ~ 4.9e8 is far beyond any cap, floor or clip (all within a few units of 1), so no capped or clipped weight
# and no clip flag changes; only an unbounded weight saturates, at a ratio only a diverged policy reaches. And
# e^20 times any advantage, summed over any batch and squared in the gradient norm stays far inside float32.
LOG_RATIO_BOUND = 20.0


@dataclass
class TokenLoss:
    """What a loss function returns, per token."""

    per_token: Tensor  # [N] coef_t * loss_t, the token's share of the micro-batch loss (carries the gradient)
    clipped_high: Tensor  # [N] bool: the upper bound acted on this token
    clipped_low: Tensor  # [N] bool: the lower bound acted on this token
    kept: Tensor  # [N] bool: the token passes gradient to log pi (False: masked by Eq. 7 or by the PPO clip)

    @classmethod
    def unclipped(cls, per_token: Tensor) -> TokenLoss:
        """A loss with no bounds and no mask: nothing clipped, every token kept."""
        none = torch.zeros_like(per_token, dtype=torch.bool)
        return cls(per_token, none, none, ~none)


@dataclass
class LossOut:
    loss: Tensor  # [] sum_t coef_t * loss_t
    ratio: Tensor  # [N] pi / pi_old from the clamped log-ratio, detached
    clipped_high: Tensor  # [N] bool: the upper bound acted on this token
    clipped_low: Tensor  # [N] bool: the lower bound acted on this token
    kept: Tensor  # [N] bool: the token passes gradient to log pi (False: masked by Eq. 7, by the PPO clip, or by a
    # train/inference correction that gives it weight 0)
    adv: Tensor  # [N] the advantage of the token's response, detached (its sign splits the clip fractions)

    @classmethod
    def cat(cls, outs: list[LossOut], cat: Callable[[list[Tensor]], Tensor] = torch.cat) -> LossOut:
        """The per-token fields [N] of several results joined by `cat` (e.g. across ranks, as 0/1 floats for the
        flags); `loss` is 0, as a sum over micro-batches it would not be one micro-batch's loss."""
        per_token = dataclass_fields(cls)[1:]
        return cls(torch.zeros(()), **{f.name: cat([getattr(o, f.name) for o in outs]) for f in per_token})


LossFn = Callable[..., TokenLoss]
LOSSES: dict[str, LossFn] = {}
WEIGHT_CAPS: dict[str, str | None] = {}  # loss name -> the knob capping its IS weight (register_loss)
# keyword-only parameters that are data, not knobs: a loss that names one gets it from `policy_loss`
SEQUENCE_ARGS = ("seq_ids",)


def register_loss(name: str, *, weight_cap: str | None = None) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(logp [N], ratio [N], adv [N], coef [N], *, knobs...) -> TokenLoss` the loss `name`.
    `weight_cap`: the knob that bounds the loss's IS weight from above, when it has one (`weight_cap(name)`).

    logp carries the gradient; ratio = pi / pi_old is clamped (LOG_RATIO_BOUND) and detached (`ratio_with_grad`
    gives it a gradient); adv is the advantage of each token's response; coef its aggregation coefficient (times
    the correction weight), which the returned per-token values include. The keyword-only parameters are the loss's
    knobs, given by name from the caller's fields (`loss_knobs`), but for `seq_ids [N]` (SEQUENCE_ARGS): a loss
    that names it gets the response of each token (module docstring)."""

    def register(fn: LossFn) -> LossFn:
        if LOSSES.get(name, fn) is not fn:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name].__qualname__})")
        params = inspect.signature(fn).parameters.values() if callable(fn) else ()
        if len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) != 4:
            raise TypeError(f"loss {name!r} must be a function (logp, ratio, adv, coef, *, knobs) -> TokenLoss, "
                            f"got {fn!r}")
        LOSSES[name] = fn
        WEIGHT_CAPS[name] = weight_cap
        return fn

    return register


def weight_cap(name: str) -> str | None:
    """The knob that caps loss `name`'s IS weight (cispo: is_weight_max), or None: the loss ignores the ratio
    (reinforce) or leaves it unbounded for some tokens (PPO's clip, for a negative advantage). With
    algo.pi_old=engine and algo.max_staleness > 0 that cap is the only bound on the off-policy weight."""
    resolve_loss(name)
    return WEIGHT_CAPS[name]


def resolve_loss(name: str) -> LossFn:
    """The loss registered as `name`; an import path "package.module:function" or "package.module.function" is
    imported and registered under that name the first time."""
    if name in LOSSES:
        return LOSSES[name]
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not (sep and module and attr):
        raise ValueError(f"unknown loss {name!r}: the registered ones are {list(LOSSES)} (cispo.algo.loss.register_loss "
                         f"adds one), or give an import path 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"loss {name!r}: cannot import {attr!r} from {module!r} ({err})") from None
    return register_loss(name)(fn)


def loss_knobs(loss: str, fields: Mapping[str, object]) -> dict:
    """The knobs the loss `loss` takes, picked by name from `fields` (e.g. the config's fields as a dict).

    A knob is a keyword-only parameter of the loss; one that `fields` lacks and that has no default is an error."""
    knobs = _knob_params(resolve_loss(loss))
    missing = [p.name for p in knobs if p.name not in fields and p.default is p.empty]
    if missing:
        raise ValueError(f"loss {loss!r} needs the knob(s) {missing}, which are not among the fields given "
                         f"{sorted(fields)}: add such a field, or give the parameter a default in the loss's signature")
    return {p.name: fields[p.name] for p in knobs if p.name in fields}


@functools.cache
def _knob_params(fn: LossFn) -> tuple[inspect.Parameter, ...]:
    """The keyword-only parameters of a loss function but the data ones (SEQUENCE_ARGS); read once: `policy_loss`
    asks on every call."""
    return tuple(p for p in inspect.signature(fn).parameters.values()
                 if p.kind is p.KEYWORD_ONLY and p.name not in SEQUENCE_ARGS)


@functools.cache
def _takes_sequences(fn: LossFn) -> bool:
    return "seq_ids" in inspect.signature(fn).parameters


def takes_sequences(loss: str) -> bool:
    """Whether loss `loss` is sequence-level: it names `seq_ids`, so a token's term depends on its whole response
    and the loss is not a sum of terms of one token each (no chunked grad hint: cispo.train.update)."""
    return _takes_sequences(resolve_loss(loss))


def sequence_ids(lengths: list[int], n: int, device: torch.device | None = None) -> Tensor:
    """seq_ids [n] of a micro-batch's packed loss tokens: response k's `lengths[k]` tokens get k, in order; tokens
    past sum(lengths) (the one token of an empty pass, cispo.algo.batch.empty_micro_batch) get len(lengths)."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    if len(ids) < n:
        ids = torch.cat([ids, torch.full((n - len(ids),), len(lengths), dtype=torch.long)])
    return ids.to(device) if device is not None else ids


def sequence_mean(values: Tensor, seq_ids: Tensor) -> Tensor:
    """values [N], seq_ids [N] -> [N]: each token gets the mean of `values` over its response's tokens (with the
    gradient of that mean)."""
    if values.numel() == 0:
        return values
    n = int(seq_ids.max()) + 1
    sums = values.new_zeros(n).index_add(0, seq_ids, values)
    counts = values.new_zeros(n).index_add_(0, seq_ids, torch.ones_like(values))
    return (sums / counts.clamp(min=1))[seq_ids]


def sequence_coefficients(lengths: Tensor, group_ids: Tensor, mode: str) -> Tensor:
    """Per-response weight c_i of each of its tokens, so that the batch loss is sum_i c_i * sum_t loss_it.

    lengths [B] loss tokens per response (0 for a response left out of the loss; with a loss mask only the
    trainable tokens count, cispo.algo.batch); group_ids [B] prompt index.
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


def clamped_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """pi / pi_old [N] = exp(logp - old_logp), the log-ratio clamped to +-LOG_RATIO_BOUND; detached."""
    return (logp.detach() - old_logp.detach()).clamp_(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp_()


def ratio_with_grad(ratio: Tensor, logp: Tensor) -> Tensor:
    """ratio [N] (detached) as a function of logp [N]: the same values, with d ratio / d logp = ratio, the
    derivative of exp(logp - old_logp); past the clamp's bound it is the derivative at the bound."""
    return ratio * torch.exp(logp - logp.detach())


def trust_region_exits(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """(high, low) [N] bool: the ratio left [1 - clip_low, 1 + clip_high] in the direction the advantage pushes,
    A > 0 and r > 1 + clip_high, A < 0 and r < 1 - clip_low. PPO's clip zeroes these tokens' gradient; M1 Eq. 7
    masks them."""
    return (ratio > 1.0 + clip_high) & (adv > 0), (ratio < 1.0 - clip_low) & (adv < 0)


@register_loss("cispo", weight_cap="is_weight_max")
def cispo(logp: Tensor, ratio: Tensor, adv: Tensor, coef: Tensor, *, is_weight_max: float | None,
          is_weight_min: float | None, unified_mask: bool, clip_low: float, clip_high: float) -> TokenLoss:
    """CISPO: loss_t = -sg(clip(r_t, is_weight_min, is_weight_max)) * A_t * log pi(o_t) [* M_t].

    logp [N] (with gradient), ratio [N], adv [N], coef [N]. is_weight_max / is_weight_min bound the stop-gradient weight
    (None = unbounded); unified_mask: M_t = 0 for the tokens M1 Eq. 7 drops (`trust_region_exits` of
    [1 - clip_low, 1 + clip_high]). With unbounded weights the masked CISPO gradient is PPO's clipped-surrogate
    gradient."""
    none = torch.zeros_like(ratio, dtype=torch.bool)
    high = ratio > is_weight_max if is_weight_max is not None else none
    low = ratio < is_weight_min if is_weight_min is not None else none
    bounded = is_weight_min is not None or is_weight_max is not None
    weight = ratio.clamp(min=is_weight_min, max=is_weight_max) if bounded else ratio
    if unified_mask:
        out_high, out_low = trust_region_exits(ratio, adv, clip_low, clip_high)
        kept = ~(out_high | out_low)
        weight = weight * kept
    else:
        kept = ~none
    # the weight is a constant (stop-gradient), so loss_t is linear in log pi: every constant folds into one
    # factor and log pi is multiplied once, which keeps this loss's autograd graph to a single product
    return TokenLoss((-adv * coef) * weight * logp, high, low, kept)


@register_loss("grpo")
@register_loss("dapo")
def ppo_clip(logp: Tensor, ratio: Tensor, adv: Tensor, coef: Tensor, *, clip_low: float,
             clip_high: float) -> TokenLoss:
    """PPO's clipped surrogate (GRPO, DAPO): loss_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t).

    logp [N] (with gradient), ratio [N], adv [N], coef [N]. The surrogate differentiates through the ratio."""
    ratio_g = ratio_with_grad(ratio, logp)
    per_token = -torch.minimum(ratio_g * adv, ratio_g.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    high, low = trust_region_exits(ratio, adv, clip_low, clip_high)
    return TokenLoss(coef * per_token, high, low, ~(high | low))


@register_loss("reinforce")
def reinforce(logp: Tensor, ratio: Tensor, adv: Tensor, coef: Tensor) -> TokenLoss:
    """REINFORCE: loss_t = -A_t * log pi(o_t). logp [N] (with gradient), adv [N], coef [N]; the ratio [N] is not
    used."""
    return TokenLoss.unclipped((-adv * coef) * logp)


@register_loss("gspo")
def gspo(logp: Tensor, ratio: Tensor, adv: Tensor, coef: Tensor, *, seq_ids: Tensor, seq_clip_low: float,
         seq_clip_high: float) -> TokenLoss:
    """GSPO (Zheng et al. 2025, Eq. 5-7): L_i = -min(s_i A_i, clip(s_i, 1 - seq_clip_low, 1 + seq_clip_high) A_i),
    s_i = exp(mean_t log r_t) over response i's loss tokens, differentiated through s_i.

    logp [N] (with gradient), ratio [N], adv [N] (one value per response), coef [N], seq_ids [N]. Each token
    carries coef_t * L_i (module docstring: the response weighs sum_t coef_t), so d loss / d logp_t =
    (sum_t' coef_t') * dL_i / ds_i * s_i / |o_i|: every token of a response gets the same gradient, 0 once the
    clip binds."""
    log_ratio = torch.log(ratio) + (logp - logp.detach())  # the clamped log-ratio, d / d logp = 1
    seq_ratio = torch.exp(sequence_mean(log_ratio, seq_ids))  # [N] s_i of each token's response
    per_token = -torch.minimum(seq_ratio * adv, seq_ratio.clamp(1.0 - seq_clip_low, 1.0 + seq_clip_high) * adv)
    high, low = trust_region_exits(seq_ratio.detach(), adv, seq_clip_low, seq_clip_high)
    return TokenLoss(coef * per_token, high, low, ~(high | low))


def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, coef: Tensor, *, loss: str,
                tis_weight: Tensor | None = None, seq_ids: Tensor | None = None, **knobs) -> LossOut:
    """The loss of one micro-batch of packed tokens: sum_t coef_t [* tis_weight_t] * loss_t.

    logp [N] log pi_theta (with gradient); old_logp [N] log pi_old (the policy that sampled, recomputed by the
    trainer; no gradient reaches it); adv [N] advantage of each token's response; coef [N] aggregation
    coefficient; tis_weight [N] optional weight of the train/inference corrections (no gradient): TIS's truncated
    ratio, or the product of the corrections of cispo.algo.corrections; a token it gives weight 0 is not `kept`.
    seq_ids [N] the response of each token (`sequence_ids`), required by a sequence-level loss (`takes_sequences`)
    and passed to no other. loss: a name in LOSSES or an import path (`resolve_loss`); knobs: the loss gets those
    its signature names (`loss_knobs`), the rest are ignored.
    """
    ratio = clamped_ratio(logp, old_logp)
    scale = coef if tis_weight is None else coef * tis_weight
    fn, data = resolve_loss(loss), {}
    if _takes_sequences(fn):
        if seq_ids is None:
            raise ValueError(f"loss {loss!r} is sequence-level: policy_loss needs seq_ids [N] (sequence_ids)")
        data["seq_ids"] = seq_ids
    terms = fn(logp, ratio, adv, scale, **data, **loss_knobs(loss, knobs))
    kept = terms.kept if tis_weight is None else terms.kept & (tis_weight != 0)
    return LossOut(terms.per_token.sum(), ratio, terms.clipped_high, terms.clipped_low, kept, adv.detach())


def logp_grad(logp: Tensor, old_logp: Tensor, adv: Tensor, coef: Tensor, **options) -> Tensor:
    """d policy_loss / d logp [N], at these logp values; `options` as for `policy_loss`.

    A token-level loss is a sum of per-token terms, so the gradient on a slice of the tokens is this function of
    that slice alone: `token_logprobs(grad_hint=...)` calls it chunk by chunk to compute the LM head's gradients in
    its forward pass. A sequence-level one (`takes_sequences`) needs whole responses."""
    logp = logp.detach().requires_grad_()
    with torch.enable_grad():
        loss = policy_loss(logp, old_logp, adv, coef, **options).loss
        return torch.autograd.grad(loss, logp, materialize_grads=True)[0]


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """Truncated IS weight min(pi_old / pi_rollout, cap) per token [N]: the trainer's policy vs the engine's."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap)


def loss_metrics(outs: list[LossOut]) -> dict[str, float]:
    """Ratio and clipping statistics over the tokens of several micro-batches; keys namespaced under loss/.

    Every share is over ALL tokens. loss/clip_frac_high: tokens whose `clipped_high` is set, i.e. the loss's upper
    bound acted: CISPO's is_weight_max cap, whatever the advantage's sign; PPO's 1 + clip_high, only where A > 0
    (where A < 0 the clip does not bind). loss/clip_frac_low likewise with the lower bound (CISPO's is_weight_min;
    PPO's 1 - clip_low, only where A < 0). loss/clip_frac_{high,low}_{pos,neg}_adv: the tokens of that total
    with A > 0 (pos) or A < 0 (neg); pos + neg is the total less the clipped tokens with A = 0, which no loss
    here sends a gradient. The flags may be bool or 0/1 floats (the trainer gathers them across ranks as floats).
    """
    if not outs or sum(o.ratio.numel() for o in outs) == 0:
        return {}
    cat = lambda field: torch.cat([getattr(o, field) for o in outs])  # noqa: E731
    ratio, adv = cat("ratio"), cat("adv")
    metrics = {
        "loss/masked_frac": 1.0 - cat("kept").float().mean().item(),
        "loss/ratio_mean": ratio.mean().item(),
        "loss/ratio_max": ratio.max().item(),
        "loss/ratio_min": ratio.min().item(),
    }
    for side in ("high", "low"):
        clipped = cat(f"clipped_{side}").bool()
        metrics[f"loss/clip_frac_{side}"] = clipped.float().mean().item()
        metrics[f"loss/clip_frac_{side}_pos_adv"] = (clipped & (adv > 0)).float().mean().item()
        metrics[f"loss/clip_frac_{side}_neg_adv"] = (clipped & (adv < 0)).float().mean().item()
    return metrics


def trust_region_metrics(ratio: Tensor, adv: Tensor, grad: Tensor, update: Tensor, clip_low: float,
                         clip_high: float) -> dict[str, float]:
    """Where the tokens that leave the trust region [1 - clip_low, 1 + clip_high] are, and how much of the loss's
    gradient they carry: the tokens on which CISPO and PPO's clip (DAPO, GRPO) disagree. Keys under trust/.

    ratio [N] pi / pi_old, adv [N] advantages, grad [N] d loss / d log pi of each token (`logp_grad`), update [N]
    the index of the optimizer step (mini-batch) the token was trained in, all over every token of an RL step.
    trust/exit_frac_{pos,neg}_adv: share of all tokens with A > 0 and r > 1 + clip_high, or A < 0 and
    r < 1 - clip_low (`trust_region_exits`: PPO zeroes their gradient, M1 Eq. 7 masks them, CISPO keeps them).
    trust/exit_grad_share_{pos,neg}_adv: their share of sum_t |grad_t|, the gradient mass on log pi (0 under PPO's
    clip by construction). trust/update_JJ_{exit_frac,abs_log_ratio}: per optimizer step J of the RL step, the
    share of its tokens outside the region on either side (whatever the advantage) and the mean |log r|, which
    show how far the policy has moved from pi_old by the J-th of `algo.updates_per_step` updates."""
    if ratio.numel() == 0:
        return {}
    high, low = trust_region_exits(ratio, adv, clip_low, clip_high)
    mass = grad.abs().sum().clamp(min=torch.finfo(grad.dtype).tiny)
    metrics = {}
    for sign, exits in (("pos", high), ("neg", low)):
        metrics[f"trust/exit_frac_{sign}_adv"] = exits.float().mean().item()
        metrics[f"trust/exit_grad_share_{sign}_adv"] = (grad.abs()[exits].sum() / mass).item()
    outside = (ratio > 1.0 + clip_high) | (ratio < 1.0 - clip_low)
    abs_log = ratio.log().abs()
    for j in torch.unique(update.long()).tolist():
        rows = update.long() == j
        metrics[f"trust/update_{j:02d}_exit_frac"] = outside[rows].float().mean().item()
        metrics[f"trust/update_{j:02d}_abs_log_ratio"] = abs_log[rows].mean().item()
    return metrics


def mismatch_metrics(old_logp: Tensor, rollout_logp: Tensor, versions: Tensor | None = None,
                     version: int = -1) -> dict[str, float]:
    """Trainer vs rollout engine on the same sampled tokens [N]: mean |diff| of logprobs and the Pearson
    correlation of the token probabilities (M1 Fig. 3 reports 0.987 -> 0.997 after its fp32 head fix).

    `versions` [N]: the policy that sampled each token; `version`: the one pi_old is. Only tokens sampled by it
    (or of unknown version, -1) measure the train/inference mismatch; the others also differ by the updates in
    between, and go to staleness/token_frac (their share) and staleness/logp_abs_diff."""
    out: dict[str, float] = {}
    if versions is not None and versions.numel():
        stale = (versions != version) & (versions >= 0)
        out["staleness/token_frac"] = stale.float().mean().item()
        if stale.any():
            out["staleness/logp_abs_diff"] = (old_logp[stale] - rollout_logp[stale]).abs().mean().item()
        old_logp, rollout_logp = old_logp[~stale], rollout_logp[~stale]
    if old_logp.numel() < 2:
        return out
    p, q = old_logp.double().exp(), rollout_logp.double().exp()
    corr = torch.corrcoef(torch.stack([p, q]))[0, 1]
    return out | {
        "mismatch/logp_abs_diff": (old_logp - rollout_logp).abs().mean().item(),
        "mismatch/prob_pearson": corr.item(),
    }
