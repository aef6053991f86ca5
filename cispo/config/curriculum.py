"""The curriculum group: what the trainer samples as training goes on (`curriculum.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.config.base import ConfigError, _positive


@dataclass
class CurriculumConfig:
    """What the trainer samples as training goes on (cispo/sampling/curriculum.py): the output window, dynamic sampling,
    and retiring solved prompts. The defaults change nothing: one window (rollout.max_tokens), one generation
    round per step, no retirement."""

    # M1 §5 staged output window: the response budget of each stage, increasing (M1: 40000 ... 80000, the last at
    # most rollout.max_tokens). The next stage starts once rollout/len_p99 >= window_threshold * the window for
    # window_patience consecutive steps. Empty = one stage of rollout.max_tokens.
    windows: list[int] = field(default_factory=list)
    window_threshold: float = 0.95  # M1: "approaches the current window", unpublished; ours
    window_patience: int = 1
    # DAPO dynamic sampling: generate up to sample_rounds batches per step until prompts_per_step groups with
    # unequal rewards are in hand (zero-variance groups are left out). 1 = one batch, every group kept.
    sample_rounds: int = 1
    # ScaleRL no-positive-resampling: retire a training prompt for good once its pass rate over all its samples
    # so far (share graded "correct") reaches this. null = off; ScaleRL: 0.9.
    retire_pass_rate: float | None = None

    def __post_init__(self):
        if any(w <= 0 for w in self.windows) or any(b <= a for a, b in zip(self.windows, self.windows[1:])):
            raise ConfigError(f"curriculum.windows must be positive and increasing, got {list(self.windows)}")
        if not 0.0 < self.window_threshold <= 1.0:
            raise ConfigError(f"curriculum.window_threshold must be in (0, 1], got {self.window_threshold}")
        _positive("curriculum.window_patience", self.window_patience)
        _positive("curriculum.sample_rounds", self.sample_rounds)
        if self.retire_pass_rate is not None and not 0.0 < self.retire_pass_rate <= 1.0:
            raise ConfigError(f"curriculum.retire_pass_rate must be in (0, 1] or null, got {self.retire_pass_rate}")
