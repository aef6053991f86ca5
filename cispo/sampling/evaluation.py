"""Held-out evaluation metrics: greedy accuracy (the trainer's), and avg@k / pass@k of sampled answers
(scripts/evaluate.py, and periodic sampled evaluation in the trainer).

avg@k is the share of correct answers among k samples per prompt, averaged over prompts: the metric M1
reports (k samples at temperature 1.0, top_p 0.95), and the unbiased estimate of pass@1.
pass@j uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374): with n samples of a prompt, c of them
correct, pass@j = 1 - C(n-c, j) / C(n, j), the chance that j of the n drawn without replacement hold a correct
one. Taking "any of the first j correct" instead would be an estimate with higher variance.
"""

from __future__ import annotations

import math
from typing import Sequence

from rollout.base import SamplingParams


def grade(scorer, responses, rows: list[dict], max_tokens: int):
    """BatchRewards of `responses` (anything with `text`, `token_ids` and `finish_reason`: a
    rollout.trajectory.Trajectory or a rollout.base.Completion), `rows[i]` the row of response i, with the lengths
    and truncations that length shaping needs."""
    return scorer.score(
        [r.text for r in responses], rows, response_lengths=[len(r.token_ids) for r in responses],
        max_tokens=max_tokens, truncated=[r.finish_reason == "length" for r in responses],
    )


def greedy_accuracy(engine, prompt_ids: list[list[int]], rows: list[dict], scorer, max_tokens: int) -> dict[str, float]:
    """eval/accuracy: share graded correct; eval/boxed_rate: share with a parseable final answer."""
    rollout = engine.generate(prompt_ids, SamplingParams(n=1, max_tokens=max_tokens, temperature=0.0))
    graded = grade(scorer, rollout.completions, rows, max_tokens)
    return greedy_metrics([r.status for r in graded.results], rollout.num_tokens)


def greedy_metrics(statuses: list[str], num_tokens: int) -> dict[str, float]:
    """eval/accuracy, eval/boxed_rate and eval/len_mean of one greedy answer per row (`statuses`: their grades)."""
    n = len(statuses)
    return {
        "eval/accuracy": sum(s == "correct" for s in statuses) / n,
        "eval/boxed_rate": sum(s != "no_answer" for s in statuses) / n,
        "eval/len_mean": num_tokens / n,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (1 <= k <= n). Computed as a product, not with binomials,
    so it stays exact-ish for large n: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def reported_ks(k: int) -> list[int]:
    """The j of pass@j reported for k samples: 1, 2, 4, ... below k, and k itself."""
    return sorted({2**e for e in range(k.bit_length()) if 2**e < k} | {k})


def sampled_metrics(correct: Sequence[Sequence[bool]], prefix: str = "eval/") -> dict[str, float]:
    """avg@k and pass@j (j in reported_ks(k)) over prompts; correct[i] = the grades of prompt i's k samples."""
    if not correct:
        return {}
    k = min(len(c) for c in correct)
    if k == 0 or any(len(c) != k for c in correct):
        raise ValueError("sampled_metrics needs the same number (>= 1) of samples for every prompt")
    counts = [sum(map(bool, c)) for c in correct]
    metrics = {f"{prefix}avg@{k}": sum(counts) / (k * len(counts))}
    for j in reported_ks(k):
        metrics[f"{prefix}pass@{j}"] = sum(pass_at_k(k, c, j) for c in counts) / len(counts)
    return metrics


def length_stats(lengths: Sequence[int], prefix: str = "eval/") -> dict[str, float]:
    """Mean, median, 90th percentile (nearest rank) and max of response lengths in tokens."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    rank = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {f"{prefix}len_mean": sum(ordered) / len(ordered), f"{prefix}len_p50": float(rank(0.5)),
            f"{prefix}len_p90": float(rank(0.9)), f"{prefix}len_max": float(ordered[-1])}


def sampled_accuracy(engine, prompt_ids: list[list[int]], rows: list[dict], scorer,
                     sampling: SamplingParams) -> dict[str, float]:
    """eval/avg@k and eval/pass@j of `sampling.n` samples per prompt, graded by the training reward.
    For periodic evaluation in the trainer, next to greedy_accuracy (whose keys it does not overlap)."""
    done = engine.generate(prompt_ids, sampling).completions
    graded = grade(scorer, done, [rows[c.prompt_index] for c in done], sampling.max_tokens)
    correct: list[list[bool]] = [[] for _ in prompt_ids]
    for c, result in zip(done, graded.results):
        correct[c.prompt_index].append(result.status == "correct")
    return sampled_metrics(correct)
