"""MiniMax (MiniMax-Text-01 / MiniMax-M1) in transformers: the tiny config, and packed forwards that stay correct.

The architecture: lightning attention (a linear-attention recurrence computed in blocks) in most layers, a softmax
attention layer after every 7 of them, and a top-2 MoE MLP in every layer (cispo/model/moe.py handles the routing).

Packing. A packed micro-batch lays several samples end to end in one row, with position ids restarting at 0 for
each sample (cispo/algo/batch.py). transformers turns the restarts into a block-diagonal mask for softmax attention,
but its lightning attention ignores position ids: its recurrent state runs across the whole row, so every sample
after the first would see the ones before it (on the tiny model, the second of two packed samples' last hidden
state is off by up to 0.7). `packed_forward` runs such models with the samples as rows of a right-padded batch
instead: each row starts from a fresh state, and causal attention never lets the padding after a sample reach it.

Generation has its own fix for this architecture, in rollout/engines/hf_engine.py (`generation_cache`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cispo.model.moe import sample_lengths, token_layout, unwrap_model

LINEAR, FULL = "linear_attention", "full_attention"
# layer kinds whose transformers implementation carries a state along the row and ignores position ids
RECURRENT_LAYER_TYPES = {"linear_attention", "mamba", "conv", "recurrent"}
RECURRENT_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"}


def tiny_minimax_config(cfg, common: dict[str, Any]):
    """MiniMaxConfig for `model.tiny.arch=minimax`: `common` (sizes, vocabulary, special tokens) plus the hybrid
    layer pattern and the MoE of `cfg` (a TinyModelConfig); each expert has cfg.intermediate_size."""
    from transformers import MiniMaxConfig

    layer_types = list(cfg.layer_types) if cfg.layer_types else [LINEAR] * (cfg.num_layers - 1) + [FULL]
    return MiniMaxConfig(
        **common,
        head_dim=cfg.hidden_size // cfg.num_heads,
        layer_types=layer_types,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        block_size=cfg.block_size,
    )


def _config(model):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def supports_packing(model) -> bool:
    """Whether a packed row (position ids restarting per sample) keeps the samples apart in `model`'s forward.

    False for models with recurrent layers (MiniMax's lightning attention, Mamba-style layers): transformers runs
    their state across the whole row. `packed_forward` handles both kinds; a caller that packs by itself must
    give such models one sample per micro-batch."""
    config = _config(model)
    if getattr(config, "model_type", None) in RECURRENT_MODEL_TYPES:
        return False
    return not any(kind in RECURRENT_LAYER_TYPES for kind in (getattr(config, "layer_types", None) or []))


def packed_forward(model, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """Final hidden states [1, S, H] of a packed row (input_ids, position_ids: [1, S]), every sample attending to
    itself only, on every architecture. `model` is the *ForCausalLM; the LM head is not applied."""
    base = model.base_model
    if supports_packing(model):
        # no cache: with one, transformers ignores the packing in position_ids and attends across samples
        return base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    lengths = sample_lengths(position_ids)
    if len(lengths) == 1:
        return base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    rows, width = len(lengths), max(lengths)
    # flat index, in the [rows * width] padded layout, of each packed token, in packed order
    index = torch.cat([r * width + torch.arange(n) for r, n in enumerate(lengths)]).to(input_ids.device)
    ids = input_ids.new_zeros(rows * width)
    ids[index] = input_ids.reshape(-1)  # padding: token 0 after each sample; causal attention keeps it unseen
    pos = torch.arange(width, device=input_ids.device).repeat(rows)
    pos[index] = position_ids.reshape(-1)
    with token_layout(index, rows * width):  # lets routing capture / replay skip the padding
        hidden = base(input_ids=ids.view(rows, width), position_ids=pos.view(rows, width), use_cache=False)
    flat = hidden.last_hidden_state.reshape(rows * width, -1)
    return flat[index].unsqueeze(0)
