"""DeepSpeed: the only module that imports it. The process group, the ZeRO config, the policy and its updater.

Two ways to run the policy update, behind one interface (cispo.train.optim.Updater):
- `trainer.zero_stage: null` (the default run): plain torch in one process (cispo.train.optim.TorchUpdater); this
  project does not import deepspeed then.
- `trainer.zero_stage: 0-3`: DeepSpeed ZeRO (`DeepSpeedUpdater`), one or many processes on one or many nodes,
  started by torchrun or the deepspeed launcher (or plain `python`: one rank). CPU ranks talk over gloo, GPU
  ranks over NCCL.

Who does what in a step (rank r of W):
- every rank holds the same step's prompts (the prompt stream is replicated, so it resumes the same everywhere);
  rank r generates and grades a contiguous share of them with its own rollout engine (`Dist.shard_range`), and
  the completions and grades of all ranks are gathered (cispo.sampling.sampler), so advantages and metrics are global;
- each optimizer mini-batch (whole prompt groups, `cispo.algo.batch.split_groups`) is split between ranks by whole
  groups, balanced by tokens (`Dist.shard_groups`); every rank packs its share into token-budget micro-batches;
- the aggregation coefficients are computed over the WHOLE mini-batch before it is split
  (`cispo.algo.batch.micro_batches(..., norm_over=mini)`), so the sum over ranks and micro-batches of
  `sum_t coef_t * loss_t` is exactly the single-process loss;
- every rank runs the same number of forward/backward passes (`cispo.algo.batch.even`: ranks with fewer micro-batches
  run empty ones with coefficient 0), because ZeRO-3 gathers parameters in forward and ZeRO-2/3 reduce in
  backward.

Loss scaling (so that the gradient equals the single-process one, whatever the world size and micro-batching):
our micro-batch loss is already a share of the global mini-batch loss (its coefficients carry the global
normaliser). DeepSpeed then (a) divides each backward's loss by `gradient_accumulation_steps` and (b) averages
gradients over the W data-parallel ranks. We set gradient_accumulation_steps = 1 and
`managed_gradient_accumulation: false` (each `engine.step()` is the boundary, however many backward passes
preceded it: our micro-batch count varies from step to step), so (a) is a no-op, and `DeepSpeedUpdater.backward`
multiplies the loss by W to undo (b): sum_r (1/W) * W * grad_r = the global gradient. `train_micro_batch_size
_per_gpu` = 1 only names "one packed sequence"; DeepSpeed's batch-size arithmetic never touches our loss.
Gradient clipping is always explicit (DeepSpeed 0.19 clips at 1.0 when the key is absent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

import torch

from cispo.train.collective import Dist, launched_world_size
from cispo.config import ConfigError, TrainerConfig
from cispo.train.optim import TorchUpdater
from cispo.model.policy import PolicyLogprobs, load_policy

logger = logging.getLogger(__name__)

DEEPSPEED_MIN = "0.19.8"  # `managed_gradient_accumulation: false` for every ZeRO stage; tested with 0.19.8
DS_TAG = "deepspeed"  # sub-directory of a checkpoint holding DeepSpeed's own files
# keys of the generated DeepSpeed config that trainer.deepspeed may not override (they carry our loss scaling)
_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "managed_gradient_accumulation", "gradient_clipping")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainerConfig) -> Dist:
    """The process group for `cfg`: none for plain torch (zero_stage null); DeepSpeed's otherwise.

    Under torchrun / the deepspeed launcher the rendezvous comes from the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...). Started with plain python, a DeepSpeed run is one rank on a free local port."""
    world = launched_world_size()
    if cfg.zero_stage is None:
        if world > 1:
            raise ConfigError(
                f"launched with {world} processes but trainer.zero_stage is null (plain torch, one process): "
                "set trainer.zero_stage=0..3 for a data-parallel run"
            )
        return Dist()
    cuda = torch.cuda.is_available()
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("trainer.dist_backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if world == 1 and "RANK" not in os.environ:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # otherwise DeepSpeed guesses, with a warning
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed = _import_deepspeed()
    if not cuda:
        # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU inference at init (25-110 s on 2 cores);
        # training never uses it. `deepspeed.comm.torch` the attribute is torch itself, hence sys.modules.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, True)


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ConfigError(f"trainer.zero_stage needs DeepSpeed (pip install 'cispo-rl[deepspeed]'): {err}") from None
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version(DEEPSPEED_MIN):
        raise ConfigError(f"trainer.zero_stage needs deepspeed >= {DEEPSPEED_MIN} (caller-owned gradient "
                          f"accumulation boundaries for ZeRO 0-3), found {deepspeed.__version__}")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return deepspeed


# --------------------------------------------------------------------------------------------------------------
# The DeepSpeed config
# --------------------------------------------------------------------------------------------------------------


def deepspeed_config(cfg: TrainerConfig, world_size: int, *, cuda: bool | None = None) -> dict:
    """The DeepSpeed config of `cfg` (see the module docstring for the batch / loss-scaling keys)."""
    if cfg.zero_stage is None:
        raise ConfigError("deepspeed_config needs trainer.zero_stage")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    stage = cfg.zero_stage
    zero: dict = {"stage": stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if stage == 3:
        # we gather ZeRO-3 parameters ourselves, bucket by bucket, for weight sync and HF export
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if cfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ds: dict = {
        # one DeepSpeed "micro-batch" = one of our packed micro-batches (size set by trainer.max_tokens_per_micro);
        # every engine.step() is the accumulation boundary, after however many backward passes
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "managed_gradient_accumulation": False,
        # explicit: DeepSpeed >= 0.19 clips at 1.0 when the key is absent. Stage 0 in fp32 with torch AdamW clips
        # inside the optimizer instead (DeepSpeed does not report the norm there), see ClippedAdamW
        "gradient_clipping": 0.0 if _optimizer_clips(cfg) else float(cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.bf16)},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as the client optimizer
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.bf16 and stage >= 1:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # accumulate micro-batch gradients in fp32
    impl = cfg.optimizer_impl
    if impl == "deepspeed" or (impl == "auto" and cfg.offload_optimizer):
        # DeepSpeed's AdamW: DeepSpeedCPUAdam with offload, FusedAdam otherwise (C++/CUDA ops, built on first use)
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.adam_betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}}
    elif cfg.offload_optimizer:
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the offloaded state, by request
    _deep_merge(ds, cfg.deepspeed, owned=_OWNED_KEYS)
    return ds


def _optimizer_clips(cfg: TrainerConfig) -> bool:
    """Stage 0, fp32, torch AdamW: ClippedAdamW clips and reports the pre-clip norm."""
    return cfg.zero_stage == 0 and not cfg.bf16 and cfg.optimizer_impl != "deepspeed"


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW that clips the gradient norm (0 = off) first and records the pre-clip norm where DeepSpeed
    looks for it (`_global_grad_norm`). Used at ZeRO stage 0, where DeepSpeed's own fp32 clipping discards the
    norm; the gradients it sees are already all-reduced, so the norm is the global one."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self._global_grad_norm = max_norm, None

    def step(self, closure=None):
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        limit = self.max_norm if self.max_norm > 0 else float("inf")
        self._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, limit))
        return super().step(closure)


def _deep_merge(base: dict, extra: dict, owned=(), prefix: str = "") -> None:
    for key, value in (extra or {}).items():
        if not prefix and key in owned:
            raise ConfigError(
                f"trainer.deepspeed.{key} is set by the trainer (micro-batching and loss scaling depend on it); "
                "use trainer.max_tokens_per_micro / trainer.grad_clip instead"
            )
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, prefix=f"{prefix}{key}.")
        else:
            base[key] = value


# --------------------------------------------------------------------------------------------------------------
# Building the policy and its updater
# --------------------------------------------------------------------------------------------------------------


def build_policy(model_dir: str, cfg, dist: Dist):
    """(policy, tokenizer, updater) for `cfg` (a cispo.config.Config): TorchUpdater for zero_stage null,
    DeepSpeedUpdater otherwise. Under ZeRO-3 the model is partitioned while it loads (zero.Init)."""
    trainer = cfg.trainer
    if trainer.zero_stage is None:
        policy, tokenizer = load_policy(model_dir, cfg.model)
        return policy, tokenizer, TorchUpdater(policy, trainer, dist, lora=_lora(policy, cfg, model_dir))
    # with trainer.bf16 DeepSpeed casts the working copy to bf16 and keeps fp32 master weights, whatever
    # model.dtype the checkpoint is loaded in
    ds_config = deepspeed_config(trainer, dist.world_size)
    with _zero3_init(ds_config):
        policy, tokenizer = load_policy(model_dir, cfg.model)
    # ZeRO-3: the adapters are added after the partitioned load; deepspeed.initialize partitions them too
    return policy, tokenizer, DeepSpeedUpdater(policy, trainer, ds_config, dist, lora=_lora(policy, cfg, model_dir))


def _lora(policy, cfg, model_dir: str):
    """model.lora.rank > 0: the adapters injected into `policy` (cispo.model.lora), the same on every rank."""
    if not cfg.model.lora.rank:
        return None
    from cispo.model.lora import apply_lora

    return apply_lora(policy, cfg.model, model_dir, cfg.trainer.seed)


@contextlib.contextmanager
def _zero3_init(ds_config: dict):
    """While loading: transformers builds the model under deepspeed.zero.Init (each rank only ever holds its
    partition). Released afterwards, so that other models loaded in this process (the HF rollout engine's own
    copy) are ordinary ones."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    _import_deepspeed()
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # transformers' zero.Init loading path needs it
        logger.warning("accelerate is not installed: each rank loads the whole model before ZeRO-3 partitions it "
                       "(pip install accelerate to load it partitioned)")
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: alive while loading
    try:
        yield
    finally:
        del keep


class DeepSpeedUpdater:
    """The DeepSpeed engine behind TorchUpdater's interface.

    `model` is what micro_batch_logprobs calls (the engine around PolicyLogprobs); `policy` is the HF model
    (parameter names for weight sync and export). `lora`: the policy's adapter (cispo.model.lora.LoraPolicy); only
    its parameters reach the optimizer, and checkpoints leave the frozen base out."""

    def __init__(self, policy, cfg: TrainerConfig, ds_config: dict, dist: Dist, lora=None):
        deepspeed = _import_deepspeed()
        self.policy, self.dist, self.cfg, self.lora = policy, dist, cfg, lora
        self.ds_config = ds_config
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.zero3 = self.zero_stage == 3
        self.bucket_bytes = cfg.sync_bucket_mb << 20
        module = PolicyLogprobs(policy)
        if self.zero3:
            # the LM head's weight is used by PolicyLogprobs.forward, not by the head module's own forward:
            # tell ZeRO-3 to gather it for the wrapper's forward and backward
            deepspeed.zero.register_external_parameter(module, policy.get_output_embeddings().weight)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in ds_config:
            adamw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
            optimizer = (ClippedAdamW(params, cfg.grad_clip, **adamw) if _optimizer_clips(cfg)
                         else torch.optim.AdamW(params, **adamw))
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=params, optimizer=optimizer, config=ds_config, dist_init_required=False,
        )
        self.model = self.engine
        self.device = dist.device
        self._lr = cfg.lr

    # ------------------------------------------------------------------------------------- the update interface
    def backward(self, loss: torch.Tensor) -> None:
        # x world_size: DeepSpeed averages gradients over ranks, our loss shares already sum to the global loss
        self.engine.backward(loss * self.dist.world_size)

    def step(self, lr: float) -> float:
        """Reduce, clip (trainer.grad_clip > 0), step at `lr`, zero the gradients; returns the pre-clip global
        norm. The rate is set on the client optimizer (DeepSpeed 0.19's `basic_optimizer`), the one a DeepSpeed
        lr_scheduler would be given: the ZeRO wrappers read their groups' rates from it."""
        for group in self.engine.basic_optimizer.param_groups:
            group["lr"] = lr
        self._lr = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self._lr

    def state_dict(self) -> dict:
        """This rank's optimizer partition (checkpoints use save/load: DeepSpeed's format)."""
        return {"optimizer": self.engine.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.engine.optimizer.load_state_dict(state["optimizer"])

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save(self, path: Path) -> None:
        """Collective: every rank writes its partitions under path/deepspeed (a shared filesystem when
        multi-node)."""
        lora = self.lora is not None
        self.engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=lora)
        if lora:  # also as a PEFT folder: the offline export reads it without DeepSpeed
            state = dict(self.named_weights())
            if self.dist.is_main:
                from cispo.model.lora import save_adapter

                save_adapter(self.lora, path, state)

    def load(self, path: Path) -> None:
        # with LoRA the checkpoint holds no frozen base: those parameters keep the model folder's weights
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False,
                                                load_module_strict=self.lora is None)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{DS_TAG}")

    # ------------------------------------------------------------------------------------------ weights out
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of every parameter, in named_parameters order. Collective under ZeRO-3: every
        rank must consume the whole iterator. ZeRO-3 parameters are gathered one bucket of about
        trainer.sync_bucket_mb at a time and yielded as copies (the gather buffers are released). With LoRA: the
        adapter's tensors only, under PEFT keys (cispo.model.lora)."""
        named = list(self.lora.params.items() if self.lora is not None else self.policy.named_parameters())
        if not self.zero3:
            for name, p in named:
                yield name, p.detach()
            return
        import deepspeed

        bucket, size = [], 0
        for k, (name, p) in enumerate(named):
            bucket.append((name, p))
            size += p.ds_numel * p.element_size()
            if size >= self.bucket_bytes or k == len(named) - 1:
                params = [q for _, q in bucket]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    full = [(n, q.data.detach().clone()) for n, q in bucket]
                yield from full
                bucket, size = [], 0


def consolidate_deepspeed_checkpoint(policy_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (HF names) of the DeepSpeed checkpoint under `policy_dir` (any stage and world
    size), on CPU and without a process group."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(policy_dir), tag=DS_TAG)
    prefix = "model."  # DeepSpeed wrapped PolicyLogprobs, whose `model` is the HF model
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
