"""Code reward: run the response's final Python block against the row's tests, each test in its own sandbox.

Test format (`row["tests"]`, a dict or its JSON string; APPS / LiveCodeBench style):
  stdin/stdout:  {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}
      The program reads input[i] on stdin; its stdout must equal output[i] line for line (trailing
      whitespace, CRLF and trailing blank lines ignored; numeric tokens equal within 1e-6). The run
      must also exit with status 0.
  function call: {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
      inputs[i] is the list of positional arguments (JSON values). The sandboxed driver calls `add`, or
      `Solution().add` when the code defines a class Solution (LeetCode style), and writes the return
      value as JSON; the grader compares it with outputs[i] here, outside the sandbox (JSON types, bool
      is not a number, floats within 1e-6). The candidate's own prints go to stderr.

Positive evidence per test: a test passes only if the run exited 0 and produced the expected output.
An early sys.exit(0) / os._exit(0) produces nothing, an always-equal object does not survive JSON, and
forged output has to equal an expected value the sandbox never sees.

Per-test statuses: "pass" | "wrong" | "runtime_error" | "timeout" | "output_limit". Sample statuses:
"correct" (all pass) | "wrong" | "no_answer" (no final python block) | "bad_tests" (unusable tests).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewards.base import Grade, RewardResult
from rewards.math import answer_region
from rewards.registry import Grader, PoolBacked
from rewards.sandbox import (RunResult, Sandbox, SandboxLimits, SandboxUnavailable, find_bwrap, interpreter_binds,
                             uid_in_use)

if TYPE_CHECKING:
    from rewards.config import RewardConfig

log = logging.getLogger(__name__)

_PYTHON_TAGS = ("python", "python3", "py", "")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_TOL = 1e-6
_STARTUP_SLACK_S = 2.0  # per test, over the test's own limit, for the sandbox and the interpreter

# Runs inside the sandbox as `python -I -c DRIVER <mode>`; the source is the file solution.py.
DRIVER = r"""
import json, os, sys
src = open("solution.py", "rb").read()
if sys.argv[1] == "call":
    spec = json.loads(sys.stdin.read())  # read before the candidate's code can touch stdin
    result_fd = os.dup(1)
    os.dup2(2, 1)  # the candidate's prints go to stderr; stdout carries the result only
    ns = {"__name__": "solution"}
    exec(compile(src, "solution.py", "exec"), ns)
    fn = ns.get(spec["fn_name"])
    if fn is None and "Solution" in ns:
        fn = getattr(ns["Solution"](), spec["fn_name"])
    result = json.dumps(fn(*spec["args"]))
    sys.stdout.flush()
    with os.fdopen(result_fd, "w") as out:
        out.write(result)
else:
    sys.argv = ["solution.py"]
    exec(compile(src, "solution.py", "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class CodeTests:
    """inputs/outputs: one entry per test; fn_name None = stdin/stdout tests."""

    inputs: list
    outputs: list
    fn_name: str | None = None


def last_python_block(text: str) -> str | None:
    """Body of the last closed ``` fence tagged python/py/python3 or untagged; None if there is none.
    Fences are lines that start with ``` (a closing one is ``` alone), read in order, so the closing fence
    of another language's block is never taken for the opening of an untagged one."""
    last, body, tag = None, None, ""
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if body is None:
            if stripped.startswith("```"):
                body, tag = [], (stripped[3:].split() or [""])[0].lower()
        elif stripped == "```":
            if tag in _PYTHON_TAGS:
                last = "".join(body)
            body = None
        else:
            body.append(line)
    return last


def parse_tests(tests, max_tests: int) -> CodeTests:
    """Validate a row's tests (dict or JSON string); keeps the first `max_tests`. Raises ValueError."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not (isinstance(tests, dict) and isinstance(tests.get("inputs"), list)
            and isinstance(tests.get("outputs"), list)):
        raise ValueError("tests must be a dict with lists 'inputs' and 'outputs'")
    inputs, outputs, fn_name = tests["inputs"], tests["outputs"], tests.get("fn_name")
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(f"tests need as many outputs as inputs, at least one ({len(inputs)} vs {len(outputs)})")
    if fn_name is None:
        if not all(isinstance(x, str) for x in inputs + outputs):
            raise ValueError("stdin/stdout tests need string inputs and outputs")
    elif not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"fn_name must be an identifier, got {fn_name!r}")
    elif not all(isinstance(x, list) for x in inputs):
        raise ValueError("function-call inputs must be lists of positional arguments")
    return CodeTests(inputs[:max_tests], outputs[:max_tests], fn_name)


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _token_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
        return math.isclose(float(a), float(b), rel_tol=_TOL, abs_tol=_TOL)
    return False


def stdout_matches(actual: str, expected: str) -> bool:
    """Line-by-line equality up to trailing whitespace, CRLF and trailing blank lines; numeric tokens
    within 1e-6. The line count must match, so a printed prefix of the expected output fails."""
    got, want = _lines(actual), _lines(expected)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        gt, wt = g.split(), w.split()
        if len(gt) != len(wt) or not all(_token_equal(x, y) for x, y in zip(gt, wt, strict=True)):
            return False
    return True


def json_equal(actual, expected) -> bool:
    """Equality of plain JSON values; bool is not a number; floats within 1e-6."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if isinstance(expected, float) or isinstance(actual, float):
            return math.isclose(actual, expected, rel_tol=_TOL, abs_tol=_TOL)
        return actual == expected
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(json_equal(a, e) for a, e in zip(actual, expected, strict=True))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(json_equal(actual[k], expected[k]) for k in expected)
    return type(actual) is type(expected) and actual == expected


def judge(run: RunResult, expected, call: bool) -> str:
    """Per-test status of one sandboxed run."""
    if run.output_limited:
        return "output_limit"
    if run.timed_out:
        return "timeout"
    if run.returncode != 0:
        return "runtime_error"
    text = run.stdout.decode("utf-8", errors="replace")
    if not call:
        return "pass" if stdout_matches(text, expected) else "wrong"
    try:
        actual = json.loads(text)
    except ValueError:
        return "wrong"
    return "pass" if json_equal(actual, expected) else "wrong"


def prepare_code(region: str, tests, max_tests: int) -> Grade | dict:
    """A Grade when decided here ("no_answer", "bad_tests"), else the worker task {"code", "tests"};
    `region` is the response's answer region (rewards.math.answer_region)."""
    code = last_python_block(region)
    if code is None:
        return Grade("no_answer", {"reason": "no closed ```python block in the answer"})
    try:
        parsed = parse_tests(tests, max_tests)
    except (ValueError, TypeError) as e:
        return Grade("bad_tests", {"reason": str(e)})
    return {"code": code, "tests": parsed}


# ---- the grader: the "code" entry of rewards.registry.GRADERS ---------------------------------------------


def prepare_code_row(response: str, row: Mapping[str, Any], cfg: RewardConfig) -> Grade | dict:
    """prepare_code on the response's answer region and the row's tests; "no_answer" if thinking never ended."""
    region = answer_region(response, cfg.think_start, cfg.think_end)
    if region is None:
        return Grade("no_answer", {"reason": "unclosed think block"})
    return prepare_code(region, row.get("tests"), cfg.code_max_tests)


def code_pool_options(cfg: RewardConfig) -> dict:
    """make_code_worker's options. Refuses to start without bubblewrap unless reward.unsafe_local_code (then
    warns loudly), and, as root, refuses spare uids that are in use."""
    if cfg.unsafe_local_code:
        message = ("UNSAFE: reward.unsafe_local_code=true runs model-written code WITHOUT bubblewrap: it can "
                   "read the host's files and reach the network. Use only on a throwaway machine.")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    elif find_bwrap() is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not on PATH, so code rows cannot be graded safely. "
                                 "Install it (apt-get install bubblewrap) or set reward.unsafe_local_code=true.")
    uid_base = cfg.code_uid_base if os.geteuid() == 0 else None
    if uid_base is not None:
        for uid in range(uid_base, uid_base + cfg.num_workers):
            if uid_in_use(uid):
                raise ValueError(f"reward.code_uid_base={uid_base}: uid {uid} is in use (a passwd entry or "
                                 f"running processes); pick a range of {cfg.num_workers} unused uids")
    return {"uid_base": uid_base, "python": cfg.code_python, "unsafe": cfg.unsafe_local_code,
            "timeout_s": cfg.code_test_timeout_s, "memory_mb": cfg.code_memory_mb,
            "max_procs": cfg.code_max_procs, "max_output_bytes": cfg.code_max_output_bytes,
            "tmpfs_mb": cfg.code_tmpfs_mb}


def code_deadline_s(cfg: RewardConfig, task: dict) -> float:
    """Each test's limit plus start-up slack, times the number of tests, plus 10 s."""
    return len(task["tests"].inputs) * (cfg.code_test_timeout_s + _STARTUP_SLACK_S) + 10.0


def code_metrics(results: list[RewardResult]) -> dict[str, float]:
    """pass_fraction_mean: the mean fraction of tests passed, over the responses whose tests ran."""
    fractions = [r.info["pass_fraction"] for r in results if "pass_fraction" in r.info]
    return {"pass_fraction_mean": statistics.fmean(fractions)} if fractions else {}


CODE_GRADER = Grader("code", PoolBacked(prepare_code_row, "rewards.code:make_code_worker", code_pool_options,
                                        code_deadline_s),
                     needs=("tests",), metrics=code_metrics)


# ---- worker side: runs in rewards._worker processes ------------------------------------------------------


def make_code_worker(slot: int, options: dict):
    """Pool factory. options: "uid_base" (int | None: None = stay the current uid), "python", "unsafe",
    and the SandboxLimits fields. Kills leftovers of a killed predecessor, then checks that a trivial
    program runs, so a sandbox that cannot work fails at start-up, not as a wall of wrong answers."""
    limits = SandboxLimits(options["timeout_s"], options["memory_mb"], options["max_procs"],
                           options["max_output_bytes"], options["tmpfs_mb"])
    uid = None if options["uid_base"] is None else options["uid_base"] + slot
    sandbox = Sandbox(limits, uid=uid, ro_binds=interpreter_binds(options["python"]),
                      allow_unsafe=options["unsafe"], reap_orphans=True)
    sandbox.kill_leftovers()
    worker = _CodeWorker(sandbox, options["python"])
    probe = sandbox.run([options["python"], "-I", "-c", "print('ok')"])
    if probe.returncode != 0 or probe.stdout.strip() != b"ok":
        raise RuntimeError(f"the code sandbox cannot run reward.code_python={options['python']!r} here (rc "
                           f"{probe.returncode}, timed out {probe.timed_out}): "
                           f"{probe.stderr.decode(errors='replace')[-2000:]}")
    return worker


class _CodeWorker:
    def __init__(self, sandbox: Sandbox, python: str):
        self._sandbox = sandbox
        self._python = python

    def __call__(self, task: dict) -> Grade:
        """task: {"code": str, "tests": CodeTests}. Grade status "correct" | "wrong", with info["tests"]
        the per-test statuses and info["pass_fraction"] in [0, 1]."""
        tests: CodeTests = task["tests"]
        call = tests.fn_name is not None
        argv = [self._python, "-I", "-c", DRIVER, "call" if call else "stdio"]
        files = {"solution.py": task["code"].encode()}
        statuses = []
        for given, expected in zip(tests.inputs, tests.outputs, strict=True):
            stdin = json.dumps({"fn_name": tests.fn_name, "args": given}) if call else given
            run = self._sandbox.run(argv, stdin=stdin.encode(), files=files)
            statuses.append(judge(run, expected, call))
        passed = statuses.count("pass")
        status = "correct" if passed == len(statuses) else "wrong"
        return Grade(status, {"tests": statuses, "pass_fraction": passed / len(statuses)})
