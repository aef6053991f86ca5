"""The pipeline's bookkeeping under races and resumes (cispo/sampling/pipeline.py), the weight-sync check's stated
power, and a batch in flight as JSON.

The producer runs against a scripted sampler (graded for real) and an in-memory sink: the races here are between
the producer thread and a checkpoint or the curriculum, which a real engine would only make slower. A test hook
(`Pipelined.before_queue`) holds the producer at the exact point a race needs, so no test waits on a sleep.
"""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from cispo.config import ConfigError, CurriculumConfig
from cispo.data.prompts import PromptStream
from cispo.sampling.curriculum import Curriculum
from cispo.sampling.dynamic import FilledBatch
from cispo.sampling.pipeline import Pipelined, Synchronous, check_sync
from cispo.sampling.sampler import Episode, SampledBatch
from cispo.train.collective import Dist
from rewards import RewardConfig, RewardResult, RewardScorer
from rollout.base import Completion, SyncReport
from rollout.trajectory import Trajectory

G = 2


class MemorySink:
    """A weight sink that only records versions (the weights themselves do not matter to the bookkeeping)."""

    def __init__(self):
        self.served_version, self.written = 0, None

    def write(self, named_tensors, version: int) -> None:
        self.written = version

    def serve(self, version: int) -> SyncReport:
        assert self.written == version
        self.served_version = version
        return SyncReport(version, "memory", 0.0, 0.0, 0, 0, 1)

    def probe(self, ids):
        return {"memory": []}


class ScriptedSampler:
    """Half of each group right: every group informative; tokens stamped with the sink's version."""

    multi_turn = False

    def __init__(self, scorer, sink):
        self.scorer, self.sink, self.rows_seen = scorer, sink, []

    def sample(self, rows, *, step, round_index, max_tokens) -> SampledBatch:
        self.rows_seen.append([r["id"] for r in rows])
        done = [Completion(i, [5, 6, 7], [-0.5] * 3, "stop", "\\boxed{7}" if j == 0 else "\\boxed{8}")
                for i in range(len(rows)) for j in range(G)]
        graded = self.scorer.score([c.text for c in done], [rows[c.prompt_index] for c in done])
        episodes = [Episode(c.prompt_index, Trajectory.single_turn([1, 2], c, self.sink.served_version), r, s, 0.0, m)
                    for c, r, s, m in zip(done, graded.results, graded.scores, graded.trainable)]
        return SampledBatch(len(rows), episodes, G, 0.0, 0.0)

    def evaluate(self, rows):
        return {}

    def close(self):
        pass


class NoWeights:
    """The updater as publish sees it: named weights (none needed by the memory sink) and no policy to probe."""

    def named_weights(self):
        return iter(())


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=1)) as s:
        yield s


def rows(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"q{i}", "answer": "7", "source": "math"} for i in range(n)]


def pipelined(scorer, k: int, steps: int = 4, retire: float | None = None) -> tuple[Pipelined, PromptStream]:
    stream = PromptStream(rows(8), seed=0)
    curriculum = Curriculum(CurriculumConfig(retire_pass_rate=retire), stream, max_tokens=16)
    sink = MemorySink()
    pipe = Pipelined(ScriptedSampler(scorer, sink), sink, curriculum, target=2, steps=steps, max_staleness=k,
                     dist=Dist(), probe=[1, 2, 3])
    pipe.publish = lambda updater, step: publish_without_probe(pipe, step)
    return pipe, stream


def publish_without_probe(pipe: Pipelined, step: int) -> None:
    """Pipelined.publish less the policy forward of the probe (no policy here)."""
    pipe.sink.write(iter(()), step)
    with pipe.cond:
        pipe.snapshot, pipe.version = (step, []), step
        pipe.cond.notify_all()


# ---- a save while a batch is being queued ----------------------------------------------------------------------

def test_a_save_in_the_gap_before_a_batch_is_queued_waits_for_it(scorer, monkeypatch):
    """The producer has taken the batch's prompts from the stream; a save that got in before the batch is queued
    would store the advanced stream without the batch, and a resume would never train those prompts."""
    monkeypatch.setattr("cispo.sampling.pipeline.check_sync", lambda *a, **k: _passed())
    pipe, stream = pipelined(scorer, k=1)
    in_gap, release = threading.Event(), threading.Event()

    def hold():
        in_gap.set()
        assert release.wait(10)

    pipe.before_queue = hold
    pipe._start()
    assert in_gap.wait(10)  # step 1's prompts are taken, its batch not queued yet
    saved = {}

    def save():
        with pipe.paused():
            saved["rollouts"], saved["stream"] = pipe.state_dict(), stream.state_dict()

    saver = threading.Thread(target=save)
    saver.start()
    saver.join(0.5)
    blocked = saver.is_alive()
    pipe.before_queue = None
    release.set()
    saver.join(10)
    pipe.close()
    assert blocked, "the save ran while the producer held a batch it had not queued"
    taken = saved["stream"]["pos"]
    queued = sum(len(p["filled"]["rows"]) for p in saved["rollouts"]["ready"])
    assert taken == queued >= 2  # every prompt taken from the stream is in a saved batch


def _passed():
    from cispo.sampling.pipeline import SyncCheck

    return SyncCheck(0.0, 0.0, 0.0, 0.0, "")


# ---- the curriculum is updated before the next batch can start -----------------------------------------------------

def test_rl_step_finishes_the_curriculum_before_it_publishes(monkeypatch):
    """At algo.max_staleness=0 publishing the new weights releases the producer for the next batch: prompts the
    step retires must be out of the stream by then."""
    import cispo.trainer as trainer
    from cispo.config import Config
    from cispo.phases import PhaseMonitor

    calls = []

    class Rollouts:
        def next(self, step):
            calls.append("next")
            return FilledBatch([], [], {"rollout/len_p99": 0.0}, [])

        def updating(self):
            import contextlib

            calls.append("updating")
            return contextlib.nullcontext()

        def finish(self, filled):
            calls.append("finish")
            return {}

        def publish(self, updater, step):
            calls.append("publish")

    monkeypatch.setattr(trainer, "update_policy", lambda *a, **k: {"time/old_logp_s": 0.0})
    cfg = Config()
    cfg.algo.group_size = 1
    trainer.rl_step(cfg, 1, Rollouts(), None, PhaseMonitor(lambda text: None))
    assert calls == ["next", "updating", "finish", "publish"]


# ---- resuming with another mode or staleness ------------------------------------------------------------------------

def test_resume_refuses_batches_it_could_not_train_as_generated(scorer, monkeypatch):
    monkeypatch.setattr("cispo.sampling.pipeline.check_sync", lambda *a, **k: _passed())
    pipe, _ = pipelined(scorer, k=2, steps=3)
    pipe.start(NoWeights(), 0)
    pipe.next(1)  # the producer runs ahead: steps 2 and 3 are generated by policy v0
    with pipe.cond:
        pipe.cond.wait_for(lambda: len(pipe.ready) == 2)
    with pipe.paused():
        state = json.loads(json.dumps(pipe.state_dict()))
    pipe.close()
    assert [(p["step"], p["version"]) for p in state["ready"]] == [(2, 0), (3, 0)]

    with pytest.raises(ConfigError, match="rollout.mode=server"):  # colocated: the queue would be dropped
        Synchronous(None, None, None, 2).load_state_dict(state)
    smaller, _ = pipelined(scorer, k=1, steps=3)
    with pytest.raises(ConfigError, match=r"step 3's batch, generated by policy v0 \(2 steps stale\), beyond "
                                          r"algo.max_staleness=1: resume with algo.max_staleness >= 2"):
        smaller.load_state_dict(state)
    same, _ = pipelined(scorer, k=2, steps=3)
    same.load_state_dict(state)  # carried: trained first after the resume
    assert [p.step for p in same.ready] == [2, 3] and same.next_step == 4
    Synchronous(None, None, None, 2).load_state_dict(Synchronous(None, None, None, 2).state_dict())


# ---- the weight-sync check and its power ----------------------------------------------------------------------------

def _policies(seed: int, n: int, move: float, noise: float):
    rng = random.Random(seed)
    old = [-rng.uniform(0.5, 4.0) for _ in range(n)]
    new = [x + move * rng.choice((-1, 1)) * rng.uniform(0.5, 1.5) for x in old]
    served = lambda policy: [x + noise * rng.choice((-1, 1)) * rng.uniform(0, 2) for x in policy]  # noqa: E731
    return old, new, served


@pytest.mark.parametrize("noise, move", [(1e-6, 0.3), (0.05, 0.8)])  # fp32 servers; bf16 against an fp32 trainer
def test_the_sync_check_catches_servers_that_skipped_or_half_did_the_load(noise, move):
    """A half load leaves the probe about move / 2 from the new policy: caught once that is beyond
    SYNC_TOLERANCE x the start-up mismatch (the stated power)."""
    n = 64
    floor_old, _, served = _policies(0, n, 0.0, noise)
    floor = sum(abs(a - b) for a, b in zip(served(floor_old), floor_old)) / n  # start-up: equal weights
    old, new, served = _policies(1, n, move=move, noise=noise)
    assert not check_sync({"a": served(new)}, new, old, floor).error  # loaded
    skipped = check_sync({"a": served(new), "b": served(old)}, new, old, floor)
    assert "b is nearer the previous policy" in skipped.error and "did not load" in skipped.error
    half = [o if t % 2 else w for t, (o, w) in enumerate(zip(old, new))]  # half the tokens still the old policy's
    assert check_sync({"a": served(half)}, new, old, floor).error


def test_the_sync_check_detects_any_move_beyond_twice_the_mismatch():
    """The stated power: skipped loads are caught whenever mean |new - old| > 2 x the start-up mismatch."""
    n, noise = 64, 0.05
    for seed in range(200):
        old, new, served = _policies(seed, n, move=0.11, noise=noise)  # noise mean 0.05: move just over 2x
        stale = served(old)
        floor = sum(abs(a - b) for a, b in zip(stale, old)) / n
        moved = sum(abs(a - b) for a, b in zip(new, old)) / n
        if moved > 2 * floor:
            assert check_sync({"a": stale}, new, old, floor).error, seed


def test_the_old_max_rule_missed_a_skipped_load_at_bf16_mismatch():
    """Why the rule changed: at a start-up mismatch of 0.05 (max |diff|) and a move of 0.3, servers that never
    loaded passed the old check (diff > 0.5 moved and diff > 10 floor + 1e-4)."""
    old, new, served = _policies(2, 64, move=0.3, noise=0.05)
    stale = served(old)
    floor = max(abs(a - b) for a, b in zip(served(old), old))
    diff, moved = max(abs(a - b) for a, b in zip(stale, new)), max(abs(a - b) for a, b in zip(new, old))
    assert not (diff > 0.5 * moved and diff > 10 * floor + 1e-4)  # the old rule raised nothing
    mean_floor = sum(abs(a - b) for a, b in zip(served(old), old)) / 64
    assert check_sync({"a": stale}, new, old, mean_floor).error


# ---- a batch in flight as JSON --------------------------------------------------------------------------------------

def test_a_batch_in_flight_survives_json_whatever_its_grader_put_in_info():
    c = Completion(0, [5, 6, 9], [-0.1, -0.2, 0.0], "early_stop", "\\boxed{7}")
    t = Trajectory.single_turn([1, 2], c, version=3)
    info = {"n": np.int64(3), "x": np.float32(0.5), "seen": {"b", "a"}, "pair": (1, 2), "obj": object()}
    e = Episode(0, t, RewardResult(1.0, "correct", info), 1.0, 0.0, True)
    batch = FilledBatch([{"id": "p0"}], [[e]], {"reward/mean": 1.0}, [])
    back = FilledBatch.from_json(json.loads(json.dumps(batch.to_json())))
    (got,) = back.groups[0]
    assert got.trajectory == t and got.trajectory.loss_mask == [True, True, False] and got.version == 3
    assert got.result.info["n"] == 3 and got.result.info["x"] == 0.5 and got.result.info["seen"] == ["a", "b"]
    assert got.result.info["pair"] == [1, 2] and got.result.info["obj"].startswith("<object")
