"""Every default of the reward system, in one place.

Plain dataclasses, no Hydra import: the top-level config composes `RewardConfig` as the `reward` group, and
tests build it directly. `__post_init__` rejects bad values with a message that names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MATH_MODES = ("strict", "lenient")
TRUNCATED_MODES = ("score", "mask")
CODE_MODES = ("all", "fraction")


@dataclass
class RewardConfig:
    # --- routing -------------------------------------------------------------------------------------------
    # Each row is graded by the grader registered for its `source` (rewards.registry.GRADERS: "math" and
    # "code" built in). Modules to import before scoring, each registering graders for more sources with
    # rewards.register_grader / rewards.add_grader, e.g. ["mypkg.graders"].
    grader_modules: list[str] = field(default_factory=list)
    # A user reward for every row whose source has no registered grader: a registered name (see
    # rewards.base.register_reward_fn) or an import path "pkg.module:fn" to a RewardFn. null: such a row is an
    # error (found when the data is loaded).
    custom: str | None = None
    # Grader worker processes per pool (one pool per pool-backed grader, e.g. math and code; each starts on
    # first use).
    num_workers: int = 2

    # --- math ----------------------------------------------------------------------------------------------
    # Hard wall-clock deadline per math sample; on overrun the worker is killed and replaced, and the sample
    # gets status "timeout" and wrong_score. math-verify's own alarms fire earlier (half of this, >= 1 s).
    timeout_s: float = 10.0
    # "strict": only the last \boxed{} after the end of thinking counts (training); when the gold has several
    #   comma-separated parts and that box holds fewer, the boxes just before it are joined to it in order.
    # "lenient" (evaluation): the final answer after the end of thinking is those boxes if there are any, else
    #   the text after the last "answer is" / "Answer:", else the last non-empty line; math-verify's own
    #   extraction reads only its last candidate in that text, never the reasoning (rewards/math.py, step 2).
    math_mode: str = "strict"
    # When the gold is a plain number (56088, -3.5, 1,000, 50%, 5 \text{cm}), the final answer must be one too:
    # an expression equal to it (\boxed{123 \times 456}, \frac{112176}{2}, 2^{100}) is "wrong". Without it
    # math-verify credits the computation restated instead of done, and a policy learns to box the question
    # (\boxed{87+4} within 5 steps). A symbolic gold (\frac{3}{4}, 2\sqrt{3}, a set, an interval) is left to
    # math-verify's equivalence either way. false: every answer math-verify finds equal is correct.
    math_numeric: bool = True
    # Marks the end of thinking. A response that opens a think block (think_start) and never closes it has
    # no answer; a response with no marker at all is searched whole (templates that put think_start in the
    # prompt leave only think_end in the response).
    think_end: str = "</think>"
    think_start: str = "<think>"
    # Address-space limit of each math worker process (sympy on adversarial input can allocate without bound).
    math_memory_mb: int = 4096
    # Cheap pre-checks on the final answer, bounding what sympy would spend on it (both modes); an answer past
    # one is status "rejected". Digits of all its numbers together, and of the value of any power or factorial
    # it writes with numbers. Only this applies to a plain number, cheap however long (two integers are even
    # compared in this process), so a correct 5000-digit answer counts:
    max_answer_digits: int = 20000
    # Characters besides those digits: sympy's cost grows with these.
    max_answer_chars: int = 1000
    # Nesting of (), [] and {} together (math-verify spends seconds on 20 nested parentheses).
    max_brace_depth: int = 20

    # --- scores --------------------------------------------------------------------------------------------
    correct_score: float = 1.0
    # Score of a wrong, rejected, timed-out or ungradable answer: 0, or -1 for DAPO-style +-1 rewards.
    wrong_score: float = 0.0
    # Score when no answer could be extracted (no box, unclosed think block, no code block).
    no_answer_score: float = 0.0
    # Added to the score of every response whose answer was extracted and graded (status "correct" or
    # "wrong"), whether or not it is right: a bonus for the format alone (an empty \boxed{} is no answer and
    # gets none). 0 = off.
    format_score: float = 0.0

    # --- length shaping ------------------------------------------------------------------------------------
    # DAPO soft overlong penalty: 0 = off. Otherwise a response of L tokens gets, added to its score,
    # 0 if L <= max_tokens - overlong_buffer; -overlong_penalty * (L - (max_tokens - overlong_buffer)) /
    # overlong_buffer inside the buffer; -overlong_penalty past max_tokens.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # "score": truncated responses are graded as they are; "mask": still graded (for the metrics), but
    # BatchRewards.trainable is False for them so the trainer leaves them out of the loss.
    truncated: str = "score"

    # --- code ----------------------------------------------------------------------------------------------
    # Wall-clock limit of one test run (interpreter start-up included: two interpreters for the assert and check
    # forms, the judge and the solution's); the CPU limit is this + 1 s.
    code_test_timeout_s: float = 5.0
    # "all": correct_score only if every test passes (the pass fraction is still reported in info);
    # "fraction": wrong_score + fraction * (correct_score - wrong_score).
    code_mode: str = "all"
    # Run candidate code WITHOUT bubblewrap (no namespaces; rlimits and the uid drop only). Off by default:
    # without bwrap the grader refuses to run code. Turning it on logs a loud warning.
    unsafe_local_code: bool = False
    # At most this many tests per sample (the first ones); each test is one sandboxed process.
    code_max_tests: int = 16
    # Interpreter that runs candidate code inside the sandbox. Must be readable by the spare uid; if it is
    # outside /usr its prefix (the directory above its bin/) is bind-mounted read-only.
    code_python: str = "/usr/bin/python3"
    # RLIMIT_AS of each sandboxed process. The total is bounded by code_memory_mb * code_max_procs.
    code_memory_mb: int = 1024
    # RLIMIT_NPROC of the spare uid: processes + threads, the 2 bubblewrap processes included (and the judge's
    # for the assert and check forms).
    code_max_procs: int = 8
    # Bytes kept of stdout (a run that prints more fails with "output_limit") and of stderr (truncated).
    code_max_output_bytes: int = 1 << 20
    # Size of each private tmpfs (/tmp, the work dir /work, /dev/shm) and the RLIMIT_FSIZE of one file.
    code_tmpfs_mb: int = 64
    # First spare uid (and gid); worker slot i runs code as code_uid_base + i. The uids must be unused on
    # the host: RLIMIT_NPROC counts every process of a uid, and it does not bind root at all.
    code_uid_base: int = 61000

    def __post_init__(self) -> None:
        _choice("math_mode", self.math_mode, MATH_MODES)
        _choice("truncated", self.truncated, TRUNCATED_MODES)
        _choice("code_mode", self.code_mode, CODE_MODES)
        for name in ("num_workers", "math_memory_mb", "max_answer_digits", "max_answer_chars", "max_brace_depth",
                     "code_max_tests", "code_memory_mb", "code_max_procs", "code_max_output_bytes", "code_tmpfs_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"reward.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("timeout_s", "code_test_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"reward.{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.overlong_buffer < 0:
            raise ValueError(f"reward.overlong_buffer must be >= 0 (0 turns the penalty off), "
                             f"got {self.overlong_buffer}")
        if self.overlong_penalty < 0:
            raise ValueError(f"reward.overlong_penalty is a magnitude and must be >= 0, got {self.overlong_penalty}")
        if not self.think_end:
            raise ValueError("reward.think_end must be a non-empty marker such as '</think>'")
        if self.code_max_procs < 4:
            # bwrap itself holds 2 processes of the uid and the interpreter a third.
            raise ValueError(f"reward.code_max_procs must be >= 4 (bubblewrap uses 2 and python 1), "
                             f"got {self.code_max_procs}")
        if self.code_uid_base < 1000:
            raise ValueError(f"reward.code_uid_base must be an unused uid >= 1000 (not root or a system uid), "
                             f"got {self.code_uid_base}")
        if self.custom is not None and not self.custom.strip():
            raise ValueError("reward.custom must be null or a name / 'pkg.module:fn', got an empty string")
        if not all(isinstance(name, str) and name.strip() for name in self.grader_modules):
            raise ValueError(f"reward.grader_modules must list module names such as 'mypkg.graders', "
                             f"got {list(self.grader_modules)!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"reward.{name} must be {options}, got {value!r}")
