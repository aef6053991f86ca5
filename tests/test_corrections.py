"""The train/inference corrections (cispo/algo/corrections.py) against hand-worked numbers, their config rules, and
sequence-level losses and corrections in the update: whole responses, no chunked grad hint, and the same gradient
whatever the micro-batch size."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import pytest
import torch

from cispo.algo.batch import micro_batches
from cispo.algo.corrections import CORRECTIONS, active, correction_weight, needs_sequences
from cispo.algo.loss import loss_knobs, loss_metrics, policy_loss, sequence_ids, tis_weights
from cispo.config import AlgoConfig, Config, ConfigError, RolloutConfig, TinyModelConfig
from cispo.model.policy import micro_batch_logprobs
from cispo.model.tiny_model import make_tiny_model
from cispo.train.collective import Dist
from dist_worker import case_config, make_samples

FIELDS = asdict(AlgoConfig())


def weight(names, log_r, seq_ids=None, **overrides):
    """The corrections' weight for tokens whose log(pi_old / pi_rollout) is log_r (pi_rollout = 0.5 each)."""
    rollout = torch.full((len(log_r),), math.log(0.5), dtype=torch.float64)
    return correction_weight(names, rollout + torch.tensor(log_r, dtype=torch.float64), rollout, seq_ids,
                             FIELDS | overrides)


def test_the_defaults_are_the_sources():
    cfg = AlgoConfig()
    assert (cfg.icepop_low, cfg.icepop_high) == (0.5, 5.0)  # IcePop; OpenRLHF's icepop band
    assert (cfg.mis_low, cfg.mis_high) == (0.5, 2.0)  # verl seq_is_rs / seq_mis: threshold 2, lower 1/2
    assert (cfg.geo_mask_low, cfg.geo_mask_high) == (0.999, 1.001)  # verl geo_rs
    assert cfg.corrections == [] and cfg.tis_cap is None  # all off
    assert set(CORRECTIONS) == {"tis", "icepop", "mis", "geo_mask"}


def test_icepop_by_hand():
    # r = 0.4, 1, 4, 6, 0.5, 5 (the band's ends are inside)
    log_r = [math.log(v) for v in (0.4, 1.0, 4.0, 6.0, 0.5, 5.0)]
    torch.testing.assert_close(weight(["icepop"], log_r), torch.tensor([0.0, 1.0, 4.0, 0.0, 0.5, 5.0],
                                                                       dtype=torch.float64))
    torch.testing.assert_close(weight(["icepop"], log_r, icepop_low=0.9, icepop_high=1.1),
                               torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_mis_by_hand():
    # response 0: log-ratios 0.3, 0.3 (rho = e^0.6 = 1.82, kept, weight rho); response 1: 0.5, 0.3 (e^0.8 = 2.23 > 2);
    # response 2: -0.8 (e^-0.8 = 0.45 < 0.5); response 3: -0.4, 0.4, 0.1 (e^0.1)
    log_r = [0.3, 0.3, 0.5, 0.3, -0.8, -0.4, 0.4, 0.1]
    seq = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    e6, e1 = math.exp(0.6), math.exp(0.1)
    torch.testing.assert_close(weight(["mis"], log_r, seq),
                               torch.tensor([e6, e6, 0, 0, 0, e1, e1, e1], dtype=torch.float64))
    # a long response: the product, not the mean, leaves the band (20 tokens of ratio 1.05: 2.65)
    long = weight(["mis"], [math.log(1.05)] * 20, torch.zeros(20, dtype=torch.long))
    assert long.sum() == 0


def test_geometric_mask_by_hand():
    # response 0: mean log-ratio 0.0005 (1.0005, inside [0.999, 1.001]); response 1: 0.0015 (outside);
    # response 2: -0.0015 (outside below); response 3: 20 tokens of ratio 1.0009 each (inside: the mean, not the product)
    log_r = [0.002, -0.001, 0.003, 0.0, -0.0015] + [math.log(1.0009)] * 20
    seq = torch.tensor([0, 0, 1, 1, 2] + [3] * 20)
    assert weight(["geo_mask"], log_r, seq).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0] + [1.0] * 20
    assert needs_sequences(["geo_mask"]) and needs_sequences(["mis"]) and not needs_sequences(["tis", "icepop"])


def test_corrections_multiply_and_tis_is_the_old_weight():
    log_r = [math.log(v) for v in (3.0, 0.3, 1.0005, 1.0)]
    seq = torch.tensor([0, 1, 2, 2])
    # tis (switched on by tis_cap) with the geometric mask: OpenRLHF's seq-mask-tis, with verl's band
    names = active(2.0, ["geo_mask"])
    assert names == ["tis", "geo_mask"]
    torch.testing.assert_close(weight(names, log_r, seq, tis_cap=2.0),
                               torch.tensor([0.0, 0.0, 1.0005, 1.0], dtype=torch.float64))
    old, rollout = torch.log(torch.tensor([0.5, 0.9])), torch.log(torch.tensor([0.1, 0.9]))
    assert torch.equal(correction_weight(["tis"], old, rollout, None, FIELDS | dict(tis_cap=2.0)),
                       tis_weights(old, rollout, 2.0))  # bit for bit the weight tis_cap always gave
    assert correction_weight([], old, rollout, None, FIELDS) is None


def test_a_dropped_token_passes_no_gradient_and_counts_as_masked():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5])).requires_grad_()
    rollout = logp.detach() - torch.log(torch.tensor([0.4, 1.0, 4.0, 6.0]))  # r = 0.4, 1, 4, 6
    w = correction_weight(["icepop"], logp.detach(), rollout, None, FIELDS)
    out = policy_loss(logp, logp.detach(), torch.ones(4), torch.full((4,), 0.25), loss="cispo", tis_weight=w,
                      **loss_knobs("cispo", FIELDS))
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, torch.tensor([0.0, -0.25, -1.0, 0.0]))  # CISPO's -coef * w * A, w = 0, 1, 4, 0
    assert out.kept.tolist() == [False, True, True, False]
    assert loss_metrics([out])["loss/masked_frac"] == 0.5


@pytest.mark.parametrize("algo, words", [
    (dict(corrections=["icepop"], tis_cap=2.0), "tis and icepop each weight a token"),
    (dict(corrections=["mis", "icepop"]), "mis and icepop each weight a token"),
    (dict(corrections=["tis"]), "tis is switched on by algo.tis_cap"),
    (dict(corrections=["ice_pop"]), r"unknown correction 'ice_pop'.*\['geo_mask', 'icepop', 'mis'\]"),
    (dict(corrections=["geo_mask", "geo_mask"]), "names a correction twice"),
    (dict(corrections=["mis"], mis_low=2.0, mis_high=0.5), "need 0 <= mis_low < mis_high"),
    (dict(corrections=["icepop"], pi_old="engine"), "algo.pi_old=engine makes the same"),
])
def test_config_refuses_what_cannot_be_meant(algo, words):
    with pytest.raises(ConfigError, match=r"algo\.corrections.*" + words):
        AlgoConfig(**algo)


def test_config_allows_a_mask_with_a_weight():
    assert AlgoConfig(corrections=["geo_mask"], tis_cap=2.0).corrections == ["geo_mask"]
    assert AlgoConfig(corrections=["mis", "geo_mask"]).corrections == ["mis", "geo_mask"]
    Config(algo=AlgoConfig(corrections=["icepop"]), rollout=RolloutConfig())


# ---- sequence-level losses and corrections in the update (cispo/train/update.py) --------------------------------

SEQUENCE_LEVEL = [
    dict(loss="gspo", loss_agg="sequence", seq_clip_low=0.02, seq_clip_high=0.02),
    dict(corrections=["mis", "geo_mask"], geo_mask_low=0.99, geo_mask_high=1.01),
    dict(loss="gspo", loss_agg="sequence", corrections=["geo_mask"], tis_cap=2.0, geo_mask_low=0.99,
         geo_mask_high=1.01),
]


def _policy_and_samples(tmp_path, algo):
    from cispo.train.distributed import build_policy

    model_dir = str(make_tiny_model(TinyModelConfig(), tmp_path))
    cfg = case_config(model_dir, None, budget=64)
    cfg = replace(cfg, algo=replace(cfg.algo, **algo))
    torch.manual_seed(0)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    samples = [s for s in make_samples(0, policy.config.vocab_size) if s.loss_len > 0]
    with torch.no_grad():  # engine logprobs near the trainer's: some responses pass the bands, some do not
        for i, s in enumerate(samples):
            (mb,) = micro_batches(samples, [i], 1 << 20, None, share_prompts=True)
            logp = micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False).logp
            noise = torch.randn(s.loss_len, generator=torch.Generator().manual_seed(i))
            s.rollout_logp = logp - (0.001 if i % 3 else 0.05) * noise
    return cfg, model_dir, policy, updater, samples


@pytest.mark.parametrize("algo", SEQUENCE_LEVEL)
def test_sequence_level_losses_take_whole_responses_and_the_trust_gradient_is_the_losss(tmp_path, algo):
    """A sequence-level loss or correction gets no chunked grad hint (a chunk may cut a response); its pi_old and
    its per-token gradient for trust/* come from the whole micro-batch: autograd of the whole loss, bit for bit,
    also when the forward is its own pi_old."""
    from cispo.algo.loss import logp_grad
    from cispo.model.logprobs import CPU_CHUNK
    from cispo.train.update import LossHint, PiOld, loss_inputs, sequence_level

    cfg, _, policy, _, samples = _policy_and_samples(tmp_path, algo)
    assert sequence_level(cfg.algo) and not sequence_level(AlgoConfig())
    for s in samples:
        s.old_logp = s.rollout_logp + 0.01 * torch.randn(s.loss_len, generator=torch.Generator().manual_seed(s.group))
    knobs = loss_knobs(cfg.algo.loss, asdict(cfg.algo))
    (mb,) = micro_batches(samples, list(range(len(samples))), 1 << 20, cfg.algo.loss_agg, share_prompts=True)
    assert len(mb.targets) > 2 * CPU_CHUNK  # several chunks, so a chunk boundary cuts responses
    inputs = loss_inputs(mb, cfg.algo, knobs)
    assert torch.equal(inputs["seq_ids"], sequence_ids(mb.lengths, len(mb.adv)))
    if "corrections" in algo:  # the bands keep some responses and drop others
        assert 0 < (inputs["tis_weight"] == 0).sum() < len(mb.adv)
    for own in (None, PiOld(samples, 0, 0.0)):
        if own is not None:
            assert own.expect(0, mb)
        hint = LossHint(mb, cfg.algo, knobs, own)
        assert not hint.chunked
        tl = micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False)
        hint.whole(tl.logp)
        if own is not None:
            assert torch.equal(mb.old_logp, tl.logp.detach())
        assert torch.equal(hint.grad, logp_grad(tl.logp, **loss_inputs(mb, cfg.algo, knobs)))
        assert hint.grad.abs().sum() > 0


@pytest.mark.parametrize("algo", SEQUENCE_LEVEL)
def test_update_gradient_does_not_depend_on_the_micro_batch_size(tmp_path, algo):
    """update_policy with a sequence-level loss or correction: micro-batches split whole responses, so the first
    optimizer step's gradient is the same at a 64-token budget (many micro-batches) as in one micro-batch."""
    import cispo.train.update as update

    cfg, model_dir, _, _, samples = _policy_and_samples(tmp_path, algo)

    def first_grads(budget):
        from cispo.train.distributed import build_policy

        run = replace(cfg, trainer=replace(cfg.trainer, max_tokens_per_micro=budget))
        torch.manual_seed(0)
        policy, _, updater = build_policy(model_dir, run, Dist())
        grads, step = [], updater.step

        def capture(lr):
            if not grads:
                grads.extend(p.grad.clone() for p in policy.parameters())
            return step(lr)

        updater.step = capture
        stats = update.update_policy(run, 1, updater, [replace(s) for s in samples])
        assert stats["train/updates"] == cfg.algo.updates_per_step and math.isfinite(stats["loss/value"])
        return grads, stats

    small, stats = first_grads(64)
    whole, _ = first_grads(1 << 20)
    assert any(g.abs().sum() > 0 for g in small)
    for a, b in zip(small, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if algo.get("loss") == "gspo":  # the sequence clip acts on the later updates
        assert stats["loss/masked_frac"] > 0
