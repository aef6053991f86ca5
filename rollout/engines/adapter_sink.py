"""The weight sink of a LoRA run (DESIGN.md §7, "adapters only"): each sync hands an in-process engine the adapter
alone, with its policy version, and the engine switches to it in `serve`.

The base weights never change under LoRA, so they never move: a sync of SmolLM2-135M's rank-8 adapter on its seven
linear layers is 9.8 MB where the whole model is 538 MB. What the engine must do (`AdapterEngine`, implemented by
rollout/engines/hf_engine.py and rollout/engines/vllm_engine.py):

- `write_adapter(named_tensors, version)`: take the adapter of policy `version` (PEFT keys, rollout.engines.lora);
  not served yet;
- `serve_adapter(version)`: sample from it from now on. vLLM: a new `LoRARequest` (a new id and name per
  version, so no cache of an older adapter can answer for it) that every later request carries; HF: the tensors
  copied into the engine's PEFT layers;
- `prompt_logprobs(ids)`: its log-probabilities of ids[1:] under the adapter it serves: what `probe` returns, so the
  pipeline's sync check (cispo.sampling.pipeline.check_sync) and the tests can prove that the engine samples from the
  new adapter rather than a stale one.

A tensor that is not an adapter tensor stops the sync (the updater yields the adapter only when model.lora.rank is
set); an adapter tensor missing from a write stops it too (rollout.engines.lora.load_into, or vLLM's loader).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from rollout.base import EngineSink, RolloutEngine, SyncReport, _Counted
from rollout.engines.lora import check_adapter_keys


@runtime_checkable
class AdapterEngine(Protocol):
    """An engine that serves a LoRA adapter over fixed base weights."""

    def write_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def serve_adapter(self, version: int) -> None: ...

    def prompt_logprobs(self, ids: list[int]) -> list[float]: ...


class AdapterSink:
    """An in-process engine serving the trainer's LoRA adapter as a weight sink (rollout.base.WeightSink)."""

    def __init__(self, engine: RolloutEngine, version: int = 0, name: str = "engine"):
        if not isinstance(engine, AdapterEngine):
            raise TypeError(f"{type(engine).__name__} cannot serve LoRA adapters (write_adapter, serve_adapter, "
                            "prompt_logprobs): set rollout.engine to hf or vllm, or model.lora.rank=0")
        self.engine, self.served_version, self.name = engine, version, name
        self._written: tuple[int, float, int, int] | None = None  # version, seconds, bytes, tensors

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        counted = _Counted(check_adapter_keys(named_tensors, "AdapterSink.write"))
        start = time.perf_counter()
        self.engine.write_adapter(counted, version)
        if not counted.tensors:
            raise ValueError(f"AdapterSink.write(v{version}): no adapter tensors were given")
        self._written = (version, time.perf_counter() - start, counted.bytes, counted.tensors)

    def serve(self, version: int) -> SyncReport:
        if self._written is None or self._written[0] != version:
            raise ValueError(f"serve(v{version}): the adapter written last is "
                             f"{'none' if self._written is None else f'v{self._written[0]}'}")
        _, write_s, size, tensors = self._written
        start = time.perf_counter()
        self.engine.serve_adapter(version)
        self.served_version = version
        return SyncReport(version, "adapter", write_s, time.perf_counter() - start, size, tensors, 1)

    def probe(self, ids: list[int]) -> dict[str, list[float]]:
        """The engine's log-probabilities of ids[1:] under the adapter it serves (it holds its own weights, so
        unlike EngineSink there is something to check)."""
        return {self.name: self.engine.prompt_logprobs(list(ids))}


def make_sink(engine: RolloutEngine, model_cfg, version: int = 0):
    """The weight sink of an in-process engine: AdapterSink with LoRA (model.lora.rank > 0), else EngineSink."""
    lora = getattr(model_cfg, "lora", None)
    return AdapterSink(engine, version) if lora is not None and lora.rank else EngineSink(engine, version)

