"""A grader plugin, registered from outside the `rewards` package the way a user's own module is: the run names it
in reward.grader_modules (as "tests.grader_plugin", the name the pool's workers import it by too).

    echo       graded in the trainer process: correct when the response is the row's answer.
    countdown  graded in the reward worker pool: the response's last \\boxed{} must be an arithmetic expression
               (+ - * / and parentheses) that uses each of the row's `nums` exactly once and equals its answer.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any

from rewards import Grader, PoolBacked, RewardConfig, RewardResult, add_grader, register_grader
from rewards.base import Grade
from rewards.math import answer_region, last_boxed

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@register_grader("echo", needs=("answer",))
def echo(response: str, row: Mapping[str, Any]) -> RewardResult:
    """1 when the response, stripped, is the row's answer."""
    ok = response.strip() == row["answer"]
    return RewardResult(1.0 if ok else 0.0, "correct" if ok else "wrong", {})


def prepare_countdown(response: str, row: Mapping[str, Any], cfg: RewardConfig) -> Grade | dict:
    """No boxed expression: "no_answer" here; otherwise the worker's task."""
    region = answer_region(response, cfg.think_start, cfg.think_end)
    expression = None if region is None else last_boxed(region)
    if expression is None:
        return Grade("no_answer", {})
    return {"expression": expression, "nums": list(row["nums"]), "target": float(row["answer"])}


def evaluate(node: ast.AST, used: list[int]) -> float:
    """The value of an expression of integer literals and + - * /; the literals are appended to `used`."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](evaluate(node.left, used), evaluate(node.right, used))
    raise ValueError(f"not allowed: {ast.dump(node)[:80]}")


def countdown_verdict(task: dict) -> Grade:
    """The worker's handler: "correct" | "wrong" (info["reason"] says why)."""
    used: list[int] = []
    try:
        value = evaluate(ast.parse(task["expression"], mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return Grade("wrong", {"reason": str(e)})
    if sorted(used) != sorted(task["nums"]):
        return Grade("wrong", {"reason": f"uses {sorted(used)}, not {sorted(task['nums'])}"})
    return Grade("correct" if abs(value - task["target"]) < 1e-9 else "wrong", {"value": value})


def make_countdown_worker(slot: int, options: dict):
    """Pool factory (runs in each worker process)."""
    return countdown_verdict


def countdown_options(cfg: RewardConfig) -> dict:
    return {}


def countdown_deadline_s(cfg: RewardConfig, task: dict) -> float:
    return cfg.timeout_s


def countdown_metrics(results: list[RewardResult]) -> dict[str, float]:
    """no_answer_frac: responses without a boxed expression."""
    return {"no_answer_frac": sum(r.status == "no_answer" for r in results) / len(results)}


COUNTDOWN = add_grader(Grader(
    "countdown", PoolBacked(prepare_countdown, "tests.grader_plugin:make_countdown_worker", countdown_options,
                            countdown_deadline_s),
    needs=("answer", "nums"), metrics=countdown_metrics))
