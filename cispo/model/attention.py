"""Causal attention over a packed micro-batch, with shared prompts and no per-sequence Python loop.

A packed row (cispo/algo/batch.py) lays sequences end to end; its position ids say where each begins:
- a *root* starts at position 0: a whole sequence (prompt + response), attending to itself;
- a *branch* starts at a position p > 0 where the positions do not continue the token before: it is a response
  whose prompt is the first p tokens of the root before it (`micro_batches(share_prompts=True)` packs a group's
  prompt once), and it attends to those p tokens and then to itself, exactly as if it were packed whole.

Each root is one attention row (its own tokens), each branch one row of its root's first p tokens followed by its
own; every row is then plain causal attention over its keys, so rows of similar length batch into one padded
SDPA call with `is_causal=True` and no mask (right padding sits after every real key, where causal attention
never looks; the padded queries' outputs are dropped). The CPU flash kernel stays in use (no mask means no
S x S scores, tests/test_long.py). A branch row recomputes its prompt's p queries, whose outputs are dropped:
p^2 extra attention work per branch, against the prompt's p tokens of every layer's MLP and projections that
sharing saves.

Rows are batched by the rule `buckets`: sorted by length, a bucket grows while its padded attention work
(rows x longest^2) stays within PAD_SLACK of the work its rows need (sum of length^2); a row longer than
ALONE_TOKENS runs alone on a view of the packed tensors, without a gathered copy. scripts/bench_attention.py
times the rule for several PAD_SLACK values on three length mixes (first figures, on a loaded machine: 1.25-1.5
best for short rows, 1 for widely spread lengths; the value is to be settled on a quiet one).

The plan (which token goes to which row) depends on position_ids only; it is computed once per forward and
reused by every layer (transformers hands every layer the same position_ids tensor).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

PACKED_ATTENTION = "cispo_packed"
PAD_SLACK = 1.5  # a bucket's padded attention work may be up to 1.5x the work of its rows
ALONE_TOKENS = 2048  # longer rows run alone, on views of the packed tensors


@dataclass
class Bucket:
    keys: Tensor | None  # [n, L] index of each row's keys (and queries) in the packed row; None: one row, a view
    span: range  # keys is None: the row is packed tokens span.start .. span.stop - 1
    out_src: Tensor  # [M] flat index into the bucket's [n * L] outputs of the rows' own tokens
    out_dst: Tensor  # [M] their index in the packed row


def rows_of(positions: list[int]) -> list[tuple[range | list[int], int]]:
    """The attention rows of one packed row of position ids: (keys, own) per row, keys the packed indices of its
    keys (a range for a root, whose keys are contiguous), own how many trailing keys are the row's own tokens
    (the rest is its prompt)."""
    rows, root, start = [], 0, 0
    for i in range(1, len(positions) + 1):
        if i < len(positions) and positions[i] == positions[i - 1] + 1:
            continue
        first = positions[start]
        if first == 0:
            root = start
            rows.append((range(start, i), i - start))
        else:
            if root + first > start:  # the prompt must be the root's leading tokens
                raise ValueError(f"packed row: a sequence starts at position {first} at index {start}, beyond the "
                                 f"{start - root} tokens of the sequence before it")
            rows.append(([*range(root, root + first), *range(start, i)], i - start))
        start = i
    return rows


def buckets(rows: list[tuple[range | list[int], int]], device: torch.device) -> list[Bucket]:
    """Group rows into padded SDPA calls (the rule in the module docstring)."""
    out, group, need = [], [], 0
    for keys, own in sorted(rows, key=lambda row: len(row[0])):  # each row is the longest of its bucket so far
        n = len(keys)
        if n > ALONE_TOKENS and isinstance(keys, range):
            index = torch.arange(n, device=device)
            out.append(Bucket(None, keys, index, index + keys.start))
            continue
        if group and (len(group) + 1) * n ** 2 > PAD_SLACK * (need + n ** 2):
            out.append(_gathered(group, len(group[-1][0]), device))
            group, need = [], 0
        group.append((keys, own))
        need += n ** 2
    if group:
        out.append(_gathered(group, len(group[-1][0]), device))
    return out


def _gathered(group, width: int, device: torch.device) -> Bucket:
    keys, src, dst = [], [], []
    for r, (k, own) in enumerate(group):
        keys.append([*k, *[k[-1]] * (width - len(k))])  # padding after the real keys: causal attention never sees it
        src += range(r * width + len(k) - own, r * width + len(k))
        dst += k[len(k) - own:]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Bucket(as_tensor(keys), range(0), as_tensor(src), as_tensor(dst))


_plan: tuple[weakref.ref, list[list[Bucket]]] | None = None


def plan(position_ids: Tensor, batch: int, length: int) -> list[list[Bucket]]:
    """The buckets of each of `batch` packed rows of `length` tokens, from position_ids [B or 1, S] (cached for the
    same tensor: every layer of one forward asks)."""
    global _plan
    if _plan is not None and _plan[0]() is position_ids:
        return _plan[1]
    pos = position_ids.view(-1, position_ids.shape[-1]).expand(batch, -1).tolist()
    result = [buckets(rows_of(row), position_ids.device) for row in pos]
    _plan = (weakref.ref(position_ids), result)
    return result


def packed_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, position_ids=None,
                     sliding_window=None, **kwargs):
    """Causal attention over packed rows (module docstring): query [B, Hq, S, D], key/value [B, Hkv, S, D] ->
    ([B, S, Hq, D], None). Registered as a transformers attention implementation; transformers builds no mask for
    it. Without position_ids each row is one sequence."""
    if attention_mask is not None or sliding_window is not None:
        raise ValueError(f"{PACKED_ATTENTION} attention runs packed rows (no attention mask, no sliding window)")
    batch, heads, length, dim = query.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device)[None]
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, dropout_p=dropout, is_causal=q.shape[-2] > 1, scale=scaling, enable_gqa=heads != key.shape[1])
    rows = []
    for b, bucket_list in enumerate(plan(position_ids, batch, length)):
        q, k, v = query[b], key[b], value[b]  # [H, S, D]
        parts, index = [], []
        for bk in bucket_list:
            if bk.keys is None:
                lo, hi = bk.span.start, bk.span.stop
                o = sdpa(q[None, :, lo:hi], k[None, :, lo:hi], v[None, :, lo:hi])[0]  # [Hq, L, D]
            else:
                n, width = bk.keys.shape
                flat = bk.keys.view(-1)
                gather = lambda t: t.index_select(1, flat).view(t.shape[0], n, width, dim).transpose(0, 1)  # noqa: E731
                o = sdpa(gather(q), gather(k), gather(v)).transpose(0, 1).reshape(heads, n * width, dim)
            parts.append(o.index_select(1, bk.out_src))
            index.append(bk.out_dst)
        out = torch.cat(parts, 1)  # [Hq, S, D] in bucket order
        rows.append(torch.empty_like(out).index_copy(1, torch.cat(index), out))
    return torch.stack(rows).transpose(1, 2).contiguous(), None
