"""Forward + backward time of the CISPO loss against the bare torch expression of the same formula.

    python scripts/bench_loss.py [--rows 64 --cols 8192 --repeats 21 --threads 1 --out bench_loss.json]

Both sides get the same packed inputs (rows x cols tokens, flattened) and compute
sum_t coef_t * -sg(clip(r_t, max=5)) * A_t * log pi_t, then backward into log pi. `policy_loss` also returns the
ratio and the clipping masks the trainer logs; the bare expression computes nothing else. The two are timed
alternately in one process, so machine load hits both alike; the table reports medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cispo.config import AlgoConfig  # noqa: E402
from cispo.algo.loss import loss_knobs, policy_loss  # noqa: E402

KNOBS = loss_knobs("cispo", asdict(AlgoConfig(is_weight_max=5.0)))  # clip(r, max=5), no floor, no mask


def bare(logp, old, adv, coef):
    weight = torch.exp(logp.detach() - old).clamp(max=5.0)
    return (coef * (-weight * adv * logp)).sum()


def ours(logp, old, adv, coef):
    return policy_loss(logp, old, adv, coef, loss="cispo", **KNOBS).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_loss.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.rows * args.cols
    base = -torch.rand(n, generator=g) * 5
    old = base + torch.randn(n, generator=g) * 0.3
    adv = torch.randn(args.rows, generator=g).repeat_interleave(args.cols)
    coef = torch.full((n,), 1.0 / n)
    times = {"bare": [], "cispo.algo.loss.policy_loss": []}
    fns = {"bare": bare, "cispo.algo.loss.policy_loss": ours}
    for rep in range(args.repeats + 2):
        for name, fn in fns.items():
            logp = base.clone().requires_grad_()
            start = time.perf_counter()
            fn(logp, old, adv, coef).backward()
            elapsed = time.perf_counter() - start
            if rep >= 2:  # two warm-up rounds
                times[name].append(elapsed)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = med["cispo.algo.loss.policy_loss"] / med["bare"]
    print(f"loss forward+backward on [{args.rows}, {args.cols}] tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'implementation':<26}{'ms':>10}")
    for k, v in med.items():
        print(f"{k:<26}{v:>10.2f}")
    print(f"ratio ours / bare: {ratio:.3f} (goal <= 1.2)")
    result = {"rows": args.rows, "cols": args.cols, "threads": args.threads, "repeats": args.repeats,
              "median_ms": med, "ratio": ratio}
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
