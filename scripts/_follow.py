"""Run a child process with its output in a log, and say what it is doing at least every ~10 s.

The benchmark scripts run training and worker processes for minutes each; `follow` is the one way they do it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def follow(cmd: list[str], log: Path, label: str, *, env: dict | None = None, cwd: Path = ROOT,
           on_line: Callable[[str], None] | None = None, every: float = 10.0, check: bool = True) -> int:
    """Run `cmd` (stdout and stderr into `log`) and return its exit code; with `check`, a non-zero code exits
    (SystemExit) with the log's tail. While it runs, a line `label: <seconds> s | <its newest output line>` is
    printed every `every` seconds, silent phases included. `on_line(line)` sees each output line as it arrives
    (e.g. to time the child's phases)."""
    start, newest = time.perf_counter(), [""]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                                errors="replace")

        def read() -> None:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if line.strip():
                    newest[0] = line.strip()
                if on_line:
                    on_line(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                print(f"  {label}: {time.perf_counter() - start:.0f} s | {newest[0][:110]}", flush=True)
        reader.join()
    if check and proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{label} failed (exit {proc.returncode}), log {log}:\n{tail}")
    return proc.returncode
