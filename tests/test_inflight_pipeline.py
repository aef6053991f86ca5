"""Continuous batching with in-flight weight updates (cispo/sampling/inflight.py): the bookkeeping, against a scripted
sampler (graded for real) and an in-memory sink, where each group's generation is held or released by the test.

A straggler does not hold a step, its tokens span the versions published while it ran, the per-group bound drops
it when it is too old, and a checkpoint taken while groups are generating resumes with every prompt trained once.
(The servers' side, real requests across a real sync, is tests/test_in_flight.py.)
"""

from __future__ import annotations

import threading
import time

import pytest

from cispo.config import ConfigError, CurriculumConfig
from cispo.data.prompts import PromptStream
from cispo.sampling.curriculum import Curriculum
from cispo.sampling.inflight import InFlight
from cispo.sampling.pipeline import Pipelined
from cispo.sampling.sampler import Episode
from cispo.sampling.tool_rollouts import Generated
from cispo.train.collective import Dist
from rollout.base import Completion, SamplingParams
from rollout.trajectory import Trajectory
from test_pipeline import MemorySink, publish_without_probe, rows, scorer  # noqa: F401 - scorer: the fixture

G = 2


class HeldSampler:
    """Each group: its first token sampled under the version served when it starts, the rest under the version
    served when it is released (a request across syncs); half of each group right. Groups of `held` prompts wait
    for `release` (a straggler)."""

    multi_turn = False

    def __init__(self, scorer, sink, held: set[str]):
        self.scorer, self.sink, self.held = scorer, sink, held
        self.release = threading.Event()
        self.started: list[str] = []

    def sampling(self, seed: int, max_tokens: int) -> SamplingParams:
        return SamplingParams(n=G, max_tokens=max_tokens, seed=seed)

    def generate(self, rows, sampling) -> Generated:
        (row,) = rows
        self.started.append(row["id"])
        first = self.sink.served_version
        if row["id"] in self.held:
            assert self.release.wait(30)
        last = self.sink.served_version
        done = [Completion(0, [5, 6, 7], [-0.5] * 3, "stop", "\\boxed{7}" if j == 0 else "\\boxed{8}",
                           [first, last, last]) for j in range(G)]
        return Generated([Trajectory.single_turn([1, 2], c, first) for c in done], 0.01)

    def episodes(self, rows, made, max_tokens, first=0):
        graded = self.scorer.score([t.text for t in made.trajectories], rows * len(made.trajectories))
        return [Episode(0, t, r, s, 0.0, m) for t, r, s, m in zip(
            made.trajectories, graded.results, graded.scores, graded.trainable)], 0.0

    def evaluate(self, rows):
        return {}

    def close(self):
        self.release.set()


def in_flight(scorer, *, held=(), bound: int = 8, k: int = 1, stream: PromptStream | None = None):
    stream = stream or PromptStream(rows(16), seed=0)
    sink = MemorySink()
    sampler = HeldSampler(scorer, sink, set(held))
    pipe = InFlight(sampler, sink, Curriculum(CurriculumConfig(), stream, max_tokens=16), target=2, steps=20,
                    max_staleness=k, max_off_policy_steps=bound, sample_rounds=1, seed=0, dist=Dist(),
                    probe=[1, 2, 3])
    pipe.publish = lambda updater, step: publish_without_probe(pipe, step)
    pipe.check = lambda *a: None
    return pipe, sampler, stream


@pytest.fixture(autouse=True)
def sync_passes(monkeypatch):
    from cispo.sampling.pipeline import SyncCheck

    monkeypatch.setattr("cispo.sampling.pipeline.check_sync", lambda *a, **k: SyncCheck(0, 0, 0, 0, ""))


def train(pipe, steps: range) -> list:
    """Take each step's batch and publish the policy it trains, as the trainer does; the batches."""
    out = []
    for step in steps:
        filled = pipe.next(step)
        pipe.finish(filled)
        out.append(filled)
        pipe.publish(None, step)
    return out


ORDER = [r["id"] for r in PromptStream(rows(16), seed=0).take(16)]  # the order the stream gives the prompts
FIRST, SECOND = ORDER[0], ORDER[1]


def served(pipe, version: int) -> None:
    """Wait until the producer has had the servers load `version` (it does so between its polls)."""
    deadline = time.monotonic() + 10
    while pipe.sink.served_version < version:
        assert time.monotonic() < deadline, f"v{version} was never served"
        time.sleep(0.01)


def ids(filled) -> list[str]:
    return [r["id"] for r in filled.rows]


def test_a_straggler_does_not_hold_a_step_and_spans_the_versions_it_ran_under(scorer):
    pipe, sampler, _ = in_flight(scorer, held={FIRST})
    try:
        batches = train(pipe, range(1, 5))  # the first prompt is generating all along: four steps go by without it
        assert all(FIRST not in ids(b) for b in batches) and FIRST in sampler.started
        served(pipe, 4)
        sampler.release.set()
        late = train(pipe, range(5, 8))
    finally:
        pipe.close()
    (with_first,) = [b for b in late if FIRST in ids(b)]
    episode = with_first.groups[ids(with_first).index(FIRST)][0]
    first, last = episode.trajectory.versions[0], episode.trajectory.versions[-1]
    assert first == 0 and last >= 4 and episode.trajectory.versions == [first, last, last]
    assert with_first.metrics["async/span_frac"] > 0 and with_first.metrics["async/dropped_groups"] == 0
    assert with_first.metrics["async/staleness"] >= 4  # its oldest token is of policy 0


def test_a_group_past_the_bound_is_dropped_and_counted(scorer):
    pipe, sampler, _ = in_flight(scorer, held={FIRST}, bound=2)
    try:
        train(pipe, range(1, 5))
        sampler.release.set()
        late = train(pipe, range(5, 8))
    finally:
        pipe.close()
    assert not any(FIRST in ids(b) for b in late)  # oldest token of policy 0, trained at step >= 5: 4 > 2 behind
    assert sum(b.metrics["async/dropped_groups"] for b in late) == 1
    assert any(o.id == FIRST for b in late for o in b.outcomes)  # its prompt was generated: the pass rates see it
    assert all(len(b.rows) == 2 for b in late)  # the batch is still full


def test_a_checkpoint_while_groups_generate_resumes_with_every_prompt_trained_once(scorer):
    pipe, sampler, stream = in_flight(scorer, held={SECOND})
    try:
        before = train(pipe, range(1, 4))
        with pipe.paused():
            saved, saved_stream = pipe.state_dict(), stream.state_dict()
    finally:
        pipe.close()
    assert {"seq": 1, "row": next(r for r in rows(16) if r["id"] == SECOND)} in saved["generating"]  # as its prompt
    resumed_stream = PromptStream(rows(16), seed=0)
    resumed_stream.load_state_dict(saved_stream)
    pipe, sampler, _ = in_flight(scorer, stream=resumed_stream)
    pipe.load_state_dict(saved)
    try:
        after = train(pipe, range(4, 7))
    finally:
        pipe.close()
    trained = [i for b in before + after for i in ids(b)]
    assert len(trained) == len(set(trained)) == 12  # none twice
    assert SECOND in trained and set(trained) == set(ORDER[:12])  # none lost: the stream's first 12, in some order


def test_a_checkpoint_of_in_flight_groups_refuses_the_other_pipelines(scorer):
    pipe, _, _ = in_flight(scorer)
    state = {"mode": "server", "in_flight": True, "done": [{}], "generating": [], "ready": []}
    other = Pipelined(None, None, pipe.curriculum, target=2, steps=4, max_staleness=1, dist=Dist(), probe=[])
    with pytest.raises(ConfigError, match="rollout.server.in_flight"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="rollout.server.in_flight=off"):
        pipe.load_state_dict({"mode": "server", "ready": [{"step": 1}]})
