"""The loss family against the formulas: hand-worked numbers, the CISPO gradient identity, a naive loop,
edge cases, micro-batch invariance, and M1 Eq. 7 against PPO's clip."""

import math

import pytest
import torch

from cispo.batch import Sample, micro_batches
from cispo.loss import AGGREGATIONS, LOSSES, loss_metrics, mismatch_metrics, policy_loss, sequence_coefficients, tis_weights


def test_hand_worked_cispo_example():
    # one response of 3 tokens, A = 2, coef = 1/3 (token mean), cap 1.5, no lower bound
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    old = torch.log(torch.tensor([0.25, 0.2, 0.9 / 0.5]).clamp(max=0.999))
    # ratios: 0.5/0.25 = 2 -> clipped to 1.5; 0.2/0.2 = 1; 0.9/0.999 = 0.9009
    r3 = 0.9 / 0.999
    out = policy_loss(logp, old, torch.full((3,), 2.0), torch.full((3,), 1 / 3), loss="cispo", is_weight_max=1.5)
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
    out = policy_loss(logp, old, adv, coef, loss="cispo", is_weight_max=cap, is_weight_min=floor)
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
    cispo = policy_loss(logp, old, adv, coef, loss="cispo", is_weight_max=5.0)
    (g_cispo,) = torch.autograd.grad(cispo.loss, logp)
    assert cispo.clipped_high.all()
    torch.testing.assert_close(g_cispo, -0.25 * 5.0 * adv)  # capped weight, gradient still flows
    ppo = policy_loss(logp, old, adv, coef, loss="dapo", clip_low=0.2, clip_high=0.28)
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


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("unified", [False, True])
def test_vectorised_matches_naive_loop(loss, unified):
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(64, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(64, generator=g, dtype=torch.float64) * 0.7
    adv, coef = torch.randn(64, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    kw = dict(is_weight_max=1.5, is_weight_min=0.6, unified_mask=unified, clip_low=0.2, clip_high=0.28)
    out = policy_loss(logp, old, adv, coef, loss=loss, **kw)
    expected = naive_loss(logp.tolist(), old.tolist(), adv.tolist(), coef.tolist(), loss, 1.5, 0.6, unified, 0.2, 0.28)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_edge_cases_zero_advantage_and_empty_batch():
    logp = torch.log(torch.rand(10) * 0.9 + 0.05).requires_grad_()
    out = policy_loss(logp, logp.detach() - 3.0, torch.zeros(10), torch.full((10,), 0.1))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0
    assert out.clipped_high.all()  # ratio e^3 > 5
    empty = policy_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    assert empty.loss.item() == 0.0 and loss_metrics([empty]) == {}


def test_huge_ratios_are_capped_not_inf():
    logp = torch.zeros(3, requires_grad=True)
    out = policy_loss(logp - 0.0, torch.full((3,), -80.0), torch.ones(3), torch.ones(3), is_weight_max=5.0)
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
            out.append(Sample(prompt, list(range(n)), n, torch.zeros(n), float(torch.randn(1, generator=g)), p))
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
            out = policy_loss(param[idx], old[idx], mb.adv.double(), mb.coef.double(), loss=loss, is_weight_max=1.3)
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
    cispo = policy_loss(logp, old, adv, coef, loss="cispo", is_weight_max=None, unified_mask=True, clip_low=eps, clip_high=eps)
    ppo = policy_loss(logp, old, adv, coef, loss="grpo", clip_low=eps, clip_high=eps)
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
    base = policy_loss(logp, old, torch.ones(2), torch.ones(2))
    weighted = policy_loss(logp, old, torch.ones(2), torch.ones(2), tis_weight=w)
    assert weighted.loss.item() == pytest.approx(-(2.0 * math.log(0.5) + math.log(0.9)))
    assert base.loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.9)))


def test_mismatch_metrics():
    p = torch.log(torch.tensor([0.1, 0.5, 0.9]))
    m = mismatch_metrics(p, p)
    assert m["mismatch/logp_abs_diff"] == 0.0 and m["mismatch/prob_pearson"] == pytest.approx(1.0)
    q = torch.log(torch.tensor([0.9, 0.5, 0.1]))  # probabilities reversed: correlation -1
    assert mismatch_metrics(p, q)["mismatch/prob_pearson"] == pytest.approx(-1.0)
