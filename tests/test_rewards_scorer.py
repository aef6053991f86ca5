"""RewardScorer: routing by source through the grader table (built-in, plugin and reward.custom graders in one
batch), user functions (import path and registry), score shaping (format bonus, DAPO overlong penalty), truncation
masking, metrics, config validation.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_rewards_scorer.py -q
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards import (GRADERS, Grader, RewardConfig, RewardResult, RewardScorer, add_grader, register_grader,
                     register_reward_fn, resolve_reward_fn, row_source)
from rewards.scorer import STATUSES, overlong_penalty

ROOT = Path(__file__).resolve().parent.parent


def length_reward(response: str, row) -> RewardResult:
    """A user reward for the import-path test: 1 per 10 characters."""
    return RewardResult(len(response) / 10, "scored", {"chars": len(response)})


def number_reward(response: str, row) -> float:
    return 0.25


def broken_reward(response: str, row) -> RewardResult:
    raise KeyError("the user's function has a bug")


def wrong_type_reward(response: str, row):
    return "one"


@register_reward_fn("test_exact")
def make_exact(cfg: RewardConfig):
    def exact(response: str, row) -> RewardResult:
        ok = response.strip() == row["answer"]
        return RewardResult(cfg.correct_score if ok else cfg.wrong_score, "correct" if ok else "wrong", {})
    return exact


# ---- length shaping --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, expected", [
    (50, 0.0), (80, 0.0),  # up to max_tokens - buffer: no penalty
    (85, -0.25), (90, -0.5), (100, -1.0),  # linear inside the buffer
    (130, -1.0),  # beyond max_tokens: the full penalty
])
def test_overlong_penalty(length, expected):
    assert overlong_penalty(length, max_tokens=100, buffer=20, penalty=1.0) == pytest.approx(expected)


def test_overlong_penalty_off():
    assert overlong_penalty(10_000, max_tokens=100, buffer=0, penalty=1.0) == 0.0


def test_scores_add_the_overlong_penalty_to_the_grade():
    cfg = RewardConfig(overlong_buffer=20, overlong_penalty=0.5)
    with RewardScorer(cfg) as scorer:
        batch = scorer.score(["\\boxed{4}"] * 4, [{"answer": "4"}] * 4, response_lengths=[50, 90, 100, 120],
                             max_tokens=100)
    assert [r.score for r in batch.results] == [1.0] * 4  # the grade itself is untouched
    assert batch.scores == pytest.approx([1.0, 0.75, 0.5, 0.5])
    assert batch.metrics["reward/overlong_penalty_mean"] == pytest.approx(-1.25 / 4)
    assert batch.metrics["reward/overlong_frac"] == 0.75
    assert batch.metrics["reward/mean"] == pytest.approx(2.75 / 4)


def test_overlong_penalty_needs_lengths():
    with RewardScorer(RewardConfig(overlong_buffer=20)) as scorer:
        with pytest.raises(ValueError, match="response_lengths and max_tokens"):
            scorer.score(["\\boxed{4}"], [{"answer": "4"}])
        with pytest.raises(ValueError, match="must not exceed"):
            scorer.score(["\\boxed{4}"], [{"answer": "4"}], response_lengths=[5], max_tokens=10)


@pytest.mark.parametrize("mode, mask", [("score", [True, True, True]), ("mask", [True, False, True])])
def test_truncated_responses(mode, mask):
    responses = ["\\boxed{4}", "<think>and then I ran out of tok", "\\boxed{5}"]
    with RewardScorer(RewardConfig(truncated=mode)) as scorer:
        batch = scorer.score(responses, [{"answer": "4"}] * 3, truncated=[False, True, False])
    assert batch.trainable == mask
    assert [r.status for r in batch.results] == ["correct", "no_answer", "wrong"]  # still graded
    assert batch.metrics["reward/truncated_frac"] == pytest.approx(1 / 3)
    assert batch.metrics["reward/masked_frac"] == pytest.approx(mask.count(False) / 3)


def test_mask_mode_needs_the_truncated_flags():
    with RewardScorer(RewardConfig(truncated="mask")) as scorer, pytest.raises(ValueError, match="truncated flags"):
        scorer.score(["\\boxed{4}"], [{"answer": "4"}])


def test_format_score_rewards_an_extracted_answer_only():
    cfg = RewardConfig(format_score=0.1, wrong_score=-1.0, no_answer_score=-1.0)
    with RewardScorer(cfg) as scorer:
        batch = scorer.score(["\\boxed{4}", "\\boxed{5}", "it is 4"], [{"answer": "4"}] * 3)
    assert batch.scores == pytest.approx([1.1, -0.9, -1.0])


# ---- routing and user functions --------------------------------------------------------------------------


def test_rows_are_routed_by_source():
    cfg = RewardConfig(custom=f"{__name__}:length_reward")
    rows = [{"answer": "4"}, {"source": "math", "answer": "4"}, {"source": "code", "tests": {"inputs": ["1"],
            "outputs": ["1"]}}, {"source": "chat", "id": 7}]
    responses = ["\\boxed{4}", "\\boxed{5}", "no code block here", "x" * 25]
    with RewardScorer(cfg) as scorer:
        batch = scorer.score(responses, rows)
    assert [r.status for r in batch.results] == ["correct", "wrong", "no_answer", "scored"]
    assert batch.results[3] == RewardResult(2.5, "scored", {"chars": 25})
    assert batch.metrics["reward/chat/mean"] == 2.5 and batch.metrics["reward/math/mean"] == 0.5
    assert batch.metrics["reward/status/scored"] == 0.25


def test_custom_fn_by_registered_name():
    with RewardScorer(RewardConfig(custom="test_exact", wrong_score=-1.0)) as scorer:
        batch = scorer.score(["yes", "no"], [{"source": "qa", "answer": "yes"}] * 2)
    assert batch.scores == [1.0, -1.0]


def test_custom_fn_may_return_a_number():
    with RewardScorer(RewardConfig(custom=f"{__name__}:number_reward")) as scorer:
        assert scorer.score(["a"], [{"source": "qa"}]).results[0] == RewardResult(0.25, "custom", {})


def test_a_failing_custom_fn_scores_error_and_logs_once(caplog):
    with RewardScorer(RewardConfig(custom=f"{__name__}:broken_reward", wrong_score=-1.0)) as scorer:
        with caplog.at_level(logging.ERROR, logger="rewards.scorer"):
            batch = scorer.score(["a", "b"], [{"source": "qa"}] * 2)
    assert [(r.score, r.status) for r in batch.results] == [(-1.0, "error")] * 2
    assert "the user's function has a bug" in batch.results[0].info["reason"]
    assert len(caplog.records) == 1


def test_a_custom_fn_returning_the_wrong_type_is_an_error():
    with RewardScorer(RewardConfig(custom=f"{__name__}:wrong_type_reward")) as scorer:
        with pytest.raises(TypeError, match="RewardResult or a number"):
            scorer.score(["a"], [{"source": "qa"}])


def test_unknown_source_without_custom_fn_is_an_error_naming_the_graders():
    with RewardScorer(RewardConfig()) as scorer, pytest.raises(ValueError) as err:
        scorer.score(["a"], [{"source": "qa"}])
    message = str(err.value)
    assert "row source 'qa' has no grader" in message and {"code", "math"} <= registered_names(message)
    assert "register_grader('qa'" in message and "reward.grader_modules" in message and "reward.custom" in message


def registered_names(message: str) -> set[str]:
    """The sources an unknown-source error lists as registered."""
    return set(message.split("(registered: ")[1].split(")")[0].split(", "))


# ---- the grader table: plugins registered from outside the package -------------------------------------------

PLUGIN = "tests.grader_plugin"  # registers "echo" (in this process) and "countdown" (in the worker pool)


def test_math_and_two_plugin_graders_in_one_batch():
    cfg = RewardConfig(grader_modules=[PLUGIN], custom=f"{__name__}:length_reward", num_workers=1)
    countdown = {"source": "countdown", "answer": "24", "nums": [4, 6, 1]}
    rows = [{"answer": "4"}, {"source": "echo", "answer": "hi"}, countdown, {"source": "echo", "answer": "hi"},
            countdown, countdown, {"source": "chat"}]
    responses = ["\\boxed{4}", " hi ", "\\boxed{(4 * 6) * 1}", "bye", "\\boxed{4 + 6 + 1}", "24", "x" * 5]
    with RewardScorer(cfg) as scorer:
        batch = scorer.score(responses, rows)
        assert set(scorer._pools) == {"countdown"}  # the math row took the fast path; echo runs here
    assert [r.status for r in batch.results] == ["correct", "correct", "correct", "wrong", "wrong", "no_answer",
                                                 "scored"]
    assert batch.results[2].info == {"value": 24} and batch.results[4].info == {"value": 11}  # worker grades
    m = batch.metrics
    assert (m["reward/math/mean"], m["reward/echo/mean"], m["reward/countdown/mean"], m["reward/chat/mean"]) == \
        (1.0, 0.5, pytest.approx(1 / 3), 0.5)
    assert m["reward/countdown/no_answer_frac"] == pytest.approx(1 / 3)  # the plugin's own metric
    assert m["reward/math/fast_path_frac"] == 1.0
    assert "reward/echo/no_answer_frac" not in m and "reward/math/no_answer_frac" not in m


def test_a_bad_grader_module_is_named():
    with pytest.raises(ValueError, match="reward.grader_modules: cannot import 'no_such_plugin_xyz'"):
        RewardScorer(RewardConfig(grader_modules=["no_such_plugin_xyz"]))


def test_register_grader_refuses_a_taken_source():
    import tests.grader_plugin as plugin

    register_grader("echo", plugin.echo, needs=("answer",))  # the same entry again (a module imported twice): fine
    with pytest.raises(ValueError, match="source 'math' already has a grader"):
        register_grader("math", length_reward)
    with pytest.raises(ValueError, match="source 'echo' already has a grader"):
        add_grader(Grader("echo", length_reward, needs=("answer",)))
    assert GRADERS["echo"].grade is plugin.echo and GRADERS["math"].needs == ("answer",)


def test_register_grader_as_a_decorator_and_needs_as_a_tuple():
    @register_grader("test_decorated", needs=("answer", "hint"))
    def decorated(response, row):
        return 1.0

    assert GRADERS.pop("test_decorated") == Grader("test_decorated", decorated, ("answer", "hint"))
    with pytest.raises(TypeError, match="tuple of field names"):
        register_grader("test_str_needs", decorated, needs="answer")
    assert "test_str_needs" not in GRADERS


@pytest.mark.parametrize("row, source", [({}, "math"), ({"source": None}, "math"), ({"source": ""}, "math"),
                                         ({"source": "code"}, "code"), ({"source": "echo"}, "echo")])
def test_row_source_defaults_to_math(row, source):
    assert row_source(row) == source


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:fn", "cannot import"),
    (f"{__name__}:no_such_fn", "cannot import"),
    ("never_registered", "not a registered reward fn"),
])
def test_resolve_reward_fn_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_reward_fn(spec, RewardConfig())


# ---- metrics and the fast path ---------------------------------------------------------------------------


def test_metrics_keys_and_fractions():
    with RewardScorer(RewardConfig()) as scorer:
        batch = scorer.score(["\\boxed{4}", "\\boxed{5}", "none", "\\boxed{9^{9^9}}"], [{"answer": "4"}] * 4)
    m = batch.metrics
    for status in STATUSES:
        assert f"reward/status/{status}" in m
    assert (m["reward/status/correct"], m["reward/status/wrong"], m["reward/status/no_answer"],
            m["reward/status/rejected"]) == (0.25, 0.25, 0.25, 0.25)
    assert m["reward/accuracy"] == 0.25 and m["reward/mean"] == 0.25
    assert m["reward/math/fast_path_frac"] == 0.5
    assert m["reward/time_s"] >= 0.0 and "reward/truncated_frac" not in m


def test_integer_batches_never_reach_sympy():
    """The default run scores 256 short integer answers per step: all on the fast path, in this process,
    without starting a worker or importing sympy."""
    script = """
import sys, time
from rewards import RewardConfig, RewardScorer
scorer = RewardScorer(RewardConfig())
start = time.perf_counter()
batch = scorer.score(["<think>...</think> \\\\boxed{%d}" % (i % 100) for i in range(256)],
                     [{"answer": str(i % 97)} for i in range(256)], progress=True)
elapsed = time.perf_counter() - start
assert batch.metrics["reward/math/fast_path_frac"] == 1.0
assert not scorer._pools and "sympy" not in sys.modules and "math_verify" not in sys.modules
print(elapsed)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0.5
    assert "rewards" in out.stderr  # the progress bar


def test_mismatched_lengths_are_rejected():
    with RewardScorer(RewardConfig()) as scorer:
        with pytest.raises(ValueError, match="2 responses but 1 rows"):
            scorer.score(["a", "b"], [{"answer": "1"}])
        with pytest.raises(ValueError, match="truncated"):
            scorer.score(["a"], [{"answer": "1"}], truncated=[True, False])


# ---- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"math_mode": "x"}, "reward.math_mode must be 'strict' or 'lenient', got 'x'"),
    ({"truncated": "drop"}, "reward.truncated must be 'score' or 'mask'"),
    ({"code_mode": "some"}, "reward.code_mode must be 'all' or 'fraction'"),
    ({"num_workers": 0}, "reward.num_workers must be >= 1"),
    ({"timeout_s": 0}, "reward.timeout_s must be > 0"),
    ({"overlong_buffer": -1}, "reward.overlong_buffer must be >= 0"),
    ({"code_uid_base": 0}, "reward.code_uid_base must be an unused uid >= 1000"),
    ({"code_max_procs": 2}, "reward.code_max_procs must be >= 4"),
    ({"custom": " "}, "reward.custom must be null"),
    ({"grader_modules": ["mypkg.graders", ""]}, "reward.grader_modules must list module names"),
])
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RewardConfig(**kwargs)


def test_close_stops_the_workers():
    scorer = RewardScorer(RewardConfig(num_workers=1))
    scorer.score(["\\boxed{\\frac{1}{2}}"], [{"answer": "\\frac{2}{4}"}])  # a symbolic gold: starts the pool
    proc = scorer._pools["math"]._workers[0].proc
    scorer.close()
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is not None
