"""The loss family against the formulas: hand-worked numbers, the CISPO gradient identity, a naive loop,
edge cases, micro-batch invariance, M1 Eq. 7 against PPO's clip, the loss table (custom losses by decorator
and by import path), huge log-ratios, and the clip fractions by advantage sign."""

import inspect
import math
from dataclasses import asdict

import pytest
import torch

from cispo.algo.batch import Sample, micro_batches
from cispo.config import AlgoConfig, ConfigError
from cispo.algo.loss import (
    AGGREGATIONS, LOG_RATIO_BOUND, LOSSES, LossOut, logp_grad, loss_knobs, loss_metrics, mismatch_metrics,
    policy_loss, register_loss, sequence_coefficients, sequence_ids, takes_sequences, tis_weights,
    trust_region_metrics,
)
from tests import custom_loss_plugin as plugin

BUILTIN = ("cispo", "dapo", "grpo", "reinforce")


def knobs(loss, **overrides):
    """The knobs `loss` takes, from AlgoConfig (the one home of their defaults) with `overrides`."""
    return loss_knobs(loss, asdict(AlgoConfig(loss=loss, **overrides)))


def test_hand_worked_cispo_example():
    # one response of 3 tokens, A = 2, coef = 1/3 (token mean), cap 1.5, no lower bound
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    old = torch.log(torch.tensor([0.25, 0.2, 0.9 / 0.5]).clamp(max=0.999))
    # ratios: 0.5/0.25 = 2 -> clipped to 1.5; 0.2/0.2 = 1; 0.9/0.999 = 0.9009
    r3 = 0.9 / 0.999
    out = policy_loss(logp, old, torch.full((3,), 2.0), torch.full((3,), 1 / 3), loss="cispo",
                      **knobs("cispo", is_weight_max=1.5))
    # loss = -(1/3) * 2 * (1.5 * ln 0.5 + 1 * ln 0.2 + r3 * ln 0.9)
    expected = -(2 / 3) * (1.5 * math.log(0.5) + math.log(0.2) + r3 * math.log(0.9))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6, rel=0)
    assert out.clipped_high.tolist() == [True, False, False]
    assert out.clipped_low.tolist() == [False, False, False]


@pytest.mark.parametrize("cap,floor", [(5.0, None), (1.2, 0.8), (None, None)])
def test_cispo_gradient_is_stop_gradient_weight_times_advantage(cap, floor):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(50, generator=g) * 3).requires_grad_()
    old = (logp.detach() + torch.randn(50, generator=g)).requires_grad_()
    adv, coef = torch.randn(50, generator=g), torch.rand(50, generator=g)
    out = policy_loss(logp, old, adv, coef, loss="cispo", **knobs("cispo", is_weight_max=cap, is_weight_min=floor))
    out.loss.backward()
    ratio = torch.exp(logp.detach() - old.detach())
    weight = ratio.clamp(min=floor, max=cap) if (cap or floor) else ratio
    torch.testing.assert_close(logp.grad, -coef * weight * adv, rtol=1e-6, atol=0)
    # the weight is a constant: nothing reaches pi_old through it
    assert old.grad is None or torch.count_nonzero(old.grad) == 0


def test_cispo_clipped_tokens_keep_gradient_ppo_drops_them():
    logp = torch.log(torch.full((4,), 0.9)).requires_grad_()
    old = torch.log(torch.full((4,), 0.1))  # ratio 9: past every bound
    adv, coef = torch.ones(4), torch.full((4,), 0.25)
    cispo = policy_loss(logp, old, adv, coef, loss="cispo", **knobs("cispo", is_weight_max=5.0))
    (g_cispo,) = torch.autograd.grad(cispo.loss, logp)
    assert cispo.clipped_high.all()
    torch.testing.assert_close(g_cispo, -0.25 * 5.0 * adv)  # capped weight, gradient still flows
    ppo = policy_loss(logp, old, adv, coef, loss="dapo", **knobs("dapo", clip_low=0.2, clip_high=0.28))
    (g_ppo,) = torch.autograd.grad(ppo.loss, logp)
    assert torch.count_nonzero(g_ppo) == 0


def naive_loss(logp, old, adv, coef, loss, cap, floor, unified, cl, ch):
    """Token by token, straight from the papers' formulas."""
    total = 0.0
    for t in range(len(logp)):
        r = math.exp(logp[t] - old[t])
        a = adv[t]
        if loss == "cispo":
            w = min(r, cap) if cap is not None else r
            w = max(w, floor) if floor is not None else w
            m = 0.0 if unified and ((a > 0 and r > 1 + ch) or (a < 0 and r < 1 - cl)) else 1.0
            term = -w * a * logp[t] * m
        elif loss in ("grpo", "dapo"):
            term = -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)
        else:
            term = -a * logp[t]
        total += coef[t] * term
    return total


@pytest.mark.parametrize("loss", BUILTIN)
@pytest.mark.parametrize("unified", [False, True])
def test_vectorised_matches_naive_loop(loss, unified):
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(64, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(64, generator=g, dtype=torch.float64) * 0.7
    adv, coef = torch.randn(64, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    kw = dict(is_weight_max=1.5, is_weight_min=0.6, unified_mask=unified, clip_low=0.2, clip_high=0.28)
    out = policy_loss(logp, old, adv, coef, loss=loss, **knobs(loss, **kw))
    expected = naive_loss(logp.tolist(), old.tolist(), adv.tolist(), coef.tolist(), loss, 1.5, 0.6, unified, 0.2, 0.28)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_edge_cases_zero_advantage_and_empty_batch():
    logp = torch.log(torch.rand(10) * 0.9 + 0.05).requires_grad_()
    out = policy_loss(logp, logp.detach() - 3.0, torch.zeros(10), torch.full((10,), 0.1), loss="cispo",
                      **knobs("cispo"))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0
    assert out.clipped_high.all()  # ratio e^3 > 5
    empty = policy_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), loss="cispo", **knobs("cispo"))
    assert empty.loss.item() == 0.0 and loss_metrics([empty]) == {}


def test_huge_ratios_are_capped_not_inf():
    logp = torch.zeros(3, requires_grad=True)
    out = policy_loss(logp - 0.0, torch.full((3,), -80.0), torch.ones(3), torch.ones(3), loss="cispo",
                      **knobs("cispo", is_weight_max=5.0))
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad, torch.full((3,), -5.0))
    assert loss_metrics([out])["loss/clip_frac_high"] == 1.0


def test_sequence_coefficients_by_hand():
    # group 0: responses of 2 and 4 tokens; group 1: responses of 3 and 0 (left out) tokens
    lengths, groups = torch.tensor([2, 4, 3, 0]), torch.tensor([0, 0, 1, 1])
    c = lambda mode: sequence_coefficients(lengths, groups, mode).tolist()  # noqa: E731
    assert c("token_batch") == pytest.approx([1 / 9, 1 / 9, 1 / 9, 0])
    assert c("token_group") == pytest.approx([1 / 12, 1 / 12, 1 / 6, 0])  # 1 / (2 prompts * N_g)
    assert c("sequence") == pytest.approx([1 / 6, 1 / 12, 1 / 9, 0])  # 1 / (3 responses * |o|)
    assert c("prompt") == pytest.approx([1 / 8, 1 / 16, 1 / 6, 0])  # 1 / (2 prompts * B'_g * |o|)
    for mode in AGGREGATIONS:  # every mode is a weighted mean: the token weights sum to 1
        assert (sequence_coefficients(lengths, groups, mode) * lengths).sum().item() == pytest.approx(1.0)
    assert sequence_coefficients(torch.zeros(3, dtype=torch.long), torch.arange(3), "token_group").sum() == 0


def _samples(seed=2, prompts=4, group=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(prompts):
        prompt = torch.randint(0, 50, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        for _ in range(group):
            n = int(torch.randint(0, 9, (1,), generator=g))  # 0 = a response left out of the loss
            out.append(Sample.leading(prompt, list(range(n)), n, torch.zeros(n), float(torch.randn(1, generator=g)), p))
    return out


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("loss", ["cispo", "dapo"])
def test_micro_batching_does_not_change_loss_or_gradient(mode, loss):
    samples = _samples()
    g = torch.Generator().manual_seed(3)
    # each sample's token logprobs are leaves of one parameter vector, so gradients can be compared
    theta = torch.randn(sum(s.loss_len for s in samples), generator=g, dtype=torch.float64)
    offsets = torch.tensor([0] + [s.loss_len for s in samples]).cumsum(0).tolist()
    old = theta + torch.randn(theta.shape, generator=g, dtype=torch.float64) * 0.5

    def run(budget):
        param = theta.clone().requires_grad_()
        total = 0.0
        for mb in micro_batches(samples, list(range(len(samples))), budget, mode):
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + samples[i].loss_len) for i in mb.sample_ids])
            out = policy_loss(param[idx], old[idx], mb.adv.double(), mb.coef.double(), loss=loss,
                              **knobs(loss, is_weight_max=1.3))
            out.loss.backward()
            total += out.loss.item()
        return total, param.grad

    whole_loss, whole_grad = run(budget=10**6)
    for budget in (1, 7, 20):
        loss_b, grad_b = run(budget)
        assert loss_b == pytest.approx(whole_loss, rel=1e-12)
        torch.testing.assert_close(grad_b, whole_grad, rtol=1e-12, atol=1e-15)


def test_unified_mask_reproduces_ppo_clip_gradient():
    g = torch.Generator().manual_seed(4)
    logp = (-torch.rand(200, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(200, generator=g) * 0.4
    adv, coef = torch.randn(200, generator=g), torch.rand(200, generator=g)
    eps = 0.2
    # M1's unified form: unbounded IS weight, the mask carrying PPO's trust region
    cispo = policy_loss(logp, old, adv, coef, loss="cispo",
                        **knobs("cispo", is_weight_max=None, unified_mask=True, clip_low=eps, clip_high=eps))
    ppo = policy_loss(logp, old, adv, coef, loss="grpo", **knobs("grpo", clip_low=eps, clip_high=eps))
    (g_cispo,) = torch.autograd.grad(cispo.loss, logp)
    (g_ppo,) = torch.autograd.grad(ppo.loss, logp)
    assert 0 < (~cispo.kept).sum() < 200  # the mask acts on some tokens, not all
    torch.testing.assert_close(g_cispo, g_ppo, rtol=1e-5, atol=1e-7)
    assert torch.equal(cispo.kept, ppo.kept)


def test_tis_weight_multiplies_the_loss_and_is_capped():
    old, rollout = torch.log(torch.tensor([0.5, 0.9])), torch.log(torch.tensor([0.1, 0.9]))
    w = tis_weights(old, rollout, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0]))
    logp = old.clone().requires_grad_()
    base = policy_loss(logp, old, torch.ones(2), torch.ones(2), loss="cispo", **knobs("cispo"))
    weighted = policy_loss(logp, old, torch.ones(2), torch.ones(2), loss="cispo", tis_weight=w, **knobs("cispo"))
    assert weighted.loss.item() == pytest.approx(-(2.0 * math.log(0.5) + math.log(0.9)))
    assert base.loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.9)))


def test_mismatch_metrics():
    p = torch.log(torch.tensor([0.1, 0.5, 0.9]))
    m = mismatch_metrics(p, p)
    assert m["mismatch/logp_abs_diff"] == 0.0 and m["mismatch/prob_pearson"] == pytest.approx(1.0)
    q = torch.log(torch.tensor([0.9, 0.5, 0.1]))  # probabilities reversed: correlation -1
    assert mismatch_metrics(p, q)["mismatch/prob_pearson"] == pytest.approx(-1.0)


def test_the_table_holds_the_builtin_losses_with_their_knobs_and_no_defaults():
    assert set(BUILTIN) <= set(LOSSES) and LOSSES["grpo"] is LOSSES["dapo"]  # one PPO clipped surrogate
    algo = asdict(AlgoConfig())
    assert loss_knobs("cispo", algo) == dict(is_weight_max=5.0, is_weight_min=None, unified_mask=False,
                                             clip_low=0.2, clip_high=0.2)
    assert loss_knobs("dapo", algo) == dict(clip_low=0.2, clip_high=0.2) and loss_knobs("reinforce", algo) == {}
    for name in BUILTIN:  # the defaults live in AlgoConfig only
        params = inspect.signature(LOSSES[name]).parameters.values()
        assert all(p.default is p.empty for p in params), name
    # a loss gets the knobs it names and no others; a knob it needs and is not given is an error naming it
    logp, adv = torch.log(torch.tensor([0.5, 0.25])), torch.tensor([1.0, -1.0])
    out = policy_loss(logp, logp, adv, torch.ones(2), **(algo | dict(loss="reinforce")))  # every field passed
    assert out.loss.item() == pytest.approx(-(math.log(0.5) - math.log(0.25)))
    with pytest.raises(ValueError, match="is_weight_min"):
        policy_loss(logp, logp, adv, torch.ones(2), loss="cispo", is_weight_max=5.0, unified_mask=False,
                    clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("cispo")(plugin.capped_reinforce)


def test_custom_loss_by_decorator_from_outside_the_package():
    """tests/custom_loss_plugin.py registers `capped_reinforce` on import; it takes one knob of AlgoConfig."""
    cfg = AlgoConfig(loss="capped_reinforce", clip_high=0.3)
    inputs = dict(loss=cfg.loss, **loss_knobs(cfg.loss, asdict(cfg)))  # what the trainer passes
    assert inputs == dict(loss="capped_reinforce", clip_high=0.3)
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(40, generator=g, dtype=torch.float64) * 0.5
    adv, coef = torch.randn(40, generator=g, dtype=torch.float64), torch.rand(40, generator=g, dtype=torch.float64)
    out = policy_loss(logp, old, adv, coef, **inputs)
    ratio = torch.exp(logp - old)  # the formula, by hand
    expected = (coef * -ratio.clamp(max=1.3) * adv * logp).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.equal(out.clipped_high, ratio.detach() > 1.3) and 0 < out.clipped_high.sum() < 40
    (g_out,) = torch.autograd.grad(out.loss, logp)
    (g_expected,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g_out, g_expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(logp_grad(logp, old, adv, coef, **inputs), g_expected, rtol=1e-12, atol=1e-15)
    assert loss_metrics([out])["loss/clip_frac_high"] == pytest.approx(out.clipped_high.double().mean().item())


@pytest.mark.parametrize("path", ["tests.custom_loss_plugin:signed_log_ratio",
                                  "tests.custom_loss_plugin.signed_log_ratio"])
def test_custom_loss_by_import_path_through_the_config(path):
    cfg = AlgoConfig(loss=path)  # validation imports and registers it
    assert LOSSES[path] is plugin.signed_log_ratio
    assert loss_knobs(path, asdict(cfg)) == {}  # its one knob has a default and is no AlgoConfig field
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9])).requires_grad_()
    old, adv, coef = torch.log(torch.tensor([0.25, 0.4, 0.9])), torch.tensor([1.0, -2.0, 3.0]), torch.full((3,), 0.5)
    out = policy_loss(logp, old, adv, coef, loss=path, **loss_knobs(path, asdict(cfg)))
    # loss_t = -2 A_t log r_t: 0.5 * -2 * (1 * ln 2 - 2 * ln 0.5 + 3 * 0)
    assert out.loss.item() == pytest.approx(-(math.log(2) - 2 * math.log(0.5)), rel=1e-6)
    torch.testing.assert_close(logp_grad(logp, old, adv, coef, loss=path), -2.0 * adv * coef)
    # the decorated loss by its import path: the same function, under a second name
    assert LOSSES[AlgoConfig(loss="tests.custom_loss_plugin:capped_reinforce").loss] is LOSSES["capped_reinforce"]


@pytest.mark.parametrize("loss, message", [
    ("ppo", r"algo\.loss: unknown loss 'ppo'.*'cispo', 'dapo', 'grpo', 'reinforce'.*'package\.module:function'"),
    ("tests.custom_loss_plugin:nope", r"algo\.loss: .*cannot import 'nope'"),
    ("no_such_package_anywhere.losses:fn", r"algo\.loss: .*cannot import 'fn' from 'no_such_package_anywhere"),
    ("tests.custom_loss_plugin:needs_beta", r"algo\.loss: .*needs the knob\(s\) \['beta'\].*add such a field"),
    ("tests.custom_loss_plugin:two_args", r"algo\.loss: .*must be a function \(logp, ratio, adv, coef, \*, knobs\)"),
])
def test_bad_losses_are_config_errors_naming_algo_loss(loss, message):
    with pytest.raises(ConfigError, match=message):
        AlgoConfig(loss=loss)


HUGE_CASES = [
    ("cispo", {}),
    ("cispo", dict(is_weight_max=None, unified_mask=True)),  # unbounded weight, M1's unified form
    ("cispo", dict(is_weight_max=None, is_weight_min=0.5)),
    ("dapo", dict(clip_low=0.2, clip_high=0.28)),
    ("grpo", {}),
    ("reinforce", {}),
    ("capped_reinforce", {}),  # a custom loss gets the clamped ratio too
]


@pytest.mark.parametrize("loss, overrides", HUGE_CASES)
@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_log_ratios_give_the_loss_and_gradient_at_the_bound(loss, overrides, mode, sign):
    """log pi - log pi_old = +-1000 on every other token (exp is inf / 0 in float32), advantages of both signs
    and zero: the loss and its gradient are finite and those of the log-ratio at the bound."""
    lengths, groups = torch.tensor([2, 2, 2]), torch.tensor([0, 0, 1])
    coef = sequence_coefficients(lengths, groups, mode).repeat_interleave(lengths)
    adv = torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    base = torch.tensor([-0.5, -1.25, -0.75, -2.0, -1.5, -0.25])  # exact in float32, as are base -+ 1000 and 20
    huge = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])

    def run(log_ratio):
        logp = base.clone().requires_grad_()
        old = base - torch.where(huge > 0, sign * log_ratio, torch.tensor([0.1, -0.1, 0.05, 0.2, -0.3, 0.15]))
        out = policy_loss(logp, old, adv, coef, loss=loss, **knobs(loss, **overrides))
        out.loss.backward()
        return out, logp.grad

    out, grad = run(1000.0)
    at_bound, grad_at_bound = run(LOG_RATIO_BOUND)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss, at_bound.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_at_bound, rtol=1e-6, atol=0)
    assert all(math.isfinite(v) for v in loss_metrics([out]).values())


@pytest.mark.parametrize("loss", ["dapo", "grpo"])
def test_ppo_gradient_through_the_clamped_ratio_is_that_of_exp(loss):
    g = torch.Generator().manual_seed(6)
    logp = (-torch.rand(100, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(100, generator=g, dtype=torch.float64) * 0.4
    adv, coef = torch.randn(100, generator=g, dtype=torch.float64), torch.rand(100, generator=g, dtype=torch.float64)
    out = policy_loss(logp, old, adv, coef, loss=loss, **knobs(loss, clip_low=0.2, clip_high=0.28))
    ratio = torch.exp(logp - old)  # unclamped, differentiated by autograd
    expected = (coef * -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)).sum()
    (g_out,) = torch.autograd.grad(out.loss, logp)
    (g_expected,) = torch.autograd.grad(expected, logp)
    assert 0 < torch.count_nonzero(g_expected) < 100  # some tokens clipped, some not
    torch.testing.assert_close(g_out, g_expected, rtol=1e-12, atol=1e-15)


def test_clip_fractions_by_advantage_sign():
    # ratios 3, 3, 3, 1, 0.5 with advantages +1, -1, 0, +1, -1
    logp = torch.zeros(5)
    old = -torch.log(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5]))
    adv, coef = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]), torch.full((5,), 0.2)
    cispo = policy_loss(logp, old, adv, coef, loss="cispo", **knobs("cispo", is_weight_max=2.0, is_weight_min=0.6))
    # the cap binds for every sign: the total counts the A = 0 token, the signed shares do not
    m = loss_metrics([cispo])
    assert m["loss/clip_frac_high"] == pytest.approx(3 / 5)
    assert m["loss/clip_frac_high_pos_adv"] == pytest.approx(1 / 5)
    assert m["loss/clip_frac_high_neg_adv"] == pytest.approx(1 / 5)
    assert m["loss/clip_frac_low"] == pytest.approx(1 / 5) and m["loss/clip_frac_low_neg_adv"] == pytest.approx(1 / 5)
    assert m["loss/clip_frac_low_pos_adv"] == 0.0
    # PPO's clip binds for one sign only: high where A > 0, low where A < 0
    ppo = policy_loss(logp, old, adv, coef, loss="dapo", **knobs("dapo", clip_low=0.2, clip_high=0.28))
    m = loss_metrics([ppo])
    assert m["loss/clip_frac_high"] == m["loss/clip_frac_high_pos_adv"] == pytest.approx(1 / 5)
    assert m["loss/clip_frac_low"] == m["loss/clip_frac_low_neg_adv"] == pytest.approx(1 / 5)
    assert m["loss/clip_frac_high_neg_adv"] == m["loss/clip_frac_low_pos_adv"] == 0.0
    # over several micro-batches, and as the trainer gathers them across ranks (every field as float)
    both = loss_metrics([cispo, ppo])
    assert both["loss/clip_frac_high_pos_adv"] == pytest.approx(2 / 10)
    gathered = LossOut(torch.zeros(()), *(torch.cat([getattr(o, f).float() for o in (cispo, ppo)])
                                          for f in ("ratio", "clipped_high", "clipped_low", "kept", "adv")))
    assert loss_metrics([gathered]) == pytest.approx(both)


def test_trust_region_metrics_split_the_exits_and_their_gradient_by_loss():
    # ratios 3, 3, 0.5, 0.5, 1, 1.1 with advantages +1, -1, -1, +1, +1, -1; trained in updates 0, 0, 0, 1, 1, 1
    logp = torch.zeros(6)
    old = -torch.log(torch.tensor([3.0, 3.0, 0.5, 0.5, 1.0, 1.1]))
    adv, coef = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0]), torch.full((6,), 1 / 6)
    update = torch.tensor([0, 0, 0, 1, 1, 1])

    def trust(loss):
        inputs = dict(old_logp=old, adv=adv, coef=coef, loss=loss, **knobs(loss, clip_low=0.2, clip_high=0.28))
        out = policy_loss(logp, **inputs)
        return trust_region_metrics(out.ratio, out.adv, logp_grad(logp, **inputs), update, 0.2, 0.28)

    cispo, dapo = trust("cispo"), trust("dapo")
    for m in (cispo, dapo):  # the exits are the same tokens whatever the loss: token 0 (A > 0) and token 2 (A < 0)
        assert m["trust/exit_frac_pos_adv"] == m["trust/exit_frac_neg_adv"] == pytest.approx(1 / 6)
        # per update: outside [0.8, 1.28] on either side; update 0 has 3, 3, 0.5, update 1 has 0.5, 1, 1.1
        assert m["trust/update_00_exit_frac"] == 1.0 and m["trust/update_01_exit_frac"] == pytest.approx(1 / 3)
        assert m["trust/update_01_abs_log_ratio"] == pytest.approx((math.log(2) + 0 + math.log(1.1)) / 3)
    # CISPO keeps them (capped weight 3 and weight 0.5), PPO's clip gives them no gradient
    # |grad| per token under CISPO: 3, 3, 0.5, 0.5, 1, 1.1 (times coef)
    assert cispo["trust/exit_grad_share_pos_adv"] == pytest.approx(3 / 9.1)
    assert cispo["trust/exit_grad_share_neg_adv"] == pytest.approx(0.5 / 9.1)
    assert dapo["trust/exit_grad_share_pos_adv"] == dapo["trust/exit_grad_share_neg_adv"] == 0.0
    assert trust_region_metrics(*(torch.zeros(0),) * 4, 0.2, 0.28) == {}


# ---- GSPO: a sequence-level loss (seq_ids) ---------------------------------------------------------------------

def test_hand_worked_gspo_example():
    # response 0: log-ratios 0.2, -0.1 (s = e^0.05 = 1.0513), A = +1; response 1: 0, 0.03, -0.06 (s = e^-0.01), A = -2
    # clip [1 - 0.1, 1 + 0.04]; loss_agg=sequence: coef 1 / (2 responses * |o_i|)
    logp = torch.log(torch.tensor([0.5, 0.4, 0.3, 0.6, 0.2], dtype=torch.float64)).requires_grad_()
    old = logp.detach() - torch.tensor([0.2, -0.1, 0.0, 0.03, -0.06], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    coef = torch.tensor([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    seq_ids = torch.tensor([0, 0, 1, 1, 1])
    out = policy_loss(logp, old, adv, coef, loss="gspo", seq_ids=seq_ids,
                      **knobs("gspo", seq_clip_low=0.1, seq_clip_high=0.04))
    s1 = math.exp(-0.01)
    # response 0: s A = 1.0513 > 1.04 A, so min takes the clipped 1.04: L = -1.04, no gradient; response 1 (inside
    # the range): L = -(s1 * -2) = 2 s1. Each response weighs the sum of its coefficients, 1/2.
    assert out.loss.item() == pytest.approx(0.5 * -1.04 + 0.5 * 2 * s1, rel=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logp)
    # d/dlogp_t of (1/2) * 2 s1: s1 / |o_1| = s1 / 3 on each of response 1's tokens
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, s1 / 3, s1 / 3, s1 / 3], dtype=torch.float64))
    assert out.clipped_high.tolist() == [True, True, False, False, False]
    assert out.kept.tolist() == [False, False, True, True, True]
    assert out.ratio[0].item() == pytest.approx(math.exp(0.2))  # the metrics see the token ratio


def naive_gspo(logp, old, adv, coef, lengths, cl, ch):
    """Response by response, from GSPO's Eq. 5-7: s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|), the response's term
    weighted by the sum of its tokens' coefficients."""
    total, start = 0.0, 0
    for n in lengths:
        rows = slice(start, start + n)
        s = torch.exp((logp[rows] - old[rows]).sum() / n)
        a = adv[start]
        total = total + coef[rows].sum() * -torch.minimum(s * a, s.clamp(1 - cl, 1 + ch) * a)
        start += n
    return total


def test_gspo_matches_the_paper_response_by_response_in_value_and_gradient():
    g = torch.Generator().manual_seed(7)
    lengths = [3, 1, 5, 2, 4]
    n = sum(lengths)
    logp = (-torch.rand(n, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(n, generator=g, dtype=torch.float64) * 0.01
    adv = torch.randn(len(lengths), generator=g, dtype=torch.float64).repeat_interleave(torch.tensor(lengths))
    coef = torch.rand(len(lengths), generator=g, dtype=torch.float64).repeat_interleave(torch.tensor(lengths))
    kw = knobs("gspo", seq_clip_low=3e-3, seq_clip_high=4e-3)
    out = policy_loss(logp, old, adv, coef, loss="gspo", seq_ids=sequence_ids(lengths, n), **kw)
    expected = naive_gspo(logp, old, adv, coef, lengths, 3e-3, 4e-3)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (g_out,) = torch.autograd.grad(out.loss, logp)
    (g_expected,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g_out, g_expected, rtol=1e-12, atol=1e-15)
    assert 0 < (~out.kept).sum() < n  # the clip binds on some responses, not all
    torch.testing.assert_close(logp_grad(logp, old, adv, coef, loss="gspo", seq_ids=sequence_ids(lengths, n), **kw),
                               g_expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_gspo_micro_batching_does_not_change_loss_or_gradient(mode):
    samples = _samples()
    g = torch.Generator().manual_seed(8)
    theta = torch.randn(sum(s.loss_len for s in samples), generator=g, dtype=torch.float64)
    offsets = torch.tensor([0] + [s.loss_len for s in samples]).cumsum(0).tolist()
    old = theta + torch.randn(theta.shape, generator=g, dtype=torch.float64) * 0.05

    def run(budget):
        param = theta.clone().requires_grad_()
        total = 0.0
        for mb in micro_batches(samples, list(range(len(samples))), budget, mode):
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + samples[i].loss_len) for i in mb.sample_ids])
            out = policy_loss(param[idx], old[idx], mb.adv.double(), mb.coef.double(), loss="gspo",
                              seq_ids=sequence_ids(mb.lengths, len(idx)), **knobs("gspo", seq_clip_high=0.05))
            out.loss.backward()
            total += out.loss.item()
        return total, param.grad

    whole_loss, whole_grad = run(budget=10**6)
    for budget in (1, 7, 20):
        loss_b, grad_b = run(budget)
        assert loss_b == pytest.approx(whole_loss, rel=1e-12)
        torch.testing.assert_close(grad_b, whole_grad, rtol=1e-12, atol=1e-15)


def test_gspo_is_sequence_level_and_its_knobs_live_in_the_config():
    assert takes_sequences("gspo") and not any(takes_sequences(name) for name in BUILTIN)
    assert loss_knobs("gspo", asdict(AlgoConfig())) == dict(seq_clip_low=3e-4, seq_clip_high=4e-4)  # the paper's
    assert AlgoConfig(loss="gspo").loss == "gspo"  # seq_ids is data, not a knob the config must have
    assert all(p.default is p.empty for p in inspect.signature(LOSSES["gspo"]).parameters.values())
    logp = torch.zeros(2)
    with pytest.raises(ValueError, match="sequence-level: policy_loss needs seq_ids"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2), loss="gspo", **knobs("gspo"))
    # a token-level loss never sees seq_ids, whatever is passed
    out = policy_loss(logp, logp, torch.ones(2), torch.ones(2), loss="cispo", seq_ids=torch.zeros(2, dtype=torch.long),
                      **knobs("cispo"))
    assert out.loss.item() == 0.0


def test_sequence_ids_of_a_micro_batch_and_of_an_empty_pass():
    assert sequence_ids([2, 1, 3], 6).tolist() == [0, 0, 1, 2, 2, 2]
    assert sequence_ids([], 1).tolist() == [0]  # the one token of an empty pass is a response of its own
    assert sequence_ids([2], 3).tolist() == [0, 0, 1]
