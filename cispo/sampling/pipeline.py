"""When a step's batch is generated: strictly before its update (`Synchronous`), or ahead of it on a fleet of
rollout servers while the trainer updates (`Pipelined`, rollout.mode=server, algo.max_staleness=k).

The trainer sees either through the same five calls per step: `next(step)` (the FilledBatch to train on),
`updating()` (around the update), `publish(updater, step)` (the new weights), `finish(filled)` (the curriculum's
bookkeeping, and this module's metrics), and `evaluate(rows)`.

Pipelined. Rank 0 runs a producer thread that fills the batch of step s (cispo.sampling.curriculum: the window, dynamic
sampling, retirement) as soon as the trainer has published the policy of step s - 1 - k, i.e. while the trainer
still updates on steps s - k .. s - 1. Weights move only between batches: before a batch, the producer has the
servers load the newest published weights, so every sample of a batch comes from one policy version, which it
carries (`Episode.version`); the batch's staleness is (s - 1) - version, at most k. k = 0 is the synchronous
loop, on servers. Other ranks receive each batch from rank 0.

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

A weight sync is checked: the servers' logprobs of a probe sequence must be nearer the new policy's than the
old one's (`sync/probe_diff` vs `sync/probe_moved`), beyond the mismatch measured at start-up.

Checkpoints (`paused()` around a save): the producer finishes the batch it is generating and waits; the batches
generated but not yet trained on are saved with the checkpoint (`state_dict`) and trained on first after a
resume, so a resumed run neither loses nor repeats prompts, and keeps the samples it had generated.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch

from cispo.sampling.curriculum import Curriculum, FilledBatch, GroupOutcome
from cispo.sampling.sampler import Episode, feed_weights
from rewards import RewardResult
from rollout.base import Completion
from rollout.trajectory import Span, Trajectory


class WeightSyncError(RuntimeError):
    """The servers do not serve the weights just published."""


class Synchronous:
    """Generate, then update, then sync, on the trainer's own engines (rollout.mode=colocated)."""

    def __init__(self, sampler, curriculum: Curriculum, target: int):
        self.sampler, self.curriculum, self.target = sampler, curriculum, target

    def next(self, step: int) -> FilledBatch:
        return self.curriculum.fill(self.sampler, step, self.target)

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
            self.sampler.push_weights(updater)

    def publish(self, updater, step: int) -> None:
        self.sampler.push_weights(updater)

    def finish(self, filled: FilledBatch) -> dict[str, float]:
        return self.curriculum.update(filled)

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        return self.sampler.evaluate(rows)

    def paused(self):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self.sampler.close()


@dataclass
class Produced:
    step: int
    filled: FilledBatch
    version: int  # the policy version (RL steps trained) that generated every sample of the batch


class Pipelined:
    """Batches generated on rank 0, up to `max_staleness` steps ahead of the update (see the module docstring).

    `sampler`, `fleet`: rank 0's (a cispo.sampling.sampler.ColocatedSampler over rollout.engines.fleet.Fleet, in one process);
    None on other ranks. `probe`: token ids whose logprobs check each weight sync."""

    def __init__(self, sampler, fleet, curriculum: Curriculum, *, target: int, steps: int, max_staleness: int,
                 dist, probe: list[int]):
        self.sampler, self.fleet, self.curriculum, self.dist = sampler, fleet, curriculum, dist
        self.target, self.steps, self.k, self.probe = target, steps, max_staleness, probe
        self.version = 0  # the newest policy published (RL steps trained)
        self.ready: deque[Produced] = deque()
        self.next_step = 1  # the step the producer fills next
        self.cond = threading.Condition()
        self.servers = threading.Lock()  # held while the fleet generates a batch, evaluates or loads weights
        self.snapshot: tuple[int, list[float]] | None = None  # (version, probe logprobs) published, not yet served
        self.served_probe: list[float] | None = None  # the trainer's probe logprobs of what the fleet serves
        self.floor = 0.0  # fleet vs trainer probe mismatch at the same weights (start-up): numerical noise
        self.error: BaseException | None = None
        self.stopping = False
        self.engine_idle = self.trainer_idle = 0.0
        self.sync_metrics: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------- the producer
    def _produce(self) -> None:
        try:
            while self.next_step <= self.steps:
                step = self.next_step
                tick = time.perf_counter()
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or self.version >= step - 1 - self.k)
                    if self.stopping:
                        return
                    self.engine_idle += time.perf_counter() - tick
                with self.servers:
                    self._serve_newest()
                    version = self.fleet.version
                    filled = self.curriculum.fill(self.sampler, step, self.target)
                for group in filled.groups:
                    for e in group:
                        e.version = version
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
        self.fleet.serve_weights(version)
        served = self.fleet.probe(self.probe)
        diff = max(_max_abs(lp, reference) for lp in served.values())
        moved = _max_abs(reference, self.served_probe)
        self.served_probe = reference
        sync = self.fleet.last_sync
        self.sync_metrics = {"sync/seconds": sync["seconds"], "sync/write_s": sync["write_s"],
                             "sync/load_s": sync["load_s"], "sync/gb_per_s": sync["bytes_per_s"] / 1e9,
                             "sync/probe_diff": diff, "sync/probe_moved": moved, "sync/servers": float(len(served))}
        if diff > 0.5 * moved and diff > 10 * self.floor + 1e-4:
            raise WeightSyncError(
                f"after the sync of policy v{version} the servers' probe logprobs are {diff:.3g} from the new "
                f"policy, which moved {moved:.3g} from the one they served (start-up mismatch {self.floor:.3g}): "
                "they do not serve the new weights")

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
        feed_weights(updater, (lambda weights: self.fleet.write_weights(weights, step)) if self.dist.is_main else None)
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
                self.fleet.serve_weights(version)
                self.served_probe = reference
                self.floor = max(_max_abs(lp, reference) for lp in self.fleet.probe(self.probe).values())

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
        """No batch is generated inside (the one under way is finished first): the stream, the curriculum and
        the batches in flight hold still for a checkpoint."""
        if not self.dist.is_main:
            yield
            return
        with self.servers:
            yield

    def state_dict(self) -> dict:
        """The batches generated and not yet trained on (call inside `paused()`)."""
        with self.cond:
            return {"next_step": self.next_step,
                    "ready": [{"step": p.step, "version": p.version, "filled": filled_to_json(p.filled)}
                              for p in self.ready]}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = state["next_step"]
        self.ready = deque(Produced(p["step"], filled_from_json(p["filled"]), p["version"]) for p in state["ready"])

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self.sampler is not None:
            self.sampler.close()


@torch.no_grad()
def probe_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under `model` (a Hugging Face causal LM), at temperature 1."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, x[0, 1:, None]).squeeze(-1).tolist()


def _max_abs(a: list[float], b: list[float] | None) -> float:
    return 0.0 if b is None else max(abs(x - y) for x, y in zip(a, b, strict=True))


# ---- batches in a checkpoint (JSON) -----------------------------------------------------------------------------

def filled_to_json(filled: FilledBatch) -> dict:
    return asdict(filled)


def filled_from_json(d: dict) -> FilledBatch:
    def episode(e: dict) -> Episode:
        t = e.get("trajectory")
        if t is not None:
            t = Trajectory(**(t | {"spans": [Span(**span) for span in t["spans"]]}))
        return Episode(**(e | {"completion": Completion(**e["completion"]), "result": RewardResult(**e["result"]),
                               "trajectory": t}))

    return FilledBatch(d["rows"], d["prompts"], [[episode(e) for e in group] for group in d["groups"]],
                       d["metrics"], [GroupOutcome(**o) for o in d["outcomes"]])
