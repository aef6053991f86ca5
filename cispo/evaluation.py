"""Held-out accuracy with fixed (greedy) decoding, graded by the training reward."""

from __future__ import annotations

from rollout.base import SamplingParams


def greedy_accuracy(engine, prompt_ids: list[list[int]], rows: list[dict], scorer, max_tokens: int) -> dict[str, float]:
    """eval/accuracy: share graded correct; eval/boxed_rate: share with a parseable final answer."""
    rollout = engine.generate(prompt_ids, SamplingParams(n=1, max_tokens=max_tokens, temperature=0.0))
    graded = scorer.score([c.text for c in rollout.completions], rows)
    statuses = [r.status for r in graded.results]
    n = len(statuses)
    return {
        "eval/accuracy": sum(s == "correct" for s in statuses) / n,
        "eval/boxed_rate": sum(s != "no_answer" for s in statuses) / n,
        "eval/len_mean": rollout.num_tokens / n,
    }
