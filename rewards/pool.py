"""A pool of killable worker processes with a hard wall-clock deadline per task.

Why not `multiprocessing.Pool` or `concurrent.futures`: neither can kill one hung task and carry on, and
threads are not an option because math-verify's timeouts use SIGALRM, which only works in a main thread.
Why fresh interpreters (`python -m rewards._worker`) and not multiprocessing's "spawn": spawn re-imports the
trainer's `__main__` in every worker (torch, vLLM, ...); a fresh interpreter imports only what the handler
needs. Why not "fork": the trainer is multi-threaded (torch, vLLM), and forking it can deadlock.

A worker is built once from a factory "module:name" called as `factory(slot, options)`, which returns the
handler `handler(payload) -> value`; payloads and values are pickled over a socket pair. On a deadline
overrun the worker is SIGKILLed and a replacement starts in the background with the same slot number
(the code grader maps slots to spare uids).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

# The directory that holds the `rewards` package, put on the workers' PYTHONPATH so that a source checkout
# works without installation.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class TaskOutcome:
    """status: "ok" (value holds the handler's return) | "timeout" (killed at the deadline) |
    "crashed" (the worker died: a segfault, the kernel's OOM killer) | "error" (the handler raised;
    detail holds the traceback)."""

    status: str
    value: Any = None
    detail: str = ""


class _Worker:
    """One worker process. state: "starting" | "ready"; `inflight` holds the tasks sent to it, in order
    (it runs them one after another); the deadline belongs to the first."""

    def __init__(self, factory: str, slot: int, options: dict, start_timeout_s: float):
        self.slot = slot
        parent_conn, child_conn = Pipe(duplex=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        fd = child_conn.fileno()
        # process_group=0: a Ctrl-C in the terminal interrupts the trainer, which closes the pool, instead of
        # spraying a traceback from every worker; an orphaned worker ends when it reads end-of-file.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewards._worker", str(fd)], process_group=0,
            pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL, stdout=2,  # worker prints go to our stderr
        )
        child_conn.close()
        self.conn: Connection = parent_conn
        self.conn.send((factory, slot, options))
        self.state = "starting"
        self.deadline = time.monotonic() + start_timeout_s
        self.inflight: deque[int] = deque()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class WorkerPool:
    """`num_workers` processes running the handler built by `factory` ("module:name")."""

    # Tasks sent to a worker ahead of its results, so that it never waits for this process to wake up
    # and hand out the next one (that wait dominated short tasks on a loaded machine).
    PIPELINE = 2

    def __init__(self, factory: str, num_workers: int, options: dict | None = None, *, start_timeout_s: float = 120.0):
        self._factory = factory
        self._options = dict(options or {})
        self._start_timeout_s = start_timeout_s
        self._workers = [self._spawn(slot) for slot in range(num_workers)]
        # Start-up failures (an import error, a sandbox that does not work) surface here, not mid-run.
        while any(w.state == "starting" for w in self._workers):
            self._poll([], [], [], [], None)

    def _spawn(self, slot: int) -> _Worker:
        return _Worker(self._factory, slot, self._options, self._start_timeout_s)

    def map(self, payloads: Sequence[Any], deadline_s: float | Sequence[float],
            on_done: Callable[[int, TaskOutcome], None] | None = None) -> list[TaskOutcome]:
        """Run every payload on some worker; `deadline_s` is per task (one float or one per payload) and
        counts from the moment the worker starts the task. Returns outcomes in payload order.

        Tasks go out in contiguous runs: worker i starts at i/num_workers of the list and goes forward; a
        worker whose run is done takes from the back of the longest run left. Neighbouring tasks (a prompt's
        group of responses, which share a gold answer) thus mostly meet one worker and its caches."""
        n, k = len(payloads), len(self._workers)
        deadlines = [deadline_s] * n if isinstance(deadline_s, (int, float)) else list(deadline_s)
        outcomes: list[TaskOutcome | None] = [None] * n
        runs = [deque(range(i * n // k, (i + 1) * n // k)) for i in range(k)]
        try:
            while any(runs) or any(w.inflight for w in self._workers):
                self._poll(runs, payloads, deadlines, outcomes, on_done)
        finally:
            # Only reached with tasks in flight when interrupted: their results would arrive in a later call.
            for i, w in enumerate(self._workers):
                if w.inflight:
                    w.kill()
                    self._workers[i] = self._spawn(w.slot)
        return outcomes  # type: ignore[return-value]

    def _poll(self, runs, payloads, deadlines, outcomes, on_done) -> None:
        """Hand out work, wait for the next message or deadline, and handle it."""
        for i, w in enumerate(self._workers):
            while w.state == "ready" and len(w.inflight) < self.PIPELINE and any(runs):
                task = runs[i].popleft() if runs[i] else max(runs, key=len).pop()
                w.conn.send((task, payloads[task]))
                if not w.inflight:
                    w.deadline = time.monotonic() + deadlines[task]
                w.inflight.append(task)
        waiting = [w for w in self._workers if w.state == "starting" or w.inflight]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        ready = set(wait([w.conn for w in waiting], timeout))
        for i, w in enumerate(self._workers):
            if not (w.state == "starting" or w.inflight):
                continue
            if w.conn in ready:
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    message = None
                self._handle(i, w, message, runs, deadlines, outcomes, on_done)
            elif time.monotonic() >= w.deadline:
                if w.state == "starting":
                    self.close()
                    raise RuntimeError(f"reward worker {self._factory} (slot {w.slot}) did not start within "
                                       f"{self._start_timeout_s:.0f} s")
                self._replace(i, w, TaskOutcome("timeout"), runs, outcomes, on_done)

    def _handle(self, i: int, w: _Worker, message, runs, deadlines, outcomes, on_done) -> None:
        if w.state == "starting":
            if message == ("ready",):
                w.state = "ready"
                return
            detail = message[1] if message else f"exit code {w.proc.wait()}"
            self.close()
            raise RuntimeError(f"reward worker {self._factory} (slot {w.slot}) failed to start:\n{detail}")
        if message is None:
            self._replace(i, w, TaskOutcome("crashed", detail=f"exit code {w.proc.wait()}"), runs, outcomes, on_done)
            return
        task, status, value = message
        w.inflight.popleft()
        if w.inflight:  # the worker went straight on to the next task
            w.deadline = time.monotonic() + deadlines[w.inflight[0]]
        outcome = TaskOutcome("ok", value=value) if status == "ok" else TaskOutcome("error", detail=value)
        outcomes[task] = outcome
        if on_done is not None:
            on_done(task, outcome)

    def _replace(self, i: int, w: _Worker, outcome: TaskOutcome, runs, outcomes, on_done) -> None:
        """The running task ended by killing or losing its worker: record it, hand the tasks queued behind
        it back (they never started), and replace the worker."""
        task = w.inflight.popleft()
        outcomes[task] = outcome
        runs[i].extendleft(reversed(w.inflight))
        w.kill()
        self._workers[i] = self._spawn(w.slot)
        if on_done is not None:
            on_done(task, outcome)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            try:
                w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
