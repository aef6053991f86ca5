"""The programs the code grader runs inside the sandbox, as source text (rewards/code.py says how each test form
uses them): DRIVER runs a solution for the stdin/stdout and function-call forms; for the self-checking forms
JUDGE_DRIVER runs the test code and CANDIDATE_DRIVER the solution, in two processes that pass values as tagged
JSON (_CODEC). Plain strings: nothing here runs in the grader's own process."""

ASSERTION_FAILED = 3  # JUDGE_DRIVER's exit status when an assertion failed

# Runs inside the sandbox as `python -I -c DRIVER <mode>`; the source is the file solution.py.
DRIVER = r"""
import json, os, sys
src = open("solution.py", "rb").read()
if sys.argv[1] == "call":
    spec = json.loads(sys.stdin.read())  # read before the candidate's code can touch stdin
    result_fd = os.dup(1)
    os.dup2(2, 1)  # the candidate's prints go to stderr; stdout carries the result only
    ns = {"__name__": "solution"}
    exec(compile(src, "solution.py", "exec"), ns)
    fn = ns.get(spec["fn_name"])
    if fn is None and "Solution" in ns:
        fn = getattr(ns["Solution"](), spec["fn_name"])
    result = json.dumps(fn(*spec["args"]))
    sys.stdout.flush()
    with os.fdopen(result_fd, "w") as out:
        out.write(result)
else:
    sys.argv = ["solution.py"]
    exec(compile(src, "solution.py", "exec"), {"__name__": "__main__"})
"""

# Shared by the two processes of the self-checking forms: values cross between them as tagged JSON, and
# `decode` builds nothing but built-in values, whatever the other side sent.
_CODEC = r'''
import json


def encode(value):
    """A plain built-in value as JSON-ready data, containers tagged by type; TypeError for anything else."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind is bytes:
        return {"bytes": value.hex()}
    raise TypeError(f"a {kind.__name__} is not a plain value: tests see built-in values only")


DECODERS = {"tuple": lambda v: tuple(map(decode, v)), "set": lambda v: set(map(decode, v)),
            "frozenset": lambda v: frozenset(map(decode, v)), "dict": lambda v: {decode(k): decode(x) for k, x in v},
            "complex": lambda v: complex(*v), "bytes": bytes.fromhex}


def decode(data):
    """encode's inverse."""
    if type(data) is list:
        return [decode(v) for v in data]
    if type(data) is dict:
        (tag, items), = data.items()
        return DECODERS[tag](items)
    return data


def send(stream, message):
    data = json.dumps(message).encode()
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def receive(stream, limit=1 << 26):
    size = int.from_bytes(exactly(stream, 8), "big")
    if size > limit:
        raise ValueError(f"a message of {size} bytes")
    return json.loads(exactly(stream, size))


def exactly(stream, n):
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("the other process is gone")
    return data
'''

# The candidate's process: loads solution.py, then answers the judge's requests on two pipes (fds in argv):
# ["describe", name] -> ["callable", None] | ["module", its name] | ["value", encoded] | None;
# ["call", name, args, kwargs] -> ["ok", encoded result] | ["raise", exception type name, message].
CANDIDATE_DRIVER = _CODEC + r'''
import os, sys

requests, replies = os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb")
ns = {"__name__": "solution"}


def describe(name):
    if name not in ns:
        return None
    value = ns[name]
    if type(value) is type(sys):
        return ["module", value.__name__]
    if callable(value):
        return ["callable", None]
    try:
        return ["value", encode(value)]
    except TypeError:
        return None


def call(name, args, kwargs):
    try:
        return ["ok", encode(ns[name](*decode(args), **decode(kwargs)))]
    except Exception as e:
        return ["raise", type(e).__name__, str(e)[:2000]]


HANDLERS = {"describe": describe, "call": call}
exec(compile(open("solution.py", "rb").read(), "solution.py", "exec"), ns)
send(replies, ["ready"])
try:
    while True:
        kind, *args = receive(requests)
        send(replies, HANDLERS[kind](*args))
except EOFError:  # the judge is done
    pass
'''

# The judge (module docstring): runs the test code, never the candidate's. It makes itself undumpable (so the
# candidate's process, of the same uid, can neither ptrace it nor open its /proc/<pid>/mem or fds), reads its
# spec {"setup", "test", "names", "entry_point", "nonce"} from stdin before that process exists, then starts
# it with two pipes and /dev/null for stdin. Once the test and check(entry point) have returned, it writes the
# nonce to its stdout and exits 0; exit ASSERTION_FAILED: an assertion failed.
JUDGE_DRIVER = _CODEC + f"CANDIDATE_DRIVER = {CANDIDATE_DRIVER!r}\nASSERTION_FAILED = {ASSERTION_FAILED}\n" + r'''
import builtins, ctypes, importlib, os, sys


def undumpable():
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def raised(name, message):
    cls = getattr(builtins, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    return cls(f"the solution raised {name}: {message}")


class Candidate:
    def __init__(self):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        os.set_inheritable(to_r, True)  # every other fd of this process is close-on-exec
        os.set_inheritable(from_w, True)
        os.posix_spawn(sys.executable, [sys.executable, "-I", "-c", CANDIDATE_DRIVER, str(to_r), str(from_w)],
                       dict(os.environ), file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
        os.close(to_r)
        os.close(from_w)
        self.requests, self.replies = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")
        if receive(self.replies) != ["ready"]:
            raise RuntimeError("the solution did not load")
        self.binders = {"callable": lambda name, _: self.function(name),
                        "module": lambda _, module: importlib.import_module(module),
                        "value": lambda _, data: decode(data)}

    def ask(self, *request):
        send(self.requests, list(request))
        return receive(self.replies)

    def function(self, name):
        def call(*args, **kwargs):
            reply = self.ask("call", name, encode(list(args)), encode(kwargs))
            if reply[0] == "ok":
                return decode(reply[1])
            raise raised(*reply[1:3])
        return call

    def bind(self, names):
        bound = {}
        for name in names:
            found = self.ask("describe", name)
            if found is not None:
                kind, detail = found
                bound[name] = self.binders[kind](name, detail)
        return bound


def main():
    undumpable()
    spec = json.loads(sys.stdin.buffer.read())
    verdict = os.dup(1)
    os.dup2(2, 1)
    candidate = Candidate()
    # never a builtin's name: a solution's own `abs` must not stand in for abs
    ns = {"__name__": "__main__", **candidate.bind(sorted(set(spec["names"]) - set(dir(builtins))))}
    try:
        exec(compile(spec["setup"] + "\n" + spec["test"], "test.py", "exec"), ns)
        if spec["entry_point"] is not None:
            ns["check"](candidate.function(spec["entry_point"]))
    except AssertionError:
        sys.excepthook(*sys.exc_info())
        os._exit(ASSERTION_FAILED)
    os.write(verdict, spec["nonce"].encode())
    os._exit(0)


main()
'''
