"""The rollout engine protocol, what the trainer needs from a generator and nothing more, and the weight sink, the
one way the trainer's weights reach the engines.

Prompts go in as token ids (the trainer applies the chat template once, so every engine sees the same tokens).
Completions come back grouped: the `n` samples of prompt i are `completions[i * n : (i + 1) * n]`.

A `WeightSink` takes a policy version's weights (`write`), makes the engines serve it (`serve`), and says which
version they serve (`served_version`); `probe` reads back what they serve. The in-process engines are one sink
(`EngineSink`); the server fleet's transports (files, a process group) are others. The pipeline talks to a sink and
never to what is behind it.
"""

from __future__ import annotations

import time
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
    versions: list[int] | None = None  # the policy version of each token, where weights changed during the request


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


@dataclass
class SyncReport:
    """One weight sync, as `WeightSink.serve` measured it."""

    version: int
    transport: str  # engine (in process) | file | group | ...
    write_s: float  # the weights handed over (written, or sent)
    load_s: float  # the engines loading them (for the servers: the pause they see)
    bytes: int
    tensors: int
    engines: int  # engines that serve the version now

    @property
    def seconds(self) -> float:
        return self.write_s + self.load_s

    def metrics(self) -> dict[str, float | str]:
        seconds = self.seconds
        return {"sync/transport": self.transport, "sync/seconds": seconds, "sync/write_s": self.write_s,
                "sync/load_s": self.load_s, "sync/pause_s": self.load_s,
                "sync/gb_per_s": self.bytes / seconds / 1e9 if seconds > 0 else 0.0,
                "sync/engines": float(self.engines)}


@runtime_checkable
class WeightSink(Protocol):
    """Where the trainer's weights go. `write` may run while the engines generate; `serve` is the moment they
    switch, so every sample generated after it returns is of `served_version`."""

    @property
    def served_version(self) -> int:
        """The policy version (RL steps trained) the engines serve now."""
        ...

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Take the weights of policy `version` (HF parameter names); they are not served yet."""
        ...

    def serve(self, version: int) -> SyncReport:
        """Have every engine serve the weights written for `version`."""
        ...

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        """Each engine's log-probabilities of ids[1:] given the tokens before (temperature 1), by engine name;
        {} where the engine shares the trainer's weights in memory and there is nothing to check."""
        ...


class EngineSink:
    """The in-process engine as a weight sink: `write` loads the weights into it at once (they are served from
    then on: the trainer does not generate while it writes)."""

    def __init__(self, engine: RolloutEngine, version: int = 0):
        self.engine, self.served_version = engine, version
        self._report: SyncReport | None = None

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        counted = _Counted(named_tensors)
        start = time.perf_counter()
        self.engine.load_weights(counted)
        self._report = SyncReport(version, "engine", 0.0, time.perf_counter() - start, counted.bytes,
                                  counted.tensors, 1)
        self.served_version = version

    def serve(self, version: int) -> SyncReport:
        if self._report is None or self._report.version != version:
            raise ValueError(f"serve(v{version}): the weights written last are "
                             f"{'none' if self._report is None else f'v{self._report.version}'}")
        return self._report

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        return {}


class _Counted:
    """An iterator of (name, tensor) that counts what passes through it."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        self._it, self.bytes, self.tensors = iter(named_tensors), 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        name, tensor = next(self._it)
        self.bytes += tensor.numel() * tensor.element_size()
        self.tensors += 1
        return name, tensor
