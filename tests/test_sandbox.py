"""The code sandbox, attacked for real: each test runs one hostile program inside the sandbox and checks
that it was contained (killed, refused, or harmless) and that the host is unharmed.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_sandbox.py -q
Needs bubblewrap (apt-get install bubblewrap); kill(-1) attacks run only as a spare uid inside the pid
namespace, never as root on the host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from rewards import RewardConfig, RewardScorer
from rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, find_bwrap, uid_in_use

PY = "/usr/bin/python3"
LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=256, max_procs=8, max_output_bytes=64 << 10, tmpfs_mb=4)
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.skipif(find_bwrap() is None or not os.path.exists(PY),
                                reason="needs bubblewrap and /usr/bin/python3")


def spare_uid() -> int | None:
    """An unused uid for this test process (None when not root: then the sandbox keeps our uid)."""
    if not IS_ROOT:
        return None
    uid = 63000 + (os.getpid() % 1000) * 4
    while uid_in_use(uid):
        uid += 1
    return uid


UID = spare_uid()


def live_processes(uid: int) -> list[int]:
    """Pids of running (not zombie) processes of `uid`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(pid))
        except OSError:
            pass
    return pids


def wait_no_live_processes(uid: int) -> None:
    deadline = time.monotonic() + 2.0
    while live_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not live_processes(uid), "processes of the sandbox uid survived the run"


@pytest.fixture(scope="module")
def host():
    """Things on the host the attacks must not touch: a process, a file, a listening socket."""
    marker_dir = os.path.join("/tmp", f"sandbox-host-{os.getpid()}")
    os.makedirs(marker_dir, exist_ok=True)
    marker = os.path.join(marker_dir, "marker.txt")
    with open(marker, "w") as f:
        f.write("intact")
    proc = subprocess.Popen(["sleep", "600"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    yield {"marker": marker, "dir": marker_dir, "proc": proc, "port": listener.getsockname()[1],
           "listener": listener}
    proc.kill()
    proc.wait()
    listener.close()
    os.remove(marker)
    os.rmdir(marker_dir)


@pytest.fixture(scope="module")
def sandbox():
    # reap_orphans as in the grader workers: this process becomes a subreaper and reaps bwrap's pid 1.
    return Sandbox(LIMITS, uid=UID, reap_orphans=True)


def run_py(sandbox: Sandbox, code: str, stdin: bytes = b""):
    return sandbox.run([PY, "-I", "solution.py"], stdin=stdin, files={"solution.py": textwrap.dedent(code).encode()})


def assert_host_unharmed(host) -> None:
    assert host["proc"].poll() is None, "the host marker process was killed"
    with open(host["marker"]) as f:
        assert f.read() == "intact"
    assert sorted(os.listdir(host["dir"])) == ["marker.txt"]
    with pytest.raises(BlockingIOError):  # nobody connected to the host's loopback listener
        host["listener"].accept()
    if UID is not None:  # the pid namespace died with the run, and its pid 1 was reaped (no zombie)
        assert not uid_in_use(UID), f"processes of the sandbox uid are left: {live_processes(UID)}"


def test_a_plain_program_runs_with_its_input(sandbox):
    r = run_py(sandbox, "print(int(input()) * 2)", b"21\n")
    assert (r.returncode, r.stdout, r.timed_out) == (0, b"42\n", False)


@pytest.mark.parametrize("code", [
    """
    import signal
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU):
        signal.signal(s, signal.SIG_IGN)
    while True:
        pass
    """,
    "import time; time.sleep(10**6)",
], ids=["busy-loop-ignoring-signals", "sleep"])
def test_runaway_programs_are_killed_at_the_wall_clock(sandbox, host, code):
    start = time.monotonic()
    r = run_py(sandbox, code)
    assert r.timed_out and r.returncode is None
    assert time.monotonic() - start < LIMITS.timeout_s + 1.5
    assert_host_unharmed(host)


@pytest.mark.parametrize("code", [
    "x = bytearray(4 << 30); print('allocated')",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
], ids=["at-once", "gradual"])
def test_memory_bombs_hit_the_address_space_limit(sandbox, host, code):
    r = run_py(sandbox, code)
    assert r.returncode != 0 and b"MemoryError" in r.stderr and b"allocated" not in r.stdout
    assert_host_unharmed(host)


@pytest.mark.parametrize("code", [
    """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """,
    """
    import ctypes
    libc = ctypes.CDLL(None)
    while True:
        libc.fork()
    """,
], ids=["os.fork", "ctypes-fork"])
def test_fork_bombs_are_bounded_and_torn_down(sandbox, host, code):
    start = time.monotonic()
    r = run_py(sandbox, code)
    assert r.timed_out
    assert time.monotonic() - start < LIMITS.timeout_s + 1.5
    assert_host_unharmed(host)


@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC only counts the sandbox alone under a spare uid")
def test_process_limit_binds_the_spare_uid(sandbox):
    r = run_py(sandbox, """
        import os
        made = 0
        for _ in range(50):
            try:
                if os.fork() == 0:
                    import time; time.sleep(5); os._exit(0)
                made += 1
            except OSError:
                break
        print(made, flush=True)
        os._exit(0)
    """)
    # max_procs counts bwrap's two processes and this interpreter as well.
    assert int(r.stdout) == LIMITS.max_procs - 3


def test_setsid_daemon_dies_with_the_run(sandbox, host):
    r = run_py(sandbox, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    time.sleep(0.01)
            os._exit(0)
        print("parent done")
    """)
    assert r.stdout == b"parent done\n"
    assert_host_unharmed(host)


def test_kill_parent_and_kill_everything_reach_only_the_namespace(sandbox, host):
    r = run_py(sandbox, """
        import os, signal
        for target in (os.getppid(), -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError as e:
                print(type(e).__name__)
        print("still here")
    """)
    assert b"still here" in r.stdout
    assert_host_unharmed(host)


def test_host_files_are_not_there(sandbox, host):
    r = run_py(sandbox, f"""
        import os
        for path in ("/etc/passwd", "/etc/shadow", "/root", "{host['marker']}", "{os.path.abspath(__file__)}"):
            try:
                print(path, open(path).read()[:100])
            except OSError as e:
                print(path, type(e).__name__)
        print(sorted(os.listdir("/")))
    """)
    out = r.stdout.decode()
    assert "root:" not in out and "intact" not in out and "import" not in out
    assert out.count("FileNotFoundError") == 5
    top = set(eval(out.strip().splitlines()[-1]))
    assert top <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "dev", "proc", "tmp", "work"}
    assert_host_unharmed(host)


def test_writes_outside_the_work_dir_fail_or_stay_private(sandbox, host):
    r = run_py(sandbox, f"""
        import os
        for path in ("/x", "/usr/x", "/dev/x", "/root/evil.txt", "{host['dir']}/evil.txt", "/work/mine.txt"):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "w").write("pwned")
                print(path, "ok")
            except OSError as e:
                print(path, type(e).__name__)
    """)
    out = r.stdout.decode().splitlines()
    assert out[:4] == ["/x OSError", "/usr/x OSError", "/dev/x OSError", "/root/evil.txt OSError"]  # read-only
    # /tmp and /work are private tmpfs mounts: the writes succeed there and vanish with the run.
    assert out[4:] == [f"{host['dir']}/evil.txt ok", "/work/mine.txt ok"]
    assert not os.path.exists("/root/evil.txt")
    assert_host_unharmed(host)


def test_filling_the_disk_stops_at_the_tmpfs_cap(sandbox, host):
    # 1 MiB files, each under RLIMIT_FSIZE: only the size of the tmpfs can stop them (at 64 MiB the test
    # program stops by itself, so that a missing cap cannot fill the host's memory).
    r = run_py(sandbox, """
        written = 0
        try:
            for i in range(64):
                with open(f"/work/f{i}", "wb") as f:
                    f.write(b"x" * (1 << 20))
                written += 1
        except OSError as e:
            print(type(e).__name__, written)
    """)
    name, mib = r.stdout.split()
    assert name == b"OSError" and int(mib) <= LIMITS.tmpfs_mb
    assert_host_unharmed(host)


def test_no_network_not_even_the_hosts_loopback(sandbox, host):
    r = run_py(sandbox, f"""
        import socket
        for addr in (("127.0.0.1", {host['port']}), ("1.1.1.1", 53)):
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect(addr)
                print("connected")
            except OSError as e:
                print(type(e).__name__)
    """)
    assert b"connected" not in r.stdout and r.stdout.count(b"Error") == 2
    assert_host_unharmed(host)


def test_huge_stdout_is_cut_at_the_cap(sandbox, host):
    r = run_py(sandbox, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert r.output_limited and r.returncode is None
    assert not r.timed_out and r.wall_s < LIMITS.timeout_s  # killed at the cap, not at the deadline
    assert len(r.stdout) == LIMITS.max_output_bytes
    assert_host_unharmed(host)


def test_environment_is_cleared(sandbox, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    r = run_py(sandbox, "import os; print(sorted(os.environ))")
    assert b"SECRET_TOKEN" not in r.stdout and b"hunter2" not in r.stdout
    assert b"'PATH'" in r.stdout


def test_refuses_without_bubblewrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH on which bwrap really is absent
    with pytest.raises(SandboxUnavailable, match="unsafe_local_code"):
        Sandbox(LIMITS, uid=UID)
    scorer = RewardScorer(RewardConfig(num_workers=1))
    row = {"source": "code", "tests": {"inputs": [""], "outputs": ["1"]}}
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        scorer.score(["```python\nprint(1)\n```"], [row])
    scorer.close()


def test_unsafe_mode_warns_loudly_and_still_kills(monkeypatch, tmp_path, host):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # no bwrap, but kill(1) stays reachable
    cfg = RewardConfig(num_workers=1, unsafe_local_code=True, code_test_timeout_s=1.0,
                       code_uid_base=(UID or 63000) + 2)
    code = "```python\nimport os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\nprint(input())\n```"
    rows = [{"source": "code", "tests": {"inputs": ["7\n"], "outputs": ["7\n"]}},
            {"source": "code", "tests": {"inputs": [""], "outputs": [""]}}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RewardScorer(cfg) as scorer:
            batch = scorer.score([code, "```python\nwhile True: pass\n```"], rows)
    assert any("UNSAFE" in str(w.message) for w in caught)
    assert [r.status for r in batch.results] == ["correct", "wrong"]
    assert batch.results[1].info["tests"] == ["timeout"]
    if IS_ROOT:  # the setsid daemon escaped the process group, but not the kill of the spare uid
        wait_no_live_processes(cfg.code_uid_base)
    assert_host_unharmed(host)


def test_a_crashing_interpreter_is_a_runtime_error_not_a_hang(sandbox):
    r = run_py(sandbox, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert r.returncode not in (0, None) and not r.timed_out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
