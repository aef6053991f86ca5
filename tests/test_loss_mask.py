"""Loss masks (cispo.algo.batch, multi-turn trajectories): environment tokens are context and nothing else.

A masked-out token must not reach the loss's numerator (a logit position, a target, a logprob that CISPO's weight,
TIS or Eq. 7 sees) nor any aggregation's normaliser. Checked three ways: the packed tensors by hand; the
coefficients of every aggregation against the same batch with the environment tokens cut out; and the gradient of
the trainer's loss path on the tiny model against one written out by hand over trainable tokens only, which wild
environment-token logprobs must not move. A mask that is all True, or True on a prefix, must give what the
single-turn path gives, tensor for tensor.
"""

from __future__ import annotations

import pytest
import torch

from cispo.algo.batch import Sample, micro_batches, trajectory_sample
from cispo.config import TinyModelConfig
from cispo.algo.loss import AGGREGATIONS, policy_loss, tis_weights
from cispo.model.policy import micro_batch_logprobs
from cispo.model.tiny_model import make_tiny_model
from rollout.trajectory import Trajectory

CAP, CLIP, TIS_CAP = 1.3, 0.2, 1.5
KNOBS = dict(loss="cispo", is_weight_max=CAP, is_weight_min=None, unified_mask=True, clip_low=CLIP, clip_high=CLIP)


def trajectories(vocab: int, seed: int = 0) -> list[tuple[list[int], Trajectory, int]]:
    """(prompt, trajectory, group): 3 groups x 2, turns of 1..6 generated tokens between env blocks of 1..5."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for group in range(3):
        prompt = ids(rand(2, 5))
        for _ in range(2):
            t = Trajectory(prompt)
            for turn in range(rand(1, 3)):
                if turn:
                    t.add_env(ids(rand(1, 5)))
                n = rand(1, 6)
                t.add_model(ids(n), (-torch.rand(n, generator=g) * 2).tolist())
            out.append((prompt, t, group))
    return out


def as_samples(trajs, advs) -> list[Sample]:
    return [trajectory_sample(t, a, grp) for (_, t, grp), a in zip(trajs, advs)]


def test_packed_positions_targets_and_lengths_by_hand():
    s = Sample([1, 2], [3, 4, 5, 6, 7], [True, True, False, False, True], torch.tensor([-1.0, -2.0, -3.0]), 1.0, 0)
    (mb,) = micro_batches([s, Sample.leading([8], [9, 10], 2, torch.zeros(2), 1.0, 1)], [0, 1], 100, "token_batch")
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # env tokens 5, 6 stay as context
    assert mb.logit_pos.tolist() == [1, 2, 5, 7, 8]  # 7 is predicted at the position of 6
    assert mb.targets.tolist() == [3, 4, 7, 9, 10]
    assert mb.rollout_logp.tolist() == [-1.0, -2.0, -3.0, 0.0, 0.0]
    assert mb.lengths == [3, 2] and torch.equal(mb.coef, torch.full((5,), 1 / 5))  # 5 trainable tokens, not 7
    with pytest.raises(ValueError, match="rollout_logp has 2 entries for 1 loss tokens"):
        Sample([1], [2, 3], [True, False], torch.zeros(2), 1.0, 0)
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 response tokens"):
        Sample([1], [2, 3], [True], torch.zeros(1), 1.0, 0)


def test_prefix_and_full_masks_equal_the_single_turn_path():
    g = torch.Generator().manual_seed(1)
    plain, masked = [], []
    for k, (n, keep) in enumerate([(5, 5), (4, 2), (3, 0), (6, 6)]):
        resp, logp = list(range(10, 10 + n)), -torch.rand(keep, generator=g)
        plain.append(Sample.leading([1, 2, 3][: k + 1], resp, keep, logp, float(k) - 1.5, k // 2))
        masked.append(Sample([1, 2, 3][: k + 1], resp, [t < keep for t in range(n)], logp, float(k) - 1.5, k // 2))
    for agg in AGGREGATIONS:
        for a, b in zip(micro_batches(plain, [0, 1, 2, 3], 9, agg), micro_batches(masked, [0, 1, 2, 3], 9, agg)):
            for name in ("input_ids", "position_ids", "logit_pos", "targets", "adv", "coef", "rollout_logp"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (agg, name)
            assert a.lengths == b.lengths


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_every_normaliser_counts_only_trainable_tokens(agg):
    """The coefficients of a batch with env tokens = those of the same batch with the env tokens cut out."""
    trajs = trajectories(50)
    masked = as_samples(trajs, [1.0] * len(trajs))
    cut = [Sample.leading(s.prompt_ids, [s.response_ids[t] for t in s.loss_positions()], s.loss_len, s.rollout_logp,
                          1.0, s.group) for s in masked]
    assert sum(len(s.response_ids) for s in masked) > sum(s.loss_len for s in masked)  # env tokens are there
    idx = list(range(len(masked)))
    (a,), (b,) = micro_batches(masked, idx, 10**6, agg), micro_batches(cut, idx, 10**6, agg)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.rollout_logp, b.rollout_logp)
    if agg == "token_batch":
        assert torch.allclose(a.coef, torch.full_like(a.coef, 1 / sum(t.num_trainable for _, t, _ in trajs)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny")),
                                                dtype=torch.float32).eval()


def trainer_grad(model, samples: list[Sample], agg: str) -> list[torch.Tensor]:
    """The trainer's path: packed micro-batches, the policy's logprobs, policy_loss with TIS, backward."""
    model.zero_grad()
    for mb in micro_batches(samples, list(range(len(samples))), 24, agg):
        logp = micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=False).logp
        tis = tis_weights(mb.old_logp, mb.rollout_logp, TIS_CAP)
        policy_loss(logp, mb.old_logp, mb.adv, mb.coef, tis_weight=tis, **KNOBS).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def hand_grad(model, trajs, advs, olds, agg: str) -> list[torch.Tensor]:
    """The same loss written out per trajectory, token by token, over the mask's True tokens only: one unpacked
    forward each; the normalisers count trainable tokens by hand."""
    model.zero_grad()
    trainable = [[t for t, m in enumerate(tr.loss_mask) if m] for _, tr, _ in trajs]
    counts = [len(ts) for ts in trainable]
    groups = [grp for _, _, grp in trajs]
    prompts = sorted(set(groups))
    total = 0.0
    for k, ((prompt, tr, grp), adv, old) in enumerate(zip(trajs, advs, olds)):
        group_tokens = sum(c for c, g in zip(counts, groups) if g == grp)
        group_seqs = sum(1 for g in groups if g == grp)
        norm = {"token_group": len(prompts) * group_tokens, "token_batch": sum(counts),
                "sequence": len(trajs) * counts[k], "prompt": len(prompts) * group_seqs * counts[k]}[agg]
        seq = torch.tensor([prompt + tr.token_ids])
        logps = model(input_ids=seq).logits[0].float().log_softmax(-1)
        for j, t in enumerate(trainable[k]):
            lp = logps[len(prompt) + t - 1, tr.token_ids[t]]
            ratio = torch.exp(lp.detach() - old[j])
            kept = not ((ratio > 1 + CLIP and adv > 0) or (ratio < 1 - CLIP and adv < 0))
            tis = min(float(torch.exp(old[j] - tr.logprobs[t])), TIS_CAP)
            total = total - (min(float(ratio), CAP) * kept * tis * adv / norm) * lp
    total.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("agg", ["token_group", "sequence", "prompt"])
def test_gradient_equals_the_hand_loss_on_trainable_tokens_and_ignores_env_logprobs(model, agg):
    trajs = trajectories(model.config.vocab_size, seed=2)
    advs = [1.0, -0.5, 2.0, -1.0, 0.7, -2.0]
    samples = as_samples(trajs, advs)
    with torch.no_grad():  # pi_old: the policy's own logprobs, pushed off so that the cap and Eq. 7 act
        g = torch.Generator().manual_seed(3)
        for mb in micro_batches(samples, list(range(len(samples))), 24, None):
            logp = micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=False).logp
            for i, lp in zip(mb.sample_ids, logp.split(mb.lengths)):
                samples[i].old_logp = lp + torch.randn(lp.shape, generator=g) * 0.3
    olds = [s.old_logp for s in samples]
    got = trainer_grad(model, samples, agg)
    want = hand_grad(model, trajs, advs, olds, agg)
    assert any(w.abs().sum() > 0 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    for _, tr, _ in trajs:  # wild sampling logprobs on env tokens (the Trajectory invariant would refuse them,
        tr.logprobs = [lp if m else -1e4 * (t % 3) + 50.0 for t, (lp, m) in enumerate(zip(tr.logprobs, tr.loss_mask))]
    wild = as_samples(trajs, advs)  # ... so they are set behind its back, as a buggy producer would)
    for s, old in zip(wild, olds):
        s.old_logp = old
    for a, b in zip(trainer_grad(model, wild, agg), got):
        assert torch.equal(a, b)
