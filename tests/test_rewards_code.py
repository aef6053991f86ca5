"""Code reward: extraction, test formats, output comparison, and grading through the real sandboxed
workers, honest and hostile. Every hostile response must score 0 with pass fraction 0.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_rewards_code.py -q   (needs bubblewrap)
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from rewards import RewardConfig, RewardScorer
from rewards.code import CodeTests, json_equal, judge, last_python_block, parse_tests, stdout_matches
from rewards.sandbox import RunResult, find_bwrap, uid_in_use

needs_sandbox = pytest.mark.skipif(find_bwrap() is None or not os.path.exists("/usr/bin/python3"),
                                   reason="needs bubblewrap and /usr/bin/python3")


def fenced(code: str) -> str:
    return f"Let me write it.\n```python\n{code.strip()}\n```\n"


# ---- pure parts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("```py\na = 1\n```\nthen\n```python3\nb = 2\n```", "b = 2\n"),
    ("```\nuntagged = True\n```", "untagged = True\n"),
    ("```python\nfirst()\n```\n```cpp\nint main() {}\n```", "first()\n"),  # other languages are not ours
    ("```python\nfinal()\n```\n```python\ntruncated(", "final()\n"),  # an unclosed fence is no block
    ("```cpp\nint x;\n```\nprose\n```python\nprint(1)\n```", "print(1)\n"),  # a closing fence opens nothing
    ("```Python\r\nx = 1\r\n```", "x = 1\r\n"),
    ("no code at all", None),
    ("```cpp\nint main() {}\n```", None),
])
def test_last_python_block(text, expected):
    assert last_python_block(text) == expected


def test_parse_tests_accepts_every_form_and_json_strings():
    stdio = parse_tests('{"inputs": ["1\\n", "2\\n"], "outputs": ["1\\n", "4\\n"]}', max_tests=1)
    assert stdio == CodeTests(["1\n"], ["1\n"], None) and stdio.mode == "stdio"  # truncated to max_tests
    call = parse_tests({"fn_name": "f", "inputs": [[1], [2]], "outputs": [1, 4]}, max_tests=8)
    assert call == CodeTests([[1], [2]], [1, 4], "f") and call.mode == "call"
    asserts = parse_tests({"asserts": ["assert f(1) == 1", "assert f(2) == 4", "assert f(3) == 9"],
                           "setup": "import math"}, max_tests=2)
    assert asserts.mode == "check" and asserts.outputs == [None, None]
    assert asserts.inputs == [{"setup": "import math", "test": f"assert f({i}) == {i * i}", "names": ["f"],
                               "entry_point": None} for i in (1, 2)]
    check = parse_tests({"check": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"}, 8)
    assert check == CodeTests([{"setup": "", "test": "def check(candidate):\n    assert candidate(2) == 4\n",
                                "names": ["candidate"], "entry_point": "f"}], [None], None, self_checking=True)


@pytest.mark.parametrize("tests", [
    {"inputs": ["1"], "outputs": []},
    {"inputs": [], "outputs": []},
    {"inputs": [1], "outputs": ["1"]},
    {"fn_name": "not an identifier", "inputs": [[1]], "outputs": [1]},
    {"fn_name": "f", "inputs": [1], "outputs": [1]},
    ["not", "a", "dict"],
    "{not json",
    {"asserts": []},
    {"asserts": ["assert f(1) == (1"]},
    {"asserts": [3]},
    {"asserts": ["assert f(1) == 1"], "setup": 3},
    {"check": "x = 1", "entry_point": "f"},
    {"check": "def check(candidate): pass"},
    {"check": "def check(candidate): pass", "entry_point": "not an identifier"},
    {"check": ["def check(candidate): pass"], "entry_point": "f"},
])
def test_parse_tests_rejects_malformed_tests(tests):
    with pytest.raises(ValueError):
        parse_tests(tests, max_tests=8)


@pytest.mark.parametrize("actual, expected, ok", [
    ("3\n", "3\n", True),
    ("3   \r\n\r\n\n", "3\n", True),  # trailing whitespace, CRLF, trailing blank lines
    ("0.3333333\n", "0.333333\n", True),  # numeric tokens within 1e-6
    ("1 2  3\n", "1 2 3\n", True),
    ("0.334\n", "0.333\n", False),
    ("1\n", "1\n2\n3\n", False),  # a printed prefix of the expected lines
    ("1\n2\n3\n4\n", "1\n2\n3\n", False),
    ("12\n", "1 2\n", False),
    ("nan\n", "nan\n", True),  # identical tokens are equal even when not numbers
    ("YES\n", "yes\n", False),
])
def test_stdout_matches(actual, expected, ok):
    assert stdout_matches(actual, expected) is ok


def test_a_self_checking_run_passes_only_with_exit_0_and_its_nonce():
    def run(returncode, stdout):
        return RunResult(returncode, stdout, b"", False, False, 0.1)

    nonce = "0123456789abcdef0123456789abcdef"
    assert judge(run(0, nonce.encode()), nonce, "check") == "pass"
    assert [judge(r, nonce, "check") for r in (run(0, b""), run(0, nonce.encode() + b"\n"), run(0, b"f" * 32),
                                               run(3, nonce.encode()), run(1, nonce.encode()))] == \
        ["wrong", "wrong", "wrong", "wrong", "runtime_error"]


@pytest.mark.parametrize("actual, expected, ok", [
    (3, 3, True), (3.0000001, 3, True), (3.01, 3, False),
    (True, 1, False), (1, True, False), (True, True, True),
    ([1, [2, "a"]], [1, [2, "a"]], True), ([1, 2], [1, 2, 3], False),
    ({"a": 1}, {"a": 1.0}, True), ({"a": 1}, {"b": 1}, False),
    (None, None, True), ("1", 1, False),
])
def test_json_equal(actual, expected, ok):
    assert json_equal(actual, expected) is ok


# ---- through the sandboxed workers -----------------------------------------------------------------------

STDIO = {"source": "code", "tests": {"inputs": ["1000003 2000005\n", "7 8\n"], "outputs": ["3000008\n", "15\n"]}}
CALL = {"source": "code", "tests": {"fn_name": "add", "inputs": [[1000003, 2000005], [7, 8]],
                                    "outputs": [3000008, 15]}}
THREE_LINES = {"source": "code", "tests": {"inputs": [""], "outputs": ["3000008\n1\n2\n"]}}
ASSERTS = {"source": "code", "tests": {"asserts": ["assert add(1000003, 2000005) == 3000008",
                                                   "assert math.isclose(add(0.5, 0.25), 0.75)"],
                                       "setup": "import math"}}
CHECK = {"source": "code", "tests": {"check": "def check(candidate):\n"
                                              "    assert candidate(1000003, 2000005) == 3000008\n"
                                              "    assert abs(candidate(7, 8) - 15) < 1e-9\n"
                                              "    assert candidate([1], [2]) == [1, 2]\n", "entry_point": "add"}}
ABS_CHECK = {"source": "code", "tests": {"check": "def check(candidate):\n    assert abs(candidate(7, 8) - 15) < 1e-9\n",
                                          "entry_point": "add"}}
LEN_ASSERT = {"source": "code", "tests": {"asserts": ["assert len(add([1], [2])) == 2"]}}
WRONG_ADD = "def add(a, b):\n    return a - b"
# Looks for the nonce everywhere the solution's process can reach (files, fds and the readable memory of every
# process), and writes every candidate it finds, and a guess, to every verdict channel it can open.
NONCE_HUNT = """
import os, re, sys
def readable(pid):
    data = b''
    for name in ('fd/0', 'environ', 'cmdline'):
        try:
            with open(f'/proc/{pid}/{name}', 'rb') as f:
                data += f.read(1 << 16)
        except OSError:
            pass
    try:
        with open(f'/proc/{pid}/maps') as maps, open(f'/proc/{pid}/mem', 'rb') as mem:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split()[0].split('-'))
                if line.split()[1][0] == 'r' and hi - lo < 1 << 26:
                    try:
                        mem.seek(lo)
                        data += mem.read(hi - lo)
                    except (OSError, OverflowError, ValueError):
                        pass
    except OSError:
        pass
    return data
stolen = b''.join(readable(pid) for pid in os.listdir('/proc') if pid.isdigit() and int(pid) != os.getpid())
guesses = set(re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', stolen)) | {b'0' * 32}
for token in guesses:
    print(token.decode())
    for fd in range(3, 64):
        try:
            os.write(fd, token)
        except OSError:
            pass
    for pid in os.listdir('/proc'):
        try:
            with open(f'/proc/{pid}/fd/1', 'wb') as f:
                f.write(token)
        except OSError:
            pass
def add(a, b):
    os._exit(0)
"""
# Right only if the judge (the parent of the solution's process) is out of its reach.
JUDGE_OUT_OF_REACH = """
import os
def reaches(path):
    try:
        with open(path, 'rb') as f:
            f.read(1)
        return True
    except OSError:
        return False
judge = os.getppid()
reached = reaches(f'/proc/{judge}/mem') or reaches(f'/proc/{judge}/environ') or os.access(f'/proc/{judge}/fd', os.R_OK)
def add(a, b):
    return 0 if reached else a + b
"""

HONEST = {
    "stdio": (fenced("a, b = map(int, input().split())\nprint(a + b)"), STDIO),
    "main-guard-and-crlf": (fenced("import sys\ndef main():\n    a, b = map(int, sys.stdin.read().split())\n"
                                   "    sys.stdout.write(str(a + b) + '  \\r\\n')\nif __name__ == '__main__':\n"
                                   "    main()"), STDIO),
    "call": (fenced("def add(a, b):\n    print('debug output is fine')\n    return a + b"), CALL),
    "leetcode-class": (fenced("class Solution:\n    def add(self, a, b):\n        return a + b"), CALL),
    "think-then-code": ("<think>```python\nprint(0)\n```</think>" + fenced("print(sum(map(int, input().split())))"),
                        STDIO),
    "asserts": (fenced("def add(a, b):\n    return a + b"), ASSERTS),
    "asserts-helper-prints-and-main": (fenced("import sys\ndef helper(x):\n    return x\ndef add(a, b):\n"
                                              "    print('debug output is fine')\n    return helper(a) + b\n"
                                              "if __name__ == '__main__':\n    sys.exit(1)"), ASSERTS),
    "check-program": (fenced("def add(a, b):\n    return a + b"), CHECK),
    "check-judge-out-of-reach": (fenced(JUDGE_OUT_OF_REACH), CHECK),
}

HOSTILE = {
    # stdio form
    "loop": (fenced("while True:\n    pass"), STDIO),
    "sleep": (fenced("import time\ntime.sleep(10**6)"), STDIO),
    "exit-0-early": (fenced("import sys\nsys.exit(0)"), STDIO),
    "os-exit-0": (fenced("import os\nos._exit(0)"), STDIO),
    "forged-report": (fenced("print('ALL TESTS PASSED')\nprint('{\"passed\": 2, \"failed\": 0}')"), STDIO),
    "atexit-excepthook": (fenced("import atexit, os, sys\nsys.excepthook = lambda *a: os._exit(0)\n"
                                 "atexit.register(lambda: os._exit(0))\nraise RuntimeError('wrong')"), STDIO),
    "prefix-only": (fenced("print(3000008)"), THREE_LINES),
    "hunt-expected": (fenced("""
import os, sys
found = []
for root, dirs, files in os.walk('/'):
    if root.startswith(('/proc', '/usr', '/sys')):
        dirs[:] = []
        continue
    for name in files:
        try:
            if b'3000008' in open(os.path.join(root, name), 'rb').read():
                found.append(os.path.join(root, name))
        except OSError:
            pass
for pid in os.listdir('/proc'):
    try:
        if b'3000008' in open(f'/proc/{pid}/cmdline', 'rb').read() + open(f'/proc/{pid}/environ', 'rb').read():
            found.append(pid)
    except OSError:
        pass
print(found[0] if found else 'nothing')
"""), STDIO),
    "huge-output": (fenced("while True:\n    print('3000008' * 1000)"), STDIO),
    "memory-bomb": (fenced("x = bytearray(1 << 40)\nprint(3000008)"), STDIO),
    "fork-bomb": (fenced("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                         "        pass"), STDIO),
    # function-call form
    "always-equal": (fenced("class Eq:\n    def __eq__(self, other):\n        return True\n"
                            "def add(a, b):\n    return Eq()"), CALL),
    "int-subclass-equal": (fenced("class I(int):\n    def __eq__(self, other):\n        return True\n"
                                  "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)"), CALL),
    "exit-at-import": (fenced("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b"), CALL),
    "os-exit-in-call": (fenced("import os\ndef add(a, b):\n    os._exit(0)"), CALL),
    "patch-json": (fenced("import json\njson.dumps = lambda *a, **k: '42'\ndef add(a, b):\n    return 0"), CALL),
    "frame-inspection": (fenced("import inspect\ndef add(a, b):\n"
                                "    return [repr(f.frame.f_globals)[:2000] for f in inspect.stack()]"), CALL),
    "loop-in-call": (fenced("def add(a, b):\n    while True:\n        pass"), CALL),
    # assert and check-program forms
    "asserts-wrong": (fenced(WRONG_ADD), ASSERTS),
    "check-wrong": (fenced(WRONG_ADD), CHECK),
    "asserts-exit-0-at-import": (fenced("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b"), ASSERTS),
    "check-exit-0-in-call": (fenced("import sys\ndef add(a, b):\n    sys.exit(0)"), CHECK),
    "check-os-exit-0": (fenced("import os\ndef add(a, b):\n    os._exit(0)"), CHECK),
    "asserts-os-exit-0-at-import": (fenced("import os\nos._exit(0)"), ASSERTS),
    "check-prints-verdicts": (fenced("print('0' * 32)\nprint('ALL TESTS PASSED')\n" + WRONG_ADD), CHECK),
    "check-nonce-hunt": (fenced(NONCE_HUNT), CHECK),
    "asserts-nonce-hunt": (fenced(NONCE_HUNT), ASSERTS),
    "check-patched-assertion-error": (fenced("import builtins\nclass Never(Exception):\n    pass\n"
                                             "builtins.AssertionError = Never\n" + WRONG_ADD), CHECK),
    "asserts-patched-builtins-and-math": (fenced("import builtins, math\nbuiltins.abs = lambda x: 0\n"
                                                 "math.isclose = lambda *a, **k: True\n" + WRONG_ADD), ASSERTS),
    "check-patched-builtins": (fenced("import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG_ADD), CHECK),
    "check-own-check": (fenced("def check(candidate):\n    pass\n" + WRONG_ADD), CHECK),
    "check-shadowed-abs": (fenced("abs = lambda x: 0\ndef add(a, b):\n    return 0"), ABS_CHECK),
    "asserts-shadowed-len": (fenced("len = lambda x: 2\ndef add(a, b):\n    return []"), LEN_ASSERT),
    "asserts-fake-math": (fenced("class math:\n    isclose = staticmethod(lambda *a, **k: True)\n"
                                 "def add(a, b):\n    return 0"), ASSERTS),
    "check-always-equal": (fenced("class Eq:\n    def __eq__(self, other):\n        return True\n"
                                  "    def __sub__(self, other):\n        return 0\n"
                                  "def add(a, b):\n    return Eq()"), CHECK),
    "asserts-int-subclass-equal": (fenced("class I(int):\n    def __eq__(self, other):\n        return True\n"
                                          "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)"), ASSERTS),
    "check-trace-the-caller": (fenced("""
import sys
def add(a, b):
    frame = sys._getframe()
    while frame is not None:
        frame.f_trace = lambda *args: None
        frame = frame.f_back
    sys.settrace(lambda *args: None)
    return 0
"""), CHECK),
    "check-kill-the-judge": (fenced("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + WRONG_ADD),
                             CHECK),
    "asserts-kill-everything": (fenced("import os, signal\nos.kill(-1, signal.SIGKILL)"), ASSERTS),
    "check-loop": (fenced("def add(a, b):\n    while True:\n        pass"), CHECK),
    "check-huge-output": (fenced("import os\nwhile True:\n    for fd in (1, 2):\n        os.write(fd, b'x' * 65536)"),
                          CHECK),
    "no-code": ("The answer is obviously 3000008.", STDIO),
    "unclosed-think": ("<think>" + fenced("print(3000008)"), STDIO),
}


def spare_uid_base(count: int, first: int = 64000, spread: int = 500) -> int:
    """A first uid of `count` free ones for a sandbox pool, from `first` + a pid-derived offset (a test module
    passes its own `first`, so pools of several modules in one session do not meet)."""
    base = first + (os.getpid() % spread) * 4
    while any(uid_in_use(u) for u in range(base, base + count)):
        base += count
    return base


@pytest.fixture(scope="module")
def graded():
    """Every case graded, in parallel on 2 sandboxed workers: the honest ones under the default limit per test
    run, the hostile ones under 2 s (the assert and check forms start two interpreters, on a machine that the
    hostile cases keep busy too); also the config, with the uids they used."""
    cfg = RewardConfig(num_workers=2, code_memory_mb=256, code_max_output_bytes=64 << 10, code_tmpfs_mb=8,
                       code_uid_base=spare_uid_base(2))
    results = {}
    for cases, timeout_s in ((HONEST, cfg.code_test_timeout_s), (HOSTILE, 2.0)):
        with RewardScorer(replace(cfg, code_test_timeout_s=timeout_s)) as scorer:
            batch = scorer.score([response for response, _ in cases.values()], [row for _, row in cases.values()])
        results |= dict(zip(cases, batch.results, strict=True))
    return results, cfg


@needs_sandbox
@pytest.mark.parametrize("name", list(HONEST))
def test_honest_solutions_pass(graded, name):
    result = graded[0][name]
    assert (result.status, result.score, result.info["pass_fraction"]) == ("correct", 1.0, 1.0), result.info


@needs_sandbox
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_responses_score_zero(graded, name):
    result = graded[0][name]
    assert result.score == 0.0 and result.status in ("wrong", "no_answer"), result
    assert result.info.get("pass_fraction", 0.0) == 0.0, result.info


@needs_sandbox
def test_hostile_statuses_say_what_happened(graded):
    results = graded[0]
    assert results["loop"].info["tests"] == ["timeout", "timeout"]
    assert results["exit-0-early"].info["tests"] == ["wrong", "wrong"]
    assert results["huge-output"].info["tests"] == ["output_limit", "output_limit"]
    assert results["always-equal"].info["tests"] == ["runtime_error", "runtime_error"]  # not JSON
    assert results["int-subclass-equal"].info["tests"] == ["wrong", "wrong"]  # serialised as 0
    assert results["no-code"].status == results["unclosed-think"].status == "no_answer"
    assert results["asserts-wrong"].info["tests"] == ["wrong", "wrong"]  # an assertion failed
    assert results["check-exit-0-in-call"].info["tests"] == ["runtime_error"]  # the solution's process ended
    assert results["check-always-equal"].info["tests"] == ["runtime_error"]  # not a plain value
    assert results["asserts-int-subclass-equal"].info["tests"] == ["runtime_error"] * 2  # not a plain value
    assert results["check-loop"].info["tests"] == ["timeout"]


@needs_sandbox
def test_workers_leave_no_process_behind(graded):
    cfg = graded[1]
    uids = range(cfg.code_uid_base, cfg.code_uid_base + cfg.num_workers)
    deadline = time.monotonic() + 2.0  # the workers were closed: their last kills are still landing
    while any(uid_in_use(u) for u in uids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(uid_in_use(u) for u in uids)


@needs_sandbox
def test_partial_credit_is_reported_and_scored_by_mode():
    tests = {"source": "code", "tests": {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "4\n", "10\n"]}}
    square = fenced("n = int(input())\nprint(n * n)")  # right on 2 of 3
    for mode, score in (("all", -1.0), ("fraction", -1.0 + 2 / 3 * 2)):
        cfg = RewardConfig(num_workers=1, code_mode=mode, wrong_score=-1.0, code_uid_base=spare_uid_base(1))
        with RewardScorer(cfg) as scorer:
            result = scorer.score([square], [tests]).results[0]
        assert result.info["tests"] == ["pass", "pass", "wrong"]
        assert result.info["pass_fraction"] == pytest.approx(2 / 3)
        assert result.score == pytest.approx(score)


@needs_sandbox
def test_bad_tests_are_masked_not_punished():
    cfg = RewardConfig(num_workers=1, wrong_score=-1.0, code_uid_base=spare_uid_base(1))
    with RewardScorer(cfg) as scorer:
        batch = scorer.score([fenced("print(1)")], [{"source": "code", "tests": {"inputs": ["1"], "outputs": []}}])
    assert batch.results[0].status == "bad_tests"
    assert batch.trainable == [False]
