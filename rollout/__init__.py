"""Rollout engines behind one protocol (rollout.base.RolloutEngine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

VLLM_UNSUPPORTED = {"minimax"}  # vLLM 0.32 dropped MiniMax's lightning attention (README: which release serves M1)


def resolve_engine(choice: str, model_dir: str) -> str:
    """'auto' -> 'vllm' when vllm is importable and can load the architecture, else 'hf'."""
    if choice != "auto":
        return choice
    config = Path(model_dir) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
    if model_type in VLLM_UNSUPPORTED or importlib.util.find_spec("vllm") is None:
        return "hf"
    return "vllm"


def build_engine(kind: str, model_dir: str, rollout_cfg, model_cfg, seed: int = 0):
    """An engine of `kind` ('vllm' | 'hf', see resolve_engine) loaded from `model_dir`."""
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, rollout_cfg, dtype=model_cfg.dtype, fp32_lm_head=model_cfg.fp32_lm_head, seed=seed)
    from rollout.hf_engine import HFEngine

    return HFEngine.from_pretrained(
        model_dir, dtype=model_cfg.dtype, fp32_lm_head=model_cfg.fp32_lm_head, trust_remote_code=model_cfg.trust_remote_code
    )
