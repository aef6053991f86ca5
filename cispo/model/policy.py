"""The policy model: loading it, and its token logprobs on a packed micro-batch.

The forward stops at the last hidden state; the LM head goes through `cispo.model.logprobs.token_logprobs`, which
never materialises more than a chunk of logits and can run the head in fp32 (M1 §3.2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from cispo.model.attention import PACKED_ATTENTION, packed_attention
from cispo.algo.batch import MicroBatch
from cispo.config import ModelConfig
from cispo.model.gguf import GGUF_PREFIX, cached_import
from cispo.model.logprobs import GradHint, TokenLogprobs, token_logprobs
from cispo.model.minimax import packed_forward, supports_packing
from cispo.model.moe import moe_routers, unwrap_model


def check_model_path(path: str) -> None:
    """Fail before any work when a local model directory is missing (hub names are left to transformers)."""
    local = path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
    if local and not (Path(path).expanduser() / "config.json").exists():
        raise FileNotFoundError(
            f"model.path: {path!r} is not a Hugging Face model directory (no config.json there). "
            "Point model.path at a saved model, or use model.path=tiny for the built-in tiny model."
        )


def resolve_model_path(path: str, cache_dir: str, *, dtype: str = "float32", log=print) -> str:
    """A model.path other than "tiny" as transformers and vLLM load it: a `gguf:` entry imported once into
    cache_dir (cispo.model.gguf.cached_import), anything else checked (check_model_path) and returned as it is."""
    if path.startswith(GGUF_PREFIX):
        return str(cached_import(path, cache_dir, dtype=dtype, log=log))
    check_model_path(path)
    return path


def _register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def load_policy(path: str, cfg: ModelConfig):
    """(model, tokenizer) in train mode, parameters in cfg.dtype, attention `packed_attention` (the policy only
    ever runs packed micro-batches; models with remote code keep their own attention)."""
    check_model_path(path)
    kwargs = dict(trust_remote_code=cfg.trust_remote_code)
    if not cfg.trust_remote_code:
        _register_packed_attention()
        kwargs["attn_implementation"] = PACKED_ATTENTION
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), tokenizer


def shares_prompts(model) -> bool:
    """Whether `model` (a *ForCausalLM, PolicyLogprobs or the DeepSpeed engine around it) can train micro-batches
    packed with shared prompts (`micro_batches(share_prompts=True)`): its attention is `packed_attention`, which
    reads the branches from the position ids, and no layer or router needs one sequence per position restart
    (recurrent layers, cispo.model.minimax; MoE routing records, cispo.model.moe)."""
    model = unwrap_model(model)
    return (getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION and supports_packing(model)
            and not moe_routers(model))


class PolicyLogprobs(torch.nn.Module):
    """The policy as a module whose forward returns what the loss needs: (logp [N], entropy [N]) of a packed
    micro-batch's loss tokens. This is the module DeepSpeed wraps, so that ZeRO-3 gathers (and releases) the
    parameters around the whole computation, LM head included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, logit_pos, targets, *, temperature: float, fp32_head: bool,
                grad_hint: GradHint | None = None):
        hidden = packed_forward(self.model, input_ids, position_ids)[0]  # [S, H], each sample attending to itself
        head = self.model.get_output_embeddings().weight  # [V, H]
        tl = token_logprobs(hidden[logit_pos], head, targets, temperature=temperature or 1.0, fp32_head=fp32_head,
                            grad_hint=grad_hint)
        return tl.logp, tl.entropy


def model_device(model) -> torch.device:
    # the DeepSpeed engine knows its device (ZeRO-3 parameters may be offloaded to CPU memory)
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def micro_batch_logprobs(model, mb: MicroBatch, *, temperature: float, fp32_head: bool,
                         grad_hint: GradHint | None = None) -> TokenLogprobs:
    """log pi and entropy [N] of the loss tokens of a packed micro-batch (gradient flows when enabled).

    `model`: a Hugging Face causal LM, or a module taking PolicyLogprobs's inputs (PolicyLogprobs itself, or
    the DeepSpeed engine wrapping it). The micro-batch's tensors are moved to the model's device. `grad_hint`:
    see `token_logprobs`; its rows index the micro-batch's loss tokens."""
    if isinstance(model, PreTrainedModel):
        model = PolicyLogprobs(model)
    device = model_device(model)
    inputs = [t.to(device) for t in (mb.input_ids, mb.position_ids, mb.logit_pos, mb.targets)]
    logp, entropy = model(*inputs, temperature=temperature, fp32_head=fp32_head, grad_hint=grad_hint)
    return TokenLogprobs(logp, entropy)
