"""When a step's batch is generated: strictly before its update (`Synchronous`), or ahead of it on a fleet of
rollout servers while the trainer updates (`Pipelined`, rollout.mode=server, algo.max_staleness=k).

The trainer sees either through the same five calls per step: `next(step)` (the FilledBatch to train on),
`updating()` (around the update), `finish(filled)` (the curriculum's bookkeeping, before the new weights can start
the next batch), `publish(updater, step)` (the new weights), and `evaluate(rows)`. Both talk to a sampler
(cispo.sampling.sampler) and a weight sink (rollout.base.WeightSink), never to what is behind them.

Pipelined. Rank 0 runs a producer thread that fills the batch of step s (cispo.sampling.curriculum: the window, dynamic
sampling, retirement) as soon as the trainer has published the policy of step s - 1 - k, i.e. while the trainer
still updates on steps s - k .. s - 1. Weights move only between batches: before a batch, the producer has the
servers load the newest published weights, so every sample of a batch comes from one policy version, which each
of its tokens carries (the sampler stamps the sink's served version); the batch's staleness is (s - 1) - version,
at most k. k = 0 is the synchronous loop, on servers. Other ranks receive each batch from rank 0.

The objective under staleness (a decision, after AReaL's decoupled PPO objective, Fu et al. 2025): the trainer's
pi_old, recomputed from its current weights at the start of the update, is the *proximal* policy, and the CISPO
ratio pi_theta / pi_old and its clip are taken against it, exactly as at k = 0. The engine's sampling logprobs
are the *behaviour* policy, up to k updates older; each token's loss is weighted by the truncated importance
weight min(pi_old / pi_behaviour, algo.tis_cap) (TIS; cispo.algo.loss.tis_weights, the same machinery that
corrects engine/trainer mismatch at k = 0). AReaL drops the tokens whose behaviour weight exceeds its cap; this
truncates them to the cap instead, because CISPO's premise is that every token keeps its gradient. A stale token's
weight is not smaller than a fresh one's: it may be anything up to the cap.
With algo.pi_old=engine there is no proximal policy: pi_old is the behaviour policy itself, so the CISPO ratio
spans the staleness (and any mismatch), and the loss's weight cap, algo.is_weight_max, bounds it, as in prime-rl.
Which configurations may run ahead is one rule, cispo.config.Config._check_off_policy.

Deviations, on purpose: prompts retired by the curriculum stop being drawn up to k steps late (the producer has
taken them already); the output window moves on a length signal up to k steps old.

A weight sync is checked (`check_sync`): the servers' logprobs of a probe sequence, against the trainer's under
the new and the previous policy, as mean absolute differences over the probe's tokens. A sync is refused when the
servers are nearer the previous policy than the new one, or further from the new one than SYNC_TOLERANCE times
the mismatch measured at start-up (equal weights). Its power, stated: servers that skipped the load are caught
whenever the policy moved more than twice the start-up mismatch (then |served - new| > |served - old| whatever
the noise, by the triangle inequality); a partial load whenever it leaves the probe more than SYNC_TOLERANCE
times the start-up mismatch from the new policy. Logged: sync/probe_diff, sync/probe_old_diff, sync/probe_moved,
sync/probe_floor.

Checkpoints (`paused()` around a save): the producer finishes the batch it is generating and waits; a batch is
queued before the producer lets go of the servers, so a save never sees the prompt stream advanced without its
batch. The batches generated but not yet trained on are saved with the checkpoint (`state_dict`) and trained on
first after a resume, so a resumed run neither loses nor repeats prompts, and keeps the samples it had generated.
A resume that could not honour them stops instead: a colocated run cannot train batches generated ahead, and a
smaller algo.max_staleness than a saved batch's staleness would train it without its correction.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from cispo.config import ConfigError
from cispo.sampling.curriculum import Curriculum
from cispo.sampling.dynamic import FilledBatch, fill
from cispo.sampling.sampler import feed_weights

SYNC_TOLERANCE = 4.0  # a sync is refused beyond this many times the start-up mismatch from the new policy


class WeightSyncError(RuntimeError):
    """The servers do not serve the weights just published."""


class Synchronous:
    """Generate, then update, then sync, on the trainer's own engines (rollout.mode=colocated)."""

    def __init__(self, sampler, sink, curriculum: Curriculum, target: int):
        self.sampler, self.sink, self.curriculum, self.target = sampler, sink, curriculum, target

    def next(self, step: int) -> FilledBatch:
        return fill(self.curriculum, self.sampler, step, self.target)

    @contextlib.contextmanager
    def updating(self):
        self.sampler.sleep()  # colocated GPU engines free their memory for the update (rollout.sleep_level)
        try:
            yield
        finally:
            self.sampler.wake()

    def start(self, updater, version: int) -> None:
        """Before the first step: a resumed run's engines get its weights."""
        if version:
            self.publish(updater, version)

    def publish(self, updater, step: int) -> None:
        feed_weights(updater, lambda weights: self.sink.write(weights, step))
        self.sink.serve(step)  # the step's time/sync_s covers it

    def finish(self, filled: FilledBatch) -> dict[str, float]:
        return self.curriculum.update(filled)

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        return self.sampler.evaluate(rows)

    def paused(self):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"mode": "colocated", "ready": []}

    def load_state_dict(self, state: dict) -> None:
        refuse_in_flight(state)
        if state.get("ready"):
            raise ConfigError(f"the checkpoint holds {len(state['ready'])} batch(es) generated ahead by rollout "
                              "servers, which a colocated run cannot train (they need the staleness correction): "
                              "resume with rollout.mode=server and the run's algo.max_staleness")

    def close(self) -> None:
        self.sampler.close()


@dataclass
class Produced:
    step: int
    filled: FilledBatch
    version: int  # the policy version (RL steps trained) that generated every sample of the batch


class Pipelined:
    """Batches generated on rank 0, up to `max_staleness` steps ahead of the update (see the module docstring).

    `sampler`, `sink`: rank 0's (a cispo.sampling.sampler.EngineSampler over the server fleet, and the fleet's
    weight sink); None on other ranks. `probe`: token ids whose logprobs check each weight sync."""

    def __init__(self, sampler, sink, curriculum: Curriculum, *, target: int, steps: int, max_staleness: int,
                 dist, probe: list[int]):
        self.sampler, self.sink, self.curriculum, self.dist = sampler, sink, curriculum, dist
        self.target, self.steps, self.max_staleness, self.probe = target, steps, max_staleness, probe
        self.version = 0  # the newest policy published (RL steps trained)
        self.ready: deque[Produced] = deque()
        self.next_step = 1  # the step the producer fills next
        self.cond = threading.Condition()
        self.servers = threading.Lock()  # held while the servers generate a batch, evaluate or load weights
        self.snapshot: tuple[int, list[float]] | None = None  # (version, probe logprobs) published, not yet served
        self.served_probe: list[float] | None = None  # the trainer's probe logprobs of what the servers serve
        self.floor = 0.0  # servers vs trainer probe mismatch at the same weights (start-up): numerical noise
        self.error: BaseException | None = None
        self.stopping = False
        self.engine_idle = self.trainer_idle = 0.0
        self.sync_metrics: dict = {}
        self.before_queue = None  # a test's hook: called with the servers held, before a batch is queued
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------- the producer
    def _produce(self) -> None:
        try:
            while self.next_step <= self.steps:
                step = self.next_step
                tick = time.perf_counter()
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or self.version >= step - 1 - self.max_staleness)
                    if self.stopping:
                        return
                    self.engine_idle += time.perf_counter() - tick
                with self.servers:  # a checkpoint sees the stream advanced only with the batch queued
                    self._serve_newest()
                    version = self.sink.served_version
                    filled = fill(self.curriculum, self.sampler, step, self.target)
                    if self.before_queue is not None:
                        self.before_queue()
                    with self.cond:
                        self.ready.append(Produced(step, filled, version))
                        self.next_step += 1
                        self.cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the trainer thread, which raises it
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def _serve_newest(self) -> None:
        """Have the servers load the newest published weights, and check what they serve (holds `servers`)."""
        with self.cond:
            snapshot, self.snapshot = self.snapshot, None
        if snapshot is None:
            return
        version, reference = snapshot
        report = self.sink.serve(version)
        check = check_sync(self.sink.probe(self.probe), reference, self.served_probe, self.floor)
        self.served_probe = reference
        self.sync_metrics = report.metrics() | check.metrics()
        if check.error:
            raise WeightSyncError(f"after the sync of policy v{version}: {check.error}")

    def _start(self) -> None:
        if self._thread is None and self.dist.is_main:
            self._thread = threading.Thread(target=self._produce, name="rollout-producer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------ the trainer's calls
    def next(self, step: int) -> FilledBatch:
        filled = None
        if self.dist.is_main:
            self._start()
            tick = time.perf_counter()
            with self.cond:
                self.cond.wait_for(lambda: self.ready or self.error is not None)
                if self.error is not None:
                    raise RuntimeError("the rollout producer failed") from self.error
                produced = self.ready.popleft()
                depth = len(self.ready)
            self.trainer_idle += time.perf_counter() - tick
            if produced.step != step:
                raise RuntimeError(f"the rollout producer made step {produced.step}'s batch, the trainer is at {step}")
            filled = produced.filled
            filled.metrics |= self.sync_metrics | {
                "async/staleness": float(step - 1 - produced.version), "async/queue_depth": float(depth),
                "async/trainer_idle_s": self.trainer_idle, "async/engine_idle_s": self.engine_idle}
            self.engine_idle, self.trainer_idle, self.sync_metrics = 0.0, 0.0, {}
        return self.dist.broadcast_object(filled)

    def updating(self):
        return contextlib.nullcontext()  # the servers keep generating: they are not on the trainer's devices

    @torch.no_grad()
    def publish(self, updater, step: int) -> None:
        """Write the weights of policy `step` for the servers (every rank: gathers are collective under ZeRO-3)
        and the reference probe; the producer has the servers load them before its next batch."""
        reference = probe_logprobs(updater.policy, self.probe)
        feed_weights(updater, (lambda weights: self.sink.write(weights, step)) if self.dist.is_main else None)
        if self.dist.is_main:
            with self.cond:
                self.snapshot, self.version = (step, reference), step
                self.cond.notify_all()

    def finish(self, filled: FilledBatch) -> dict[str, float]:
        return self.curriculum.update(filled)

    def start(self, updater, version: int) -> None:
        """Before the first step: the servers load the trainer's weights (servers started elsewhere may hold any),
        and the probe mismatch at equal weights is measured: the numerical floor of the sync checks."""
        self.publish(updater, version)
        if self.dist.is_main:
            with self.servers:
                with self.cond:
                    (_, reference), self.snapshot = self.snapshot, None
                self.sink.serve(version)
                self.served_probe = reference
                self.floor = max(mean_abs(lp, reference) for lp in self.sink.probe(self.probe).values())

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """On the newest published weights (waits for the batch being generated)."""
        metrics = None
        if self.dist.is_main:
            with self.servers:
                self._serve_newest()
                metrics = self.sampler.evaluate(rows)
        return self.dist.broadcast_object(metrics)

    @contextlib.contextmanager
    def paused(self):
        """No batch is generated inside (the one under way is finished and queued first): the stream, the
        curriculum and the batches in flight hold still for a checkpoint."""
        if not self.dist.is_main:
            yield
            return
        with self.servers:
            yield

    def state_dict(self) -> dict:
        """The batches generated and not yet trained on (call inside `paused()`)."""
        with self.cond:
            return {"mode": "server", "max_staleness": self.max_staleness, "next_step": self.next_step,
                    "ready": [{"step": p.step, "version": p.version, "filled": p.filled.to_json()}
                              for p in self.ready]}

    def load_state_dict(self, state: dict) -> None:
        refuse_in_flight(state)
        ready = [Produced(p["step"], FilledBatch.from_json(p["filled"]), p["version"]) for p in state["ready"]]
        for p in ready:  # trained at step p.step, after the update of step p.step - 1
            if p.step - 1 - p.version > self.max_staleness:
                raise ConfigError(f"the checkpoint holds step {p.step}'s batch, generated by policy v{p.version} "
                                  f"({p.step - 1 - p.version} steps stale), beyond algo.max_staleness="
                                  f"{self.max_staleness}: resume with algo.max_staleness >= "
                                  f"{p.step - 1 - p.version} (the saved run's was {state.get('max_staleness')})")
        self.next_step = state.get("next_step", 1)
        self.ready = deque(ready)

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self.sampler is not None:
            self.sampler.close()


def refuse_in_flight(state: dict) -> None:
    """A checkpoint of in-flight updates (cispo.sampling.inflight) holds groups that only that pipeline resumes."""
    if state.get("in_flight") and (state.get("done") or state.get("generating")):
        raise ConfigError(f"the checkpoint was saved with in-flight weight updates and holds {len(state['done'])} "
                          f"group(s) generated and {len(state['generating'])} generating: resume with the run's "
                          "rollout.server.in_flight (keep or recompute)")


@torch.no_grad()
def probe_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under `model` (a Hugging Face causal LM), at temperature 1."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, x[0, 1:, None]).squeeze(-1).tolist()


def mean_abs(a: list[float], b: list[float] | None) -> float:
    """Mean |a_t - b_t| over the probe's tokens (0 without b)."""
    return 0.0 if b is None else sum(abs(x - y) for x, y in zip(a, b, strict=True)) / max(len(a), 1)


@dataclass
class SyncCheck:
    diff: float  # the farthest engine from the new policy: mean |served - new|
    old_diff: float  # that engine from the previous policy: mean |served - old|
    moved: float  # mean |new - old|
    floor: float  # the start-up mismatch
    error: str  # "" when the sync passes

    def metrics(self) -> dict[str, float]:
        return {"sync/probe_diff": self.diff, "sync/probe_old_diff": self.old_diff, "sync/probe_moved": self.moved,
                "sync/probe_floor": self.floor}


def check_sync(served: dict[str, list[float]], new: list[float], old: list[float] | None, floor: float,
               tolerance: float = SYNC_TOLERANCE) -> SyncCheck:
    """Whether every engine serves the new policy (module docstring). `served`: each engine's probe logprobs
    [T]; `new`, `old`: the trainer's under the policy just published and the one served before [T]; `floor`: the
    start-up mismatch (mean absolute)."""
    name, lp = max(served.items(), key=lambda item: mean_abs(item[1], new)) if served else ("", new)
    diff, old_diff, moved = mean_abs(lp, new), mean_abs(lp, old) if old else float("inf"), mean_abs(new, old)
    error = ""
    if diff > old_diff:
        error = (f"{name} is nearer the previous policy ({old_diff:.3g}) than the new one ({diff:.3g}): it did "
                 "not load the new weights")
    elif diff > tolerance * floor + 1e-4:
        error = (f"{name} is {diff:.3g} from the new policy, beyond {tolerance:g}x the start-up mismatch "
                 f"({floor:.3g}; the policy moved {moved:.3g}): it loaded part of the new weights at most")
    return SyncCheck(diff, old_diff if old else 0.0, moved, floor, error)
