"""The python tool (rollout/env/python_tool.py) with real bubblewrap: model-written programs run in the sandbox, never in
this process; failures, timeouts and floods come back as text; at most `workers` programs run at once, and the
waiting and running are timed; no bubblewrap stops it at start-up.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_python_tool.py -q (needs bubblewrap and /usr/bin/python3).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from rewards.sandbox import SandboxUnavailable, find_bwrap
from rollout.env import python_tool
from rollout.env.environment import Limits, ToolEnv
from rollout.env.python_tool import PythonLimits, PythonRunner
from rollout.env.tools import TOOLS
from test_rewards_code import spare_uid_base

pytestmark = pytest.mark.skipif(find_bwrap() is None or not os.path.exists("/usr/bin/python3"),
                                reason="needs bubblewrap and /usr/bin/python3")

IS_ROOT = os.geteuid() == 0
UID_BASE = spare_uid_base(2, first=60500, spread=250)


@pytest.fixture(scope="module")
def runner():
    """The process's runner, as the trainer configures it: 2 workers, 1 s per program."""
    r = python_tool.configure(PythonLimits(workers=2, timeout_s=1.0, memory_mb=256, uid_base=UID_BASE))
    r.start()
    yield r
    r.close()


def call(code: str) -> str:
    import json

    return f"<tool_call>{json.dumps({'name': 'python', 'arguments': {'code': code}})}</tool_call>"


def test_a_program_runs_in_the_sandbox_not_here(runner):
    assert "python" in TOOLS and TOOLS["python"].schema["function"]["parameters"]["required"] == ["code"]
    out = TOOLS["python"].fn("import os, socket\nprint(socket.gethostname(), os.getpid(), os.getuid())\n"
                             "print(sorted(os.listdir('/')))")
    host, pid, uid = out.splitlines()[0].split()
    assert host == "sandbox" != socket.gethostname()  # bubblewrap's own uts namespace
    assert int(pid) < 10 and int(pid) != os.getpid()  # a new pid namespace
    if IS_ROOT:
        assert int(uid) in (UID_BASE, UID_BASE + 1)  # the worker's spare uid, not root
    assert "home" not in out and "etc" not in out and "root" not in out  # none of the host's files


@pytest.mark.parametrize("code, want", [
    ("print(2**100)", "1267650600228229401496703205376\n"),
    ("import sys\nprint('partial')\nsys.exit(3)", "partial\n(exit status 3)"),
    ("pass", "(no output)"),
])
def test_outputs(runner, code, want):
    assert TOOLS["python"].fn(code) == want


def test_failures_come_back_as_text(runner):
    err = TOOLS["python"].fn("print('before')\n1/0")
    assert err.startswith("before\nstderr:\nTraceback") and err.rstrip().endswith("ZeroDivisionError: division by zero")
    start = time.perf_counter()
    hung = TOOLS["python"].fn("print('started', flush=True)\nwhile True: pass")
    assert hung == "error: the program ran past 1 s and was killed\nstarted\n" and time.perf_counter() - start < 5
    flood = TOOLS["python"].fn("while True: print('x' * 1000)")
    assert flood.endswith(f"error: output beyond {python_tool.MAX_OUTPUT_BYTES} bytes; the program was killed")
    net = TOOLS["python"].fn("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)")
    assert "OSError" in net or "unreachable" in net
    assert TOOLS["python"].fn("x" * (python_tool.MAX_CODE_BYTES + 1)).startswith("error: the program is longer")
    assert TOOLS["python"].fn("print('still here')") == "still here\n"  # the workers survived all of it


def test_concurrency_cap_timing_and_truncation_through_the_env(runner):
    runner.take_metrics()
    env = ToolEnv(["python"], limits=Limits(max_calls_per_turn=4, max_output_tokens=16, tool_timeout_s=10.0))
    nap = "import time\nstart = time.time()\ntime.sleep(0.4)\nprint(start, time.time())"  # the host's clock
    step = asyncio.run(env.step(call(nap) * 4 + call("print('word ' * 100)")))
    results = [m["content"] for m in step.observation]
    assert results[4] == "error: at most 4 tool calls per turn; this one was not run"
    spans = [tuple(map(float, r.split())) for r in results[:4]]
    running = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert running == 2, "two workers: the four naps run two at a time"
    m = runner.take_metrics()
    assert m["tool/python/runs"] == 4 and m["tool/python/timeouts"] == 0 and m["tool/python/failures"] == 0
    assert m["tool/python/run_s"] >= 1.6 and m["tool/python/wait_s"] >= 0.6  # two of them waited a wave
    assert env.stats.calls == {"python": 5} and env.stats.errors == {"python": 1}
    text = asyncio.run(env.step(call("print('word ' * 100)"))).observation[0]["content"]
    assert text.endswith("... [truncated]") and text.count("word") < 15  # env.max_output_tokens: 64 characters


def test_no_bubblewrap_stops_it_at_start(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        PythonRunner(PythonLimits(workers=1)).start()
