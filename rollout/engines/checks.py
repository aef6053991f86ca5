"""Request checks every engine runs before generating anything (rollout.base.SamplingParams, rollout.max_model_len)."""

from __future__ import annotations

from rollout.base import SamplingParams


def check_request(prompts: list[list[int]], sampling: SamplingParams, max_model_len: int) -> None:
    """ValueError, before anything is generated, for bad sampling parameters, an empty prompt, or a prompt whose
    length plus max_tokens exceeds `max_model_len` (rollout.max_model_len)."""
    if sampling.n < 1:
        raise ValueError(f"SamplingParams.n must be >= 1, got {sampling.n}")
    if sampling.max_tokens < 1:
        raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {sampling.max_tokens}")
    if sampling.seed is not None and sampling.seed < 0:
        raise ValueError(f"SamplingParams.seed must be >= 0 or None, got {sampling.seed}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) + sampling.max_tokens > max_model_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; with max_tokens={sampling.max_tokens} it needs "
                f"{len(prompt) + sampling.max_tokens} > rollout.max_model_len={max_model_len}. Raise "
                f"rollout.max_model_len, lower rollout.max_tokens, or filter long prompts."
            )
