"""The HF rollout engine's repetition early stop (rollout.engines.early_stop), on the tiny Qwen2 made repetitive.

Built through the registry (`build_engine("hf", ...)`), as the trainer builds it for MiniMax (rollout.engine=auto
resolves to hf there), so these tests also check that rollout.early_stop_k reaches the engine. The same rule on
the vLLM engine, and both engines on one model: tests/test_vllm_engine.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.config import ModelConfig, RolloutConfig, TinyModelConfig
from cispo.model.tiny_model import make_tiny_model
from engine_kit import first_run_end, loss_tokens, repetition_weights
from rollout import build_engine
from rollout.base import SamplingParams

K, P = 8, 0.99
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["What is 12+7?", "Compute 3*4.", "What is 99-1? Think step by step."]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module")
def scaled_dirs(model_dir, tmp_path_factory):
    """scale -> a saved copy of the tiny model with repetition_weights(scale) (None: the original)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dirs = {None: model_dir}
    for scale in (5.0, 4.0):
        out = tmp_path_factory.mktemp(f"repeat-{scale}")
        model.load_state_dict(repetition_weights(originals, scale))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs[scale] = out
    return dirs


def hf_engine(model_dir, early_stop_k: int = K):
    cfg = RolloutConfig(engine="hf", max_tokens=MAX_TOKENS, max_model_len=256, early_stop_k=early_stop_k,
                        early_stop_p=P)
    return build_engine("hf", str(model_dir), cfg, ModelConfig(), seed=0)


def sampled(engine, prompts, **kw):
    return engine.generate(prompts, SamplingParams(n=4, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0, seed=3,
                                                   **kw)).completions


@pytest.mark.parametrize("scale", [5.0, 4.0, None], ids=["repetitive", "confident-below-p", "original"])
def test_repetition_early_stop(scaled_dirs, prompts, scale):
    """finish_reason == "early_stop" exactly when K consecutive sampled tokens had p > P, right after the K-th;
    the forced EOS has logprob 0 and is not in the loss (the vLLM engine's test, on the HF engine)."""
    engine = hf_engine(scaled_dirs[scale])
    completions = sampled(engine, prompts)
    reasons = [c.finish_reason for c in completions]
    eos = engine.tokenizer.eos_token_id
    for c in completions:
        # temperature 1, top_p 1: the returned logprobs are the raw policy's, what the rule looks at
        probs = [math.exp(x) for x in c.logprobs]
        end = first_run_end(probs, K, P)
        if c.finish_reason == "early_stop":
            assert end == len(c.token_ids) - 1, (end, len(c.token_ids))  # the EOS follows the K-th token at once
            assert c.token_ids[-1] == eos
            assert all(q > P for q in probs[-K - 1 : -1])
            assert c.logprobs[-1] == 0.0  # forced: every other token was masked
            assert loss_tokens(c) == len(c.token_ids) - 1
        else:
            assert end is None or end == len(c.token_ids), (c.finish_reason, end, probs)  # no run it missed
            assert loss_tokens(c) == len(c.token_ids)
    if scale == 5.0:
        assert reasons.count("early_stop") >= len(reasons) // 2, reasons
    if scale is None:
        assert "early_stop" not in reasons


def test_early_stop_off_changes_nothing(scaled_dirs, prompts):
    """early_stop_k=0 passes no processor; with one, the samples up to the forced EOS are the same tokens with the
    same logprobs (the processor draws no random numbers and leaves unforced rows alone)."""
    off, on = hf_engine(scaled_dirs[5.0], early_stop_k=0), hf_engine(scaled_dirs[5.0])
    assert off.early_stop is None and on.early_stop is not None
    free, stopped = sampled(off, prompts), sampled(on, prompts)
    assert "early_stop" not in [c.finish_reason for c in free]
    assert any(c.finish_reason == "early_stop" for c in stopped)
    for a, b in zip(free, stopped):
        n = len(b.token_ids) - (b.finish_reason == "early_stop")
        assert a.token_ids[:n] == b.token_ids[:n] and a.logprobs[:n] == b.logprobs[:n]
        if b.finish_reason != "early_stop":
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason


def test_greedy_early_stop_after_exactly_k_tokens(scaled_dirs, prompts):
    """Greedy decoding of the repetitive model: K confident tokens, then the forced EOS, in every row."""
    engine = hf_engine(scaled_dirs[5.0])
    out = engine.generate(prompts, SamplingParams(n=2, max_tokens=MAX_TOKENS, temperature=0.0)).completions
    assert [(len(c.token_ids), c.finish_reason, loss_tokens(c)) for c in out] == [(K + 1, "early_stop", K)] * len(out)
    assert all(c.logprobs[-1] == 0.0 for c in out)


def test_budget_k_at_max_tokens_is_a_length_stop(scaled_dirs, prompts):
    """A run that completes on the last allowed token leaves no room for the EOS: finish_reason "length"."""
    engine = hf_engine(scaled_dirs[5.0])
    out = engine.generate(prompts, SamplingParams(n=1, max_tokens=K, temperature=0.0)).completions
    assert [(len(c.token_ids), c.finish_reason) for c in out] == [(K, "length")] * len(out)


def test_prompt_too_long_fails_before_generating(scaled_dirs, prompts):
    """rollout.max_model_len is honoured: prompt + max_tokens over it is refused up front, naming the knob."""
    engine = hf_engine(scaled_dirs[None])
    long_prompt = (prompts[0] * 256)[: 256 - 8]
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*rollout\.max_model_len=256"):
        engine.generate([prompts[0], long_prompt], SamplingParams(n=2, max_tokens=MAX_TOKENS))


@pytest.mark.parametrize("batch_size", [256, 6], ids=["one-call", "groups-split-across-calls"])
def test_sampling_logprobs_match_a_forward_of_the_same_tokens(model_dir, prompts, batch_size):
    """Each group's prompt is prefilled once and its cache gathered to the group's n rows (shared_prefill): the
    returned logprobs must be the policy's on every row, prompts of different lengths (left padding) and a batch
    size that splits groups across generate calls included. The sampled tokens must stay distinct within groups."""
    engine = hf_engine(model_dir, early_stop_k=0)
    engine.batch_size = batch_size
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = sampled(engine, prompts)
    assert [c.prompt_index for c in out] == [i for i in range(len(prompts)) for _ in range(4)]
    worst = 0.0
    for c in out:
        with torch.no_grad():
            logits = model(torch.tensor([prompts[c.prompt_index] + c.token_ids])).logits[0].float()
        ref = logits[len(prompts[c.prompt_index]) - 1 : -1].log_softmax(-1)
        ref = ref.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-4
    assert all(len({tuple(c.token_ids) for c in out[g : g + 4]}) > 1 for g in range(0, len(out), 4))
