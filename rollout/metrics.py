"""Rollout metrics, engine-independent: computed from a rollout.base.Rollout (any engine), logged every step.

Pure: imports nothing beyond rollout.base and the standard library.
"""

from __future__ import annotations

import logging

from rollout.base import Rollout

logger = logging.getLogger(__name__)

# ScaleRL saw training become unstable once more than 10-15% of responses were truncated at the budget.
TRUNCATION_WARN = 0.10
SINGLE_TURN_ADVICE = "raise rollout.max_tokens or move to the next output window (configs/rollout/m1_*)"
TRAJECTORY_ADVICE = "raise env.token_budget (the whole trajectory) or rollout.max_tokens (one turn)"


def _quantile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def rollout_metrics(rollout: Rollout, *, truncation_warn: float = TRUNCATION_WARN,
                    advice: str = SINGLE_TURN_ADVICE) -> dict[str, float]:
    """Throughput, response-length distribution and how responses ended (`advice`: what the truncation warning
    tells the user to change, naming the knobs that cut these responses).

    rollout/tokens_per_s       generated tokens / wall-clock seconds of the generate call
    rollout/len_mean, len_p50, len_p99, len_max   response length in tokens (EOS included)
    rollout/truncation_rate    fraction that hit the token budget (finish_reason "length")
    rollout/early_stop_rate    fraction halted by the repetition early stop (finish_reason "early_stop")

    Logs a warning when truncation_rate > truncation_warn (M1 advanced its output window when the p99 length
    neared it; ScaleRL saw instability past 10-15% truncation).
    """
    lengths = sorted(len(c.token_ids) for c in rollout.completions)
    count = len(lengths)
    if count == 0:
        return {
            "rollout/tokens_per_s": 0.0, "rollout/len_mean": 0.0, "rollout/len_p50": 0.0, "rollout/len_p99": 0.0,
            "rollout/len_max": 0.0, "rollout/truncation_rate": 0.0, "rollout/early_stop_rate": 0.0,
        }
    reasons = [c.finish_reason for c in rollout.completions]
    total = sum(lengths)
    metrics = {
        "rollout/tokens_per_s": total / rollout.seconds if rollout.seconds > 0 else 0.0,
        "rollout/len_mean": total / count,
        "rollout/len_p50": float(_quantile(lengths, 0.50)),
        "rollout/len_p99": float(_quantile(lengths, 0.99)),
        "rollout/len_max": float(lengths[-1]),
        "rollout/truncation_rate": reasons.count("length") / count,
        "rollout/early_stop_rate": reasons.count("early_stop") / count,
    }
    if metrics["rollout/truncation_rate"] > truncation_warn:
        logger.warning(
            "%.0f%% of responses hit their token budget: above %.0f%% training tends to become unstable (ScaleRL); "
            "%s", 100 * metrics["rollout/truncation_rate"], 100 * truncation_warn, advice,
        )
    return metrics
