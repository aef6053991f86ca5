r"""Math reward: math-verify behind our wrapper.

Per response, in the trainer process (microseconds):
  1. The answer region (`answer_region`): the text after the last end-of-thinking marker. A response that
     opens a think block and never closes it has no answer; one with no marker at all is searched whole.
  2. Strict mode: the last `\boxed{...}` (or `\fbox{...}`) in that region, braces matched. If that last
     box never closes (a truncated response) there is no answer: an earlier box is not the final answer.
  3. Pre-checks on the box content (`precheck`): a length cap, a brace-depth cap, numeric power towers,
     huge exponents, factorials and binomials. Each of these kept math-verify busy in sympy until its 5 s
     alarm (and an alarm cannot interrupt a long C-level bigint operation); here they cost a regex and
     score "rejected". Then a trailing percent sign is dropped from answer and gold (`strip_percent`).
  4. Fast path (`fast_verdict`): the gold and the answer are both plain integers or decimals of at most
     15 significant digits, the common case in arithmetic training. It decides only where math-verify
     would agree: math-verify compares two integers exactly, and when a decimal is involved it rounds both
     sides to 6 decimal places (float_rounding=6) and compares. So equal values are correct, two integers
     that differ are wrong, and values at least 1e-5 apart are wrong; a closer pair of decimals falls
     through to math-verify. tests/test_rewards_math.py checks this against math-verify itself.
  5. Everything else becomes a task for the worker pool (`make_math_worker`): math-verify's parse of the
     gold wrapped in \boxed{} (cached per worker, so each distinct gold is parsed once per worker) and of
     the answer, then verify(gold, answer) (gold first: verify is not symmetric). math-verify's own alarms
     stay on as the first line of defence; the pool's hard deadline and RLIMIT_AS are the guarantee.

Lenient mode (evaluation) keeps 1 (an unclosed think block is still no answer), skips 2-4 and hands the
answer region to math-verify's default extraction (LaTeX and plain expressions, anchored or not), which
finds more answers and more false positives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rewards.base import Grade, RewardResult
from rewards.registry import Grader, PoolBacked

if TYPE_CHECKING:
    from rewards.config import RewardConfig

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PERCENT = re.compile(r"\s*\\?%\s*$")
_MAX_FAST_DIGITS = 15  # sympy Floats carry 15 significant digits; past that rounding can make values equal
_FAST_WRONG_GAP = Decimal("1e-5")  # well outside math-verify's 6-decimal rounding

# (pattern, reason): shapes that send sympy into huge integer arithmetic. Numeric bases only, so that
# symbolic answers such as e^{x^2} or x^{2^n} still reach math-verify.
_PATHOLOGICAL = [
    (re.compile(r"\d\s*\^\s*\{?\s*\(?\s*\d+(?:\.\d+)?\s*\}?\s*\)?\s*\^"), "power tower"),
    (re.compile(r"\d\s*\^\s*\{?\s*\(?\s*\d{7,}"), "huge exponent"),
    (re.compile(r"\d{5,}\s*!"), "huge factorial"),
    (re.compile(r"(?:\^\s*(?:\{[^{}]*\}|\d+)|\([^()]*\^[^()]*\))\s*!"), "factorial of a power"),
    (re.compile(r"\\[dt]?binom\s*\{[^{}]*(?:\d{5,}|\^)"), "huge binomial"),
    (re.compile(r"\\[dt]?binom\s*\{[^{}]*\}\s*\{[^{}]*(?:\d{5,}|\^)"), "huge binomial"),
]


def answer_region(response: str, think_start: str, think_end: str) -> str | None:
    """The part of `response` that may hold the final answer; None if thinking never ended."""
    end = response.rfind(think_end)
    if end >= 0:
        return response[end + len(think_end):]
    if think_start and think_start in response:
        return None
    return response


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} / \fbox{...} in `text`; None if there is none or it never closes."""
    opens = [m.end() for m in _BOX_OPEN.finditer(text)]
    if not opens:
        return None
    depth = 1
    for i in range(opens[-1], len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[opens[-1]:i]
    return None


def brace_depth(text: str) -> int:
    depth = deepest = 0
    for c in text:
        if c == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif c == "}":
            depth -= 1
    return deepest


def precheck(answer: str, max_chars: int, max_depth: int) -> str | None:
    """Why `answer` (box content) must not reach sympy, or None if it may."""
    if len(answer) > max_chars:
        return f"longer than {max_chars} chars"
    if brace_depth(answer) > max_depth:
        return f"braces nested deeper than {max_depth}"
    for pattern, reason in _PATHOLOGICAL:
        if pattern.search(answer):
            return reason
    return None


def plain_number(text: str) -> Decimal | None:
    """`text` as a Decimal if it is a plain integer/decimal of at most 15 significant digits, else None."""
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    if len(text.lstrip("-").replace(".", "").lstrip("0")) > _MAX_FAST_DIGITS:
        return None
    return Decimal(text)


def fast_verdict(gold: str, answer: str) -> bool | None:
    """True/False where math-verify is sure to say the same; None to ask math-verify (see module doc)."""
    g, a = plain_number(gold), plain_number(answer)
    if g is None or a is None:
        return None
    if g == a:
        return True
    both_integers = "." not in gold and "." not in answer
    if both_integers or abs(g - a) >= _FAST_WRONG_GAP:
        return False
    return None


def strip_percent(text: str) -> str:
    r"""`50\%` -> `50`. math-verify 0.9 cannot parse a boxed percent at all (it falls back to comparing
    strings, so 50 vs 50\% is wrong); like units, the sign is treated as decoration."""
    return _PERCENT.sub("", text)


def strip_gold(gold: str) -> str:
    return strip_percent(gold.strip().strip("$").strip())


def prepare_math(response: str, gold: str, *, mode: str, think_start: str, think_end: str,
                 max_chars: int, max_depth: int) -> Grade | dict:
    """Grade what can be graded here; otherwise return the worker task {"gold", "answer" | "text"}.
    Grades made here: "correct" | "wrong" (fast path, info["fast_path"] True) | "no_answer" | "rejected";
    info["extracted"] is the answer text (or None), info["reason"] says why no_answer / rejected."""
    region = answer_region(response, think_start, think_end)
    if region is None:
        return Grade("no_answer", {"extracted": None, "reason": "unclosed think block"})
    gold = strip_gold(gold)
    if mode == "lenient":
        return {"gold": gold, "text": region}
    answer = last_boxed(region)
    if answer is None:
        return Grade("no_answer", {"extracted": None, "reason": "no closed \\boxed{} in the answer"})
    reason = precheck(answer, max_chars, max_depth)
    if reason is not None:
        return Grade("rejected", {"extracted": answer[:200], "reason": reason})
    answer = strip_percent(answer)
    verdict = fast_verdict(gold, answer)
    if verdict is not None:
        return Grade("correct" if verdict else "wrong", {"extracted": answer, "fast_path": True})
    return {"gold": gold, "answer": answer}


# ---- the grader: the "math" entry of rewards.registry.GRADERS ---------------------------------------------


def prepare_math_row(response: str, row: Mapping[str, Any], cfg: RewardConfig) -> Grade | dict:
    """prepare_math on the row's gold, with the run's settings."""
    return prepare_math(response, str(row["answer"]), mode=cfg.math_mode, think_start=cfg.think_start,
                        think_end=cfg.think_end, max_chars=cfg.max_answer_chars, max_depth=cfg.max_brace_depth)


def math_pool_options(cfg: RewardConfig) -> dict:
    """make_math_worker's options: the workers' address-space limit, and math-verify's own alarms at half the
    hard deadline (at least 1 s)."""
    return {"memory_mb": cfg.math_memory_mb, "alarm_s": max(1, int(cfg.timeout_s // 2))}


def math_deadline_s(cfg: RewardConfig, task: dict) -> float:
    """Every math task gets reward.timeout_s."""
    return cfg.timeout_s


def boxed_gold(row: Mapping[str, Any]) -> str:
    """The response that must grade correct against its own row: the gold, boxed."""
    return f"\\boxed{{{row['answer']}}}"


def math_metrics(results: list[RewardResult]) -> dict[str, float]:
    """fast_path_frac: the fraction of math responses decided without math-verify."""
    return {"fast_path_frac": sum(bool(r.info.get("fast_path")) for r in results) / len(results)}


MATH_GRADER = Grader("math", PoolBacked(prepare_math_row, "rewards.math:make_math_worker", math_pool_options,
                                        math_deadline_s),
                     needs=("answer",), reference=boxed_gold, metrics=math_metrics)


# ---- worker side: runs in rewards._worker processes ------------------------------------------------------


def make_math_worker(slot: int, options: dict):
    """Pool factory. options: {"memory_mb": int, "alarm_s": int (math-verify's own timeouts)}."""
    import logging
    import resource

    limit = options["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # math-verify logs a warning per internal timeout; ours are counted in the batch metrics instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return _MathWorker(options["alarm_s"])


class _MathWorker:
    def __init__(self, alarm_s: int):
        # Imported here, not at module top: the trainer process and the code workers never need sympy.
        import math_verify

        self._mv = math_verify
        self._alarm_s = alarm_s
        self._strict_target = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]
        self._gold_target = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
        self._golds: dict[str, list] = {}

    def _gold(self, gold: str) -> list:
        if gold not in self._golds:
            if len(self._golds) >= 4096:  # a dataset pass visits each gold a few times; bound the memory
                self._golds.clear()
            boxed = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
            self._golds[gold] = self._mv.parse(boxed, extraction_config=self._gold_target,
                                               parsing_timeout=self._alarm_s)
        return self._golds[gold]

    def __call__(self, task: dict) -> Grade:
        """task: {"gold": str, "answer": str} (strict) or {"gold": str, "text": str} (lenient).
        Grade status: "correct" | "wrong" | "no_answer" (lenient only) | "gold_unparseable"."""
        gold = self._gold(task["gold"])
        if not gold:
            return Grade("gold_unparseable", {"extracted": None})
        if "answer" in task:
            pred = self._mv.parse("\\boxed{" + task["answer"] + "}", extraction_config=self._strict_target,
                                  parsing_timeout=self._alarm_s)
            extracted = task["answer"]
        else:
            pred = self._mv.parse(task["text"], parsing_timeout=self._alarm_s)
            if not pred:
                return Grade("no_answer", {"extracted": None})
            # The raw string math-verify matched; str() of a sympy object can itself hang.
            extracted = pred[-1] if isinstance(pred[-1], str) else None
        ok = bool(pred) and self._mv.verify(gold, pred, timeout_seconds=self._alarm_s)
        return Grade("correct" if ok else "wrong", {"extracted": extracted})
