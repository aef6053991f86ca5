r"""Math reward: answer extraction, pre-checks, the integer/decimal fast path (checked against math-verify
itself), grading through the real worker pool (with a table of corner cases in both modes, and the plain-number
rule with reward.math_numeric on and off), and the pool's hard deadline.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_rewards_math.py -q
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from rewards import RewardConfig, RewardScorer
from rewards.math import (AnswerLimits, answer_parts, answer_region, fast_verdict, final_statement, last_boxed,
                          normalize, plain_number, precheck, strip_percent)
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
    "+".join(["1"] * 20000): "more than 1000 chars besides digits",
    "{" * 400 + "1" + "}" * 400: "brackets nested deeper than 20",
    "(" * 30 + "1" + ")" * 30: "brackets nested deeper than 20",
    "[(" * 11 + "1" + ")]" * 11: "brackets nested deeper than 20",
    "7" * 20001: "more than 20000 digits",
    "2^{100000}": "a power or factorial of more than 20000 digits",
    "0.5^{-70000}": "a power or factorial of more than 20000 digits",
    "(" + "7" * 50 + ")^{1000}": "a power or factorial of more than 20000 digits",
    "9999!": "a power or factorial of more than 20000 digits",
}


@pytest.mark.parametrize("answer", list(PATHOLOGICAL))
def test_pathological_answers_are_rejected_in_microseconds(answer):
    start = time.perf_counter()
    reason = precheck(answer, AnswerLimits())
    assert time.perf_counter() - start < 0.01
    assert reason == PATHOLOGICAL[answer]


@pytest.mark.parametrize("answer", ["e^{x^2}", "x^{2^{n}}", "2^{100}", "170!", "\\binom{10}{3}", "(n+1)!",
                                    "\\frac{1}{2}", "\\{1, 2\\}", "10^{6}", "\\sqrt{2}^{3}", "7" * 5000,
                                    "-" + "7" * 19999 + ".5", "\\frac{" + "7" * 9000 + "}{" + "3" * 9000 + "}",
                                    "2^{60000}", "10^{-5}", "5000!", "1^{-123456789}",
                                    "\\left(\\frac{\\sqrt{3}}{2}\\right)^{2}", "((1, 2), [3, 4])"])
def test_ordinary_answers_pass_the_prechecks(answer):
    assert precheck(answer, AnswerLimits()) is None


@pytest.mark.parametrize("field", ["max_answer_digits", "max_answer_chars", "max_brace_depth"])
def test_answer_limits_must_be_positive(field):
    with pytest.raises(ValueError, match=f"reward.{field} must be >= 1"):
        RewardConfig(**{field: 0})


@pytest.mark.parametrize("answer", ["7" * 5000, "7" * 5000 + " + 2^{2}", "7" * 5000 + " \\cdot 3!",
                                    "3^{" + "7" * 5000 + "}"])
def test_long_numbers_are_prechecked_in_linear_time(answer):
    # Each regex must try a number from its first digit only: from every digit, 5000 digits took 1.6 s.
    start = time.perf_counter()
    precheck(answer, AnswerLimits())
    assert time.perf_counter() - start < 0.1


# ---- fast path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("82", "82"), (" -7 ", "-7"), ("0.50", "0.5"), ("007", "7"), ("123456789012345", "123456789012345"),
    ("1234567890123456", "1234567890123456"), ("7" * 5000, "7" * 5000),  # integers of any length
    ("1234567890123456.5", None), ("1e5", None), ("+5", None), ("1,000", None), ("\\frac{1}{2}", None),
    (".5", None), ("5.", None), ("", None),
])
def test_plain_number(text, value):
    assert plain_number(text) == (None if value is None else plain_number(value))


def test_percent_is_decoration():
    assert [strip_percent(t) for t in ("50\\%", "50%", "12.5 \\%", "50")] == ["50", "50", "12.5", "50"]


def test_normalize_writes_every_empty_set_one_way():
    texts = ("\\varnothing", "\\{\\}", "\\{ \\}", "\u2205", "A \\cup \\varnothing", " 50\\% ")
    assert [normalize(t) for t in texts] == ["\\emptyset"] * 4 + ["A \\cup \\emptyset", "50"]


@pytest.mark.parametrize("text, parts", [
    ("2, 3", 2), ("2,3,4", 3), ("7", 1), ("(1, 2]", 1), ("\\{1, 2, 3\\}", 1), ("(1, 2), (3, 4)", 2),
    ("1,000", 1), ("1{,}000", 1), ("1\\,000", 1), ("1,000, 2", 2), ("1,00", 2), ("x = 2, y = 3", 2),
])
def test_answer_parts(text, parts):
    assert answer_parts(text) == parts


@pytest.mark.parametrize("region, statement", [
    ("So x = 3.", "So x = 3"),
    ("The answer is 7.\n\nCheck: 3 + 4 = 7.", "7"),
    ("Some work.\n**Final Answer:** $12$\n", "$12$"),
    ("the answers are 2 and 3", "2 and 3"),
    ("The answer is:\n\n$$42$$\n\nDone.", "$$42$$"),
    ("Therefore\n\\[\nx = 5\n\\]\n", "\\[ x = 5 \\]"),
    ("I am not sure what the answer is.", None),
    ("  \n \n", None),
])
def test_final_statement(region, statement):
    assert final_statement(region) == statement


FAST_PAIRS = [  # (gold, answer): the fast path must agree with math-verify wherever it decides
    ("82", "82"), ("82", "83"), ("82", "-82"), ("2", "2.0"), ("2", "2.5"), ("007", "7"), ("-0", "0"),
    ("0.5", "0.50"), ("0.333333", "0.3333333"), ("0.3333331", "0.3333333"), ("0.33", "0.333"),
    ("1000000", "1000000.000001"), ("123456789012345", "123456789012344"), ("3.14159", "3.1416"),
    ("100000000000000000001", "100000000000000000000"), ("12345678901234567.5", "12345678901234567.6"),
    ("7" * 5000, "7" * 5000), ("7" * 5000, "7" * 4999 + "6"), ("-" + "9" * 30, "9" * 30),
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
    # Within math-verify's rounding, or a decimal past 15 significant digits: math-verify decides.
    assert fast_verdict("0.3333331", "0.3333333") is None
    assert fast_verdict("1234567890123456.5", "1234567890123456.6") is None
    # Two integers are compared exactly, however long.
    assert fast_verdict("100000000000000000001", "100000000000000000000") is False
    assert fast_verdict("7" * 5000, "0" + "7" * 5000) is True


# ---- grading through the worker pool ---------------------------------------------------------------------

STRICT = [  # (response, gold, status)
    ("<think>so 82</think>The answer is \\boxed{82}.", "82", "correct"),
    ("</think>\\boxed{83}", "82", "wrong"),
    ("\\boxed{\\frac{1}{2}}", "0.5", "wrong"),  # reward.math_numeric: a plain-number gold needs a plain number
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
    ("\\boxed{2^{100}}", "1267650600228229401496703205376", "wrong"),  # reward.math_numeric
    ("\\boxed{2} or maybe \\boxed{3}", "3", "correct"),  # the last box is the answer
    ("\\boxed{2} or maybe \\boxed{3}", "2", "wrong"),
    ("The answer is 82.", "82", "no_answer"),
    ("<think>\\boxed{82} but I keep thinking", "82", "no_answer"),
    ("<think>\\boxed{82}</think> so 82", "82", "no_answer"),  # a box inside the thinking does not count
    ("\\boxed{82} wait, \\boxed{8", "82", "no_answer"),
    ("Put it in \\boxed{ }. 82", "82", "no_answer"),  # an empty box (the instruction's) holds no answer
    ("\\boxed{82}, in the form \\boxed{}", "82", "no_answer"),  # ... and the last box is the answer
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


def test_a_restated_computation_earns_nothing_by_default():
    with RewardScorer(RewardConfig(num_workers=1)) as scorer:
        batch = scorer.score(["\\boxed{123 \\times 456}"], [{"answer": "56088"}])
    assert RewardConfig().math_numeric is True
    assert (batch.results[0].status, batch.results[0].score) == ("wrong", 0.0)
    assert batch.results[0].info["reason"] == "the gold is a plain number and the answer is not (reward.math_numeric)"


def test_ungradable_gold_is_masked(strict_batch):
    statuses = [r.status for r in strict_batch.results]
    assert strict_batch.trainable == [s != "gold_unparseable" for s in statuses]


# ---- issue #18 corner cases: one table, both modes -------------------------------------------------------

LONG = "7" * 5000
TOO_LONG = "7" * 20001


def both(response: str, gold: str, status: str) -> list[tuple[str, str, str, str]]:
    """The same row in strict and in lenient mode."""
    return [(response, gold, "strict", status), (response, gold, "lenient", status)]


def numeric(response: str, gold: str, on: str, off: str) -> list[tuple[str, str, str, str, str]]:
    """The same NUMERIC_GOLD row in strict and in lenient mode."""
    return [(response, gold, "strict", on, off), (response, gold, "lenient", on, off)]


NUMERIC_GOLD = [  # (response, gold, mode, status with reward.math_numeric on (the default), status with it off)
    # an answer that restates the computation instead of doing it
    *numeric("\\boxed{123 \\times 456}", "56088", "wrong", "correct"),
    *numeric("\\boxed{87+4}", "91", "wrong", "correct"),
    *numeric("\\boxed{\\sqrt{3136}}", "56", "wrong", "correct"),
    *numeric("\\boxed{56088 = 123 \\times 456}", "56088", "wrong", "correct"),  # the value is what follows the last =
    ("The answer is 87+4.", "91", "lenient", "wrong", "correct"),  # math-verify's own extraction reads 87+4
    # the number itself, written as a plain number
    *numeric("\\boxed{56088}", "56088", "correct", "correct"),
    *numeric("\\boxed{56089}", "56088", "wrong", "wrong"),
    *numeric("\\boxed{11+6} = \\boxed{17}", "17", "correct", "correct"),  # the last box counts
    *numeric("\\boxed{-3.5}", "-3.5", "correct", "correct"),
    *numeric("\\boxed{+12}", "12", "correct", "correct"),
    *numeric("\\boxed{.5}", "0.5", "correct", "correct"),
    ("The answer is 56088.", "56088", "lenient", "correct", "correct"),
    # a fraction equal to the gold: a division left undone, even when it is the exact value of a decimal gold
    *numeric("\\boxed{\\frac{112176}{2}}", "56088", "wrong", "correct"),
    *numeric("\\boxed{\\frac{1}{2}}", "0.5", "wrong", "correct"),
    # a percent sign is decoration on either side (normalize drops it first)
    *numeric("\\boxed{50\\%}", "50", "correct", "correct"),
    *numeric("\\boxed{50}", "50\\%", "correct", "correct"),
    *numeric("\\boxed{\\frac{25}{2}\\%}", "12.5\\%", "wrong", "correct"),
    # scientific notation is an expression; a gold written in it is symbolic
    *numeric("\\boxed{1.2 \\times 10^{5}}", "120000", "wrong", "correct"),
    *numeric("\\boxed{5.6088e4}", "56088", "wrong", "wrong"),
    *numeric("\\boxed{120000}", "1.2 \\times 10^{5}", "correct", "correct"),
    # units: a \\text / \\mathrm / \\mbox word or a degree sign after the number, a dollar sign before it
    *numeric("\\boxed{56088 \\text{ apples}}", "56088", "correct", "correct"),
    *numeric("\\boxed{5\\,\\mathrm{cm}}", "5", "correct", "correct"),
    *numeric("\\boxed{30^\\circ}", "30", "correct", "correct"),
    *numeric("\\boxed{\\$56088}", "56088", "correct", "correct"),
    *numeric("\\boxed{56088}", "56088\\text{ apples}", "correct", "correct"),
    *numeric("\\boxed{56088 apples}", "56088", "wrong", "correct"),  # a bare word: not read as a unit
    *numeric("\\boxed{(87+4) \\text{ apples}}", "91", "wrong", "correct"),
    # thousands separators
    *numeric("\\boxed{56{,}088}", "56088", "correct", "correct"),
    *numeric("\\boxed{56,088}", "56088", "correct", "correct"),
    *numeric("\\boxed{56088}", "56{,}088", "correct", "correct"),
    *numeric("\\boxed{56\\,088}", "56088", "wrong", "wrong"),  # math-verify does not read a thin space in a number
    # an equals sign: the value is what follows the last one; a leading = is dropped
    *numeric("\\boxed{= 56088}", "56088", "correct", "correct"),
    *numeric("\\boxed{x = 56088}", "56088", "correct", "correct"),
    *numeric("\\boxed{123 \\times 456 = 56088}", "56088", "correct", "correct"),
    *numeric("\\boxed{56088}", "x = 56088", "correct", "correct"),
    # a symbolic gold: math-verify's equivalence as before
    *numeric("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", "correct", "correct"),
    *numeric("\\boxed{0.75}", "\\frac{3}{4}", "correct", "correct"),
    *numeric("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", "correct", "correct"),
    *numeric("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", "correct", "correct"),
    *numeric("\\boxed{(1, 2]}", "(1,2]", "correct", "correct"),
    *numeric("\\boxed{2x + 2}", "2(x+1)", "correct", "correct"),
    *numeric("\\boxed{3, 4}", "x = 3, y = 4", "correct", "correct"),  # several parts: not a plain number
]

CORNER_CASES = [  # (response, gold, mode, status)
    # 1. a trailing percent is decoration on either side, in both modes
    *both("\\boxed{50\\%}", "50", "correct"),
    *both("\\boxed{50}", "50\\%", "correct"),
    *both("\\boxed{12.5 \\%}", "12.5%", "correct"),
    *both("\\boxed{0.5}", "50\\%", "wrong"),
    ("The answer is 50%.", "50", "lenient", "correct"),
    ("The answer is $50\\%$.", "50", "lenient", "correct"),
    # 2. long plain numbers are cheap; costly shapes are rejected before sympy
    *both(f"\\boxed{{{LONG}}}", LONG, "correct"),
    *both(f"\\boxed{{{LONG[:-1]}6}}", LONG, "wrong"),
    *both(f"\\boxed{{-{LONG}.5}}", f"-{LONG}.5", "correct"),
    *both(f"\\boxed{{\\frac{{{LONG}}}{{{LONG}}}}}", "\\frac{7}{7}", "correct"),
    *both(f"\\boxed{{\\frac{{{LONG}}}{{{LONG}}}}}", "1", "wrong"),  # reward.math_numeric (section 6)
    *both(f"\\boxed{{{TOO_LONG}}}", TOO_LONG, "rejected"),
    *both("\\boxed{9^{9^{9^9}}}", "5", "rejected"),
    *both("\\boxed{100000!}", "5", "rejected"),
    *both("\\boxed{2^{100000}}", "5", "rejected"),
    *both("\\boxed{" + "(" * 30 + "1" + ")" * 30 + "}", "1", "rejected"),
    *both("\\boxed{" + "+".join(["1"] * 2000) + "}", "2000", "rejected"),
    # 3. the empty set, however it is written
    *both("\\boxed{\\emptyset}", "\\varnothing", "correct"),
    *both("\\boxed{\\varnothing}", "\\emptyset", "correct"),
    *both("\\boxed{\\{\\}}", "\\varnothing", "correct"),
    *both("\\boxed{\\varnothing}", "\\{\\}", "correct"),
    *both("\\boxed{\\emptyset}", "\\{0\\}", "wrong"),
    *both("\\boxed{\\{0\\}}", "\\varnothing", "wrong"),
    # 4. a multi-part gold may be answered one box per part; a single-part gold reads the last box only
    *both("\\boxed{2} and \\boxed{3}", "2, 3", "correct"),
    *both("$x = \\boxed{3}$ or $x = \\boxed{2}$", "2, 3", "correct"),
    *both("\\boxed{1}, \\boxed{2}, \\boxed{3}", "2, 3", "correct"),
    *both("\\boxed{2} and \\boxed{4}", "2, 3", "wrong"),
    *both("\\boxed{2}", "2, 3", "wrong"),
    *both("A first guess \\boxed{5}, then \\boxed{2, 3}", "2, 3", "correct"),
    *both("\\boxed{2} or maybe \\boxed{3}", "3", "correct"),
    *both("\\boxed{2} or maybe \\boxed{3}", "2", "wrong"),
    *both("\\boxed{(1, 2]}", "(1,2]", "correct"),
    # 5. lenient mode credits the final answer only: the last box, else the last "answer is" / "Answer:"
    #    statement, else the last line
    ("We get 7 apples. The answer is \\boxed{}.", "7", "lenient", "no_answer"),  # the box, empty: not the 7
    ("Since 3 + 4 = 7, the answer is \\boxed{\\frac{7}{}}", "7", "lenient", "wrong"),
    ("Adding 3 and 4 gives 7.\nI am not sure what the answer is.", "7", "lenient", "no_answer"),
    ("We know 7 is prime.\nSo I give up.", "7", "lenient", "no_answer"),
    ("<think>The answer is 7.</think>I do not know.", "7", "lenient", "no_answer"),
    ("3 + 4 = 7, so the answer is 8.", "7", "lenient", "wrong"),
    ("The answer is 7.\n\nCheck: 3 + 4 = 8, and 10 - 2 = 8.", "7", "lenient", "correct"),
    ("The final answer is $\\frac{1}{2}$.", "0.5", "lenient", "wrong"),  # reward.math_numeric (section 6)
    ("The final answer is $\\frac{1}{2}$.", "\\frac{2}{4}", "lenient", "correct"),
    ("**Answer:** $12$", "12", "lenient", "correct"),
    ("The answer is:\n\n$$42$$\n\nDone.", "42", "lenient", "correct"),
    ("So x = 3.", "3", "lenient", "correct"),
    ("Therefore\n\\[\nx = 5\n\\]", "5", "lenient", "correct"),
    ("I cannot tell.", "8", "lenient", "no_answer"),
    ("The answer is 82.", "82", "strict", "no_answer"),
    # 6. a plain-number gold needs a plain-number answer: the rows of NUMERIC_GOLD, reward.math_numeric on
    *[(response, gold, mode, on) for response, gold, mode, on, _ in NUMERIC_GOLD],
]


@pytest.fixture(scope="module")
def corner_grades(strict_scorer):
    """CORNER_CASES graded, strict rows by the strict scorer and lenient rows by a lenient one."""
    grades = {}
    with RewardScorer(RewardConfig(num_workers=2, math_mode="lenient")) as lenient_scorer:
        for mode, scorer in (("strict", strict_scorer), ("lenient", lenient_scorer)):
            rows = [i for i, case in enumerate(CORNER_CASES) if case[2] == mode]
            batch = scorer.score([CORNER_CASES[i][0] for i in rows], [{"answer": CORNER_CASES[i][1]} for i in rows])
            grades |= dict(zip(rows, batch.results, strict=True))
    return grades


@pytest.mark.parametrize("i", range(len(CORNER_CASES)),
                         ids=[f"{m}:{r[:24]}|{g[:8]}" for r, g, m, _ in CORNER_CASES])
def test_corner_cases(corner_grades, i):
    assert corner_grades[i].status == CORNER_CASES[i][3], (CORNER_CASES[i][:3], corner_grades[i])


@pytest.fixture(scope="module")
def numeric_off_grades():
    """NUMERIC_GOLD graded with reward.math_numeric off, each row in its mode."""
    grades = []
    for mode in ("strict", "lenient"):
        rows = [row for row in NUMERIC_GOLD if row[2] == mode]
        with RewardScorer(RewardConfig(num_workers=2, math_mode=mode, math_numeric=False)) as scorer:
            batch = scorer.score([r[0] for r in rows], [{"answer": r[1]} for r in rows])
        grades += zip(rows, batch.results, strict=True)
    return grades


def test_numeric_gold_rule_off_leaves_math_verify_to_judge(numeric_off_grades):
    assert [(row[:3], grade.status) for row, grade in numeric_off_grades] == \
        [(row[:3], row[4]) for row, _ in numeric_off_grades]
    assert not any("reason" in grade.info for _, grade in numeric_off_grades)


def test_numeric_gold_rule_says_why(corner_grades):
    first = CORNER_CASES.index(NUMERIC_GOLD[0][:4])
    decided = [corner_grades[first + i] for i, (*_, on, off) in enumerate(NUMERIC_GOLD) if on != off]
    assert {grade.info.get("reason") for grade in decided} == \
        {"the gold is a plain number and the answer is not (reward.math_numeric)"}


def child_pids() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    return pids


def test_workers_start_once_per_scorer(strict_scorer, strict_batch):
    before = child_pids()
    batch = strict_scorer.score(["\\boxed{\\frac{2}{4}}"] * 4, [{"answer": "\\frac{1}{2}"}] * 4)  # needs the workers
    assert [r.status for r in batch.results] == ["correct"] * 4
    assert child_pids() == before  # no process started (or lost) by a later step


def test_math_workers_have_an_address_space_limit(strict_scorer, strict_batch):
    for w in strict_scorer._pool("math")._workers:
        with open(f"/proc/{w.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max address space"))
        assert line.split()[3] == str(4096 << 20)


def test_lenient_mode_uses_math_verify_extraction():
    cases = [("The final answer is $\\frac{1}{2}$.", "\\frac{2}{4}", "correct"),
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
