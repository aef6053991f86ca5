"""What to train on as training goes on: the staged output window and prompt retirement.

Pure bookkeeping (no model, no engine); the trainer calls it once per step, and dynamic sampling
(cispo.sampling.dynamic) takes its prompts and window from it. Each piece keeps a JSON-able state_dict, so a resumed
run continues with the same window, the same pass-rate history and the same retired prompts.

- OutputWindow (MiniMax-M1 §5): the response budget grows in stages, 40k -> 48k -> ... -> 80k in M1, and moves on
  once the 99th percentile of response length approaches the current window (M1 also waited for the perplexity
  of generated text to converge; we use the length signal only).
- PassRateTracker (ScaleRL "no-positive-resampling"): a prompt whose pass rate over all its samples so far
  reaches curriculum.retire_pass_rate (ScaleRL: 0.9) is never sampled again (PromptStream.retire).
- Curriculum: the two together with the prompt stream, as the trainer uses them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cispo.config import ConfigError, CurriculumConfig


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


@dataclass(frozen=True)
class GroupOutcome:
    """One generated group: its prompt's id and how many of its `total` samples were graded "correct"."""

    id: str
    correct: int
    total: int


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


# ---- all of it -------------------------------------------------------------------------------------------------


class Curriculum:
    """The window, dynamic sampling and retirement of one run (curriculum.* config).

    Per step: dynamic sampling `take`s prompts under the current window (`max_tokens`), and after the update
    `update(filled)` logs the window that step used, moves the window and retires solved prompts from the
    stream."""

    def __init__(self, cfg: CurriculumConfig, stream, max_tokens: int):
        self.cfg, self.stream = cfg, stream
        self.window = OutputWindow.from_config(cfg, max_tokens)
        self.pass_rates = PassRateTracker(cfg.retire_pass_rate)
        self.lock = threading.Lock()  # taken from a producer thread while the trainer updates (pipeline)

    @property
    def max_tokens(self) -> int:
        with self.lock:
            return self.window.max_tokens

    def take(self, n: int) -> list[dict]:
        with self.lock:
            return self.stream.take(n)

    def update(self, filled) -> dict[str, float]:
        """`filled`: the step's cispo.sampling.dynamic.FilledBatch. curriculum/window (the window this step used), curriculum/window_stage, curriculum/window_advanced,
        curriculum/retired (prompts retired so far), curriculum/retired_new."""
        with self.lock:
            return self._update(filled)

    def _update(self, filled) -> dict[str, float]:
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
