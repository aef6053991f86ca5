"""Where a step's samples come from: the `Sampler` generates, grades and gathers, evaluates, and takes new weights.

The trainer and the curriculum see rollouts only through this interface. `ColocatedSampler` is the default: every
rank owns one in-process rollout engine (vLLM or HF), generates and grades a contiguous share of the prompts, and
the episodes of all ranks are gathered, so every rank holds the whole step. A sampler fed by a fleet of servers,
or one that returns samples of an older policy while the trainer updates, is another class with the same methods.

An `Episode` is one sampled response with its grade: what the trainer turns into a loss sample. Reward and
rollout metrics are not computed here; the caller computes them once, over everything generated in a step
(cispo.curriculum.fill_batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from cispo.collective import Dist
from cispo.config import Config
from cispo.data import encode_prompts
from cispo.evaluation import grade, greedy_accuracy, sampled_accuracy
from rewards import RewardResult, RewardScorer
from rollout.base import Completion, RolloutEngine, SamplingParams


@dataclass
class Episode:
    """One sampled response and its grade."""

    completion: Completion  # completion.prompt_index: the prompt's index in the `sample` call that made it
    result: RewardResult
    score: float  # what advantages are computed from: the grade's score plus the overlong penalty
    penalty: float  # the overlong penalty (<= 0)
    trainable: bool  # enters the loss (False: a masked truncation, or a row that cannot be graded)
    version: int = 0  # the policy that generated it: RL steps trained before (cispo.pipeline)


@dataclass
class SampledBatch:
    """The result of one `Sampler.sample` call: every prompt's group, in prompt order."""

    prompts: list[list[int]]  # token ids of each row's prompt (chat template applied)
    episodes: list[Episode]  # group_size per prompt, grouped, in prompt order
    group_size: int  # samples per prompt
    seconds: float  # generation wall time (the slowest rank's)
    reward_seconds: float  # grading wall time (the slowest rank's)

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
        """Send the updater's weights (cispo.optim.Updater.named_weights) to the engines (collective)."""
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

    def sample(self, rows: list[dict], *, step: int, round_index: int, max_tokens: int) -> SampledBatch:
        cfg, dist = self.cfg, self.dist
        prompts = encode_prompts(self.tokenizer, rows, cfg.data)
        lo, hi = dist.shard_range(len(prompts))
        sampling = SamplingParams(
            n=cfg.algo.group_size, max_tokens=max_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            seed=(cfg.rollout.seed + step) * dist.world_size + dist.rank + round_index * 1_000_003,
        )
        rollout = self.engine.generate(prompts[lo:hi], sampling)
        graded = grade(self.scorer, rollout.completions, rows[lo:hi], max_tokens)
        episodes = [Episode(replace(c, prompt_index=c.prompt_index + lo), *graded_one)
                    for c, *graded_one in zip(rollout.completions, graded.results, graded.scores, graded.penalties,
                                              graded.loss_mask, strict=True)]
        parts = dist.all_gather_object((episodes, rollout.seconds, graded.metrics["reward/time_s"]))
        return SampledBatch(prompts, [e for part in parts for e in part[0]], sampling.n, max(p[1] for p in parts),
                            max(p[2] for p in parts))

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """Greedy accuracy, and avg@k / pass@k of trainer.eval_k samples per prompt (M1's evaluation sampling:
        temperature 1.0, top_p 0.95) when set; each rank evaluates its share (the metrics are means)."""
        cfg, dist = self.cfg, self.dist
        prompts = encode_prompts(self.tokenizer, rows, cfg.data)
        lo, hi = dist.shard_range(len(prompts))
        metrics = greedy_accuracy(self.engine, prompts[lo:hi], rows[lo:hi], self.scorer, cfg.rollout.max_tokens)
        if cfg.trainer.eval_k:
            sampling = SamplingParams(n=cfg.trainer.eval_k, max_tokens=cfg.rollout.max_tokens, temperature=1.0,
                                      top_p=0.95, seed=cfg.trainer.seed)
            metrics |= sampled_accuracy(self.engine, prompts[lo:hi], rows[lo:hi], self.scorer, sampling)
        return dist.mean(metrics, weight=hi - lo)

    def push_weights(self, updater) -> None:
        feed_weights(updater, self.engine.load_weights)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
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
