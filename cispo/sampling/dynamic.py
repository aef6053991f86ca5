"""Dynamic sampling (DAPO, Yu et al. 2025 §3.2; ScaleRL zero-variance filtering): groups whose rewards are all
equal carry no gradient; generate more prompts until the batch holds prompts_per_step informative groups, or until
curriculum.sample_rounds rounds have run. The result, `FilledBatch`, is what one step trains on, and the step's
rollout/* and reward/* metrics are computed here once, over everything generated.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cispo.sampling.curriculum import Curriculum, GroupOutcome
from cispo.sampling.sampler import Episode, Sampler
from cispo.sampling.tool_rollouts import sum_metrics, trajectory_metrics
from rewards.scorer import batch_metrics
from rollout.base import Rollout
from rollout.metrics import SINGLE_TURN_ADVICE, TRAJECTORY_ADVICE, rollout_metrics


def fill(curriculum: Curriculum, sampler: Sampler, step: int, target: int) -> FilledBatch:
    """The batch of `step` under the curriculum's current window, its prompts taken from its stream."""
    return fill_batch(curriculum.take, sampler, step=step, max_tokens=curriculum.max_tokens, target=target,
                      max_rounds=curriculum.cfg.sample_rounds, multi_turn=sampler.multi_turn)


@dataclass
class FilledBatch:
    """What fill_batch returns: the kept groups.

    rows: the kept prompts; groups[i] holds prompt i's group_size episodes (cispo.sampling.sampler.Episode), each
        with its own prompt ids.
    metrics: rollout/* and reward/* over EVERY episode generated this step (the policy's real lengths and
        accuracy; the kept groups are a biased subset), plus sampling/rounds, sampling/prompts (generated),
        sampling/informative_frac (of generated groups), sampling/kept (groups), sampling/filled (1 when the
        batch reached prompts_per_step informative groups); multi-turn: rollout/turns, rollout/finish/*, tool/*,
        time/generate_s and time/tool_s (cispo.sampling.tool_rollouts).
    outcomes: every generated group's outcome, for PassRateTracker.
    """

    rows: list[dict]
    groups: list[list[Episode]]
    metrics: dict[str, float]
    outcomes: list[GroupOutcome]

    def to_json(self) -> dict:
        return {"rows": self.rows, "groups": [[e.to_json() for e in group] for group in self.groups],
                "metrics": self.metrics, "outcomes": [asdict(o) for o in self.outcomes]}

    @classmethod
    def from_json(cls, d: dict) -> FilledBatch:
        return cls(d["rows"], [[Episode.from_json(e) for e in group] for group in d["groups"]], d["metrics"],
                   [GroupOutcome(**o) for o in d["outcomes"]])


def fill_batch(take: Callable[[int], list[dict]], sampler: Sampler, *, step: int, max_tokens: int, target: int,
               max_rounds: int, multi_turn: bool = False) -> FilledBatch:
    """Generate and grade rounds of prompts until `target` groups have unequal rewards (DAPO dynamic sampling).

    take(n): the next n prompt rows (PromptStream.take). Round r calls sampler.sample(rows, step=step,
    round_index=r, max_tokens=max_tokens). max_rounds == 1: one round of `target` prompts, every group kept
    (zero-variance ones included: the trainer's algo.drop_zero_variance decides). max_rounds > 1: only informative
    groups are kept, the first `target` of them; later rounds ask for about as many prompts as the informative
    rate so far says are missing (at least the deficit, at most `target`). A batch still short after max_rounds is
    returned short. `multi_turn`: the samples are tool trajectories (their metrics and truncation advice)."""
    keep_all = max_rounds == 1
    kept: list[tuple[dict, list[Episode]]] = []  # (row, episodes)
    generated: list[tuple[dict, Episode]] = []  # every episode of the step, with its row
    outcomes: list[GroupOutcome] = []
    seconds = reward_seconds = env_seconds = 0.0
    env_metrics: list[dict[str, float]] = []
    rounds = informative = 0
    while rounds < max_rounds and len(kept) < target:
        need = target - len(kept)
        rate = informative / len(outcomes) if outcomes else 1.0
        n = target if rounds == 0 else min(target, max(need, math.ceil(need / rate) if rate > 0 else target))
        rows = take(n)
        batch = sampler.sample(rows, step=step, round_index=rounds, max_tokens=max_tokens)
        rounds += 1
        seconds += batch.seconds
        reward_seconds += batch.reward_seconds
        env_seconds += batch.env_seconds
        env_metrics.append(batch.metrics)
        generated += [(rows[e.prompt_index], e) for e in batch.episodes]
        for row, group in zip(rows, batch.groups(), strict=True):
            useful = len(set(array("f", [e.score for e in group]))) > 1  # unequal in float32, as advantages compare
            informative += useful
            outcomes.append(GroupOutcome(row["id"], sum(e.result.status == "correct" for e in group), len(group)))
            if (keep_all or useful) and len(kept) < target:
                kept.append((row, group))
    return FilledBatch([r for r, _ in kept], [g for _, g in kept],
                       step_metrics(generated, seconds, reward_seconds, env_seconds, multi_turn) | sum_metrics(env_metrics) | {
                           "sampling/rounds": float(rounds), "sampling/prompts": float(len(outcomes)),
                           "sampling/informative_frac": informative / len(outcomes) if outcomes else 0.0,
                           "sampling/kept": float(len(kept)), "sampling/filled": float(len(kept) >= target)},
                       outcomes)


def step_metrics(generated: list[tuple[dict, Episode]], seconds: float, reward_seconds: float,
                 env_seconds: float = 0.0, multi_turn: bool = False) -> dict[str, float]:
    """rollout/* and reward/* over (row, episode) pairs: computed once per step, over every round. Multi-turn
    episodes add the trajectory metrics (cispo.sampling.tool_rollouts.trajectory_metrics) and the step's generation time against
    its environment time (time/generate_s, time/tool_s)."""
    episodes = [e for _, e in generated]
    trajectories = [e.trajectory for e in episodes]
    turns = trajectory_metrics(trajectories) | {"time/generate_s": seconds, "time/tool_s": env_seconds} if multi_turn \
        else {}
    advice = TRAJECTORY_ADVICE if multi_turn else SINGLE_TURN_ADVICE
    return rollout_metrics(Rollout(trajectories, seconds), advice=advice) | batch_metrics(
        [e.result for e in episodes], [row for row, _ in generated], [e.score for e in episodes],
        [e.penalty for e in episodes], [e.trainable for e in episodes],
        [t.finish_reason == "length" for t in trajectories], reward_seconds) | turns
