"""The policy model: loading it, and its token logprobs on a packed micro-batch.

The forward stops at the last hidden state; the LM head goes through `cispo.logprobs.token_logprobs`, which
never materialises more than a chunk of logits and can run the head in fp32 (M1 §3.2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.batch import MicroBatch
from cispo.config import ModelConfig
from cispo.logprobs import TokenLogprobs, token_logprobs


def check_model_path(path: str) -> None:
    """Fail before any work when a local model directory is missing (hub names are left to transformers)."""
    local = path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
    if local and not (Path(path).expanduser() / "config.json").exists():
        raise FileNotFoundError(
            f"model.path: {path!r} is not a Hugging Face model directory (no config.json there). "
            "Point model.path at a saved model, or use model.path=tiny for the built-in tiny model."
        )


def load_policy(path: str, cfg: ModelConfig):
    """(model, tokenizer) in train mode, parameters in cfg.dtype."""
    check_model_path(path)
    kwargs = dict(trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), tokenizer


def micro_batch_logprobs(model, mb: MicroBatch, *, temperature: float, fp32_head: bool) -> TokenLogprobs:
    """log pi and entropy [N] of the loss tokens of a packed micro-batch (gradient flows when enabled)."""
    # no cache: with one, transformers ignores the packing in position_ids and attends across samples
    out = model.base_model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False)
    hidden = out.last_hidden_state[0]  # [S, H]
    head = model.get_output_embeddings().weight  # [V, H]
    return token_logprobs(hidden[mb.logit_pos], head, mb.targets, temperature=temperature or 1.0, fp32_head=fp32_head)
