"""The rollout engine protocol: what the trainer needs from a generator, and nothing more.

Prompts go in as token ids (the trainer applies the chat template once, so every engine sees the same tokens).
Completions come back grouped: the `n` samples of prompt i are `completions[i * n : (i + 1) * n]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Coroutine, Iterable, Protocol, runtime_checkable

import torch

FINISH_REASONS = ("stop", "length", "early_stop")


@dataclass
class SamplingParams:
    n: int  # samples per prompt (the group size)
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompts, same weights -> same samples
    min_tokens: int = 0  # no end of sequence before this many tokens (rollout.min_tokens; <= max_tokens)


SEED_STRIDE = 2**24  # samples per generate() call that get distinct seeds


def prompt_seed(seed: int | None, i: int, n: int) -> int | None:
    """The request seed of prompt i of a call with `n` samples per prompt: vLLM gives sample j of a request
    `seed + j`, so every sample of a call has its own stream (the colocated engine and the server fleet alike)."""
    return None if seed is None else seed * SEED_STRIDE + i * n


@dataclass
class Completion:
    prompt_index: int  # index into the prompts passed to generate()
    token_ids: list[int]  # the response, including the EOS token when one was produced
    logprobs: list[float]  # log-probability of each token under the sampling distribution (after temperature)
    finish_reason: str  # stop | length | early_stop
    text: str  # decoded response, special tokens skipped

    @property
    def loss_tokens(self) -> int:
        """Tokens that enter the loss: an early stop's forced EOS was not sampled from the policy (M1 §3.2)."""
        return len(self.token_ids) - (self.finish_reason == "early_stop")


@dataclass
class Rollout:
    completions: list[Completion]
    seconds: float  # wall-clock time of the generate call

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (HF parameter names) without restarting it."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory while the policy trains (colocated engines); a no-op where there is none."""
        ...

    def wake(self) -> None:
        """Undo `sleep` before the weight sync; the next load_weights restores weights a deep sleep dropped."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SessionEngine(Protocol):
    """An engine that also takes one request at a time per trajectory, kept on one replica (the server fleet):
    multi-turn rollouts then run every trajectory on its own instead of in lockstep (rollout.env.multiturn)."""

    def session(self) -> Any:
        """A new session: the replica its first request goes to serves the rest while it stays healthy."""
        ...

    async def complete(self, ids: list[int], sampling: SamplingParams, session: Any) -> Completion:
        """One sample of `ids` (sampling.n == 1; sampling.seed is the request's own seed)."""
        ...

    def run(self, coro: Coroutine) -> Any:
        """Run `coro` on the engine's event loop and return its result (called from outside that loop)."""
        ...
