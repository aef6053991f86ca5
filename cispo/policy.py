"""The policy model: loading it, and its token logprobs on a packed micro-batch.

The forward stops at the last hidden state; the LM head goes through `cispo.logprobs.token_logprobs`, which
never materialises more than a chunk of logits and can run the head in fp32 (M1 §3.2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from cispo.batch import MicroBatch
from cispo.config import ModelConfig
from cispo.gguf import GGUF_PREFIX, cached_import
from cispo.logprobs import GradHint, TokenLogprobs, token_logprobs
from cispo.minimax import packed_forward


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
    cache_dir (cispo.gguf.cached_import), anything else checked (check_model_path) and returned as it is."""
    if path.startswith(GGUF_PREFIX):
        return str(cached_import(path, cache_dir, dtype=dtype, log=log))
    check_model_path(path)
    return path


PACKED_ATTENTION = "cispo_packed"


def packed_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, position_ids=None,
                     sliding_window=None, **kwargs):
    """Causal attention over a packed row, one sequence at a time (sequences start where position_ids restart).

    transformers' own "sdpa" treats a packed row as one sequence under an S x S block-diagonal mask: the kernel
    computes all S^2 scores and the mask itself takes S^2 memory (a 32k-token micro-batch: 1 G entries). Here
    each sequence of length L_i costs L_i^2, as if it were alone, and no mask exists. Registered as a transformers
    attention implementation; transformers builds no mask for it. query [B, Hq, S, D], key/value [B, Hkv, S, D]
    -> ([B, S, Hq, D], None)."""
    if attention_mask is not None or sliding_window is not None:
        raise ValueError(f"{PACKED_ATTENTION} attention runs packed rows (no attention mask, no sliding window)")
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(query)
    if position_ids is None:
        bounds = [[(0, query.shape[2])]] * query.shape[0]
    else:
        pos = position_ids.view(-1, position_ids.shape[-1]).expand(query.shape[0], -1).cpu()
        bounds = []
        for row in pos:
            starts = [0] + (torch.nonzero(row[1:] != row[:-1] + 1).view(-1) + 1).tolist() + [row.numel()]
            bounds.append(list(zip(starts[:-1], starts[1:])))
    for b, segments in enumerate(bounds):
        for lo, hi in segments:
            out[b : b + 1, :, lo:hi] = torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1, :, lo:hi], key[b : b + 1, :, lo:hi], value[b : b + 1, :, lo:hi],
                dropout_p=dropout, is_causal=hi - lo > 1, scale=scaling, enable_gqa=gqa,
            )
    return out.transpose(1, 2).contiguous(), None


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
