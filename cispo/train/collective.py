"""The data-parallel world and the few collectives the trainer needs, over torch.distributed (no DeepSpeed).

`Dist` is this process's place in the world (rank, world size, device) and the collectives the trainer calls:
sums and maxima, object gathers, concatenation of per-token tensors, weighted means of metrics. It also holds
the sharding rules every rank computes alike: a contiguous share of a step's prompts (`shard_range`) and a
token-balanced share of a mini-batch's prompt groups (`shard_groups`). With one process (the default run) every
collective is the identity and torch.distributed is never touched. cispo.train.distributed builds the process group
(DeepSpeed's); everything else only sees a `Dist`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch


def launched_world_size() -> int:
    """Processes started by the launcher (torchrun / deepspeed set WORLD_SIZE); 1 for plain python."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """This process's place in the data-parallel world, and the few collectives the trainer needs.
    With one process (the default run) every collective is the identity and torch.distributed is never used."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the policy's device
    initialized: bool = False  # torch.distributed is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------------------------- collectives
    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()

    def broadcast_object(self, obj, src: int = 0):
        if not self.initialized:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.initialized or not values:
            return list(values)
        t = self._tensor(values)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if not self.initialized:
            return value
        t = self._tensor([value], torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """The 1-D tensors of all ranks, concatenated in rank order (lengths may differ)."""
        if not self.initialized:
            return tensor
        local = tensor.detach().reshape(-1)
        sizes = [int(s) for s in self._all_gather_tensor(self._tensor([local.numel()], torch.int64))]
        if max(sizes) == 0:
            return tensor.detach().reshape(-1)
        padded = torch.zeros(max(sizes), dtype=local.dtype, device=self.device)
        padded[: local.numel()] = local.to(self.device)
        parts = self._all_gather_tensor(padded)
        return torch.cat([p[:n] for p, n in zip(parts.view(self.world_size, -1), sizes)]).to(tensor.device)

    def mean(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        """Weighted mean over ranks of per-rank means (e.g. accuracy over each rank's share of the prompts)."""
        if not self.initialized:
            return metrics
        parts = self.all_gather_object((metrics, weight))
        total = sum(w for _, w in parts)
        keys = [k for k in parts[0][0] if all(k in m for m, _ in parts)]
        return {k: sum(m[k] * w for m, w in parts) / total for k in keys}

    def _all_gather_tensor(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, t)
        return torch.cat(out)

    @contextlib.contextmanager
    def local_rank0_first(self):
        """Local rank 0 of each node runs the block first (e.g. fills a per-node cache), then the others."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    # ------------------------------------------------------------------------------------------ data sharding
    def shard_range(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (shares differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def shard_groups(self, samples: list, indices: list[int]) -> list[int]:
        """This rank's share of `indices` (a mini-batch of cispo.algo.batch.Sample): whole prompt groups, balanced by
        tokens (longest group first to the least loaded rank; deterministic, so every rank computes the same
        assignment)."""
        if self.world_size == 1:
            return list(indices)
        tokens: dict[int, int] = {}
        for i in indices:
            s = samples[i]
            tokens[s.group] = tokens.get(s.group, 0) + len(s.prompt_ids) + len(s.response_ids)
        load = [0] * self.world_size
        owner = {}
        for g in sorted(tokens, key=lambda g: (-tokens[g], g)):
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            owner[g] = r
            load[r] += tokens[g]
        return [i for i in indices if owner[samples[i].group] == self.rank]

    # ------------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.initialized and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
        self.initialized = False
