r"""Math reward: answer extraction, pre-checks, the integer/decimal fast path (checked against math-verify
itself), grading through the real worker pool, and the pool's hard deadline.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_rewards_math.py -q
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from rewards import RewardConfig, RewardScorer
from rewards.math import answer_region, fast_verdict, last_boxed, plain_number, precheck, strip_percent
from rewards.pool import WorkerPool

# ---- extraction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, region", [
    ("<think>a</think>b", "b"),
    ("a</think>b", "b"),  # the template put <think> in the prompt
    ("<think>x</think>y</think>z", "z"),  # the last end marker counts
    ("<think>never closed \\boxed{1}", None),
    ("no markers \\boxed{1}", "no markers \\boxed{1}"),
])
def test_answer_region(response, region):
    assert answer_region(response, "<think>", "</think>") == region


@pytest.mark.parametrize("text, content", [
    ("\\boxed{82}", "82"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed {x}", "x"),
    ("\\boxed{1} and at the end \\boxed{\\frac{1}{2}", None),  # the final box never closes
    ("no box", None),
    ("\\boxed{}", ""),
])
def test_last_boxed(text, content):
    assert last_boxed(text) == content


# ---- pre-checks ------------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "9^{9^{9}}": "power tower",
    "2^{2^{2^{2^{2^2}}}}": "power tower",
    "10^{10^{10}}": "power tower",
    "3^{10^9}": "power tower",
    "9^9^9": "power tower",
    "7^{123456789}": "huge exponent",
    "1000000!": "huge factorial",
    "(10^{10})!": "factorial of a power",
    "10^{100}!": "factorial of a power",
    "\\binom{10000000}{5000000}": "huge binomial",
    "\\binom{10^9}{5\\cdot10^8}": "huge binomial",
    "3^{10^{8}} \\bmod 7": "power tower",
    "+".join(["1"] * 20000): "longer than 1000 chars",
    "{" * 400 + "1" + "}" * 400: "braces nested deeper than 20",
}


@pytest.mark.parametrize("answer", list(PATHOLOGICAL))
def test_pathological_answers_are_rejected_in_microseconds(answer):
    start = time.perf_counter()
    reason = precheck(answer, max_chars=1000, max_depth=20)
    assert time.perf_counter() - start < 0.01
    assert reason == PATHOLOGICAL[answer]


@pytest.mark.parametrize("answer", ["e^{x^2}", "x^{2^{n}}", "2^{100}", "170!", "\\binom{10}{3}", "(n+1)!",
                                    "\\frac{1}{2}", "\\{1, 2\\}", "10^{6}", "\\sqrt{2}^{3}"])
def test_ordinary_answers_pass_the_prechecks(answer):
    assert precheck(answer, max_chars=1000, max_depth=20) is None


# ---- fast path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("82", "82"), (" -7 ", "-7"), ("0.50", "0.5"), ("007", "7"), ("123456789012345", "123456789012345"),
    ("1234567890123456", None), ("1e5", None), ("+5", None), ("1,000", None), ("\\frac{1}{2}", None),
    (".5", None), ("5.", None), ("", None),
])
def test_plain_number(text, value):
    assert plain_number(text) == (None if value is None else plain_number(value))


def test_percent_is_decoration():
    assert [strip_percent(t) for t in ("50\\%", "50%", "12.5 \\%", "50")] == ["50", "50", "12.5", "50"]


FAST_PAIRS = [  # (gold, answer): the fast path must agree with math-verify wherever it decides
    ("82", "82"), ("82", "83"), ("82", "-82"), ("2", "2.0"), ("2", "2.5"), ("007", "7"), ("-0", "0"),
    ("0.5", "0.50"), ("0.333333", "0.3333333"), ("0.3333331", "0.3333333"), ("0.33", "0.333"),
    ("1000000", "1000000.000001"), ("123456789012345", "123456789012344"), ("3.14159", "3.1416"),
    ("100000000000000000001", "100000000000000000000"), ("12345678901234567.5", "12345678901234567.6"),
]


@pytest.mark.parametrize("gold, answer", FAST_PAIRS)
def test_fast_path_agrees_with_math_verify(gold, answer):
    from math_verify import LatexExtractionConfig, parse, verify

    target = [LatexExtractionConfig(boxed_match_priority=0)]
    truth = verify(parse(f"\\boxed{{{gold}}}", extraction_config=target),
                   parse(f"\\boxed{{{answer}}}", extraction_config=target))
    verdict = fast_verdict(gold, answer)
    assert verdict is None or verdict == truth


def test_fast_path_decides_the_common_cases():
    assert [fast_verdict(g, a) for g, a in [("82", "82"), ("82", "83"), ("2", "2.0"), ("0.5", "0.75")]] == \
        [True, False, True, False]
    # Within math-verify's rounding, or past 15 significant digits: math-verify decides.
    assert fast_verdict("0.3333331", "0.3333333") is None
    assert fast_verdict("100000000000000000001", "100000000000000000000") is None


# ---- grading through the worker pool ---------------------------------------------------------------------

STRICT = [  # (response, gold, status)
    ("<think>so 82</think>The answer is \\boxed{82}.", "82", "correct"),
    ("</think>\\boxed{83}", "82", "wrong"),
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
    ("\\boxed{1/2}", "\\frac{1}{2}", "correct"),
    ("\\boxed{0.5}", "\\dfrac12", "correct"),
    ("\\boxed{0.3333333}", "\\frac{1}{3}", "correct"),  # math-verify rounds to 6 places
    ("\\boxed{0.33}", "\\frac{1}{3}", "wrong"),
    ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", "correct"),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", "wrong"),
    ("\\boxed{(1, 2]}", "(1,2]", "correct"),
    ("\\boxed{[1, 2]}", "(1,2]", "wrong"),
    ("\\boxed{x = 3}", "3", "correct"),
    ("\\boxed{3}", "x=3", "correct"),
    ("\\boxed{5\\text{ cm}}", "5", "correct"),
    ("\\boxed{50\\%}", "50", "correct"),
    ("\\boxed{50}", "50\\%", "correct"),
    ("\\boxed{0.5}", "50\\%", "wrong"),
    ("\\boxed{1,000}", "1000", "correct"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "correct"),
    ("\\boxed{2^{100}}", "1267650600228229401496703205376", "correct"),
    ("\\boxed{2} or maybe \\boxed{3}", "3", "correct"),  # the last box is the answer
    ("\\boxed{2} or maybe \\boxed{3}", "2", "wrong"),
    ("The answer is 82.", "82", "no_answer"),
    ("<think>\\boxed{82} but I keep thinking", "82", "no_answer"),
    ("<think>\\boxed{82}</think> so 82", "82", "no_answer"),  # a box inside the thinking does not count
    ("\\boxed{82} wait, \\boxed{8", "82", "no_answer"),
    ("\\boxed{9^{9^{9}}}", "5", "rejected"),
    ("\\boxed{(10^{10})!}", "5", "rejected"),
    ("\\boxed{82}", "", "gold_unparseable"),
]


@pytest.fixture(scope="module")
def strict_scorer():
    with RewardScorer(RewardConfig(num_workers=2, wrong_score=-1.0, no_answer_score=-0.5)) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def strict_batch(strict_scorer):
    return strict_scorer.score([r for r, _, _ in STRICT], [{"answer": g} for _, g, _ in STRICT])


@pytest.mark.parametrize("i", range(len(STRICT)), ids=[f"{r[:30]}|{g[:12]}" for r, g, _ in STRICT])
def test_strict_grading(strict_batch, i):
    response, gold, status = STRICT[i]
    result = strict_batch.results[i]
    assert result.status == status, result
    assert result.score == {"correct": 1.0, "no_answer": -0.5}.get(status, -1.0)


def test_ungradable_gold_is_masked(strict_batch):
    statuses = [r.status for r in strict_batch.results]
    assert strict_batch.loss_mask == [s != "gold_unparseable" for s in statuses]


def child_pids() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    return pids


def test_workers_start_once_per_scorer(strict_scorer, strict_batch):
    before = child_pids()
    batch = strict_scorer.score(["\\boxed{\\frac{2}{4}}"] * 4, [{"answer": "0.5"}] * 4)  # needs the workers
    assert [r.status for r in batch.results] == ["correct"] * 4
    assert child_pids() == before  # no process started (or lost) by a later step


def test_math_workers_have_an_address_space_limit(strict_scorer, strict_batch):
    for w in strict_scorer._pool("math")._workers:
        with open(f"/proc/{w.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max address space"))
        assert line.split()[3] == str(4096 << 20)


def test_lenient_mode_uses_math_verify_extraction():
    cases = [("The final answer is $\\frac{1}{2}$.", "0.5", "correct"),
             ("So x = 3.", "3", "correct"),
             ("Therefore, the answer is $7$.", "8", "wrong"),
             ("<think>unclosed $\\frac12$", "0.5", "no_answer"),
             ("I cannot tell.", "8", "no_answer")]
    with RewardScorer(RewardConfig(num_workers=1, math_mode="lenient")) as scorer:
        batch = scorer.score([c[0] for c in cases], [{"answer": c[1]} for c in cases])
    assert [r.status for r in batch.results] == [c[2] for c in cases]


# ---- the pool's hard deadline ----------------------------------------------------------------------------


def make_uninterruptible_worker(slot: int, options: dict):
    """Pool factory for the deadline test. It stands in for a sympy call stuck in C code, where
    math-verify's SIGALRM cannot land: no real input we tried got past that alarm."""

    def handle(payload):
        if payload == "hang":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
            time.sleep(60)
        if payload == "crash":
            os._exit(3)
        if payload == "raise":
            raise ValueError("boom")
        return payload, os.getpid()

    return handle


def test_pool_kills_and_replaces_a_hung_or_crashed_worker(monkeypatch):
    # The worker imports this module by name: put its directory on the workers' path.
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))
    with WorkerPool(f"{__name__}:make_uninterruptible_worker", 2) as pool:
        first_pids = {w.proc.pid for w in pool._workers}
        start = time.monotonic()
        outcomes = pool.map(["a", "hang", "b", "crash", "raise", "c"], deadline_s=1.0)
        assert time.monotonic() - start < 5.0
        assert [o.status for o in outcomes] == ["ok", "timeout", "ok", "crashed", "error", "ok"]
        assert "ValueError: boom" in outcomes[4].detail
        pids_now = {w.proc.pid for w in pool._workers}
        assert len(first_pids - pids_now) == 2  # both the hung and the crashed worker were replaced
        for pid in first_pids - pids_now:
            assert not os.path.exists(f"/proc/{pid}")
        again = pool.map(["x", "y", "z"], deadline_s=5.0)
        assert [o.value[0] for o in again] == ["x", "y", "z"]


def test_a_worker_that_cannot_start_fails_loudly():
    with pytest.raises(RuntimeError, match="failed to start"):
        WorkerPool("rewards.no_such_module:factory", 1)
