"""Code reward: run the response's final Python block against the row's tests, each test in its own sandbox.

Test format (`row["tests"]`, a dict or its JSON string):
  stdin/stdout (APPS / LiveCodeBench style):  {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}
      The program reads input[i] on stdin; its stdout must equal output[i] line for line (trailing
      whitespace, CRLF and trailing blank lines ignored; numeric tokens equal within 1e-6). The run
      must also exit with status 0.
  function call: {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
      inputs[i] is the list of positional arguments (JSON values). The sandboxed driver calls `add`, or
      `Solution().add` when the code defines a class Solution (LeetCode style), and writes the return
      value as JSON; the grader compares it with outputs[i] here, outside the sandbox (JSON types, bool
      is not a number, floats within 1e-6). The candidate's own prints go to stderr.
  asserts (MBPP style):  {"asserts": ["assert add(1, 2) == 3", ...], "setup": "import math"}
      Each assert (any test statements) is one test: the optional setup code, then the assert.
  check program (HumanEval style):
      {"check": "def check(candidate):\\n    assert candidate(1, 2) == 3\\n", "entry_point": "add"}
      One test: the program (which must define check) runs, then check(<the solution's add>).

The two self-checking forms are run by a judge process in the sandbox (JUDGE_DRIVER, rewards/code_drivers.py) that runs the test code
and never the candidate's: the solution runs in a second process there, and the test sees the solution's
names through a pipe (functions are called over there and return plain built-in values; modules are imported
in the judge; data is copied). The names the test code reads that the solution defines are bound so, as if
they shared one namespace (never a builtin's name: a solution's own `abs` does not replace abs), and the
test's own code overrides them; check() gets the entry point as its argument. The judge is undumpable, so
the solution's process, of the same uid, can neither ptrace it nor read its memory or fds. Once the test and
check() have returned, the judge writes the run's random nonce to its stdout and exits 0; the grader here
requires both. The solution never learns the nonce: it comes on the judge's stdin, drained before the
solution's process starts, and then lives only in the judge's memory (the solution can reach the stdout pipe
through bubblewrap's own process, but has nothing to write there; nor can it set the judge's exit status).
So an exit(0), a printed or forged verdict, a patched assert, AssertionError or builtin, an object equal to
everything and a killed judge all score 0. What such tests cannot do: pass objects of the solution's own
classes to the test (values cross as plain data), or see the solution's in-place changes to an argument.

Positive evidence per test: a test passes only if the run exited 0 and produced the expected output (the
expected value, or the nonce). An early sys.exit(0) / os._exit(0) produces nothing, an always-equal object
does not survive JSON, and forged output has to equal an expected value the sandbox never sees.

Per-test statuses: "pass" | "wrong" | "runtime_error" | "timeout" | "output_limit". Sample statuses:
"correct" (all pass) | "wrong" | "no_answer" (no final python block) | "bad_tests" (unusable tests).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import secrets
import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewards.base import Grade, RewardResult
from rewards.code_drivers import ASSERTION_FAILED, DRIVER, JUDGE_DRIVER
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



@dataclass(frozen=True)
class CodeTests:
    """One sandboxed run per entry of `inputs`, judged against the same entry of `outputs`: stdin texts and
    expected stdout (fn_name None), argument lists and return values (fn_name set), or for the self-checking
    forms the judge's specs {"setup", "test", "names", "entry_point"} and None (the run's nonce is expected)."""

    inputs: list
    outputs: list
    fn_name: str | None = None
    self_checking: bool = False

    @property
    def mode(self) -> str:
        """How they run: "stdio" | "call" | "check" (both self-checking forms)."""
        if self.self_checking:
            return "check"
        return "stdio" if self.fn_name is None else "call"


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
    """Validate a row's tests (dict or JSON string, any form of the module docstring); keeps the first
    `max_tests`. Raises ValueError."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    form = next((key for key in _FORMS if isinstance(tests, dict) and key in tests), None)
    if form is None:
        raise ValueError("tests must be a dict with lists 'inputs' and 'outputs', a list 'asserts', or a "
                         "'check' program and its 'entry_point'")
    return _FORMS[form](tests, max_tests)


def _io_tests(tests: dict, max_tests: int) -> CodeTests:
    """The stdin/stdout and function-call forms."""
    if not (isinstance(tests.get("inputs"), list) and isinstance(tests.get("outputs"), list)):
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


def _assert_tests(tests: dict, max_tests: int) -> CodeTests:
    """The assert form: one run per assert, each after the setup code."""
    asserts, setup = tests["asserts"], tests.get("setup") or ""
    if not (isinstance(asserts, list) and asserts and all(isinstance(a, str) for a in asserts)):
        raise ValueError("'asserts' must be a non-empty list of test statements, e.g. 'assert add(1, 2) == 3'")
    if not isinstance(setup, str):
        raise ValueError(f"'setup' must be code, got {type(setup).__name__}")
    names = _free_names(setup)
    specs = [{"setup": setup, "test": a, "names": sorted(names | _free_names(a)), "entry_point": None}
             for a in asserts]
    return CodeTests(specs[:max_tests], [None] * min(len(specs), max_tests), self_checking=True)


def _check_tests(tests: dict, max_tests: int) -> CodeTests:
    """The check-program form: one run of the program, then check(entry point)."""
    program, entry_point = tests["check"], tests.get("entry_point")
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise ValueError(f"a check program needs 'entry_point', the name of the function it checks, "
                         f"got {entry_point!r}")
    if not isinstance(program, str):
        raise ValueError(f"'check' must be the test program's code, got {type(program).__name__}")
    if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in _parse_python(program).body):
        raise ValueError("the check program must define check(candidate)")
    spec = {"setup": "", "test": program, "names": sorted(_free_names(program)), "entry_point": entry_point}
    return CodeTests([spec], [None], self_checking=True)


def _free_names(code: str) -> set[str]:
    """The names test code reads (dunders excepted): the judge binds those the solution defines."""
    return {n.id for n in ast.walk(_parse_python(code)) if isinstance(n, ast.Name) and not n.id.startswith("__")}


def _parse_python(code: str) -> ast.Module:
    """The syntax tree of test code (it is parsed, never run, here). Raises ValueError."""
    try:
        return ast.parse(code)
    except SyntaxError as e:
        raise ValueError(f"test code does not parse: {e}") from None


# The key that marks each form, in the order they are looked for, and its parser.
_FORMS: dict[str, Callable[[dict, int], CodeTests]] = {"asserts": _assert_tests, "check": _check_tests,
                                                        "inputs": _io_tests}


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


def call_matches(text: str, expected) -> bool:
    """The call driver's stdout is the JSON of a value json_equal to the expected one."""
    try:
        actual = json.loads(text)
    except ValueError:
        return False
    return json_equal(actual, expected)


def nonce_matches(text: str, nonce: str) -> bool:
    """The judge's stdout is exactly this run's nonce."""
    return text == nonce


def judge(run: RunResult, expected, mode: str) -> str:
    """Per-test status of one sandboxed run in `mode` (CodeTests.mode)."""
    if run.output_limited:
        return "output_limit"
    if run.timed_out:
        return "timeout"
    if mode == "check" and run.returncode == ASSERTION_FAILED:
        return "wrong"
    if run.returncode != 0:
        return "runtime_error"
    return "pass" if _MODES[mode].matches(run.stdout.decode("utf-8", errors="replace"), expected) else "wrong"


def _stdio_request(tests: CodeTests, given: str, expected):
    return given.encode(), expected


def _call_request(tests: CodeTests, given: list, expected):
    return json.dumps({"fn_name": tests.fn_name, "args": given}).encode(), expected


def _check_request(tests: CodeTests, given: dict, expected):
    """The judge's spec with a fresh nonce, which is then the expected output."""
    nonce = secrets.token_hex(16)
    return json.dumps({**given, "nonce": nonce}).encode(), nonce


@dataclass(frozen=True)
class _Mode:
    """How the tests of one CodeTests.mode run: the interpreter's arguments; (tests, input, output) -> (stdin,
    the expected output); (stdout, expected) -> whether it passed."""

    args: tuple[str, ...]
    request: Callable[[CodeTests, Any, Any], tuple[bytes, Any]]
    matches: Callable[[str, Any], bool]


_MODES = {"stdio": _Mode(("-I", "-c", DRIVER, "stdio"), _stdio_request, stdout_matches),
          "call": _Mode(("-I", "-c", DRIVER, "call"), _call_request, call_matches),
          "check": _Mode(("-I", "-c", JUDGE_DRIVER), _check_request, nonce_matches)}


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
    _probe(sandbox, options["python"])
    return _CodeWorker(sandbox, options["python"])


def _probe(sandbox: Sandbox, python: str) -> None:
    """A trivial program, and a trivial assert through the judge (which needs ctypes and a second process),
    must pass in this sandbox; RuntimeError with the interpreter's stderr otherwise."""
    tests = parse_tests({"asserts": ["assert one() == 1"]}, 1)
    spec, nonce = _check_request(tests, tests.inputs[0], None)
    probes = [("run", [python, "-I", "-c", "print('ok')"], b"", lambda run: run.stdout.strip() == b"ok"),
              ("run the judge of the assert and check forms with", [python, *_MODES["check"].args], spec,
               lambda run: judge(run, nonce, "check") == "pass")]
    for what, argv, stdin, passed in probes:
        run = sandbox.run(argv, stdin=stdin, files={"solution.py": b"def one():\n    return 1\n"})
        if run.returncode != 0 or not passed(run):
            raise RuntimeError(f"the code sandbox cannot {what} reward.code_python={python!r} here (rc "
                               f"{run.returncode}, timed out {run.timed_out}): "
                               f"{run.stderr.decode(errors='replace')[-2000:]}")


class _CodeWorker:
    def __init__(self, sandbox: Sandbox, python: str):
        self._sandbox = sandbox
        self._python = python

    def __call__(self, task: dict) -> Grade:
        """task: {"code": str, "tests": CodeTests}. Grade status "correct" | "wrong", with info["tests"]
        the per-test statuses and info["pass_fraction"] in [0, 1]."""
        tests: CodeTests = task["tests"]
        mode = _MODES[tests.mode]
        files = {"solution.py": task["code"].encode()}
        statuses = []
        for given, expected in zip(tests.inputs, tests.outputs, strict=True):
            stdin, expected = mode.request(tests, given, expected)
            run = self._sandbox.run([self._python, *mode.args], stdin=stdin, files=files)
            statuses.append(judge(run, expected, tests.mode))
        passed = statuses.count("pass")
        status = "correct" if passed == len(statuses) else "wrong"
        return Grade(status, {"tests": statuses, "pass_fraction": passed / len(statuses)})
