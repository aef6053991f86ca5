"""Weight streams, engine-independent: what a trainer hands an engine's `load_weights` (a state_dict, or (name,
tensor) pairs or buckets of them, lazily), counted and checked on the way (`Meter`), compared with the checkpoint's
tensor names, and staged as safetensors shards for a worker in another process (`staged_safetensors`)."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping

import torch

STAGE_SHARD_BYTES = 1 << 30  # shard size when weights are staged on disk for an out-of-process worker


def iter_named_tensors(named_tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Flatten what a trainer hands over into (HF name, tensor) pairs, lazily.

    Accepted: a mapping (state_dict), or an iterable whose items are (name, tensor) pairs or buckets of them
    (a mapping or a list of pairs), e.g. a generator over a ZeRO-3 model that gathers one bucket at a time."""
    if isinstance(named_tensors, Mapping):
        named_tensors = named_tensors.items()
    for item in named_tensors:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        elif isinstance(item, Mapping):
            yield from item.items()
        else:
            for pair in item:
                if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise TypeError(f"load_weights: expected (name, tensor) pairs or buckets of them, got {type(pair)}")
                yield pair


class Meter:
    """Counts what streams through it (tensors, bytes, names) and checks that each item is a tensor."""

    def __init__(self, pairs: Iterator[tuple[str, torch.Tensor]]):
        self.pairs, self.names, self.bytes = pairs, set(), 0

    def __iter__(self):
        for name, tensor in self.pairs:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"load_weights: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            self.names.add(name)
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor


def checkpoint_names(model_dir: str) -> set[str] | None:
    """Tensor names of a local safetensors checkpoint (headers only); None when not a local safetensors dir."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(f, framework="pt") as st:
            names.update(st.keys())
    return names


def parameter_count(model_dir: str) -> int | None:
    """Parameters of a local safetensors checkpoint (headers only); None when not a local safetensors dir."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            total += sum(math.prod(st.get_slice(name).get_shape()) for name in st.keys())
    return total


def stage_safetensors(pairs: Iterable[tuple[str, torch.Tensor]], out_dir: str) -> None:
    """Write the stream as safetensors shards of about STAGE_SHARD_BYTES, holding one shard at a time."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            save_file(shard, os.path.join(out_dir, f"model-{index:05d}.safetensors"))
            shard, size, index = {}, 0, index + 1

    for name, tensor in pairs:
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors rejects shared
        size += tensor.numel() * tensor.element_size()
        if size >= STAGE_SHARD_BYTES:
            flush()
    flush()


@contextlib.contextmanager
def staged_safetensors(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[str]:
    """A temporary directory (in /dev/shm when present) holding the stream as safetensors shards; removed after."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    stage = tempfile.mkdtemp(prefix="cispo-weights-", dir=base)
    try:
        stage_safetensors(pairs, stage)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
