"""What each phase of a step costs in memory, and a sign of life while a long one runs.

`PhaseMonitor.phase(name)` records the peak resident set of this process during the phase
(`memory/<name>_peak_gb`) and, when the phase runs longer than `heartbeat_s`, says so every `heartbeat_s`
seconds: an 80k-token response is minutes of generation, and minutes of forward and backward, with no other output.

A daemon thread reads the resident set every `interval` seconds (Linux: /proc/self/statm; elsewhere the
process's lifetime peak, `ru_maxrss`, which only grows). Torch and vLLM release the GIL inside their kernels, so
the thread keeps sampling through a long matmul. A colocated engine runs in this process, so the rollout phase's
peak is the engine's and the trainer's together; a server fleet's memory is its own processes'.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (its lifetime peak where /proc is missing)."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PhaseMonitor:
    """`with monitor.phase("update", "step 3"): ...`; `metrics()` returns the peaks recorded since the last call."""

    def __init__(self, say: Callable[[str], None] = lambda text: None, *, interval: float = 0.02,
                 heartbeat_s: float = 10.0):
        self.say, self.interval, self.heartbeat_s = say, interval, heartbeat_s
        self._lock = threading.Lock()
        self._active = threading.Event()
        self._peak, self._label, self._started, self._said = 0, "", 0.0, 0.0
        self._peaks: dict[str, int] = {}
        threading.Thread(target=self._sample, daemon=True, name="phase-monitor").start()

    def _sample(self) -> None:
        while True:
            self._active.wait()
            rss = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, rss)
                now = time.perf_counter()
                if self._active.is_set() and now - self._said >= self.heartbeat_s:
                    self._said = now
                    self.say(f"{self._label}: {now - self._started:.0f} s (resident {rss / 2**30:.2f} GB)")
            time.sleep(self.interval)

    @contextmanager
    def phase(self, name: str, label: str = ""):
        with self._lock:
            self._peak = rss_bytes()
            self._label = f"{label} {name}".strip()
            self._started = self._said = time.perf_counter()
        self._active.set()
        try:
            yield
        finally:
            with self._lock:
                self._active.clear()
                self._peaks[name] = max(self._peaks.get(name, 0), self._peak, rss_bytes())

    def metrics(self) -> dict[str, float]:
        out = {f"memory/{name}_peak_gb": peak / 2**30 for name, peak in self._peaks.items()}
        self._peaks.clear()
        return out
