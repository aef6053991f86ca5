"""update_policy takes the first mini-batch's pi_old from its own training forward (no second forward pass).

That is today's update exactly when the training forward's logp equals a forward-only pass's, bit for bit: then
the loss sees the same pi_old either way. Checked on the trainer's own batches (tests/dist_worker.py): variable
lengths, several micro-batches, a masked and a truncated response, packed as the trainer packs them for the
tiny model (shared prompts).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from cispo.algo.batch import micro_batches, split_groups
from cispo.train.collective import Dist
from cispo.config import AlgoConfig, Config, ConfigError, ModelConfig, RolloutConfig, TinyModelConfig
from cispo.model.policy import micro_batch_logprobs
from cispo.model.tiny_model import make_tiny_model
from dist_worker import case_config, make_samples


def test_the_first_mini_batch_pi_old_is_a_forward_only_pass_bit_for_bit(tmp_path):
    import cispo.train.update as update
    from cispo.train.distributed import build_policy

    model_dir = str(make_tiny_model(TinyModelConfig(), tmp_path))
    cfg = case_config(model_dir, None, budget=64)
    torch.manual_seed(0)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    samples = [s for s in make_samples(0, policy.config.vocab_size) if s.loss_len > 0]
    first = update.split_groups(samples, cfg.algo.updates_per_step)[0]
    assert first and len(first) < len(samples)
    with torch.no_grad():  # pi_old as a separate forward-only pass computes it, before any update, packed as the
        reference = {}     # trainer packs: the first mini-batch alone, the others together
        for part in (first, [i for i in range(len(samples)) if i not in first]):
            for mb in micro_batches(samples, part, 64, None, share_prompts=True):
                logp = micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False).logp
                reference |= dict(zip(mb.sample_ids, logp.split(mb.lengths)))
    first_grads, step = [], updater.step

    def capture(lr):  # the gradients of the first optimizer step, before it is taken
        if not first_grads:
            first_grads.extend(p.grad.clone() for p in policy.parameters())
        return step(lr)

    updater.step = capture
    stats = update.update_policy(cfg, 1, updater, samples)
    assert stats["train/updates"] == cfg.algo.updates_per_step
    for i, s in enumerate(samples):  # the training forward's pi_old (first mini-batch) and the pass's (others)
        assert torch.equal(s.old_logp, reference[i]), i
    assert all(torch.equal(a, b) for a, b in zip(first_grads, reference_grads(cfg, model_dir, samples, first,
                                                                               reference)))


def reference_grads(cfg, model_dir, samples, mini, reference) -> list[torch.Tensor]:
    """The first optimizer step's gradients as the trainer computed them with a separate pi_old pass."""
    import cispo.train.update as update
    from cispo.train.distributed import build_policy
    from cispo.algo.loss import logp_grad, loss_knobs, policy_loss

    torch.manual_seed(0)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    for i in mini:
        samples[i].old_logp = reference[i]
    knobs = loss_knobs(cfg.algo.loss, asdict(cfg.algo))
    for mb in micro_batches(samples, mini, 64, cfg.algo.loss_agg, share_prompts=True):
        hint = lambda logp, rows, mb=mb: logp_grad(logp, **update.loss_inputs(mb, cfg.algo, knobs, rows))  # noqa: E731
        tl = micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False, grad_hint=hint)
        updater.backward(policy_loss(tl.logp, **update.loss_inputs(mb, cfg.algo, knobs)).loss)
    return [p.grad.clone() for p in policy.parameters()]


def engine_old_run(cfg, model_dir, samples, pi_old: str):
    """update_policy from the same initial weights with algo.pi_old=`pi_old`: (final weights, stats, number of
    forward-only pi_old passes)."""
    from dataclasses import replace

    import cispo.train.update as update
    from cispo.train.distributed import build_policy

    cfg = replace(cfg, algo=replace(cfg.algo, pi_old=pi_old))
    torch.manual_seed(0)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    passes, forward = [], update.micro_batch_logprobs

    def counting(*args, **kwargs):
        passes.append(not torch.is_grad_enabled())
        return forward(*args, **kwargs)

    update.micro_batch_logprobs = counting
    try:
        stats = update.update_policy(cfg, 1, updater, samples)
    finally:
        update.micro_batch_logprobs = forward
    return [p.detach().clone() for p in policy.parameters()], stats, sum(passes)


def test_pi_old_from_the_engine_skips_the_pass_and_trains_against_the_engines_logprobs(tmp_path):
    """algo.pi_old=engine: no forward-only pass; each sample's pi_old is its rollout_logp. When the engine's
    logprobs are the trainer's own, the updates are the recomputing trainer's bit for bit; when they are not, the
    mismatch metrics still see the difference (measured on the first mini-batch's training forward)."""
    model_dir = str(make_tiny_model(TinyModelConfig(), tmp_path))
    cfg = case_config(model_dir, None, budget=64)
    torch.manual_seed(0)
    from cispo.train.distributed import build_policy

    policy, _, _ = build_policy(model_dir, cfg, Dist())
    samples = [s for s in make_samples(0, policy.config.vocab_size) if s.loss_len > 0]
    first = split_groups(samples, cfg.algo.updates_per_step)[0]
    with torch.no_grad():  # the trainer's pi_old, packed as it packs it: the first mini-batch alone, the rest together
        for part in (first, [i for i in range(len(samples)) if i not in first]):
            for mb in micro_batches(samples, part, 64, None, share_prompts=True):
                logp = micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False).logp
                for i, lp in zip(mb.sample_ids, logp.split(mb.lengths)):
                    samples[i].rollout_logp = lp.clone()

    recomputed, stats, passes = engine_old_run(cfg, model_dir, samples, "trainer")
    assert passes > 0 and stats["time/old_logp_s"] > 0
    taken, stats, passes = engine_old_run(cfg, model_dir, samples, "engine")
    assert passes == 0 and stats["train/updates"] == cfg.algo.updates_per_step
    assert all(s.old_logp is s.rollout_logp for s in samples)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, taken))
    assert stats["mismatch/logp_abs_diff"] < 1e-6

    shift = {i: 0.1 * (1 + i % 5) for i in range(len(samples))}  # an engine off by a different amount per sample
    for i, s in enumerate(samples):
        s.rollout_logp = s.rollout_logp - shift[i]
    shifted, stats, _ = engine_old_run(cfg, model_dir, samples, "engine")
    # measured on the first mini-batch's tokens only (its training forward is the trainer's logp): the token mean
    # of their shifts, not the mean over every token
    first_tokens = [shift[i] for i in first for _ in range(samples[i].loss_len)]
    every_token = [shift[i] for i in range(len(samples)) for _ in range(samples[i].loss_len)]
    assert abs(stats["mismatch/logp_abs_diff"] - sum(first_tokens) / len(first_tokens)) < 1e-4
    assert abs(sum(first_tokens) / len(first_tokens) - sum(every_token) / len(every_token)) > 1e-3
    assert not all(torch.equal(a, b) for a, b in zip(recomputed, shifted))


@pytest.mark.parametrize("parts, words", [
    (dict(algo=dict(tis_cap=2.0)), "algo.tis_cap=null, or algo.pi_old=trainer"),
    (dict(model=dict(routing_replay=True)), "model.routing_replay .* algo.pi_old=trainer"),
    (dict(rollout=dict(top_p=0.9)), "rollout.top_p=1.0, or algo.pi_old=trainer"),
    (dict(algo=dict(pi_old="rollout")), "algo.pi_old must be one of"),
])
def test_pi_old_from_the_engine_refuses_what_it_cannot_honour(parts, words):
    algo = dict(pi_old="engine") | parts.get("algo", {})
    with pytest.raises(ConfigError, match=words):
        Config(algo=AlgoConfig(**algo), model=ModelConfig(**parts.get("model", {})),
               rollout=RolloutConfig(**parts.get("rollout", {})))


def test_staleness_needs_tis_cap_unless_pi_old_is_the_engines():
    with pytest.raises(ConfigError, match="set algo.tis_cap"):
        Config(algo=AlgoConfig(max_staleness=1), rollout=RolloutConfig(mode="server"))
    Config(algo=AlgoConfig(pi_old="engine", max_staleness=1), rollout=RolloutConfig(mode="server"))


# ---- the off-policy rule, stated once (cispo.config.Config) ------------------------------------------------------

@pytest.mark.parametrize("algo, rollout, words", [
    # the engines report logprobs with EOS masked out before min_tokens: ratio 1 - p_eos at identical weights
    (dict(pi_old="engine"), dict(min_tokens=4), "rollout.min_tokens=0, or algo.pi_old=trainer"),
    # REINFORCE ignores the ratio and tis_cap is refused with pi_old=engine: nothing would correct staleness
    (dict(pi_old="engine", loss="reinforce", max_staleness=1), dict(mode="server"),
     "algo.loss=reinforce does not weight tokens by the ratio"),
    # an uncapped IS weight over stale samples: one token with log-ratio 5 weighs 148
    (dict(pi_old="engine", is_weight_max=None, max_staleness=1), dict(mode="server"),
     "algo.is_weight_max=null leaves the weight of stale samples unbounded"),
    (dict(pi_old="engine", loss="dapo", max_staleness=1), dict(mode="server"),
     "algo.loss=dapo does not cap its IS weight"),
])
def test_off_policy_configs_without_a_bounded_correction_are_refused(algo, rollout, words):
    with pytest.raises(ConfigError, match=words):
        Config(algo=AlgoConfig(**algo), rollout=RolloutConfig(**rollout))


def test_engine_pi_old_with_a_capped_cispo_weight_may_run_ahead():
    Config(algo=AlgoConfig(pi_old="engine", max_staleness=2, is_weight_max=5.0), rollout=RolloutConfig(mode="server"))
    Config(algo=AlgoConfig(loss="reinforce", tis_cap=2.0, max_staleness=1), rollout=RolloutConfig(mode="server"))


@pytest.mark.parametrize("algo", [dict(), dict(loss="dapo", tis_cap=2.0)])
def test_the_trust_gradient_is_the_loss_gradient_the_hint_sent_back(tmp_path, algo):
    """trust/* reads d loss / d log pi per token from the grad hint (LossHint.grad), chunk by chunk: the same numbers,
    bit for bit, as autograd of the micro-batch's whole loss at the forward's logp; also when the forward is its own
    pi_old (taken row by row before each chunk's gradient, and the TIS weight with it)."""
    from dataclasses import replace

    from cispo.algo.loss import logp_grad, loss_knobs
    from cispo.model.logprobs import CPU_CHUNK
    from cispo.train.distributed import build_policy
    from cispo.train.update import LossHint, PiOld, loss_inputs

    model_dir = str(make_tiny_model(TinyModelConfig(), tmp_path))
    cfg = case_config(model_dir, None, budget=64)
    cfg = replace(cfg, algo=replace(cfg.algo, **algo))
    torch.manual_seed(0)
    policy, _, _ = build_policy(model_dir, cfg, Dist())
    samples = [s for s in make_samples(0, policy.config.vocab_size) if s.loss_len > 0]
    for s in samples:  # a pi_old away from the policy, so that ratios and clips are not all 1 and none
        s.old_logp = s.rollout_logp + 0.3 * torch.randn(s.loss_len, generator=torch.Generator().manual_seed(s.group))
    knobs = loss_knobs(cfg.algo.loss, asdict(cfg.algo))
    (mb,) = micro_batches(samples, list(range(len(samples))), 1 << 20, cfg.algo.loss_agg, share_prompts=True)
    assert len(mb.targets) > 2 * CPU_CHUNK  # several chunks
    for own in (None, PiOld(samples, 0, 0.0)):
        if own is not None:
            assert own.expect(0, mb)
        hint = LossHint(mb, cfg.algo, knobs, own)
        tl = micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False, grad_hint=hint)
        if own is not None:
            assert torch.equal(mb.old_logp, tl.logp.detach())
        assert torch.equal(hint.grad, logp_grad(tl.logp, **loss_inputs(mb, cfg.algo, knobs)))
        assert hint.grad.abs().sum() > 0
    with torch.no_grad():  # a forward that never asks the hint: no gradient to report, and it says so
        hint = LossHint(mb, cfg.algo, knobs, None)
        micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False, grad_hint=hint)
    with pytest.raises(RuntimeError, match="grad_hint"):
        hint.grad


def test_mismatch_is_measured_on_tokens_of_the_current_policy_and_staleness_apart():
    """At algo.max_staleness > 0 a stale token's old-vs-rollout gap holds the updates in between as well as the
    train/inference mismatch: mismatch/* must not mix them (M1 Fig. 3 compares the same weights)."""
    from cispo.algo.loss import mismatch_metrics

    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.2])
    rollout = old + torch.tensor([0.01, -0.01, 0.02, 0.5, -0.7, 0.6])  # three fresh tokens, three stale ones
    versions = torch.tensor([4, 4, 4, 2, 3, 2])
    m = mismatch_metrics(old, rollout, versions, version=4)
    assert m["mismatch/logp_abs_diff"] == pytest.approx((0.01 + 0.01 + 0.02) / 3)
    assert m["staleness/token_frac"] == 0.5 and m["staleness/logp_abs_diff"] == pytest.approx((0.5 + 0.7 + 0.6) / 3)
    same = mismatch_metrics(old, rollout)  # no versions: every token is the current policy's, as before
    assert same["mismatch/logp_abs_diff"] == pytest.approx((0.01 + 0.01 + 0.02 + 0.5 + 0.7 + 0.6) / 6)
    fresh_only = mismatch_metrics(old[:3], rollout[:3], versions[:3], version=4)
    assert fresh_only["staleness/token_frac"] == 0.0 and "staleness/logp_abs_diff" not in fresh_only
    assert fresh_only["mismatch/logp_abs_diff"] == m["mismatch/logp_abs_diff"]
