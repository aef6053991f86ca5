"""The process-group weight transport, the parts both ends share (torch only, no vLLM): a gloo group of the trainer
(rank 0) and the rollout servers (ranks 1..n), joined through a TCPStore, and the weights broadcast in packed buckets.

A bucket is one flat uint8 tensor holding whole tensors back to back (each at an offset aligned to ALIGN bytes); its
layout travels over HTTP in the update (`layout`: per bucket {"nbytes", "tensors": [[name, dtype, shape, offset]]}),
the bytes over the group. A tensor larger than the bucket size gets a bucket of its own.

The group is a `torch.distributed.ProcessGroupGloo` built directly on a TCPStore, never the default process group
(vLLM owns that one in the server's worker). Every operation has the group's timeout, so a member that dies
mid-broadcast makes the others fail after at most that long instead of hanging. The server side is the
`cispo_group` backend in rollout.engines.vllm_transfer; the trainer side rollout.engines.fleet.group_sink.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

import torch
import torch.distributed as dist

ALIGN = 64  # byte alignment of each tensor in a bucket (a view as any dtype needs its offset aligned)

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32,
    torch.int64, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
         ) -> tuple[list[torch.Tensor], list[dict], int, int]:
    """(buckets, layout, bytes, tensors): the tensors copied into flat uint8 buckets of about `bucket_bytes`. Each
    tensor is copied once as it comes, so an iterator that gathers parameters one at a time (ZeRO-3) never has more
    than one bucket of them outside the packed copy."""
    buckets: list[torch.Tensor] = []
    layout: list[dict] = []
    pending: list[tuple[str, torch.Tensor, int]] = []
    size = total = count = 0

    def flush():
        nonlocal pending, size
        if not pending:
            return
        buf = torch.empty(size, dtype=torch.uint8)
        entries = []
        for name, t, off in pending:
            raw = t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0).view(torch.uint8)
            buf[off:off + raw.numel()].copy_(raw)
            entries.append([name, dtype_name(t.dtype), list(t.shape), off])
        buckets.append(buf)
        layout.append({"nbytes": size, "tensors": entries})
        pending, size = [], 0

    for name, tensor in named_tensors:
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        off = -(-size // ALIGN) * ALIGN
        if pending and off + nbytes > bucket_bytes:
            flush()
            off = 0
        pending.append((name, t, off))
        size = off + nbytes
        total += nbytes
        count += 1
    flush()
    return buckets, layout, total, count


def unpack(buf: torch.Tensor, entry: dict) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) views of one received bucket (they share its memory)."""
    out = []
    for name, dtype, shape, off in entry["tensors"]:
        d = _DTYPES[dtype]
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=d).element_size()
        out.append((name, buf[off:off + nbytes].view(d).view(shape)))
    return out


def address_towards(host: str) -> str:
    """This machine's address on the route to `host` (loopback for a local host): what the other members dial."""
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: nothing is sent, the kernel picks the outgoing interface
        return s.getsockname()[0]


def url_host(url: str) -> str:
    return urlparse(url).hostname or "127.0.0.1"


def join(store: dist.Store, rank: int, world_size: int, address: str, timeout_s: float) -> dist.ProcessGroupGloo:
    """This process's member of a gloo group on `store` (blocks until all `world_size` members joined, or raises
    after `timeout_s`)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def client_store(master_address: str, master_port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(master_address, master_port, world_size, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def master_store(address: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore on a free port of `address` (read it from `.port`); the trainer, rank 0, runs it."""
    return dist.TCPStore(address, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def _opts() -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    return opts


def send_buckets(pg: dist.ProcessGroupGloo, buckets: list[torch.Tensor], window: int = 2) -> None:
    """Rank 0: broadcast the buckets in order, at most `window` in flight."""
    works = []
    for buf in buckets:
        works.append(pg.broadcast([buf], _opts()))
        if len(works) >= window:
            works.pop(0).wait()
    for w in works:
        w.wait()


def receive_buckets(pg: dist.ProcessGroupGloo, layout: list[dict],
                    load: Callable[[list[tuple[str, torch.Tensor]]], object]) -> None:
    """A server: receive the buckets of `layout` and `load` each; the receive of bucket i + 1 is posted before
    bucket i loads, so the two overlap. Each bucket gets fresh memory (the layerwise reload keeps references to the
    tensors it was given until their layer is complete)."""
    def post(i: int):
        buf = torch.empty(layout[i]["nbytes"], dtype=torch.uint8)
        return buf, pg.broadcast([buf], _opts())

    pending = post(0) if layout else None
    for i in range(len(layout)):
        buf, work = pending
        work.wait()
        pending = post(i + 1) if i + 1 < len(layout) else None
        load(unpack(buf, layout[i]))
