"""The curriculum (cispo/sampling/curriculum.py): the staged output window advances on the p99 length and only then,
dynamic sampling refills zero-variance groups and lays the batch out as one generate call would, solved prompts
retire, and every piece resumes from its state_dict. Rewards come from the real RewardScorer (math fast path)."""

from __future__ import annotations

import json

import pytest

from cispo.config import ConfigError, CurriculumConfig
from cispo.sampling.curriculum import Curriculum, GroupOutcome, OutputWindow, PassRateTracker
from cispo.sampling.dynamic import fill as fill_step, fill_batch
from cispo.data.prompts import PromptStream
from cispo.sampling.sampler import Episode, SampledBatch
from rewards import RewardConfig, RewardScorer
from rollout.base import Completion
from rollout.trajectory import Trajectory

M1_WINDOWS = [40000, 48000, 56000, 64000, 72000, 80000]


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what a checkpoint stores


# ---- the output window -----------------------------------------------------------------------------------------


def test_window_advances_when_p99_nears_it_and_not_before():
    w = OutputWindow(M1_WINDOWS, threshold=0.95, patience=1)
    assert w.max_tokens == 40000
    assert not w.update(37999)  # 0.95 * 40000 = 38000
    assert w.max_tokens == 40000
    assert w.update(38000)
    assert (w.max_tokens, w.stage) == (48000, 1)
    assert not w.update(45000) and w.update(47000)
    assert w.max_tokens == 56000


def test_window_patience_needs_consecutive_steps():
    w = OutputWindow([10, 20], threshold=0.9, patience=3)
    assert [w.update(p) for p in (9, 9, 5, 9, 9)] == [False] * 5  # the short step resets the count
    assert w.update(9.5) and w.max_tokens == 20


def test_window_stays_at_the_last_stage():
    w = OutputWindow([10, 20], threshold=0.9, patience=1)
    assert w.update(10) and not w.update(20) and not w.update(10**9)
    assert w.max_tokens == 20 and w.last


def test_window_from_config():
    assert OutputWindow.from_config(CurriculumConfig(), 1024).windows == [1024]  # off: one stage
    assert OutputWindow.from_config(CurriculumConfig(windows=M1_WINDOWS), 80000).max_tokens == 40000
    with pytest.raises(ConfigError, match="beyond rollout.max_tokens"):
        OutputWindow.from_config(CurriculumConfig(windows=M1_WINDOWS), 40000)
    for bad in (dict(windows=[10, 10]), dict(windows=[20, 10]), dict(windows=[0, 10]), dict(window_threshold=0.0),
                dict(window_patience=0), dict(sample_rounds=0), dict(retire_pass_rate=1.5)):
        with pytest.raises(ConfigError):
            CurriculumConfig(**bad)


def test_window_state_dict_round_trip():
    a = OutputWindow(M1_WINDOWS, threshold=0.95, patience=2)
    for p in (39000, 39000, 47000):  # advanced once; one step near the second window
        a.update(p)
    b = OutputWindow(M1_WINDOWS, threshold=0.95, patience=2)
    b.load_state_dict(roundtrip(a.state_dict()))
    assert (b.stage, b.near) == (1, 1)
    lengths = [47000, 10, 55000, 55000, 63000, 63000]
    assert [b.update(p) for p in lengths] == [a.update(p) for p in lengths]
    assert b.max_tokens == a.max_tokens == 72000
    with pytest.raises(ConfigError, match="differ from the resumed run"):
        OutputWindow([1, 2], 0.9, 1).load_state_dict(a.state_dict())


def test_staged_window_simulation_m1_schedule():
    """M1 §5 in miniature: a policy whose p99 response length grows 1500 tokens per step until it hits the
    window (then the window truncates it). The window must step 40k -> 48k -> ... -> 80k, each advance on the step
    whose p99 first reaches 95% of the window, and the logged curriculum/window must be the one each step used."""
    curriculum = Curriculum(CurriculumConfig(windows=M1_WINDOWS, window_threshold=0.95), PromptStream([], 0), 80000)
    natural, log = 20000, []
    for step in range(1, 61):
        p99 = min(natural, curriculum.max_tokens)  # responses are cut at the window
        metrics = curriculum.update(_filled(p99))
        log.append((step, p99, metrics["curriculum/window"], metrics["curriculum/window_advanced"]))
        natural += 1500
    advances = [(step, window) for step, _, window, advanced in log if advanced]
    assert [w for _, w in advances] == M1_WINDOWS[:-1]
    assert [s for s, _ in advances] == [13, 19, 24, 29, 34]  # natural p99 first >= 38000, 45600, 53200, 60800, 68400
    assert log[-1][2] == 80000
    for step, p99, window, _ in log:
        assert p99 <= window


# ---- retirement ------------------------------------------------------------------------------------------------


def test_pass_rate_is_cumulative_and_retires_once():
    t = PassRateTracker(threshold=0.9)
    assert t.update([GroupOutcome("a", 8, 8), GroupOutcome("b", 7, 8)]) == ["a"]  # 1.0 and 0.875
    assert t.update([GroupOutcome("b", 8, 8)]) == ["b"]  # 15 / 16 = 0.9375
    assert t.update([GroupOutcome("b", 8, 8)]) == []  # already retired
    assert t.update([GroupOutcome("c", 8, 8), GroupOutcome("c", 0, 8)]) == []  # one step, two groups: 8 / 16
    assert t.pass_rate("b") == 23 / 24 and t.pass_rate("zzz") is None
    assert PassRateTracker(threshold=None).update([GroupOutcome("a", 8, 8)]) == []
    u = PassRateTracker(threshold=0.9)
    u.load_state_dict(roundtrip(t.state_dict()))
    assert u.counts == t.counts
    assert u.update([GroupOutcome("c", 16, 16)]) == t.update([GroupOutcome("c", 16, 16)]) == []  # 24 / 32 = 0.75


# ---- dynamic sampling ------------------------------------------------------------------------------------------

G = 4


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=1)) as s:
        yield s


def problems(correct: list[int]) -> list[dict]:
    """Rows whose k-th entry will get `correct[k]` of G answers right ("\\boxed{7}" vs "\\boxed{8}")."""
    return [{"id": f"p{i}", "prompt": f"q{i}", "answer": "7", "source": "math", "k": k} for i, k in enumerate(correct)]


class ScriptedSampler:
    """A cispo.sampling.sampler.Sampler whose k-th completion of a row is right when k < row["k"], graded for real."""

    multi_turn = False

    def __init__(self, scorer, calls: list, group_size: int = G):
        self.scorer, self.calls, self.group_size = scorer, calls, group_size

    def sample(self, rows, *, step, round_index, max_tokens) -> SampledBatch:
        self.calls.append((round_index, [r["id"] for r in rows]))
        done = []
        for i, row in enumerate(rows):
            for j in range(G):
                text = "\\boxed{7}" if j < row["k"] else "\\boxed{8}"
                done.append(Completion(i, [1] * (3 + i + j), [-0.1] * (3 + i + j), "stop", text))
        graded = self.scorer.score([c.text for c in done], [rows[c.prompt_index] for c in done])
        episodes = [Episode(c.prompt_index, Trajectory.single_turn([100 + c.prompt_index], c, 0), r, s, 0.0, m)
                    for c, r, s, m in zip(done, graded.results, graded.scores, graded.trainable)]
        return SampledBatch(len(rows), episodes, self.group_size, 0.5, 0.0)


def fill(stream, sampler, **kwargs):
    return fill_batch(stream.take, sampler, step=1, max_tokens=16, **kwargs)


def test_one_round_keeps_every_group_like_a_plain_step(scorer):
    stream, calls = PromptStream(problems([0, 2, 4, 1]), seed=0), []
    filled = fill(stream, ScriptedSampler(scorer, calls), target=4, max_rounds=1)
    assert len(calls) == 1 and len(filled.rows) == 4  # zero-variance groups included: the trainer drops them
    assert [len(g) for g in filled.groups] == [G] * 4
    assert [r["k"] for r in filled.rows] == [sum(e.result.status == "correct" for e in g) for g in filled.groups]
    assert filled.metrics["sampling/informative_frac"] == 0.5 and filled.metrics["sampling/filled"] == 1.0


def test_refill_until_the_batch_holds_target_informative_groups(scorer):
    n = 14
    order = [r["id"] for r in PromptStream(problems([0] * n), seed=0).take(n)]  # the order the stream serves
    served = [1, 2, 3, 0, 1, 4, 2, 0, 4, 3, 2, 1, 0, 0]  # correct answers of the i-th prompt served (of G = 4)
    k = {pid: c for pid, c in zip(order, served)}
    stream, calls = PromptStream([r | {"k": k[r["id"]]} for r in problems([0] * n)], seed=0), []
    filled = fill(stream, ScriptedSampler(scorer, calls), target=6, max_rounds=5)
    # round 1: 6 prompts, 4 informative (k = 0 and k = 4 are not); 2 missing at a rate of 4/6 -> ask for 3;
    # round 2: 1 informative of 3; 1 missing at 5/9 -> ask for 2; round 3: both informative, the first one fills it
    assert [(r, len(ids)) for r, ids in calls] == [(0, 6), (1, 3), (2, 2)]
    assert [r["id"] for r in filled.rows] == [order[i] for i in (0, 1, 2, 4, 6, 9)]
    # each kept group is its row's, with its grades
    assert [len(g) for g in filled.groups] == [G] * 6
    for row, group in zip(filled.rows, filled.groups):
        assert 0 < row["k"] < G and all(e.trajectory.prompt_ids[0] >= 100 for e in group)
        assert sum(e.result.status == "correct" for e in group) == row["k"]
        for e in group:
            assert (e.result.status == "correct") == (e.trajectory.text == "\\boxed{7}")
            assert e.score == (e.trajectory.text == "\\boxed{7}")
    # metrics describe everything generated (11 prompts), not the kept subset
    assert filled.metrics["sampling/prompts"] == 11 and filled.metrics["sampling/rounds"] == 3
    assert filled.metrics["sampling/informative_frac"] == pytest.approx(7 / 11)
    assert filled.metrics["sampling/kept"] == 6 and filled.metrics["sampling/filled"] == 1.0
    assert filled.metrics["reward/accuracy"] == pytest.approx(sum(served[:11]) / (11 * G))
    assert [(g.id, g.correct, g.total) for g in filled.outcomes] == [(order[i], served[i], G) for i in range(11)]


def test_refill_gives_up_after_max_rounds(scorer):
    stream, calls = PromptStream(problems([0, 4, 0, 4, 0, 4]), seed=0), []
    filled = fill(stream, ScriptedSampler(scorer, calls), target=3, max_rounds=3)
    assert len(calls) == 3 and [len(ids) for _, ids in calls] == [3, 3, 3]  # no informative group: full requests
    assert filled.rows == [] and filled.groups == []
    assert filled.metrics["sampling/filled"] == 0.0 and filled.metrics["sampling/informative_frac"] == 0.0
    assert filled.metrics["rollout/len_mean"] > 0  # the lengths of what was generated are still reported


def test_refill_checks_the_group_size(scorer):
    stream = PromptStream(problems([1, 2]), seed=0)
    with pytest.raises(ValueError, match="expected 3"):
        fill(stream, ScriptedSampler(scorer, [], group_size=3), target=2, max_rounds=1)


# ---- all together ----------------------------------------------------------------------------------------------


def test_curriculum_update_retires_solved_prompts_and_resumes(scorer):
    pattern = [4, 2, 4, 1, 3, 2]  # p0, p2 always solved
    cfg = CurriculumConfig(windows=[8, 16], window_threshold=0.9, sample_rounds=2, retire_pass_rate=0.9)
    stream = PromptStream(problems(pattern), seed=1)
    cur = Curriculum(cfg, stream, max_tokens=16)
    sampler = ScriptedSampler(scorer, [])
    filled = fill_step(cur, sampler, 1, target=3)
    metrics = cur.update(filled)
    assert metrics["curriculum/window"] == 8.0  # the window this step used; lengths up to 3 + 2 + 3 = 8 -> advance
    assert metrics["curriculum/window_advanced"] == 1.0 and cur.max_tokens == 16
    solved = {g.id for g in filled.outcomes if g.correct == G}
    assert stream.retired == solved and metrics["curriculum/retired"] == len(solved)
    # resume: a fresh stream and curriculum from the saved states continue identically
    state, stream_state = roundtrip(cur.state_dict()), roundtrip(stream.state_dict())
    stream2 = PromptStream(problems(pattern), seed=1)
    stream2.load_state_dict(stream_state)
    cur2 = Curriculum(cfg, stream2, max_tokens=16)
    cur2.load_state_dict(state)
    for _ in range(3):
        a, b = fill_step(cur, sampler, 2, 3), fill_step(cur2, sampler, 2, 3)
        assert [r["id"] for r in a.rows] == [r["id"] for r in b.rows]
        assert cur.update(a) == cur2.update(b)
    assert stream.retired == stream2.retired == {"p0", "p2"}
    assert all(r["id"] not in {"p0", "p2"} for r in stream.take(20))


def _filled(p99: float):
    """A FilledBatch stand-in carrying only what Curriculum.update reads."""
    class Filled:
        metrics = {"rollout/len_p99": p99}
        outcomes: list = []
    return Filled()
