"""`scripts/train.py` under a long-tailed response-length mix, for scripts/bench_long_tail.py (not a training tool).

Each request the rollout servers get has its min_tokens raised to a draw from a Pareto distribution (shape ALPHA,
scale `LONG_TAIL_MEDIAN` tokens at the median), capped at the request's max_tokens, keyed by the request's seed
(a run draws the same lengths when it is run again; the modes draw from the same distribution, their requests
having other seeds). The tiny model ends its answer a few tokens after min_tokens, so the drawn length is the
response length. Everything else is the real trainer and real servers; the drawn lengths only stand in for a
policy whose thinking lengths are long-tailed, as RL's are.

Note: min_tokens masks the end of sequence, so the servers' sampling logprobs are of that masked distribution and
the tis_cap weights see a mismatch on those tokens (the throughput measured here does not depend on it).
"""

import math
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rollout.engines.fleet.router as router  # noqa: E402
from cispo.cli import main  # noqa: E402

ALPHA = 1.1  # shape: the lower, the heavier the tail (response lengths under RL: a few percent 10x the median)
MEDIAN = int(os.environ.get("LONG_TAIL_MEDIAN", "48"))


def draw(seed: int, cap: int) -> int:
    """A length from the Pareto with median MEDIAN, capped at `cap`, the same for the same seed."""
    u = random.Random(seed).random()
    scale = MEDIAN / 2 ** (1 / ALPHA)  # the Pareto's median is scale * 2^(1/alpha)
    return min(cap, max(1, math.ceil(scale * (1 - u) ** (-1 / ALPHA))))


def long_tailed(request_body):
    """The router's request builder, each training request's min_tokens raised to its drawn length."""

    def body(prompt, sampling, n_req, seed, tag, version, model):
        out = request_body(prompt, sampling, n_req, seed, tag, version, model)
        if sampling.temperature > 0:  # training samples; greedy evaluation keeps its own lengths
            out["min_tokens"] = max(out["min_tokens"], draw(seed or 0, sampling.max_tokens))
        return out

    return body


if __name__ == "__main__":  # only a run started as this script draws its lengths
    router._request_body = long_tailed(router._request_body)
    sys.exit(main(["train", *sys.argv[1:]]))
