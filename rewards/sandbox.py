"""Run one untrusted program under bubblewrap, as a spare uid, with rlimits, a wall clock and an output cap.

Layers, outermost first:
  * A spare unprivileged uid (when the grader runs as root): the program's processes belong to a uid that
    owns nothing on the host, and RLIMIT_NPROC binds it (the kernel exempts root from RLIMIT_NPROC).
  * bubblewrap, started as that uid: new user, pid, network, ipc, uts and cgroup namespaces; a root made of
    read-only /usr (plus the interpreter's prefix if it lives elsewhere) and nothing else from the host:
    no /etc, /home, /root, no host /tmp, no working tree; private size-capped tmpfs on /work (the working
    directory), /tmp and /dev/shm; everything else read-only; a cleared environment; --die-with-parent.
  * rlimits set before exec: AS (memory per process), CPU (seconds + 1), FSIZE (one file), NOFILE,
    NPROC (processes and threads of the uid), CORE = 0.
  * A wall-clock deadline and an output cap enforced from outside: on either, SIGKILL goes to the outer
    bwrap; --die-with-parent then kills the namespace's pid 1, and with it every process in the namespace.
  * The program's input comes on stdin and its files (the source) are copied in from memory, so nothing
    of the host's file system is shared. Expected outputs never enter the sandbox: callers compare outside.

What is covered:
  infinite loops (also ones that ignore SIGTERM/SIGALRM), sleeps, memory bombs (per process), fork bombs
  and setsid double-fork daemons (NPROC, and the pid namespace dies with the program), kill(-1, SIGKILL) and
  killing the parent (only the namespace is reachable, and only as the spare uid), reading host files
  (they are not there), writing outside the work dir (read-only or private), filling the disk (tmpfs caps,
  FSIZE), the network (only a down loopback in a new network namespace), unbounded output (the cap).

What is not covered:
  * Total memory is bounded by code_memory_mb * code_max_procs, not by a cgroup: a fork x memory attack
    can use that much RAM for up to the wall-clock limit. Use a cgroup (or a remote sandbox) where that matters.
  * No seccomp filter: the kernel's whole syscall surface is reachable; a kernel exploit escapes.
  * /proc inside shows host-wide, read-only information (CPU, memory, uptime, the kernel version).
  * Timing side channels and CPU contention with other jobs on the host.
  * In unsafe mode (`allow_unsafe`, no bubblewrap): only the uid drop, the rlimits, the wall clock (killpg
    plus a kill of every process of the spare uid) and a private working directory. The program can read
    whatever the spare uid can read on the host and reach the network.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

# The only environment the program sees.
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
_MAX_OPEN_FILES = 128
_STDERR_CAP = 64 << 10


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here, and unsafe local execution was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float  # wall clock of the whole run, start-up included
    memory_mb: int  # RLIMIT_AS per process
    max_procs: int  # RLIMIT_NPROC of the spare uid (processes + threads, bwrap's 2 included)
    max_output_bytes: int  # stdout beyond this kills the run (output_limited)
    tmpfs_mb: int  # size of each private tmpfs, and RLIMIT_FSIZE


@dataclass(frozen=True)
class RunResult:
    """returncode: None when the run was killed (deadline or output cap); negative = killed by that signal."""

    returncode: int | None
    stdout: bytes
    stderr: bytes  # at most 64 KiB
    timed_out: bool
    output_limited: bool
    wall_s: float


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def uid_in_use(uid: int) -> bool:
    """True if `uid` has a passwd entry or owns a running process (so it is not a spare uid)."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    return _process_count(uid) > 0


def interpreter_binds(python: str) -> tuple[str, ...]:
    """Read-only binds an interpreter needs besides /usr: its prefix (the directory above bin/)."""
    real = os.path.realpath(python)
    if real.startswith("/usr/"):
        return ()
    return (os.path.dirname(os.path.dirname(real)),)


def bwrap_argv(bwrap: str, argv: list[str], limits: SandboxLimits, ro_binds: tuple[str, ...],
               file_fds: dict[str, int], info_fd: int) -> list[str]:
    """The bubblewrap command line that runs `argv` (see the module docstring for the layout); each
    file_fds entry (name -> fd of its content) becomes a read-only file /work/<name>; bwrap writes the
    host pid of the namespace's pid 1 to `info_fd`."""
    a = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox",
         "--info-fd", str(info_fd), "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: /lib -> usr/lib
            a += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            a += ["--ro-bind", top, top]
    for path in ro_binds:
        a += ["--ro-bind", path, path]
    size = str(limits.tmpfs_mb << 20)
    a += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    for d in ("/dev/shm", "/tmp", "/work"):
        a += ["--size", size, "--tmpfs", d]
    for name, fd in file_fds.items():
        a += ["--ro-bind-data", str(fd), f"/work/{name}"]
    a += ["--chdir", "/work", "--remount-ro", "/"]
    for k, v in SANDBOX_ENV.items():
        a += ["--setenv", k, v]
    return a + ["--", *argv]


class Sandbox:
    """Runs programs for one worker slot. `uid`: the spare uid to run as (None when not root: the caller's
    uid stays, and NPROC counts the caller's other processes too). `allow_unsafe`: run without bubblewrap.

    `reap_orphans`: make this process a child subreaper and reap each run's orphan. bwrap's outer process
    exits before its inner one (the namespace's pid 1) is reaped, so the inner one is reparented; left to a
    container's pid 1, which often never reaps, these zombies pile up and use up the uid's RLIMIT_NPROC.
    Only the known orphan is waited for (bwrap reports its pid on --info-fd); other children are left alone,
    except in unsafe mode, where the killed leftovers of the spare uid are reaped too."""

    def __init__(self, limits: SandboxLimits, *, uid: int | None, ro_binds: tuple[str, ...] = (),
                 allow_unsafe: bool = False, reap_orphans: bool = False):
        self.limits = limits
        self.uid = uid
        self.ro_binds = ro_binds
        self.reap_orphans = reap_orphans
        if reap_orphans:
            _become_subreaper()
        self.bwrap = None if allow_unsafe else find_bwrap()
        if self.bwrap is None and not allow_unsafe:
            raise SandboxUnavailable(
                "bubblewrap (bwrap) is not on PATH, so untrusted code cannot be isolated. Install it "
                "(apt-get install bubblewrap) or set reward.unsafe_local_code=true to run code without isolation.")

    def run(self, argv: list[str], *, stdin: bytes = b"", files: dict[str, bytes] | None = None) -> RunResult:
        """Run `argv` (argv[0] an absolute path) in the working directory, which holds `files`
        (name -> content; read-only under bubblewrap), with `stdin` as its standard input."""
        files = files or {}
        for name in files:
            if "/" in name or name.startswith("."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
        if self.bwrap is None:
            return self._run_unsafe(argv, stdin, files)
        fds = {name: _memfd(name, content) for name, content in files.items()}
        info_r, info_w = os.pipe()
        try:
            cmd = bwrap_argv(self.bwrap, argv, self.limits, self.ro_binds, fds, info_fd=info_w)
            result = self._launch(cmd, "/", {}, stdin, (*fds.values(), info_w))
            os.close(info_w)
            info_w = -1
            if self.reap_orphans:
                _reap(_child_pid(info_r), wait_s=2.0)
            return result
        finally:
            for fd in (*fds.values(), info_r, info_w):
                if fd >= 0:
                    os.close(fd)

    def _run_unsafe(self, argv: list[str], stdin: bytes, files: dict[str, bytes]) -> RunResult:
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        try:
            for name, content in files.items():
                with open(os.path.join(workdir, name), "wb") as f:
                    f.write(content)
            if self.uid is not None:
                os.chown(workdir, self.uid, self.uid)
            return self._launch(argv, workdir, dict(SANDBOX_ENV, HOME=workdir), stdin, ())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self.kill_leftovers()  # daemons that left the process group
            if self.reap_orphans:
                _reap(-1, wait_s=0.0)

    def _launch(self, cmd: list[str], cwd: str, env: dict, stdin: bytes, pass_fds: tuple[int, ...]) -> RunResult:
        limits, nproc = self.limits, self.limits.max_procs
        if self.uid is None:  # NPROC counts all our processes: leave room for the ones that exist
            nproc += _process_count(os.getuid())
        rlimits = ((resource.RLIMIT_AS, limits.memory_mb << 20), (resource.RLIMIT_CPU, math.ceil(limits.timeout_s) + 1),
                   (resource.RLIMIT_FSIZE, limits.tmpfs_mb << 20), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NOFILE, _MAX_OPEN_FILES), (resource.RLIMIT_NPROC, nproc))

        def set_rlimits() -> None:  # runs in the child between fork and exec; the grader workers are single-threaded
            for res, value in rlimits:
                resource.setrlimit(res, (value, value))

        ids = {} if self.uid is None else {"user": self.uid, "group": self.uid, "extra_groups": []}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, pass_fds=pass_fds,
                                preexec_fn=set_rlimits, **ids)
        stdout, stderr, timed_out, limited = _communicate(proc, stdin, start + limits.timeout_s,
                                                          limits.max_output_bytes)
        returncode = None if (timed_out or limited) else proc.returncode
        return RunResult(returncode, stdout, stderr, timed_out, limited, time.monotonic() - start)

    def kill_leftovers(self) -> None:
        """SIGKILL every process of the spare uid (after each unsafe run, and when a slot starts): a forked
        child drops to the uid and calls kill(-1), which reaches exactly that uid's processes."""
        if self.uid is None:
            return
        pid = os.fork()
        if pid == 0:  # the grader workers are single-threaded, so forking them is safe
            try:
                os.setgroups([])
                os.setgid(self.uid)
                os.setuid(self.uid)
                if os.getuid() == os.geteuid() == self.uid != 0:  # never kill(-1) with privileges
                    os.kill(-1, signal.SIGKILL)
            except OSError:  # ESRCH: nothing to kill
                pass
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _become_subreaper() -> None:
    import ctypes

    pr_set_child_subreaper = 36
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _child_pid(info_r: int) -> int | None:
    """The "child-pid" bwrap wrote on its --info-fd during set-up (the sandboxed program never holds
    that fd), or None."""
    os.set_blocking(info_r, False)
    data = b""
    try:
        while chunk := os.read(info_r, 4096):
            data += chunk
    except BlockingIOError:  # a dying bwrap process still holds the write end: what it wrote is here
        pass
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):  # bwrap failed before it could write it
        return None


def _reap(pid: int | None, wait_s: float) -> None:
    """Reap child `pid`, waiting at most `wait_s` for it to exit; pid -1: every child that has exited."""
    if pid is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (we are no subreaper), or none left
            return
        if done == 0:  # nothing exited (yet)
            if pid == -1 or time.monotonic() >= deadline:
                return
            time.sleep(0.002)
        elif pid != -1:
            return


def _memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, content)  # a memfd takes any size in one write
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _process_count(uid: int) -> int:
    """Processes owned by `uid` (the owner of /proc/<pid> is the process's effective uid)."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _communicate(proc: subprocess.Popen, stdin: bytes, deadline: float,
                 max_out: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and collect stdout/stderr until the process exits or the deadline passes; kill on the
    deadline or when stdout exceeds `max_out`. Returns (stdout, stderr, timed_out, output_limited).
    The end is the exit of the process itself (a pidfd), not the end of its pipes: without bubblewrap a
    leftover daemon can hold the pipes open long after the program is done."""
    out, err = bytearray(), bytearray()
    caps = {proc.stdout.fileno(): (out, max_out + 1), proc.stderr.fileno(): (err, _STDERR_CAP)}
    sel = selectors.DefaultSelector()
    for fd in caps:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ)
    stdin_fd, pending = proc.stdin.fileno(), memoryview(stdin)
    if pending:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    exited = timed_out = False
    while not exited and len(out) <= max_out:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(remaining):
            if key.fd == pidfd:
                exited = True
            elif key.fd == stdin_fd:
                try:
                    pending = pending[os.write(stdin_fd, pending[:65536]):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # the program stopped reading: fine, it may not need all input
                    pending = pending[:0]
                if not pending:
                    sel.unregister(stdin_fd)
                    proc.stdin.close()
            elif _read_once(key.fd, *caps[key.fd]) is False:
                sel.unregister(key.fd)  # end of file
    if exited:  # what the program wrote just before exiting may still sit in the pipes (at most their size)
        for fd, (buf, cap) in caps.items():
            for _ in range(64):
                if not _read_once(fd, buf, cap):
                    break
    sel.close()
    os.close(pidfd)
    limited = len(out) > max_out
    if timed_out or limited:
        _kill(proc)
    else:
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if not f.closed:
            f.close()
    return bytes(out[:max_out]), bytes(err), timed_out, limited


def _read_once(fd: int, buf: bytearray, cap: int) -> bool | None:
    """One read from non-blocking `fd`, kept in `buf` up to `cap` bytes (the rest is dropped so that the
    writer never blocks on a full pipe). True: got data; False: end of file; None: nothing there now."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return None
    buf += chunk[:max(0, cap - len(buf))]
    return bool(chunk)


def _kill(proc: subprocess.Popen) -> None:
    # start_new_session made the outer process a group leader; under bwrap its death also takes down the
    # pid namespace (--die-with-parent), so daemons that left the group die too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
