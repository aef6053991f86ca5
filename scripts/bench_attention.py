"""The bucketing rule of the packed attention (cispo/model/attention.py), measured: forward + backward of one layer's
attention over a packed micro-batch, for several values of PAD_SLACK, on several length mixes.

    python scripts/bench_attention.py [--threads 1] [--repeats 7] [--out bench_attention.json]

PAD_SLACK = s lets a bucket of rows pad to its longest row while rows x longest^2 <= s x sum(length^2): s = 1
batches only rows of one length, a huge s makes one padded call. "loop" is one call per row (the attention before
bucketing; a root runs on a view, a branch on its gathered prompt and tokens). Mixes (prompt P shared by a group of G responses, lengths in tokens):
  equal     P 40, G 8 x 16 responses of 16: the default run's shape (short answers, one length)
  narrow    P 40, G 8 x 16 responses of 8..64
  wide      P 64, G 4 x 8 responses log-uniform in 64..2048 (a reasoning batch)
Heads and head size are the tiny model's (2 query heads, 1 key/value head, 64); CPU time of this process, median
of --repeats, after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cispo.model import attention  # noqa: E402

SLACKS = [1.0, 1.25, 1.5, 2.0, 4.0, 1e9]


def mix(name: str, g: torch.Generator) -> list[int]:
    """Packed position ids: per group a root (prompt + first response), then branches for the other responses."""
    prompt, groups, size, lengths = {
        "equal": (40, 16, 8, lambda: 16),
        "narrow": (40, 16, 8, lambda: int(torch.randint(8, 65, (1,), generator=g))),
        "wide": (64, 8, 4, lambda: int(round(math.exp(math.log(64) + (math.log(2048) - math.log(64))
                                                       * float(torch.rand(1, generator=g)))))),
    }[name]
    pos = []
    for _ in range(groups):
        pos += range(prompt + lengths())
        for _ in range(size - 1):
            pos += range(prompt, prompt + lengths())
    return pos


def time_attention(pos: list[int], repeats: int) -> float:
    S = len(pos)
    q = torch.randn(1, 2, S, 64, requires_grad=True)
    kv = torch.randn(1, 1, S, 64, requires_grad=True)
    times = []
    for k in range(repeats + 1):
        position_ids = torch.tensor([pos])  # a new tensor: the plan is computed each time, as in each forward
        started = time.process_time()
        out, _ = attention.packed_attention(None, q, kv, kv, None, position_ids=position_ids)
        out.sum().backward()
        if k:
            times.append(time.process_time() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench_attention.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, defaults = {}, (attention.PAD_SLACK, attention.ALONE_TOKENS)
    for name in ("equal", "narrow", "wide"):
        pos = mix(name, torch.Generator().manual_seed(0))
        row = {}
        for slack in SLACKS:
            attention.PAD_SLACK = slack
            row[f"{slack:g}"] = time_attention(pos, args.repeats)
        attention.PAD_SLACK, attention.ALONE_TOKENS = 0.0, 0  # every row alone: one call per row
        row["loop"] = time_attention(pos, args.repeats)
        attention.PAD_SLACK, attention.ALONE_TOKENS = defaults
        results[name] = {"tokens": len(pos), "ms": {k: 1000 * v for k, v in row.items()}}
    cols = [f"{s:g}" for s in SLACKS] + ["loop"]
    print(f"{'mix':8}{'tokens':>8}" + "".join(f"{'slack ' + c if c != 'loop' else c:>12}" for c in cols) + "   (ms)")
    for name, r in results.items():
        print(f"{name:8}{r['tokens']:>8}" + "".join(f"{r['ms'][c]:>12.1f}" for c in cols))
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
