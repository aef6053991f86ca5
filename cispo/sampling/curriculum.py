"""What to train on as training goes on: the staged output window, dynamic sampling and prompt retirement.

Pure bookkeeping (no model, no engine); the trainer calls it once per step. Each piece keeps a JSON-able
state_dict, so a resumed run continues with the same window, the same pass-rate history and the same retired
prompts.

- OutputWindow (MiniMax-M1 §5): the response budget grows in stages, 40k -> 48k -> ... -> 80k in M1, and moves on
  once the 99th percentile of response length approaches the current window (M1 also waited for the perplexity
  of generated text to converge; we use the length signal only).
- fill_batch (DAPO dynamic sampling, Yu et al. 2025 §3.2; ScaleRL zero-variance filtering): groups whose rewards
  are all equal carry no gradient; generate more prompts until the batch holds prompts_per_step informative
  groups, or until curriculum.sample_rounds rounds have run.
- PassRateTracker (ScaleRL "no-positive-resampling"): a prompt whose pass rate over all its samples so far
  reaches curriculum.retire_pass_rate (ScaleRL: 0.9) is never sampled again (PromptStream.retire).
- Curriculum: the three together, as the trainer uses them.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from cispo.config import ConfigError, CurriculumConfig
from cispo.sampling.tool_rollouts import sum_metrics, trajectory_metrics
from cispo.sampling.sampler import Episode, Sampler
from rewards.scorer import batch_metrics
from rollout.base import Rollout
from rollout.metrics import SINGLE_TURN_ADVICE, TRAJECTORY_ADVICE, rollout_metrics


class OutputWindow:
    """The staged response budget. `max_tokens` is the current window; `update(len_p99)` after each step."""

    def __init__(self, windows: list[int], threshold: float, patience: int):
        self.windows, self.threshold, self.patience = list(windows), threshold, patience
        self.stage = 0  # index into windows
        self.near = 0  # consecutive steps with len_p99 >= threshold * window

    @classmethod
    def from_config(cls, cfg: CurriculumConfig, max_tokens: int) -> OutputWindow:
        """curriculum.windows, or the one window rollout.max_tokens; the last window must fit rollout.max_tokens
        (the engine's max_model_len is sized for it)."""
        windows = list(cfg.windows) or [max_tokens]
        if windows[-1] > max_tokens:
            raise ConfigError(f"curriculum.windows ends at {windows[-1]} tokens, beyond rollout.max_tokens "
                              f"({max_tokens}); raise rollout.max_tokens (and rollout.max_model_len) to the last window")
        return cls(windows, cfg.window_threshold, cfg.window_patience)

    @property
    def max_tokens(self) -> int:
        return self.windows[self.stage]

    @property
    def last(self) -> bool:
        return self.stage == len(self.windows) - 1

    def update(self, len_p99: float) -> bool:
        """Record one step's p99 response length; True when that moved the window to the next stage."""
        if self.last:
            return False
        self.near = self.near + 1 if len_p99 >= self.threshold * self.max_tokens else 0
        if self.near < self.patience:
            return False
        self.stage, self.near = self.stage + 1, 0
        return True

    def metrics(self) -> dict[str, float]:
        return {"curriculum/window": float(self.max_tokens), "curriculum/window_stage": float(self.stage)}

    def state_dict(self) -> dict:
        return {"windows": self.windows, "stage": self.stage, "near": self.near}

    def load_state_dict(self, state: dict) -> None:
        if state["windows"] != self.windows:
            raise ConfigError(f"curriculum.windows {self.windows} differ from the resumed run's {state['windows']}")
        self.stage, self.near = state["stage"], state["near"]


class PassRateTracker:
    """Running pass rate per prompt id: correct samples / samples, over every group generated for it."""

    def __init__(self, threshold: float | None):
        self.threshold = threshold
        self.counts: dict[str, list[int]] = {}  # id -> [correct, total]

    def update(self, groups: list[GroupOutcome]) -> list[str]:
        """Add one step's groups (a prompt may have several); the ids whose pass rate now reaches the threshold
        for the first time (retire them)."""
        before = {g.id: self.reached(g.id) for g in groups}
        for g in groups:
            c = self.counts.setdefault(g.id, [0, 0])
            c[0] += g.correct
            c[1] += g.total
        return [pid for pid, was in before.items() if not was and self.reached(pid)]

    def reached(self, prompt_id: str) -> bool:
        rate = self.pass_rate(prompt_id)
        return self.threshold is not None and rate is not None and rate >= self.threshold

    def pass_rate(self, prompt_id: str) -> float | None:
        c = self.counts.get(prompt_id)
        return c[0] / c[1] if c and c[1] else None

    def state_dict(self) -> dict:
        return {"counts": {k: list(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counts = {k: list(v) for k, v in state["counts"].items()}


# ---- dynamic sampling ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupOutcome:
    """One generated group: its prompt's id and how many of its `total` samples were graded "correct"."""

    id: str
    correct: int
    total: int


@dataclass
class FilledBatch:
    """What fill_batch returns: the kept groups.

    rows, prompts: the kept prompts; groups[i] holds prompt i's group_size episodes (cispo.sampling.sampler.Episode).
    metrics: rollout/* and reward/* over EVERY episode generated this step (the policy's real lengths and
        accuracy; the kept groups are a biased subset), plus sampling/rounds, sampling/prompts (generated),
        sampling/informative_frac (of generated groups), sampling/kept (groups), sampling/filled (1 when the
        batch reached prompts_per_step informative groups); multi-turn: rollout/turns, rollout/finish/*, tool/*,
        time/generate_s and time/tool_s (cispo.sampling.tool_rollouts).
    outcomes: every generated group's outcome, for PassRateTracker.
    """

    rows: list[dict]
    prompts: list[list[int]]
    groups: list[list[Episode]]
    metrics: dict[str, float]
    outcomes: list[GroupOutcome]


def fill_batch(take: Callable[[int], list[dict]], sampler: Sampler, *, step: int, max_tokens: int, target: int,
               max_rounds: int) -> FilledBatch:
    """Generate and grade rounds of prompts until `target` groups have unequal rewards (DAPO dynamic sampling).

    take(n): the next n prompt rows (PromptStream.take). Round r calls sampler.sample(rows, step=step,
    round_index=r, max_tokens=max_tokens). max_rounds == 1: one round of `target` prompts, every group kept
    (zero-variance ones included: the trainer's algo.drop_zero_variance decides). max_rounds > 1: only informative
    groups are kept, the first `target` of them; later rounds ask for about as many prompts as the informative
    rate so far says are missing (at least the deficit, at most `target`). A batch still short after max_rounds is
    returned short."""
    keep_all = max_rounds == 1
    kept: list[tuple[dict, list[int], list[Episode]]] = []  # (row, prompt, episodes)
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
        generated += [(rows[e.completion.prompt_index], e) for e in batch.episodes]
        for row, prompt, group in zip(rows, batch.prompts, batch.groups(), strict=True):
            useful = len(set(array("f", [e.score for e in group]))) > 1  # unequal in float32, as advantages compare
            informative += useful
            outcomes.append(GroupOutcome(row["id"], sum(e.result.status == "correct" for e in group), len(group)))
            if (keep_all or useful) and len(kept) < target:
                kept.append((row, prompt, group))
    return FilledBatch([r for r, _, _ in kept], [p for _, p, _ in kept], [g for _, _, g in kept],
                       step_metrics(generated, seconds, reward_seconds, env_seconds) | sum_metrics(env_metrics) | {
                           "sampling/rounds": float(rounds), "sampling/prompts": float(len(outcomes)),
                           "sampling/informative_frac": informative / len(outcomes) if outcomes else 0.0,
                           "sampling/kept": float(len(kept)), "sampling/filled": float(len(kept) >= target)},
                       outcomes)


def step_metrics(generated: list[tuple[dict, Episode]], seconds: float, reward_seconds: float,
                 env_seconds: float = 0.0) -> dict[str, float]:
    """rollout/* and reward/* over (row, episode) pairs: computed once per step, over every round. Multi-turn
    episodes add the trajectory metrics (cispo.sampling.tool_rollouts.trajectory_metrics) and the step's generation time against
    its environment time (time/generate_s, time/tool_s)."""
    episodes = [e for _, e in generated]
    completions = [e.completion for e in episodes]
    trajectories = [e.trajectory for e in episodes if e.trajectory is not None]
    turns = trajectory_metrics(trajectories) | ({"time/generate_s": seconds, "time/tool_s": env_seconds}
                                                if trajectories else {})
    advice = TRAJECTORY_ADVICE if trajectories else SINGLE_TURN_ADVICE
    return rollout_metrics(Rollout(completions, seconds), advice=advice) | batch_metrics(
        [e.result for e in episodes], [row for row, _ in generated], [e.score for e in episodes],
        [e.penalty for e in episodes], [e.trainable for e in episodes],
        [c.finish_reason == "length" for c in completions], reward_seconds) | turns


# ---- all of it -------------------------------------------------------------------------------------------------


class Curriculum:
    """The window, dynamic sampling and retirement of one run (curriculum.* config).

    Per step: `fill(sampler, step, target)` samples the batch under the current window, and after the
    update `update(filled)` logs the window that step used, moves the window and retires solved prompts from the
    stream."""

    def __init__(self, cfg: CurriculumConfig, stream, max_tokens: int):
        self.cfg, self.stream = cfg, stream
        self.window = OutputWindow.from_config(cfg, max_tokens)
        self.pass_rates = PassRateTracker(cfg.retire_pass_rate)
        self.lock = threading.Lock()  # fill may run in a producer thread while the trainer calls update (cispo.sampling.pipeline)

    @property
    def max_tokens(self) -> int:
        return self.window.max_tokens

    def fill(self, sampler: Sampler, step: int, target: int) -> FilledBatch:
        with self.lock:
            max_tokens = self.max_tokens
        return fill_batch(self._take, sampler, step=step, max_tokens=max_tokens, target=target,
                          max_rounds=self.cfg.sample_rounds)

    def _take(self, n: int) -> list[dict]:
        with self.lock:
            return self.stream.take(n)

    def update(self, filled: FilledBatch) -> dict[str, float]:
        """curriculum/window (the window this step used), curriculum/window_stage, curriculum/window_advanced,
        curriculum/retired (prompts retired so far), curriculum/retired_new."""
        with self.lock:
            return self._update(filled)

    def _update(self, filled: FilledBatch) -> dict[str, float]:
        metrics = self.window.metrics()
        metrics["curriculum/window_advanced"] = float(self.window.update(filled.metrics["rollout/len_p99"]))
        retired = self.pass_rates.update(filled.outcomes)
        self.stream.retire(retired)
        metrics |= {"curriculum/retired": float(len(self.stream.retired)), "curriculum/retired_new": float(len(retired))}
        return metrics

    def state_dict(self) -> dict:
        """The window and the pass rates; the stream (with its retired ids) keeps its own state_dict."""
        return {"window": self.window.state_dict(), "pass_rates": self.pass_rates.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state["window"])
        self.pass_rates.load_state_dict(state["pass_rates"])
