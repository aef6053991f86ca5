"""Continuous batching with in-flight weight updates (`InFlight`; rollout.mode=server, rollout.server.in_flight =
keep | recompute, algo.max_staleness = k >= 1): no server waits for the slowest sample of a batch.

The pipeline of cispo.sampling.pipeline.Pipelined, with two changes.
- Groups, not batches: rank 0's producer keeps up to (k + 1) * algo.prompts_per_step prompt groups outstanding
  (generating, or done and not yet trained on), each sent on its own as soon as there is room, so the servers
  always hold work. A step's batch is the first groups to finish, in the order they finished; a group is complete
  or absent, as in every mode. With curriculum.sample_rounds > 1 (dynamic sampling) the zero-variance groups are
  passed over (counted in the step's metrics), and a step takes at most sample_rounds * prompts_per_step groups.
- Weights change mid-request: `publish` hands the producer the new weights at once and it has the servers load
  them (rollout.engines.fleet.in_flight.InFlightSink: pause with the requests kept, load, resume), so a long
  sample goes on under the newer policy. Every token carries the version that sampled it and its sampling
  logprob; the loss corrects each token against its own behaviour policy (the tis_cap weight, or the capped ratio
  with algo.pi_old=engine), exactly as for a batch of one older version.

The bound, per group (algo.max_off_policy_steps = m, after PipelineRL's max_off_policy_steps): a group trained at
step s whose oldest token is of a policy older than s - 1 - m is dropped, not trained on: its prompt is used up
(counted in async/dropped_groups and in the curriculum's pass rates, like any generated group). A group cannot go
past the bound while it waits in the queue for more than m - k steps only if the trainer outruns the servers by
that much; a sample that spans many syncs (a straggler) can, and that is what the bound is for.

Checkpoints: `paused()` holds the producer's bookkeeping still (the servers go on generating). The groups done and
not trained on are saved with their samples; the groups still generating are saved as their prompts and sent
again first after a resume (their partial samples are lost, their prompts neither lost nor repeated).

Measured per step: async/staleness (steps between the oldest token trained on and pi_old), async/span_frac (the
share of samples whose tokens span more than one version), async/dropped_groups, async/queue_depth (groups done
and waiting), async/trainer_idle_s (the trainer waiting for groups), async/server_idle_s (no request in flight).

Deviations from PipelineRL, on purpose: the trainer's pi_old is recomputed at the start of the update (the
proximal policy, as in Pipelined), not taken from the engine, unless algo.pi_old=engine; groups are taken in the
order they finish, which favours short samples within the window of outstanding groups (the bias PipelineRL and
prime-rl's continuous batching also have: bounded, since a group waits at most until it is done).
"""

from __future__ import annotations

import contextlib
import time
from array import array
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from cispo.config import ConfigError
from cispo.sampling.curriculum import Curriculum, GroupOutcome
from cispo.sampling.dynamic import FilledBatch, step_metrics
from cispo.sampling.pipeline import Pipelined
from cispo.sampling.sampler import Episode, call_seed

POLL_S = 0.05  # the producer's loop: completions, a new policy, room for more groups


@dataclass
class Group:
    """One prompt's group, done: its place in the stream (`seq`, which its seed derives from), its row, episodes."""

    seq: int
    row: dict
    episodes: list[Episode]
    seconds: float  # generation wall time
    reward_seconds: float

    @property
    def oldest(self) -> int:
        return min(e.version for e in self.episodes)

    @property
    def informative(self) -> bool:
        return len(set(array("f", [e.score for e in self.episodes]))) > 1  # as cispo.sampling.dynamic compares

    def to_json(self) -> dict:
        return {"seq": self.seq, "row": self.row, "episodes": [e.to_json() for e in self.episodes],
                "seconds": self.seconds, "reward_seconds": self.reward_seconds}

    @classmethod
    def from_json(cls, d: dict) -> Group:
        return cls(d["seq"], d["row"], [Episode.from_json(e) for e in d["episodes"]], d["seconds"],
                   d["reward_seconds"])


class InFlight(Pipelined):
    """Groups generated continuously on rank 0's servers, weights updated in flight (module docstring)."""

    def __init__(self, sampler, sink, curriculum: Curriculum, *, target: int, steps: int, max_staleness: int,
                 max_off_policy_steps: int, sample_rounds: int, seed: int, dist, probe: list[int]):
        super().__init__(sampler, sink, curriculum, target=target, steps=steps, max_staleness=max_staleness,
                         dist=dist, probe=probe)
        self.max_off_policy_steps, self.sample_rounds, self.seed = max_off_policy_steps, sample_rounds, seed
        self.capacity = (max_staleness + 1) * target  # groups outstanding: generating, or done and waiting
        self.seq = 0  # the next group's number in the stream
        self.generating: dict[int, tuple[dict, Future, int]] = {}  # seq -> (row, its generation, its max_tokens)
        self.done: deque[Group] = deque()
        self.resend: list[tuple[int, dict]] = []  # (seq, row) generating at the checkpoint a run resumed from
        self.server_idle = 0.0
        self._pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------------------- the producer
    def _produce(self) -> None:
        self._pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="rollout-group")
        idle_since = time.perf_counter()
        try:
            while not self.stopping:
                if self.snapshot is not None:  # a new policy: loaded with the requests in flight
                    with self.servers:
                        self._serve_newest()
                self._admit()
                futures = [f for _, f, _ in self.generating.values()]
                if futures and idle_since is not None:
                    self.server_idle, idle_since = self.server_idle + time.perf_counter() - idle_since, None
                if not futures:
                    idle_since = idle_since or time.perf_counter()
                    time.sleep(POLL_S)
                    continue
                finished, _ = wait(futures, timeout=POLL_S, return_when=FIRST_COMPLETED)
                for seq in [s for s, (_, f, _) in self.generating.items() if f in finished]:
                    self._finish(seq)
        except BaseException as err:  # noqa: BLE001 - handed to the trainer thread, which raises it
            with self.cond:
                self.error = err
                self.cond.notify_all()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _admit(self) -> None:
        """Send groups while fewer than `capacity` are outstanding (first those a resumed run was generating)."""
        with self.cond:
            while len(self.generating) + len(self.done) < self.capacity and not self.stopping:
                if self.resend:
                    seq, row = self.resend.pop(0)
                else:
                    seq, row, self.seq = self.seq, self.curriculum.take(1)[0], self.seq + 1
                max_tokens = self.curriculum.max_tokens
                sampling = self.sampler.sampling(call_seed(self.seed, seq, 0, 0, 1), max_tokens)
                self.generating[seq] = (row, self._pool.submit(self.sampler.generate, [row], sampling), max_tokens)

    def _finish(self, seq: int) -> None:
        """Grade a finished group (here, on the producer's thread: graders need not be thread-safe) and queue it."""
        row, future, max_tokens = self.generating[seq]
        made = future.result()
        episodes, reward_seconds = self.sampler.episodes([row], made, max_tokens)
        with self.cond:
            del self.generating[seq]
            self.done.append(Group(seq, row, episodes, made.seconds, reward_seconds))
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------ the trainer's calls
    def next(self, step: int) -> FilledBatch:
        filled = None
        if self.dist.is_main:
            self._start()
            tick = time.perf_counter()
            with self.cond:
                taken = self._take(step)
                depth = len(self.done)
            self.trainer_idle += time.perf_counter() - tick
            filled = batch_of(taken, step, target=self.target, keep_all=self.sample_rounds == 1,
                              max_off_policy_steps=self.max_off_policy_steps)
            filled.metrics |= self.sync_metrics | {
                "async/queue_depth": float(depth), "async/trainer_idle_s": self.trainer_idle,
                "async/server_idle_s": self.server_idle}
            self.trainer_idle, self.server_idle, self.sync_metrics = 0.0, 0.0, {}
        return self.dist.broadcast_object(filled)

    def _take(self, step: int) -> list[Group]:
        """The finished groups of `step`'s batch, in the order they finished (holds `cond`): until `target` are
        kept by the rules of `batch_of`, or sample_rounds * target within the bound are taken."""
        taken: list[Group] = []
        kept = fresh = 0  # groups kept; groups within the bound (a stale group is replaced, not counted)
        while kept < self.target and fresh < self.sample_rounds * self.target:
            self.cond.wait_for(lambda: self.done or self.error is not None)
            if self.error is not None:
                raise RuntimeError("the rollout producer failed") from self.error
            group = self.done.popleft()
            taken.append(group)
            kept += keeps(group, step, self.max_off_policy_steps, self.sample_rounds == 1)
            fresh += step - 1 - group.oldest <= self.max_off_policy_steps
        self.cond.notify_all()  # room for more groups
        return taken

    @contextlib.contextmanager
    def paused(self):
        """The producer's bookkeeping holds still (no group sent, finished or taken) while a checkpoint is saved."""
        if not self.dist.is_main:
            yield
            return
        with self.cond:
            yield

    def state_dict(self) -> dict:
        with self.cond:
            generating = [{"seq": s, "row": row} for s, (row, _, _) in sorted(self.generating.items())]
            return {"mode": "server", "in_flight": True, "max_staleness": self.max_staleness, "seq": self.seq,
                    "generating": generating + [{"seq": s, "row": row} for s, row in self.resend],
                    "done": [g.to_json() for g in self.done], "ready": []}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ready"):
            raise ConfigError(f"the checkpoint holds {len(state['ready'])} batch(es) generated ahead with "
                              "rollout.server.in_flight=off, which this pipeline does not train: resume with "
                              "rollout.server.in_flight=off")
        self.seq = state.get("seq", 0)
        self.resend = [(g["seq"], g["row"]) for g in state.get("generating", [])]
        self.done = deque(Group.from_json(g) for g in state.get("done", []))


def keeps(group: Group, step: int, max_off_policy_steps: int, keep_all: bool) -> bool:
    """Whether `step`'s batch trains on `group`: its oldest token at most max_off_policy_steps policies older than
    pi_old (policy step - 1), and informative unless every group is kept (curriculum.sample_rounds == 1)."""
    return step - 1 - group.oldest <= max_off_policy_steps and (keep_all or group.informative)


def batch_of(taken: list[Group], step: int, *, target: int, keep_all: bool, max_off_policy_steps: int) -> FilledBatch:
    """`step`'s FilledBatch from the groups taken for it: the kept ones (`keeps`, at most `target`) trained on, the
    metrics over all (cispo.sampling.dynamic.step_metrics), every group's outcome for the pass rates."""
    kept = [g for g in taken if keeps(g, step, max_off_policy_steps, keep_all)][:target]
    stale = [g for g in taken if step - 1 - g.oldest > max_off_policy_steps]
    episodes = [e for g in kept for e in g.episodes]
    metrics = step_metrics([(g.row, e) for g in taken for e in g.episodes], max((g.seconds for g in taken), default=0),
                           sum(g.reward_seconds for g in taken)) | {
        "sampling/rounds": len(taken) / target, "sampling/prompts": float(len(taken)),
        "sampling/informative_frac": sum(g.informative for g in taken) / max(len(taken), 1),
        "sampling/kept": float(len(kept)), "sampling/filled": float(len(kept) >= target),
        "async/staleness": float(step - 1 - min((g.oldest for g in kept), default=step - 1)),
        "async/span_frac": sum(len(set(e.trajectory.versions)) > 1 for e in episodes) / max(len(episodes), 1),
        "async/dropped_groups": float(len(stale))}
    outcomes = [GroupOutcome(g.row["id"], sum(e.result.status == "correct" for e in g.episodes), len(g.episodes))
                for g in taken]
    return FilledBatch([g.row for g in kept], [g.episodes for g in kept], metrics, outcomes)
