"""MiniMax (lightning attention + MoE) at tiny scale: the config, packed forwards, routing replay, router metrics
and aux loss, the old/new logprob mismatch with and without replay, HF export, and a short CISPO run.

`python -m pytest tests/test_minimax.py -s` also prints the mismatch figures."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from cispo.algo.batch import Sample, micro_batches
from cispo.config import TinyModelConfig
from cispo.model.logprobs import token_logprobs
from cispo.model.minimax import packed_forward, supports_packing
from rollout.engines.hf_engine import generation_cache
from cispo.model.moe import (
    RoutingMeter, RoutingStats, RoutingStore, load_balancing_loss, moe_routers, routing, routing_metrics,
)
from cispo.model.tiny_model import build_model, build_tokenizer

TINY = TinyModelConfig(arch="minimax", num_layers=4, intermediate_size=256)  # as configs/model/tiny_minimax.yaml


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TINY.vocab_size)


def _model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_model(TinyModelConfig(**{**TINY.__dict__, "seed": seed}), tokenizer).eval()


def _samples(n=6, seed=0, response=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        prompt = torch.randint(3, 300, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(3, 300, (response,), generator=g).tolist()
        adv = 1.0 if k % 2 else -1.0
        out.append(Sample.leading(prompt, resp, response, torch.zeros(response), adv, group=k // 2))
    return out


def _logp(model, mb, store=None, **mode):
    """What micro_batch_logprobs does once wired: packed_forward, the LM head, under a routing context."""
    with routing(model, mb, store, **mode) as cap:
        hidden = packed_forward(model, mb.input_ids, mb.position_ids)[0]
        logp = token_logprobs(hidden[mb.logit_pos], model.get_output_embeddings().weight, mb.targets).logp
    return logp, cap


def test_tiny_minimax_config(tokenizer):
    model = _model(tokenizer)
    c = model.config
    assert c.model_type == "minimax" and c.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (c.num_local_experts, c.num_experts_per_tok, c.block_size, c.head_dim) == (4, 2, 16, 64)
    assert c.vocab_size >= len(tokenizer)
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["MiniMaxLightningAttention"] * 3 + ["MiniMaxAttention"]
    assert [i for i, _ in moe_routers(model)] == [0, 1, 2, 3]
    assert not supports_packing(model)
    pattern = ["linear_attention", "full_attention", "full_attention"]
    other = build_model(TinyModelConfig(arch="minimax", num_layers=3, layer_types=pattern, num_experts=8,
                                        experts_per_token=1, block_size=8), tokenizer)
    c = other.config
    assert (c.layer_types, c.num_local_experts, c.num_experts_per_tok, c.block_size) == (pattern, 8, 1, 8)
    dense = build_model(TinyModelConfig(), tokenizer)
    assert supports_packing(dense) and moe_routers(dense) == []


def test_packed_forward_keeps_samples_apart(tokenizer):
    model = _model(tokenizer)
    samples = _samples(4)
    (mb,) = micro_batches(samples, [0, 1, 2, 3], 1 << 20, None)
    with torch.no_grad():
        alone = [model.base_model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).last_hidden_state[0]
                 for s in samples]
        naive = model.base_model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False)
        packed = packed_forward(model, mb.input_ids, mb.position_ids)[0]
    # transformers' lightning attention runs its state across the packed row: the second sample sees the first
    n0 = len(alone[0])
    assert (naive.last_hidden_state[0, n0 : n0 + len(alone[1])] - alone[1]).abs().max() > 1e-2
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)
    # and the same through the LM head, with gradients: packed logprobs equal separate forwards'
    logp, _ = _logp(model, mb)
    sep = torch.cat([_logp(model, m)[0] for m in micro_batches(samples, [0, 1, 2, 3], 1, None)])
    torch.testing.assert_close(logp, sep, atol=1e-5, rtol=0)


def test_routing_replay_uses_recorded_experts_and_router_gets_gradient(tokenizer):
    model = _model(tokenizer)
    samples = _samples(6)
    store = RoutingStore()
    with torch.no_grad():
        for mb in micro_batches(samples, list(range(6)), 120, None):  # pi_old pass: several packed micro-batches
            old, cap = _logp(model, mb, store, record=True)
    assert sorted(store.experts) == list(range(6)) and store.experts[0].dtype == torch.uint8
    # unchanged weights: the replayed forward is the recorded forward
    (mb,) = micro_batches(samples, [4, 1, 3], 1 << 20, "token_batch")  # grouped differently from the record
    with torch.no_grad():
        fresh, _ = _logp(model, mb)
        replayed, cap = _logp(model, mb, store, replay=True)
    torch.testing.assert_close(replayed, fresh, atol=1e-6, rtol=0)
    # perturb the routers so that fresh routing differs; replay must still use the recorded experts
    with torch.no_grad():
        for _, router in moe_routers(model):
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
    recorded = store.get([4, 1, 3])  # [L, T, k]
    with torch.no_grad():
        _, cap_fresh = _logp(model, mb, store)
    changed = torch.stack(cap_fresh.fresh).sort(-1).values != recorded.sort(-1).values
    assert changed.any(-1).float().mean() > 0.2  # the perturbation flips many tokens' expert sets
    assert cap_fresh.stats.changed is not None and cap_fresh.stats.changed.sum() > 0
    logp, cap = _logp(model, mb, store, replay=True)
    assert torch.equal(torch.stack(cap.used), recorded)  # what ran is what was recorded
    # the routers still computed their own choice (layer 0 sees the same input in both forwards)
    assert torch.equal(cap.fresh[0], cap_fresh.fresh[0]) and not torch.equal(cap.fresh[0], cap.used[0])
    (logp * mb.adv).sum().backward()
    for layer, router in moe_routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, layer
    with pytest.raises(KeyError):  # replay without a record is an error, not silently fresh routing
        _logp(model, mb, RoutingStore(), replay=True)


def test_replay_under_gradient_checkpointing(tokenizer):
    """The recompute in backward must route like the forward: replay with checkpointing gives the same gradients."""
    samples = _samples(3)
    (mb,) = micro_batches(samples, [0, 1, 2], 1 << 20, "token_batch")
    grads = []
    for checkpointing in (False, True):
        model = _model(tokenizer)
        store = RoutingStore()
        with torch.no_grad():
            _logp(model, mb, store, record=True)
            for _, router in moe_routers(model):
                router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        with routing(model, mb, store, replay=True) as cap:
            hidden = packed_forward(model, mb.input_ids, mb.position_ids)[0]
            logp = token_logprobs(hidden[mb.logit_pos], model.lm_head.weight, mb.targets).logp
            (logp * mb.adv).sum().backward()  # inside the block: the recompute is replayed too
        assert torch.equal(torch.stack(cap.used), store.get([0, 1, 2]))
        assert not torch.equal(cap.fresh[0], cap.used[0])  # the perturbed routers would have routed elsewhere
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_aux_loss_matches_transformers(tokenizer):
    model = _model(tokenizer)
    ids = torch.tensor([_samples(1, response=30)[0].prompt_ids + _samples(1, response=30)[0].response_ids])
    with routing(model) as cap:
        out = model(input_ids=ids, output_router_logits=True)
    ours = load_balancing_loss(cap.logits, model.config.num_experts_per_tok)
    torch.testing.assert_close(ours, out.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cap.aux_loss(), out.aux_loss, atol=1e-6, rtol=1e-6)
    ours.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    # balanced routing gives the minimum, top_k; all tokens on one expert pair gives E * k * (mean prob)
    uniform = [torch.zeros(8, 4)]
    balanced = [torch.tensor([[0, 1], [2, 3]] * 4)]
    assert load_balancing_loss(uniform, 2, balanced).item() == pytest.approx(2.0)
    skewed = [torch.tensor([[0, 1]] * 8)]
    assert load_balancing_loss(uniform, 2, skewed).item() == pytest.approx(4 * (1.0 * 0.25 + 1.0 * 0.25))


def test_routing_metrics_by_hand():
    stats = RoutingStats([0, 5], torch.tensor([[5.0, 5, 5, 5], [20, 0, 0, 0]]), torch.tensor([10 * math.log(4), 0.0]),
                         changed=torch.tensor([0.0, 5.0]), tokens=10, ref_tokens=10, changed_any=5, aux_sum=20.0)
    m = routing_metrics([stats, None])
    assert m["moe/load_cv/layer0"] == 0 and m["moe/load_max_share/layer0"] == 0.25
    assert m["moe/load_max_share/layer5"] == 1.0 and m["moe/load_cv/layer5"] == pytest.approx(math.sqrt(3))
    assert m["moe/router_entropy/layer0"] == pytest.approx(math.log(4)) and m["moe/router_entropy/layer5"] == 0
    assert m["moe/routing_changed_frac"] == 0.25 and m["moe/routing_changed_any_layer_frac"] == 0.5
    assert m["moe/aux_loss"] == 2.0 and m["moe/load_max_share"] == 1.0
    assert routing_metrics([]) == {}
    # the flat layout for a sum over ranks round-trips; two equal ranks give the same fractions
    assert routing_metrics([stats.from_list(stats.to_list())]) == pytest.approx(m)
    assert routing_metrics([stats.from_list([2 * v for v in stats.to_list()])]) == pytest.approx(m)


def test_meter_and_empty_micro_batch(tokenizer):
    from cispo.algo.batch import empty_micro_batch

    model = _model(tokenizer)
    meter = RoutingMeter(model)
    store = RoutingStore()
    with torch.no_grad():
        for mb in [*micro_batches(_samples(2), [0, 1], 1 << 20, None), empty_micro_batch()]:
            _, cap = _logp(model, mb, store, record=True)  # the empty pass (ranks in step) records nothing
            meter.add(cap.stats)
    assert sorted(store.experts) == [0, 1] and cap.stats is None
    m = meter.metrics(reduce=lambda values: [2 * v for v in values])  # as if two ranks had the same
    assert m == meter.metrics() and 0 < m["moe/router_entropy"] <= math.log(4)
    assert RoutingMeter(build_model(TinyModelConfig(), tokenizer)).metrics(reduce=lambda v: v) == {}


def test_dense_model_is_a_no_op(tokenizer):
    dense = build_model(TinyModelConfig(), tokenizer)
    (mb,) = micro_batches(_samples(2), [0, 1], 1 << 20, None)
    store = RoutingStore()
    with torch.no_grad():
        _logp(dense, mb, store, record=True)
        _, cap = _logp(dense, mb, store, replay=True)
    assert len(store) == 0 and cap.aux_loss().item() == 0 and routing_metrics([cap.stats]) == {}


def _answer_samples(tokenizer, rows):
    out = []
    for k, row in enumerate(rows):
        answer = tokenizer.encode(f"\\boxed{{{row['answer']}}}") + [tokenizer.eos_token_id]
        out.append(Sample.leading(tokenizer.encode(row["prompt"]), answer, len(answer), torch.zeros(len(answer)), 1.0, k))
    return out


def test_old_new_mismatch_with_and_without_replay(tokenizer):
    """The figure: a briefly fine-tuned tiny MoE (so that its experts differ), pi_old with its routing recorded,
    then AdamW steps of the CISPO loss trained under replay (as with model.routing_replay=true); after them,
    log pi_new under fresh routing and under pi_old's routing, each against log pi_old."""
    import copy
    from dataclasses import asdict

    from cispo.data.arithmetic import arithmetic_rows
    from cispo.config import AlgoConfig
    from cispo.algo.loss import loss_knobs, policy_loss

    rows = arithmetic_rows(2, 16, 0)[0]
    model = _model(tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # supervised, as the warm start does
        (mb,) = micro_batches(_answer_samples(tokenizer, [rows[i] for i in torch.randint(0, 4000, (32,), generator=g)]),
                              list(range(32)), 1 << 20, "token_batch")
        logp, _ = _logp(model, mb)
        policy_loss(logp, logp.detach(), mb.adv, mb.coef, loss="reinforce").loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    samples = _answer_samples(tokenizer, rows[-16:])
    for k, s in enumerate(samples):
        s.adv, s.group = (1.0 if k % 2 else -1.0), k // 2
    idx = list(range(len(samples)))
    store = RoutingStore()
    with torch.no_grad():
        for mb in micro_batches(samples, idx, 256, None):
            logp, _ = _logp(model, mb, store, record=True)
            for i, lp in zip(mb.sample_ids, logp.split(mb.lengths)):
                samples[i].old_logp = lp
    (whole,) = micro_batches(samples, idx, 1 << 20, None)
    print()
    for lr in (1e-3, 1e-4):  # the tiny trainer preset's lr, and a tenth of it
        policy = copy.deepcopy(model)
        opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-15)
        for step in range(1, 5):
            for mb in micro_batches(samples, idx, 256, "token_group"):
                logp, _ = _logp(policy, mb, store, replay=True)
                policy_loss(logp, mb.old_logp, mb.adv, mb.coef, loss="cispo",
                            **loss_knobs("cispo", asdict(AlgoConfig()))).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step not in (1, 4):
                continue
            with torch.no_grad():
                fresh, cap = _logp(policy, whole, store)
                replayed, cap_replay = _logp(policy, whole, store, replay=True)
            assert torch.equal(torch.stack(cap_replay.used), store.get(idx))
            m = routing_metrics([cap.stats])
            f_diff, r_diff = (fresh - whole.old_logp).abs(), (replayed - whole.old_logp).abs()
            routing_only = (fresh - replayed).abs()
            print(f"lr {lr:g}, after {step} AdamW step(s): mean |log pi_new - log pi_old| {f_diff.mean():.4f} fresh "
                  f"routing, {r_diff.mean():.4f} replayed (max {f_diff.max():.3f} / {r_diff.max():.3f}); routing flips "
                  f"alone: mean {routing_only.mean():.4f}, max {routing_only.max():.3f}; top-k set changed for "
                  f"{m['moe/routing_changed_frac']:.1%} of (token, layer) pairs, "
                  f"{m['moe/routing_changed_any_layer_frac']:.1%} of tokens in >= 1 layer")
            assert m["moe/routing_changed_frac"] > 0 and routing_only.max() > 0
            assert torch.isfinite(f_diff).all() and torch.isfinite(r_diff).all()


def test_hf_export_reloads_with_the_same_logits(tokenizer, tmp_path):
    """The trainer's export (cispo.train.checkpoint.export_hf) of a MiniMax policy reloads with identical logits."""
    from cispo.train.checkpoint import export_hf
    from cispo.config import TrainerConfig
    from cispo.train.distributed import init_distributed
    from cispo.train.optim import TorchUpdater

    model = _model(tokenizer)
    with torch.no_grad():  # stand-in for training: every weight moves
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    cfg = TrainerConfig()
    out = export_hf(TorchUpdater(model, cfg, dist=init_distributed(cfg)), tmp_path / "final", tokenizer)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([_samples(1, response=40)[0].prompt_ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    for (name, a), (_, b) in zip(model.named_buffers(), again.named_buffers()):
        assert torch.equal(a, b), name  # lightning attention's decay buffers


def _generation_mismatch(model, tokenizer, generate):
    """Max |sampling logprob - trainer logprob| over left-padded sampled completions from `generate`."""
    prompts = [s.prompt_ids for s in _samples(3)]  # different lengths: left padding
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    out = generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=0,
                   pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True)
    new = out.sequences[:, width:]
    sampled = torch.stack([s.log_softmax(-1) for s in out.scores], 1).gather(-1, new[..., None])[..., 0]
    samples = [Sample.leading(p, new[k].tolist(), 20, sampled[k], 0.0, 0) for k, p in enumerate(prompts)]
    (mb,) = micro_batches(samples, [0, 1, 2], 1 << 20, None)
    with torch.no_grad():
        logp, _ = _logp(model, mb)
    return (logp - mb.rollout_logp).abs().max().item()


def test_generation_cache_masks_left_padding(tokenizer):
    """transformers' MiniMaxCache lets decode steps attend to left padding; generation_cache's does not."""
    model = _model(tokenizer)
    # if this starts failing, transformers fixed MiniMaxCache and generation_cache can go
    assert _generation_mismatch(model, tokenizer, model.generate) > 1e-3
    fixed = lambda **kw: model.generate(**kw, past_key_values=generation_cache(model))  # noqa: E731
    assert _generation_mismatch(model, tokenizer, fixed) < 1e-5
    assert type(generation_cache(build_model(TinyModelConfig(), tokenizer))) is DynamicCache  # transformers' own


def test_hf_engine_sampling_logprobs_match_the_trainer(tokenizer):
    from rollout.base import SamplingParams
    from rollout.engines.hf_engine import HFEngine

    model = _model(tokenizer)
    prompts = [s.prompt_ids for s in _samples(3)]  # different lengths: the engine left-pads them
    out = HFEngine(model, tokenizer).generate(prompts, SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=0))
    samples = [Sample.leading(prompts[c.prompt_index], c.token_ids, len(c.token_ids), torch.tensor(c.logprobs), 0.0, 0)
               for c in out.completions]
    (mb,) = micro_batches(samples, list(range(len(samples))), 1 << 20, None)
    with torch.no_grad():
        logp, _ = _logp(model, mb)
    torch.testing.assert_close(logp, mb.rollout_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["hermes", "minimax"])
def test_renderer_self_test_passes_on_the_tiny_minimax_template(tokenizer, fmt):
    """configs/model/tiny_minimax.yaml ships the tiny tokenizer's ChatML template: its turn boundaries are
    token-exact in both tool-call formats (Hermes' <tool_call>, M1's <tool_calls>), by the start-up self-test."""
    from cispo.config import EnvConfig
    from cispo.sampling.tool_rollouts import renderer_for

    renderer_for(EnvConfig(name="calculator", tool_format=fmt), tokenizer)


def test_multiturn_trajectories_on_the_tiny_minimax_engine(tokenizer):
    """Lockstep turns on the HF engine running MiniMax (lightning attention re-reads the whole context each turn):
    the trainer's logprobs of each trajectory's model tokens, through its loss mask, equal the engine's."""
    from cispo.algo.batch import trajectory_sample
    from rollout.base import SamplingParams
    from rollout.env.environment import Limits
    from rollout.engines.hf_engine import HFEngine
    from rollout.env.multiturn import lockstep_rollout
    from rollout.env.render import make_renderer
    from test_multiturn import ROWS, Countdown

    model = _model(tokenizer)
    out = lockstep_rollout(HFEngine(model, tokenizer), [Countdown(2) for _ in ROWS], ROWS, make_renderer(tokenizer),
                           SamplingParams(n=1, max_tokens=6, temperature=1.0, seed=0), Limits(token_budget=10_000))
    samples = [trajectory_sample(t, 1.0, i) for i, t in enumerate(out.trajectories)]
    assert all(t.num_turns == 3 and 0 < s.loss_len < len(t.token_ids) for t, s in zip(out.trajectories, samples))
    (mb,) = micro_batches(samples, list(range(len(samples))), 1 << 20, None)
    with torch.no_grad():
        logp, _ = _logp(model, mb)
    torch.testing.assert_close(logp, mb.rollout_logp, atol=1e-5, rtol=0)


def test_moe_module_imports_only_torch():
    import subprocess
    import sys

    heavy = ("transformers", "deepspeed", "vllm", "hydra")
    code = f"import sys, cispo.model.moe; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------------------------------------------------
# a short CISPO run of the tiny MiniMax through the trainer as it stands (HF engine, math reward)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from cispo.cli import to_config
    from cispo.cli import register_configs
    from cispo.trainer import train

    tmp = tmp_path_factory.mktemp("minimax_run")
    register_configs()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        cfg = to_config(compose("train", overrides=[
            "model=tiny_minimax", f"model.cache_dir={tmp}/cache",
            "model.warm_start.max_steps=40", "model.warm_start.batch_size=32", "model.warm_start.warmup_steps=10",
            "model.warm_start.lr=3e-3",
            "model.warm_start.eval_every=40", "model.warm_start.eval_problems=16",
            "model.warm_start.target_accuracy=1.0",
            "algo.group_size=4", "algo.prompts_per_step=8", "algo.updates_per_step=2",
            "rollout.engine=hf", "reward.num_workers=1", "data.digits=1", "data.eval_size=16",
            "trainer.steps=2", "trainer.eval_every=0", f"trainer.output_dir={tmp}/run",
            "logger.wandb_mode=disabled", "logger.progress=false", "logger.plot=false",
        ]))
    result = train(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (start,) = (tmp / "cache").glob("tiny-minimax-*-warm-*")  # the warm-started policy the run began from
    return result, [r for r in rows if r["step"] >= 1], start


def test_tiny_minimax_cispo_run(tiny_run):
    result, steps, start_dir = tiny_run
    assert len(steps) == 2 and sum(row["train/updates"] for row in steps) >= 2
    for row in steps:
        if row["train/updates"]:
            assert math.isfinite(row["loss/value"]) and math.isfinite(row["train/grad_norm"])
            assert row["train/grad_norm"] > 0
    start = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32)
    final = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    assert final.config.model_type == "minimax"
    moved = [n for (n, a), (_, b) in zip(start.named_parameters(), final.named_parameters()) if not torch.equal(a, b)]
    assert any(".mlp.gate." in n for n in moved) and any("self_attn.qkv_proj" in n for n in moved)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.isfinite(final(input_ids=ids).logits).all()


def test_tiny_minimax_run_logs_moe_metrics(tiny_run):
    _, steps, _ = tiny_run
    for row in steps:
        assert 0 <= row["moe/load_cv"] and 0 < row["moe/router_entropy"] <= math.log(4) + 1e-6
        assert "moe/routing_changed_frac" in row and "moe/load_cv/layer3" in row
