"""Per-token log-probabilities and entropy from hidden states and the LM head, in bounded memory.

An 80k-token response against a 150k-200k vocabulary has 80k x 200k fp32 logits (64 GB), so they are never
materialised whole. `token_logprobs` walks the tokens in chunks of `chunk_size` rows: forward keeps only the
log-normaliser of each token ([T] floats) besides the inputs, and backward recomputes one chunk of logits at a
time and turns it into that chunk's share of both gradients. Peak extra memory is two [chunk_size, V] fp32
buffers in forward, one in backward beside the gradients themselves (the weight's is summed in a [V, H] fp32
buffer), independent of T.

Cost: one logits matmul in forward; one recompute and the two gradient matmuls in backward. That is 4 matmuls
where autograd through materialised logits does 3, in exchange for never writing or re-reading [T, V] tensors.

The head has no bias (the Qwen2, Llama and MiniMax LM heads have none). This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    chunk_size: int = 128,
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
        chunk_size: tokens per chunk; at most two [chunk_size, V] fp32 buffers live at once. The default is
            tuned on CPU (scripts/bench_logprobs.py: fastest at V = 8k-32k, within 10% of the best at V = 512
            and 150k). On a GPU pass 4096 or so: each chunk re-reads the weight and adds a [V, H] partial into
            the weight gradient, so small chunks leave the matmuls memory-bound.

    Returns:
        TokenLogprobs with logp [T] and entropy [T], float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {shapes}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"expected targets [T={hidden.shape[0]}] int64, got {tuple(targets.shape)} {targets.dtype}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden and weight must share one of {_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if not temperature > 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0 and chunk_size >= 1, got {temperature} and {chunk_size}")
    logp, entropy = _ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), fp32_head, chunk_size)
    return TokenLogprobs(logp=logp, entropy=entropy)


def _logits(h: Tensor, weight: Tensor, temperature: float, fp32_head: bool) -> Tensor:
    """fp32 logits [C, V] of the chunk h [C, H], divided by the temperature."""
    if fp32_head and h.dtype != torch.float32:
        if h.is_cuda:  # low-precision matmul with fp32 output: tensor-core speed, logits not rounded to bf16
            z = torch.mm(h, weight.T, out_dtype=torch.float32)
        else:  # the CPU mm has no out_dtype; the upcast (a [V, H] fp32 copy per chunk) gives the same numbers
            z = torch.mm(h.float(), weight.T.float())
    else:
        z = torch.mm(h, weight.T).float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, fp32_head, chunk_size):
        T = hidden.shape[0]
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        # Autocast would run the matmuls in bf16 and silently undo fp32 inputs or fp32_head.
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, T, chunk_size):
                rows = slice(s, s + chunk_size)
                z = _logits(hidden[rows], weight, temperature, fp32_head)
                target_logit = z.gather(1, targets[rows, None]).squeeze(1)
                zmax = z.amax(1, keepdim=True)
                z.sub_(zmax)
                ez = torch.exp(z)
                sumexp = ez.sum(1)
                log_sumexp = sumexp.log()
                # entropy = lse - E_p[z]; both shift with z, so it is computed on the shifted z
                expected = ez.mul_(z).sum(1) / sumexp
                lse[rows] = zmax.squeeze(1) + log_sumexp
                logp[rows] = target_logit - lse[rows]
                entropy[rows] = log_sumexp - expected
                del z, ez  # free them before the next chunk's logits exist: two [chunk, V] buffers at peak, not three
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.fp32_head, ctx.chunk_size = temperature, fp32_head, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Chunk partials are summed in fp32: rounding a bf16 running sum once per chunk would lose precision
        # as T grows.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        # d logp_t / d logits_t = (onehot(y_t) - softmax_t) / temperature
        g = grad_logp.float() / ctx.temperature
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(s, s + ctx.chunk_size)
                # in place, one [chunk, V] buffer: -g * softmax, then + g at the target
                dz = _logits(hidden[rows], weight, ctx.temperature, ctx.fp32_head)
                dz.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
                dz.scatter_add_(1, targets[rows, None], g[rows, None])
                dz = dz.to(hidden.dtype)
                if need_hidden:
                    torch.mm(dz, weight, out=grad_hidden[rows])
                if need_weight:
                    if dz.dtype == torch.float32:
                        grad_weight.addmm_(dz.T, hidden[rows])
                    else:
                        grad_weight += dz.T @ hidden[rows]
                del dz  # free it before the next chunk's logits exist
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
