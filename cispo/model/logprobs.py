"""Per-token log-probabilities and entropy from hidden states and the LM head, in bounded memory.

An 80k-token response against a 150k-200k vocabulary has 80k x 200k fp32 logits (64 GB), so they are never
materialised whole. `token_logprobs` walks the tokens in chunks of `chunk_size` rows: forward keeps only the
log-normaliser of each token ([T] floats) besides the inputs, and backward recomputes one chunk of logits at a
time and turns it into that chunk's share of both gradients. Extra memory is a few [chunk_size, V] buffers and
the gradients themselves, independent of T.

Cost: one logits matmul in forward; one recompute and the two gradient matmuls in backward, 4 matmuls where
autograd through materialised logits does 3. With `grad_hint` (the caller can say, from a chunk's logp, what
gradient its loss will send back, as a per-token policy loss can) the gradients are computed in the forward pass
from the logits already there: 3 matmuls, and nothing is recomputed. The hint is checked in backward and the
result stays exact when it was wrong (see `token_logprobs`).

On CUDA the elementwise work on each chunk (softmax statistics, the logits' gradient) runs as Triton kernels,
one read of the chunk each (`cispo.model.logprobs_triton`); the torch functions here are their reference and the CPU
path. The matmuls are cuBLAS's on every device.

Deviation from the usual fp32 accumulation: on CUDA, with bf16/fp16 inputs, the weight gradient is summed over
chunks in the input dtype (each chunk's product is accumulated in fp32 by cuBLAS and rounded once). An fp32
[V, H] buffer is 2.2 GB at Qwen's head, more than the whole budget this path is built for; the error this adds
is measured in scripts/bench_logprobs.py. On CPU, and for fp32 inputs, the sum is fp32.

The head has no bias (the Qwen2, Llama and MiniMax LM heads have none). This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_CHUNK = 128  # scripts/bench_logprobs.py on CPU: fastest at V = 8k-32k, within 10% of the best at 512 and 150k
CUDA_WORKSPACE_BYTES = 320 * 2**20  # logits buffers of one chunk on CUDA; sets the default chunk there
GradHint = Callable[[Tensor, slice | Tensor], Tensor]


@dataclass
class TokenLogprobs:
    """Per-token results of `token_logprobs`.

    logp: [T] float32, log pi(target_t) under softmax(hidden @ weight.T / temperature); differentiable with
        respect to `hidden` and `weight`.
    entropy: [T] float32, entropy (nats) of the same temperature-scaled distribution. Detached: it is for
        metrics only, no gradient flows through it (so it cannot serve as an entropy bonus).
    """

    logp: Tensor
    entropy: Tensor


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    fp32_head: bool = False,
    chunk_size: int | None = None,
    grad_hint: GradHint | None = None,
    mask: Tensor | None = None,
) -> TokenLogprobs:
    """Log-probability of each target token and the entropy of each position's next-token distribution.

    Args:
        hidden: [T, H] float32/bfloat16/float16, the final hidden states of the positions that predict
            `targets` (packed: select the response positions of all sequences first).
        weight: [V, H], the LM-head weight, same dtype as `hidden`.
        targets: [T] int64, the token each position predicts.
        temperature: logits are divided by it; must equal the rollout's sampling temperature, or logp is not the
            log-probability the tokens were sampled with.
        fp32_head: compute the logits in fp32 from low-precision inputs (products of bf16/fp16 values are exact
            in fp32 and are summed in fp32), as MiniMax-M1 does to shrink the train/inference probability
            mismatch. Without it, the logits are rounded to the input dtype, as a bf16 engine rounds them. The
            softmax statistics are fp32 either way. Gradients come back in the input dtype.
        chunk_size: tokens per chunk. Default: 128 on CPU; on CUDA as many as fit CUDA_WORKSPACE_BYTES of
            logits buffers (1024 at Qwen's 152k vocabulary in bf16): each chunk re-reads the weight and adds a
            [V, H] partial into its gradient, so small chunks leave the matmuls memory-bound.
        grad_hint: optional `hint(logp [C] float32, rows) -> [C]`, the gradient the caller's loss will send back
            to `logp[rows]`, given those tokens' logp (e.g. autograd of a per-token policy loss on the slice);
            `rows` is a slice, or with `mask` the positions [C] int64. The weight and hidden gradients are then
            computed in the forward pass. In backward the gradient that arrives, g, is compared with the hinted
            one, h: if g = s * h for a scalar s (a loss scale, gradient accumulation), the saved gradients are
            scaled by s; otherwise the remainder g - s * h goes through the recomputing backward, so the result
            is exact either way (a remainder under 1e-6 of |g| counts as none). Ignored when no gradient is
            required.
        mask: optional [T] bool; tokens where it is False are not computed at all (their logp and entropy are
            0, they pass no gradient). The same as selecting the kept rows first, which is what the trainer does
            when it packs a micro-batch's loss tokens.

    Returns:
        TokenLogprobs with logp [T] and entropy [T], float32.
    """
    _check_inputs(hidden, weight, targets, mask)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.dtype, fp32_head, hidden.device)
    if not temperature > 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0 and chunk_size >= 1, got {temperature} and {chunk_size}")
    if mask is not None:
        kept = mask.nonzero().squeeze(1)
        hint = grad_hint and (lambda logp, rows: grad_hint(logp, kept[rows]))
        inner = token_logprobs(hidden[kept], weight, targets[kept], temperature=temperature, fp32_head=fp32_head,
                               chunk_size=chunk_size, grad_hint=hint)
        zeros = inner.logp.new_zeros(mask.shape)
        return TokenLogprobs(zeros.index_put((kept,), inner.logp), zeros.index_put((kept,), inner.entropy))
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        grad_hint = None
    logp, entropy = _ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), fp32_head, chunk_size,
                                           grad_hint)
    return TokenLogprobs(logp=logp, entropy=entropy)


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None) -> None:
    """ValueError naming the argument whose shape or dtype does not fit `token_logprobs`."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {shapes}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"expected targets [T={hidden.shape[0]}] int64, got {tuple(targets.shape)} {targets.dtype}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden and weight must share one of {_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if mask is not None and (mask.shape != targets.shape or mask.dtype != torch.bool):
        raise ValueError(f"expected mask [T={hidden.shape[0]}] bool, got {tuple(mask.shape)} {mask.dtype}")


def default_chunk_size(vocab: int, dtype: torch.dtype, fp32_head: bool, device: torch.device) -> int:
    """CPU_CHUNK on CPU; on CUDA the largest multiple of 128 (at least 128, at most 8192) whose logits buffers
    fit CUDA_WORKSPACE_BYTES: the logits in place of their own gradient, plus a low-precision copy of the
    gradient when the logits are fp32 and the inputs are not."""
    if device.type != "cuda":
        return CPU_CHUNK
    per_logit = 4 + dtype.itemsize if fp32_head and dtype != torch.float32 else dtype.itemsize
    rows = CUDA_WORKSPACE_BYTES // (vocab * per_logit) // 128 * 128
    return min(max(rows, 128), 8192)


def softmax_stats_torch(z: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """z [C, V] raw logits, targets [C] int64 -> (lse, logp, entropy) [C] float32 of softmax(z / temperature).
    Leaves z untouched."""
    z = z.float() / temperature  # a copy
    zmax = z.amax(1, keepdim=True)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    ez = torch.exp(z.sub_(zmax))
    sumexp = ez.sum(1)
    log_sumexp = sumexp.log()
    lse = zmax.squeeze(1) + log_sumexp
    # entropy = lse - E_p[z]; both shift with z, so it is computed on the shifted z
    return lse, target_logit - lse, log_sumexp - ez.mul_(z).sum(1) / sumexp


def logit_grad_torch(z: Tensor, lse: Tensor, targets: Tensor, g: Tensor, temperature: float, out: Tensor) -> Tensor:
    """d(sum_t g_t logp_t) / dz for raw logits z [C, V] = (g / temperature) * (onehot - softmax(z / temperature)),
    written into `out` [C, V] (may be z itself). lse, g [C] float32. Consumes z when it is fp32."""
    gs = g / temperature
    dz = z if z.dtype == torch.float32 else z.float()  # fp32 logits are overwritten
    if temperature != 1.0:
        dz.div_(temperature)
    dz.sub_(lse[:, None]).exp_().mul_(-gs[:, None])
    dz.scatter_add_(1, targets[:, None], gs[:, None])
    return dz if dz is out else out.copy_(dz)


def _kernels(device: torch.device):
    """(softmax_stats, logit_grad) for the device: the Triton kernels on CUDA when triton is installed."""
    if device.type == "cuda":
        try:
            from cispo.model import logprobs_triton
        except ImportError:
            pass
        else:
            return logprobs_triton.softmax_stats, logprobs_triton.logit_grad
    return softmax_stats_torch, logit_grad_torch


def _logits(h: Tensor, weight: Tensor, fp32_head: bool) -> Tensor:
    """Raw logits [C, V] of the chunk h [C, H]: fp32 with fp32_head or fp32 inputs, else the input dtype."""
    if fp32_head and h.dtype != torch.float32:
        if h.is_cuda:  # low-precision matmul with fp32 output: tensor-core speed, logits not rounded to bf16
            return torch.mm(h, weight.T, out_dtype=torch.float32)
        return torch.mm(h.float(), weight.T.float())  # the CPU mm has no out_dtype; the upcast gives the same numbers
    return torch.mm(h, weight.T)


class _Grads:
    """Gradient buffers of one pass over the chunks: hidden's [T, H] in its dtype, weight's [V, H] summed in
    fp32, or in the input dtype on CUDA (module docstring)."""

    def __init__(self, hidden: Tensor, weight: Tensor, need_hidden: bool, need_weight: bool):
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        low_precision_cuda = weight.is_cuda and weight.dtype != torch.float32
        acc = weight.dtype if low_precision_cuda else torch.float32
        self.weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        self.dtype = weight.dtype

    def add_chunk(self, z, h, weight, targets, lse, g, temperature, logit_grad, rows: slice) -> None:
        """Add the share of the chunk `rows`: z [C, V] its raw logits (overwritten), h [C, H], targets, lse and
        g (the gradient arriving at logp) [C]. The logits' gradient goes in z's own memory when z has the
        input dtype, else in a second buffer of the input dtype."""
        out = z if z.dtype == h.dtype else torch.empty(z.shape, dtype=h.dtype, device=z.device)
        dz = logit_grad(z, lse, targets, g, temperature, out=out)
        if self.hidden is not None:
            torch.mm(dz, weight, out=self.hidden[rows])
        if self.weight is not None:
            if dz.dtype == self.weight.dtype:
                self.weight.addmm_(dz.T, h)
            else:
                self.weight += dz.T @ h

    def result(self) -> tuple[Tensor | None, Tensor | None]:
        return self.hidden, None if self.weight is None else self.weight.to(self.dtype)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, fp32_head, chunk_size, grad_hint):
        T = hidden.shape[0]
        stats, logit_grad = _kernels(hidden.device)
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
        hint = torch.empty_like(logp) if grad_hint else None
        grads = _Grads(hidden, weight, *ctx.needs_input_grad[:2]) if grad_hint else None
        # Autocast would run the matmuls in bf16 and silently undo fp32 inputs or fp32_head.
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, T, chunk_size):
                rows = slice(s, s + chunk_size)
                z = _logits(hidden[rows], weight, fp32_head)
                lse[rows], logp[rows], entropy[rows] = stats(z, targets[rows], temperature)
                if grad_hint:
                    with torch.enable_grad():
                        hint[rows] = grad_hint(logp[rows].clone(), rows).detach()
                    grads.add_chunk(z, hidden[rows], weight, targets[rows], lse[rows], hint[rows], temperature,
                                    logit_grad, rows)
                del z  # free it before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, targets, lse, hint)
        ctx.hinted = grads.result() if grad_hint else None
        ctx.temperature, ctx.fp32_head, ctx.chunk_size = temperature, fp32_head, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse, hint = ctx.saved_tensors
        g = grad_logp.float()
        scale = None
        if hint is not None:
            hinted, ctx.hinted = ctx.hinted, None
            norm = hint.dot(hint)
            scale = (g.dot(hint) / norm).item() if norm > 0 else 0.0
            g = g - scale * hint
            if g.norm() <= 1e-6 * grad_logp.norm():  # the loss sent back what it hinted, up to the scale
                if abs(scale - 1.0) > 1e-6:
                    hinted = [None if t is None else t.mul_(scale) for t in hinted]
                return *hinted, None, None, None, None, None
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grads = _Grads(hidden, weight, need_hidden, need_weight)
        _, logit_grad = _kernels(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(s, s + ctx.chunk_size)
                z = _logits(hidden[rows], weight, ctx.fp32_head)
                grads.add_chunk(z, hidden[rows], weight, targets[rows], lse[rows], g[rows], ctx.temperature,
                                logit_grad, rows)
                del z  # free it before the next chunk's logits exist
        grad_hidden, grad_weight = grads.result()
        if scale is not None:  # the remainder of a wrong hint, plus the scaled hinted gradients
            grad_hidden = None if grad_hidden is None else grad_hidden.add_(hinted[0], alpha=scale)
            grad_weight = None if grad_weight is None else grad_weight.add_(hinted[1], alpha=scale)
        return grad_hidden, grad_weight, None, None, None, None, None
