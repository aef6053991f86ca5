"""Code reward: extraction, test formats, output comparison, and grading through the real sandboxed
workers, honest and hostile. Every hostile response must score 0 with pass fraction 0.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_rewards_code.py -q   (needs bubblewrap)
"""

from __future__ import annotations

import os
import time

import pytest

from rewards import RewardConfig, RewardScorer
from rewards.code import CodeTests, json_equal, last_python_block, parse_tests, stdout_matches
from rewards.sandbox import find_bwrap, uid_in_use

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


def test_parse_tests_accepts_both_formats_and_json_strings():
    stdio = parse_tests('{"inputs": ["1\\n", "2\\n"], "outputs": ["1\\n", "4\\n"]}', max_tests=1)
    assert stdio == CodeTests(["1\n"], ["1\n"], None)  # truncated to max_tests
    call = parse_tests({"fn_name": "f", "inputs": [[1], [2]], "outputs": [1, 4]}, max_tests=8)
    assert call == CodeTests([[1], [2]], [1, 4], "f")


@pytest.mark.parametrize("tests", [
    {"inputs": ["1"], "outputs": []},
    {"inputs": [], "outputs": []},
    {"inputs": [1], "outputs": ["1"]},
    {"fn_name": "not an identifier", "inputs": [[1]], "outputs": [1]},
    {"fn_name": "f", "inputs": [1], "outputs": [1]},
    ["not", "a", "dict"],
    "{not json",
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

HONEST = {
    "stdio": (fenced("a, b = map(int, input().split())\nprint(a + b)"), STDIO),
    "main-guard-and-crlf": (fenced("import sys\ndef main():\n    a, b = map(int, sys.stdin.read().split())\n"
                                   "    sys.stdout.write(str(a + b) + '  \\r\\n')\nif __name__ == '__main__':\n"
                                   "    main()"), STDIO),
    "call": (fenced("def add(a, b):\n    print('debug output is fine')\n    return a + b"), CALL),
    "leetcode-class": (fenced("class Solution:\n    def add(self, a, b):\n        return a + b"), CALL),
    "think-then-code": ("<think>```python\nprint(0)\n```</think>" + fenced("print(sum(map(int, input().split())))"),
                        STDIO),
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
    "no-code": ("The answer is obviously 3000008.", STDIO),
    "unclosed-think": ("<think>" + fenced("print(3000008)"), STDIO),
}

CASES = {**HONEST, **HOSTILE}


def spare_uid_base(count: int) -> int:
    base = 64000 + (os.getpid() % 500) * 4
    while any(uid_in_use(u) for u in range(base, base + count)):
        base += count
    return base


@pytest.fixture(scope="module")
def graded():
    """Every case graded in one batch, in parallel on 2 sandboxed workers; also the uids they used."""
    cfg = RewardConfig(num_workers=2, code_test_timeout_s=1.0, code_memory_mb=256, code_max_output_bytes=64 << 10,
                       code_tmpfs_mb=8, code_uid_base=spare_uid_base(2))
    names = list(CASES)
    with RewardScorer(cfg) as scorer:
        batch = scorer.score([CASES[n][0] for n in names], [CASES[n][1] for n in names])
    return dict(zip(names, batch.results, strict=True)), cfg


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
    assert batch.loss_mask == [False]
