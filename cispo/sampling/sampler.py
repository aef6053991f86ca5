"""Where a step's samples come from: the `Sampler` generates, grades and gathers, and evaluates.

The trainer and the pipeline see rollouts only through this interface; weights reach the engines through a
rollout.base.WeightSink, never through the sampler. `EngineSampler` samples on any rollout engine: every rank's
in-process engine (vLLM or HF), each rank generating and grading a contiguous share of the prompts and the
episodes of all ranks gathered, so every rank holds the whole step; or rank 0's fleet of servers.

An `Episode` is one sampled response with its grade: a rollout.trajectory.Trajectory (a single-turn completion is
a one-turn trajectory), carrying its own prompt ids and the policy version of each token, stamped here from the
sink's served version. The trainer turns it into a loss sample (`episode_sample`). Reward and rollout metrics are
not computed here; the caller computes them once, over everything generated in a step
(cispo.sampling.dynamic.fill_batch).

With env.name set the trajectory has several turns (cispo.sampling.tool_rollouts.ToolRollouts): its score adds the
environment's rewards to the grade of its final answer, and only the model's tokens are loss tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from cispo.algo.batch import Sample, trajectory_sample
from cispo.config import Config
from cispo.data.prompts import encode_prompts
from cispo.eval_config import EvalConfig
from cispo.sampling.evaluation import grade, greedy_accuracy, greedy_metrics, sampled_accuracy, sampled_metrics
from cispo.sampling.tool_rollouts import Generated, ToolRollouts, sum_metrics, trajectory_metrics
from cispo.train.collective import Dist
from rewards import RewardResult, RewardScorer
from rollout.base import RolloutEngine, SamplingParams, WeightSink
from rollout.trajectory import Span, Trajectory


@dataclass
class Episode:
    """One sampled response and its grade."""

    prompt_index: int  # the prompt's index in the `sample` call that made it
    trajectory: Trajectory  # the response, with its own prompt ids (rollout.trajectory)
    result: RewardResult
    score: float  # what advantages are computed from: the grade's score, the overlong penalty, env rewards
    penalty: float  # the overlong penalty (<= 0)
    trainable: bool  # the response enters the loss (False: a masked truncation, or a row that cannot be graded)

    @property
    def version(self) -> int:
        """The oldest policy version among its tokens (cispo.sampling.pipeline)."""
        return self.trajectory.oldest_version

    def to_json(self) -> dict:
        """A JSON-able copy (a batch in flight goes into a checkpoint); a grader's `info` is kept as far as JSON
        can say it (numbers, strings, lists; anything else as its repr)."""
        d = asdict(self)
        d["result"]["info"] = json.loads(json.dumps(d["result"]["info"], default=_jsonable))
        return d

    @classmethod
    def from_json(cls, d: dict) -> Episode:
        t = d["trajectory"]
        trajectory = Trajectory(**(t | {"spans": [Span(**span) for span in t["spans"]]}))
        return cls(**(d | {"trajectory": trajectory, "result": RewardResult(**d["result"])}))


def _jsonable(value):
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
    return repr(value)


ROUND_STRIDE = 1_000_003  # a prime beyond any step count: rounds of dynamic sampling never share a seed


def call_seed(seed: int, step: int, round_index: int, rank: int, world_size: int) -> int:
    """The seed of one rank's `sample` call (rollout.seed = `seed`). The seeds below it derive from it in their
    own modules: sample j of prompt i in a call gets its own stream (rollout.base.prompt_seed), and turn t of a
    multi-turn call uses seed * env.max_turns + t (cispo.sampling.tool_rollouts, rollout.env.multiturn)."""
    return (seed + step) * world_size + rank + round_index * ROUND_STRIDE


def episode_sample(e: Episode, adv: float, group: int) -> Sample:
    """The loss sample of an episode: its trajectory under the trajectory's own prompt (the context the engine
    continued from), the model's tokens as loss tokens; none when the episode is not trainable."""
    return trajectory_sample(e.trajectory, adv, group, trainable=e.trainable)


@dataclass
class SampledBatch:
    """The result of one `Sampler.sample` call: every prompt's group, in prompt order."""

    num_prompts: int
    episodes: list[Episode]  # group_size per prompt, grouped, in prompt order
    group_size: int  # samples per prompt
    seconds: float  # generation wall time (the slowest rank's)
    reward_seconds: float  # grading wall time (the slowest rank's)
    env_seconds: float = 0.0  # multi-turn: wall time of the environment steps (the slowest rank's)
    metrics: dict[str, float] = field(default_factory=dict)  # multi-turn: tool/* counts and seconds, summed over ranks

    def groups(self) -> list[list[Episode]]:
        """The episodes of each prompt; ValueError when a prompt did not get exactly `group_size`."""
        out: list[list[Episode]] = [[] for _ in range(self.num_prompts)]
        for e in self.episodes:
            out[e.prompt_index].append(e)
        for i, group in enumerate(out):
            if len(group) != self.group_size:
                raise ValueError(f"prompt {i} got {len(group)} completions, expected {self.group_size}")
        return out


class Sampler(Protocol):
    multi_turn: bool  # the samples are tool trajectories (env.name set)

    def sample(self, rows: list[dict], *, step: int, round_index: int, max_tokens: int) -> SampledBatch:
        """A group of sampled and graded responses for each row (algo.group_size), on every rank (collective)."""
        ...

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """Held-out metrics of the current policy on `rows` (eval/*; collective)."""
        ...

    def sleep(self) -> None:
        """Free the engines' accelerator memory while the policy trains (a no-op where there is none)."""
        ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class EngineSampler:
    """Samples and grades on a rollout engine: one in-process engine per rank, each rank sampling and grading its
    share of the prompts (Dist.shard_range), the shares gathered; or rank 0 alone over the server fleet. Every
    episode is stamped with the policy version its engine serves (`sink.served_version`)."""

    def __init__(self, cfg: Config, engine: RolloutEngine, sink: WeightSink, scorer: RewardScorer, tokenizer,
                 dist: Dist):
        self.cfg, self.engine, self.sink, self.scorer, self.tokenizer, self.dist = (
            cfg, engine, sink, scorer, tokenizer, dist)
        self.tools = ToolRollouts(cfg, tokenizer) if cfg.env.name else None
        self.multi_turn = self.tools is not None

    def sample(self, rows: list[dict], *, step: int, round_index: int, max_tokens: int) -> SampledBatch:
        dist = self.dist
        lo, hi = dist.shard_range(len(rows))
        sampling = self.sampling(call_seed(self.cfg.rollout.seed, step, round_index, dist.rank, dist.world_size),
                                 max_tokens)
        made = self.generate(rows[lo:hi], sampling)
        episodes, reward_seconds = self.episodes(rows[lo:hi], made, max_tokens, first=lo)
        parts = dist.all_gather_object((episodes, made.seconds, reward_seconds, made.env_seconds, made.metrics))
        return SampledBatch(len(rows), [e for part in parts for e in part[0]], sampling.n, max(p[1] for p in parts),
                            max(p[2] for p in parts), max(p[3] for p in parts), sum_metrics([p[4] for p in parts]))

    def sampling(self, seed: int, max_tokens: int) -> SamplingParams:
        """A group of algo.group_size samples per prompt under the rollout settings, within `max_tokens`."""
        cfg = self.cfg
        return SamplingParams(n=cfg.algo.group_size, max_tokens=max_tokens, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, min_tokens=min(cfg.rollout.min_tokens, max_tokens), seed=seed)

    def episodes(self, rows: list[dict], made: Generated, max_tokens: int, first: int = 0) -> tuple[list[Episode], float]:
        """The episodes of `made` (n per row of `rows`, in order; prompt indices from `first`) and the grading's
        wall time."""
        n = len(made.trajectories) // max(len(rows), 1)
        budget = self.tools.limits.token_budget if self.tools else max_tokens  # of the overlong penalty
        graded = grade(self.scorer, made.trajectories, [rows[k // n] for k in range(len(made.trajectories))], budget)
        return [Episode(first + k // n, t, result, score + t.reward, penalty, trainable)
                for k, (t, result, score, penalty, trainable) in enumerate(zip(
                    made.trajectories, graded.results, graded.scores, graded.penalties, graded.trainable,
                    strict=True))], graded.metrics["reward/time_s"]

    def generate(self, rows: list[dict], sampling: SamplingParams) -> Generated:
        """The samples of `rows`, n per row, grouped: completions as one-turn trajectories, or multi-turn
        trajectories with env.name; every token stamped with the policy version that sampled it (the engine's
        per-token versions where it has them, else the version served when the call began). The server fleet
        takes calls from several threads at once."""
        version = self.sink.served_version  # an engine without per-token versions keeps one version per call
        if self.tools is not None:
            made = self.tools.generate(self.engine, rows, sampling)
            for t in made.trajectories:
                t.stamp(version)
            return made
        prompts = encode_prompts(self.tokenizer, rows, self.cfg.data)
        rollout = self.engine.generate(prompts, sampling)
        return Generated([Trajectory.single_turn(prompts[c.prompt_index], c, version) for c in rollout.completions],
                         rollout.seconds)

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """Greedy accuracy, and avg@k / pass@k of trainer.eval_k samples per prompt (M1's evaluation sampling,
        the defaults of cispo.eval_config.EvalConfig) when set; each rank evaluates its share (the metrics are
        means). With env.name set the samples are trajectories, graded on their final answers."""
        cfg, dist = self.cfg, self.dist
        lo, hi = dist.shard_range(len(rows))
        if self.tools is not None:
            return dist.mean(self._evaluate_tools(rows[lo:hi]), weight=hi - lo)
        prompts = encode_prompts(self.tokenizer, rows, cfg.data)
        metrics = greedy_accuracy(self.engine, prompts[lo:hi], rows[lo:hi], self.scorer, cfg.rollout.max_tokens)
        if cfg.trainer.eval_k:
            metrics |= sampled_accuracy(self.engine, prompts[lo:hi], rows[lo:hi], self.scorer, self._eval_sampling())
        return dist.mean(metrics, weight=hi - lo)

    def _eval_sampling(self) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(n=cfg.trainer.eval_k, max_tokens=cfg.rollout.max_tokens, seed=cfg.trainer.seed,
                              temperature=EvalConfig.temperature, top_p=EvalConfig.top_p)

    def _evaluate_tools(self, rows: list[dict]) -> dict[str, float]:
        """The greedy and sampled metrics of `evaluate` over trajectories, plus eval/turns and eval/tool_calls (per
        trajectory)."""
        cfg, budget = self.cfg, self.tools.limits.token_budget
        greedy = SamplingParams(n=1, max_tokens=cfg.rollout.max_tokens, temperature=0.0)
        made = self.tools.generate(self.engine, rows, greedy)
        statuses = [r.status for r in grade(self.scorer, made.trajectories, rows, budget).results]
        metrics = greedy_metrics(statuses, sum(len(t.token_ids) for t in made.trajectories)) | {
            "eval/turns": trajectory_metrics(made.trajectories)["rollout/turns"],
            "eval/tool_calls": made.metrics.get("tool/calls", 0.0) / len(rows)}
        if cfg.trainer.eval_k:
            k = cfg.trainer.eval_k
            made = self.tools.generate(self.engine, rows, self._eval_sampling())
            results = grade(self.scorer, made.trajectories, [rows[i // k] for i in range(len(made.trajectories))],
                            budget).results
            metrics |= sampled_metrics([[r.status == "correct" for r in results[i * k:(i + 1) * k]]
                                        for i in range(len(rows))])
        return metrics

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
