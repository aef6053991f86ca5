"""The `python` tool: a model-written program run in the code grader's bubblewrap sandbox, never in this process.

    python(code="print(2**100)")  ->  "1267650600228229401496703205376\\n"

Each program runs as `python -I main.py` in a rewards.sandbox.Sandbox (new namespaces, no network, read-only
/usr, private tmpfs, rlimits, a wall clock, an output cap; as root a spare uid), inside a sandbox worker process
(rewards.pool.WorkerPool: a fresh interpreter, killable, replaced when it dies). `PythonLimits.workers` workers,
one program each at a time: the tool's concurrency cap; a call beyond it waits for a free worker.

What comes back is text for the model, never an exception: stdout, then stderr after a "stderr:" line (a traceback
reads as the model would see it in a terminal), "(exit status N)" after a failure that wrote no stderr, "error: the
program ran past N s and was killed" (what it printed until then follows), "error: output beyond N bytes ...",
"error: ..." when the sandbox itself failed. The environment cuts the text to env.max_output_tokens.

Decisions (deviations from a tool that is a plain function):
- One runner per process, `RUNNER`, since TOOLS holds plain functions: `configure(PythonLimits(...))` replaces it
  (the trainer does, from env.python_* and the code grader's reward.code_* limits, and starts it at once, so a
  machine without bubblewrap stops the run at start-up); otherwise it starts with the defaults on the first call.
  `close()` ends its workers (also at exit).
- Timing: `take_metrics()` returns the runs, timeouts, failures, program seconds (`run_s`, wall clock in the
  sandbox) and seconds spent waiting for a free worker (`wait_s`) since the last call, as tool/python/* metrics.
- Worker i runs programs as uid `uid_base + i` (as root; refused when that uid is in use), like the code grader.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from dataclasses import dataclass

from rewards.pool import TaskOutcome, WorkerPool
from rewards.sandbox import RunResult, Sandbox, SandboxLimits, SandboxUnavailable, find_bwrap, interpreter_binds, \
    uid_in_use
from rollout.env.tools import register_tool

MAX_CODE_BYTES = 64 << 10
MAX_OUTPUT_BYTES = 64 << 10  # the sandbox's cap; the environment cuts to env.max_output_tokens after it
_DEADLINE_SLACK_S = 10.0  # a worker that does not answer within timeout_s + this is killed and replaced


@dataclass(frozen=True)
class PythonLimits:
    workers: int = 2
    timeout_s: float = 5.0  # wall clock of one program
    memory_mb: int = 512  # RLIMIT_AS per process
    max_procs: int = 8  # RLIMIT_NPROC of the uid (bubblewrap's 2 processes and the interpreter included)
    tmpfs_mb: int = 16  # each private tmpfs, and the largest file
    python: str = "/usr/bin/python3"  # the interpreter inside the sandbox
    uid_base: int = 60000  # as root: worker i runs as uid_base + i


class PythonRunner:
    """The sandbox workers of the python tool and their counters (see the module docstring)."""

    def __init__(self, limits: PythonLimits):
        self.limits = limits
        self._free: queue.Queue[WorkerPool] | None = None
        self._pools: list[WorkerPool] = []
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("runs", "timeouts", "failures", "run_s", "wait_s"), 0.0)

    def start(self) -> None:
        """Start the workers (once); SandboxUnavailable without bubblewrap, ValueError for a uid in use."""
        with self._lock:
            if self._free is not None:
                return
            if find_bwrap() is None:
                raise SandboxUnavailable("the python tool runs programs under bubblewrap (bwrap), which is not on "
                                         "PATH: install it (apt-get install bubblewrap) or leave the tool out")
            uids = [self.limits.uid_base + i if os.geteuid() == 0 else None for i in range(self.limits.workers)]
            for uid in uids:
                if uid is not None and uid_in_use(uid):
                    raise ValueError(f"env.python_uid_base={self.limits.uid_base}: uid {uid} is in use; pick a "
                                     f"range of {self.limits.workers} unused uids")
            free: queue.Queue[WorkerPool] = queue.Queue()
            try:
                for uid in uids:
                    pool = WorkerPool("rollout.env.python_tool:make_python_worker", 1, {"uid": uid, "limits": self.limits})
                    self._pools.append(pool)
                    free.put(pool)
            except BaseException:
                self.close()
                raise
            self._free = free

    def run(self, code: str) -> str:
        """The model's answer for one program (see the module docstring)."""
        if len(code.encode()) > MAX_CODE_BYTES:
            return f"error: the program is longer than {MAX_CODE_BYTES} bytes"
        self.start()
        asked = time.perf_counter()
        pool = self._free.get()
        waited = time.perf_counter() - asked
        try:
            outcome = pool.map([code], self.limits.timeout_s + _DEADLINE_SLACK_S)[0]
        finally:
            self._free.put(pool)
        run = outcome.value if outcome.status == "ok" else None
        with self._lock:
            c = self._counts
            c["runs"] += 1
            c["wait_s"] += waited
            c["run_s"] += run.wall_s if run else 0.0
            c["timeouts"] += bool(run and run.timed_out)
            c["failures"] += run is None
        return answer(run, outcome, self.limits)

    def take_metrics(self) -> dict[str, float]:
        """tool/python/runs, timeouts, failures (the sandbox, not the program, failed), run_s, wait_s since the last
        call."""
        with self._lock:
            out = {f"tool/python/{k}": float(v) for k, v in self._counts.items()}
            self._counts = dict.fromkeys(self._counts, 0.0)
        return out

    def close(self) -> None:
        for pool in self._pools:
            pool.close()
        self._pools, self._free = [], None


def answer(run: RunResult | None, outcome: TaskOutcome, limits: PythonLimits) -> str:
    """The text the model reads for one program's run (None: the sandbox worker failed, `outcome` says how)."""
    if run is None:
        return f"error: the sandbox failed ({outcome.status}); the program may not have run"
    out, err = (b.decode(errors="replace") for b in (run.stdout, run.stderr))
    text = out + (("\n" if out and not out.endswith("\n") else "") + "stderr:\n" + err if err else "")
    if run.timed_out:
        return f"error: the program ran past {limits.timeout_s:g} s and was killed" + ("\n" + text if text else "")
    if run.output_limited:
        return text + f"\nerror: output beyond {MAX_OUTPUT_BYTES} bytes; the program was killed"
    if run.returncode and not err:  # a failure without a traceback: say so
        text += ("\n" if text and not text.endswith("\n") else "") + f"(exit status {run.returncode})"
    return text or "(no output)"


RUNNER = PythonRunner(PythonLimits())


def configure(limits: PythonLimits) -> PythonRunner:
    """Replace the process's runner (closing the old one's workers); returns the new one, not started."""
    global RUNNER
    RUNNER.close()
    RUNNER = PythonRunner(limits)
    return RUNNER


atexit.register(lambda: RUNNER.close())


@register_tool("python")
def python(code: str) -> str:
    """Run a Python 3 program in a sandbox (no network, no files kept) and return what it printed.

    Args:
        code: the program's source; print what you want to see
    """
    return RUNNER.run(code)


# ---- worker side: runs in rewards._worker processes ------------------------------------------------------------


def make_python_worker(slot: int, options: dict):
    """Pool factory: a sandbox as options["uid"] (None: this process's uid) under options["limits"]; kills what a
    killed predecessor left, and checks that a trivial program runs."""
    limits: PythonLimits = options["limits"]
    sandbox = Sandbox(SandboxLimits(limits.timeout_s, limits.memory_mb, limits.max_procs, MAX_OUTPUT_BYTES,
                                    limits.tmpfs_mb),
                      uid=options["uid"], ro_binds=interpreter_binds(limits.python), reap_orphans=True)
    sandbox.kill_leftovers()
    argv = [limits.python, "-I", "main.py"]
    probe = sandbox.run(argv, files={"main.py": b"print('ok')\n"})
    if probe.returncode != 0 or probe.stdout.strip() != b"ok":
        raise RuntimeError(f"the python tool's sandbox cannot run {limits.python!r} here (rc {probe.returncode}, "
                           f"timed out {probe.timed_out}): {probe.stderr.decode(errors='replace')[-2000:]}")
    return lambda code: sandbox.run(argv, files={"main.py": code.encode()})
