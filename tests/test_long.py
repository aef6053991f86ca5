"""Long responses: the forced-length knob on both engines, the attention kernel of the packed path, and one
16k-token response pair through the whole step (generate, grade, pi_old, update, sync) in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cispo.config import ConfigError, ModelConfig, RolloutConfig, TinyModelConfig
from cispo.model.attention import packed_attention
from cispo.model.tiny_model import make_tiny_model
from rollout import ENGINES, build_engine, check_engine_knobs, register_engine
from rollout.base import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def test_packed_attention_runs_the_flash_kernel_not_the_math_fallback():
    """The math fallback materialises T x T scores (40 GB at 80k); the CPU flash kernel works in blocks."""
    q = torch.randn(1, 2, 256, 64, requires_grad=True)
    kv = torch.randn(1, 1, 256, 64, requires_grad=True)
    pos = torch.cat([torch.arange(100), torch.arange(156)])[None]  # two packed sequences
    with torch.profiler.profile() as prof:
        packed_attention(None, q, kv, kv, None, position_ids=pos)[0].sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert not any("math" in op for op in ops), sorted(op for op in ops if "attention" in op)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(TinyModelConfig(max_positions=8192), tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("kind", ["vllm", "hf"])
def test_min_tokens_holds_back_the_end_of_turn(kind, model_dir):
    cfg = RolloutConfig(engine=kind, max_tokens=600, max_model_len=700, min_tokens=500,
                        **({"kv_cache_gb": 0.1} if kind == "vllm" else {}))
    check_engine_knobs(kind, cfg)
    engine = build_engine(kind, model_dir, cfg, ModelConfig(), 0)
    try:
        prompt = [[1, 5, 6, 7]]
        free = engine.generate(prompt, SamplingParams(n=4, max_tokens=600, seed=1)).completions
        forced = engine.generate(prompt, SamplingParams(n=4, max_tokens=600, seed=1, min_tokens=500)).completions
    finally:
        engine.close()
    assert min(len(c.token_ids) for c in free) < 500  # the random model ends a turn early on its own
    assert min(len(c.token_ids) for c in forced) >= 500


def test_min_tokens_on_an_engine_that_cannot_honour_it(monkeypatch):
    monkeypatch.setattr("rollout.registry.ENGINES", dict(ENGINES))  # the engine below stays in this test
    register_engine("no-min-tokens", lambda *a: None, honours={"max_model_len"})
    with pytest.raises(Exception, match=r"rollout.min_tokens=64 needs the .*engine"):
        check_engine_knobs("no-min-tokens", RolloutConfig(engine="no-min-tokens", min_tokens=64))
    with pytest.raises(ConfigError, match="rollout.min_tokens=2000 must be between 0"):
        RolloutConfig(max_tokens=1024, min_tokens=2000)


@pytest.mark.slow
def test_a_16k_response_pair_through_the_whole_step(tmp_path):
    run = tmp_path / "run"
    # both cores: generation is most of this test's time (the suite runs one test at a time)
    cmd = [sys.executable, "scripts/train.py", "experiment=tiny_80k", "trainer.steps=1", "trainer.threads=2",
           "rollout.max_tokens=16500", "rollout.max_model_len=16600", "rollout.min_tokens=16384",
           "curriculum.windows=[16500]", "model.warm_start.target_accuracy=0.1",
           f"model.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={run}", "logger.wandb_mode=disabled"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=os.environ | {"OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert step["rollout/len_mean"] >= 16384 and step["train/tokens"] >= 2 * 16384
    assert step["train/updates"] == 1 and step["time/sync_s"] > 0
    # activations are linear in T (scripts/bench_long.py: ~56 KB a token, 1.8 GB here); the math attention
    # fallback would keep T x T scores of every layer and head for backward: 6.3 GB more
    assert step["memory/update_peak_gb"] - step["memory/rollout_peak_gb"] < 2.5, step
    assert "update: " in proc.stdout  # a progress line while the long update ran
    assert (run / "final" / "config.json").exists()
