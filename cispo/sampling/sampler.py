"""Where a step's samples come from: the `Sampler` generates, grades and gathers, evaluates, and takes new weights.

The trainer and the curriculum see rollouts only through this interface. `ColocatedSampler` is the default: every
rank owns one in-process rollout engine (vLLM or HF), generates and grades a contiguous share of the prompts, and
the episodes of all ranks are gathered, so every rank holds the whole step. A sampler fed by a fleet of servers,
or one that returns samples of an older policy while the trainer updates, is another class with the same methods.

An `Episode` is one sampled response with its grade: what the trainer turns into a loss sample (`episode_sample`).
Reward and rollout metrics are not computed here; the caller computes them once, over everything generated in a
step (cispo.sampling.curriculum.fill_batch).

With env.name set, each sample is a multi-turn trajectory (cispo.sampling.tool_rollouts.ToolRollouts): the episode carries it,
its score adds the environment's rewards to the grade of its final answer, and its loss sample has the loss mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from cispo.algo.batch import Sample, trajectory_sample
from cispo.train.collective import Dist
from cispo.config import Config
from cispo.data.prompts import encode_prompts
from cispo.sampling.evaluation import grade, greedy_accuracy, greedy_metrics, sampled_accuracy, sampled_metrics
from cispo.sampling.tool_rollouts import Generated, ToolRollouts, sum_metrics, trajectory_metrics
from rewards import RewardResult, RewardScorer
from rollout.base import Completion, RolloutEngine, SamplingParams
from rollout.trajectory import Trajectory


@dataclass
class Episode:
    """One sampled response and its grade."""

    completion: Completion  # completion.prompt_index: the prompt's index in the `sample` call that made it
    result: RewardResult
    score: float  # what advantages are computed from: the grade's score plus the overlong penalty
    penalty: float  # the overlong penalty (<= 0)
    trainable: bool  # enters the loss (False: a masked truncation, or a row that cannot be graded)
    version: int = 0  # the policy that generated it: RL steps trained before (cispo.sampling.pipeline)
    trajectory: Trajectory | None = None  # env.name set: the multi-turn trajectory (completion holds it flattened)


def episode_sample(e: Episode, prompt_ids: list[int], adv: float, group: int) -> Sample:
    """The loss sample of an episode: a completion's leading loss tokens, or a trajectory's model tokens (its loss
    mask); no loss tokens when the episode is not trainable."""
    if e.trajectory is not None:
        s = trajectory_sample(e.trajectory, prompt_ids, adv, group)
        return s if e.trainable else replace(s, loss_len=0, rollout_logp=torch.zeros(0))
    n = e.completion.loss_tokens if e.trainable else 0
    return Sample(prompt_ids, e.completion.token_ids, n, torch.tensor(e.completion.logprobs[:n], dtype=torch.float32),
                  adv, group)


@dataclass
class SampledBatch:
    """The result of one `Sampler.sample` call: every prompt's group, in prompt order."""

    prompts: list[list[int]]  # token ids of each row's prompt (chat template applied)
    episodes: list[Episode]  # group_size per prompt, grouped, in prompt order
    group_size: int  # samples per prompt
    seconds: float  # generation wall time (the slowest rank's)
    reward_seconds: float  # grading wall time (the slowest rank's)
    env_seconds: float = 0.0  # multi-turn: wall time of the environment steps (the slowest rank's)
    metrics: dict[str, float] = field(default_factory=dict)  # multi-turn: tool/* counts and seconds, summed over ranks

    def groups(self) -> list[list[Episode]]:
        """The episodes of each prompt; ValueError when a prompt did not get exactly `group_size`."""
        out: list[list[Episode]] = [[] for _ in self.prompts]
        for e in self.episodes:
            out[e.completion.prompt_index].append(e)
        for i, group in enumerate(out):
            if len(group) != self.group_size:
                raise ValueError(f"prompt {i} got {len(group)} completions, expected {self.group_size}")
        return out


class Sampler(Protocol):
    def sample(self, rows: list[dict], *, step: int, round_index: int, max_tokens: int) -> SampledBatch:
        """A group of sampled and graded responses for each row (algo.group_size), on every rank (collective)."""
        ...

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """Held-out metrics of the current policy on `rows` (eval/*; collective)."""
        ...

    def push_weights(self, updater) -> None:
        """Send the updater's weights (cispo.train.optim.Updater.named_weights) to the engines (collective)."""
        ...

    def sleep(self) -> None:
        """Free the engines' accelerator memory while the policy trains (a no-op where there is none)."""
        ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class ColocatedSampler:
    """One rollout engine per rank, in the trainer's process; each rank samples and grades its share of the
    prompts (Dist.shard_range) and the shares are gathered."""

    def __init__(self, cfg: Config, engine: RolloutEngine, scorer: RewardScorer, tokenizer, dist: Dist):
        self.cfg, self.engine, self.scorer, self.tokenizer, self.dist = cfg, engine, scorer, tokenizer, dist
        self.tools = ToolRollouts(cfg, tokenizer) if cfg.env.name else None

    def sample(self, rows: list[dict], *, step: int, round_index: int, max_tokens: int) -> SampledBatch:
        cfg, dist = self.cfg, self.dist
        lo, hi = dist.shard_range(len(rows))
        sampling = SamplingParams(
            n=cfg.algo.group_size, max_tokens=max_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, min_tokens=min(cfg.rollout.min_tokens, max_tokens),
            seed=(cfg.rollout.seed + step) * dist.world_size + dist.rank + round_index * 1_000_003,
        )
        prompts, made = self._generate(rows, lo, hi, sampling)
        budget = self.tools.limits.token_budget if self.tools else max_tokens  # of the overlong penalty
        graded = grade(self.scorer, made.completions, rows[lo:hi], budget)
        trajectories = made.trajectories or [None] * len(made.completions)
        episodes = [Episode(replace(c, prompt_index=c.prompt_index + lo), result, score + (t.reward if t else 0.0),
                            penalty, trainable, trajectory=t)
                    for c, t, result, score, penalty, trainable in zip(
                        made.completions, trajectories, graded.results, graded.scores, graded.penalties,
                        graded.loss_mask, strict=True)]
        parts = dist.all_gather_object((episodes, made.seconds, graded.metrics["reward/time_s"], made.env_seconds,
                                        made.metrics))
        return SampledBatch(prompts, [e for part in parts for e in part[0]], sampling.n, max(p[1] for p in parts),
                            max(p[2] for p in parts), max(p[3] for p in parts), sum_metrics([p[4] for p in parts]))

    def _generate(self, rows: list[dict], lo: int, hi: int, sampling: SamplingParams
                  ) -> tuple[list[list[int]], Generated]:
        """Every row's prompt ids, and the samples of rows[lo:hi]: completions, or trajectories with env.name."""
        if self.tools is not None:
            return self.tools.prompts(rows), self.tools.generate(self.engine, rows[lo:hi], sampling)
        prompts = encode_prompts(self.tokenizer, rows, self.cfg.data)
        rollout = self.engine.generate(prompts[lo:hi], sampling)
        return prompts, Generated(rollout.completions, rollout.seconds)

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """Greedy accuracy, and avg@k / pass@k of trainer.eval_k samples per prompt (M1's evaluation sampling:
        temperature 1.0, top_p 0.95) when set; each rank evaluates its share (the metrics are means). With
        env.name set the samples are trajectories, graded on their final answers (`_evaluate_tools`)."""
        cfg, dist = self.cfg, self.dist
        lo, hi = dist.shard_range(len(rows))
        if self.tools is not None:
            return dist.mean(self._evaluate_tools(rows[lo:hi]), weight=hi - lo)
        prompts = encode_prompts(self.tokenizer, rows, cfg.data)
        metrics = greedy_accuracy(self.engine, prompts[lo:hi], rows[lo:hi], self.scorer, cfg.rollout.max_tokens)
        if cfg.trainer.eval_k:
            sampling = SamplingParams(n=cfg.trainer.eval_k, max_tokens=cfg.rollout.max_tokens, temperature=1.0,
                                      top_p=0.95, seed=cfg.trainer.seed)
            metrics |= sampled_accuracy(self.engine, prompts[lo:hi], rows[lo:hi], self.scorer, sampling)
        return dist.mean(metrics, weight=hi - lo)

    def _evaluate_tools(self, rows: list[dict]) -> dict[str, float]:
        """The greedy and sampled metrics of `evaluate` over greedy trajectories, plus eval/turns and
        eval/tool_calls (per trajectory)."""
        cfg, budget = self.cfg, self.tools.limits.token_budget
        greedy = SamplingParams(n=1, max_tokens=cfg.rollout.max_tokens, temperature=0.0)
        made = self.tools.generate(self.engine, rows, greedy)
        statuses = [r.status for r in grade(self.scorer, made.completions, rows, budget).results]
        metrics = greedy_metrics(statuses, sum(len(c.token_ids) for c in made.completions)) | {
            "eval/turns": trajectory_metrics(made.trajectories)["rollout/turns"],
            "eval/tool_calls": made.metrics.get("tool/calls", 0.0) / len(rows)}
        if cfg.trainer.eval_k:
            k = cfg.trainer.eval_k
            made = self.tools.generate(self.engine, rows, SamplingParams(
                n=k, max_tokens=cfg.rollout.max_tokens, temperature=1.0, top_p=0.95, seed=cfg.trainer.seed))
            results = grade(self.scorer, made.completions, rows, budget).results
            metrics |= sampled_metrics([[r.status == "correct" for r in results[i * k:(i + 1) * k]]
                                        for i in range(len(rows))])
        return metrics

    def push_weights(self, updater) -> None:
        feed_weights(updater, self.engine.load_weights)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        if self.tools is not None:
            self.tools.close()
        self.engine.close()


def feed_weights(updater, consume: Callable[[Iterable[tuple[str, torch.Tensor]]], object] | None) -> None:
    """Hand `updater.named_weights()` to `consume` (None: this rank only takes part). Under ZeRO-3 the gathers
    are collective, so the iterator is drained even if `consume` stopped early or there is none (its own error
    then surfaces instead of a hang on the other ranks)."""
    weights = updater.named_weights()
    try:
        if consume is not None:
            consume(weights)
    finally:
        for _ in weights:
            pass
