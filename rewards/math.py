r"""Math reward: math-verify behind our wrapper.

Per response, in the trainer process (microseconds):
  1. The answer region (`answer_region`): the text after the last end-of-thinking marker. A response that
     opens a think block and never closes it has no answer; one with no marker at all is searched whole.
  2. The final answer (`final_answer`):
     strict mode: the last `\boxed{...}` (or `\fbox{...}`) in that region, braces matched. If that last box
        never closes (a truncated response) there is no answer: an earlier box is not the final answer.
        When the gold has several comma-separated parts (`2, 3`; commas inside brackets, `{,}` and
        thousands separators do not count) and the last box holds fewer, the boxes before it are taken too
        until they hold as many, and joined in order (`\boxed{2}` and `\boxed{3}` answer `2, 3`).
     lenient mode (evaluation): the same boxes if the region has any; else the last explicit answer
        statement: the text after the last "answer is" / "answers are" / "answer:" (any case, markdown
        stars allowed), to the end of its line, or the next non-empty line when nothing follows on it;
        else the region's last non-empty line. A display-math block (\[...\], $$...$$) counts as one
        line; an answer that is one math span ($...$, \(...\), \[...\], $$...$$) is read like box content,
        any other answer text goes to math-verify's own extraction, which reads only its last candidate
        (extraction_mode="first_match"): nothing earlier in the response is ever credited, so a wrong or
        unparseable final answer is not rescued by a number the reasoning happened to contain.
     In both modes an empty final answer (`\boxed{}`, `\boxed{ }`: the instruction's template copied) is
        no answer, so reward.format_score never pays for the box alone.
     A gold that is a plain number (`is_number`) needs an answer that is one too (reward.math_numeric, on by
        default): an expression equal to the gold is wrong, because it restates the computation instead of
        doing it (`87+4` for 91, `\frac{112176}{2}` for 56088; a real model learnt to box the question within
        5 RL steps). A symbolic gold (a fraction, a radical, a set, an interval, an expression) is left to
        math-verify's equivalence. In lenient mode the rule applies to the final answer's math, or to what
        math-verify extracts from its text.
  3. Pre-checks on the answer (`precheck`), which bound what sympy would spend on it rather than its length:
     at most max_answer_digits digits in all its numbers together (a plain number, digits with an optional
     sign and decimal point, is cheap however long: only this applies to it), at most max_answer_chars
     characters besides those digits, brackets ((), [] and {} together) nested at most max_brace_depth
     deep, no numeric power towers, huge exponents, factorials or binomials, and no power or factorial of
     numbers whose value would have more than max_answer_digits digits. Each of these kept math-verify busy
     in sympy until its 5 s alarm (and an alarm cannot interrupt a long C-level bigint operation); here they
     cost a regex and score "rejected". The pool's hard deadline stays the backstop for whatever gets past.
  4. Normalisation of answer and gold alike (`normalize`): a trailing percent sign (`strip_percent`) and a
     leading `=` are dropped, and every empty set (`\varnothing`, `\{\}`, U+2205) is written `\emptyset`.
  5. Fast path (`fast_verdict`): the gold and the answer are both plain integers (any length) or decimals
     of at most 15 significant digits, the common case in arithmetic training. It decides only where
     math-verify would agree: math-verify compares two integers exactly, and when a decimal is involved it
     rounds both sides to 6 decimal places (float_rounding=6) and compares. So equal values are correct,
     two integers that differ are wrong, and values at least 1e-5 apart are wrong; a closer pair of
     decimals falls through to math-verify. tests/test_rewards_math.py checks this against math-verify.
  6. Everything else becomes a task for the worker pool (`make_math_worker`): math-verify's parse of the
     gold wrapped in \boxed{} (cached per worker, so each distinct gold is parsed once per worker) and of
     the answer, then verify(gold, answer) (gold first: verify is not symmetric). math-verify's own alarms
     stay on as the first line of defence; the pool's hard deadline and RLIMIT_AS are the guarantee. The
     workers convert numbers of up to max_answer_digits digits from text (Python's own limit is 4300).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from rewards.base import Grade, RewardResult
from rewards.registry import Grader, PoolBacked

if TYPE_CHECKING:
    from rewards.config import RewardConfig

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # 1,000
_NO_DIGITS = str.maketrans("", "", "0123456789")
_PERCENT = re.compile(r"\s*\\?%\s*$")
_LEADING_EQUALS = re.compile(r"^=\s*")
_EMPTY_SET = re.compile(r"\\varnothing(?![a-zA-Z])|\\\{\s*\\\}|\u2205")
_NOT_SEPARATORS = re.compile(r"\\,|" + _THOUSANDS.pattern)  # thin spaces, thousands separators
_MAX_FAST_DIGITS = 15  # sympy Floats carry 15 significant digits; past that rounding can make values equal
_FAST_WRONG_GAP = Decimal("1e-5")  # well outside math-verify's 6-decimal rounding

# What may surround a plain number (is_number): a dollar sign before it, a unit after it (a \text, \mathrm or
# \mbox of letters, or a degree sign), and thousands separated by `,` or `{,}`.
_NUMERAL = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)")
_CURRENCY = re.compile(r"^\\\$\s*")
_UNIT = re.compile(r"(?:\s|\\[ ,;])*(?:\\(?:text|mathrm|mbox)\s*\{[a-zA-Z\s.]*\}|\^\s*(?:\\circ|\{\s*\\circ\s*\}))$")
_DIGIT_GROUPS = re.compile(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?!\d))")
_NOT_A_NUMBER = "the gold is a plain number and the answer is not (reward.math_numeric)"

# (pattern, reason): shapes that send sympy into huge integer arithmetic. Numeric bases only, so that
# symbolic answers such as e^{x^2} or x^{2^n} still reach math-verify.
_PATHOLOGICAL = [
    (re.compile(r"\d\s*\^\s*\{?\s*\(?\s*\d+(?:\.\d+)?\s*\}?\s*\)?\s*\^"), "power tower"),
    (re.compile(r"\d\s*\^\s*\{?\s*\(?\s*\d{7,}"), "huge exponent"),
    (re.compile(r"(?<!\d)\d{5,}\s*!"), "huge factorial"),
    (re.compile(r"(?:\^\s*(?:\{[^{}]*\}|\d+)|\([^()]*\^[^()]*\))\s*!"), "factorial of a power"),
    (re.compile(r"\\[dt]?binom\s*\{[^{}]*(?:\d{5,}|\^)"), "huge binomial"),
    (re.compile(r"\\[dt]?binom\s*\{[^{}]*\}\s*\{[^{}]*(?:\d{5,}|\^)"), "huge binomial"),
]
# base (maybe in brackets), exponent
_POWER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:\\right)?[)\]}]?\s*\^\s*\{?\s*\(?\s*(-?\d+)")
_FACTORIAL = re.compile(r"(?<![\d.])(\d+)\s*!")

# Lenient mode's final answer when there is no box (module docstring, step 2).
_DISPLAY_MATH = re.compile(r"\\\[.*?\\\]|\$\$.*?\$\$", re.DOTALL)
_ANSWER_STATEMENT = re.compile(r"\banswers?\b(?:\s+(?:is|are)\b|[\s*]*:)", re.IGNORECASE)
_STATEMENT_EDGES = re.compile(r"^[\s*:]+|[\s*.]+$")
_MATH_SPAN = re.compile(r"\$\$((?:(?!\$).)+)\$\$|\$((?:(?!\$).)+)\$|\\\(((?:(?!\\\)).)+)\\\)|\\\[((?:(?!\\\]).)+)\\\]",
                        re.DOTALL)
_NO_ANSWER = {"strict": "no closed \\boxed{} in the answer",
              "lenient": "no final answer (no closed box, answer statement or last line)"}


class AnswerLimits(NamedTuple):
    """What an answer may cost before it reaches sympy (reward.max_answer_digits / max_answer_chars /
    max_brace_depth; see precheck). A tuple: one is made per response, and a dataclass costs 1 us more."""

    max_digits: int = 20000
    max_chars: int = 1000
    max_depth: int = 20


def answer_region(response: str, think_start: str, think_end: str) -> str | None:
    """The part of `response` that may hold the final answer; None if thinking never ended."""
    end = response.rfind(think_end)
    if end >= 0:
        return response[end + len(think_end):]
    if think_start and think_start in response:
        return None
    return response


def _closing_brace(text: str, start: int, stop: int) -> int | None:
    """Index of the `}` that closes the brace opened just before text[start], looking before `stop`."""
    depth = 1
    for i in range(start, stop):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def final_boxes(text: str, parts: int) -> list[str] | None:
    r"""Contents of the boxes of the final answer, in order: the last \boxed{...} / \fbox{...} in `text`, and
    while they hold fewer than `parts` answer parts, the closed boxes before it. None if there is no box or
    the last one never closes."""
    boxes, held, stop = [], 0, len(text)
    for m in reversed(list(_BOX_OPEN.finditer(text))):
        end = _closing_brace(text, m.end(), stop)
        if end is None:  # never closes, or encloses the boxes already taken
            break
        boxes.insert(0, text[m.end():end])
        held, stop = held + answer_parts(boxes[0]), m.start()
        if held >= parts:
            break
    return boxes or None


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} / \fbox{...} in `text`; None if there is none or it never closes."""
    boxes = final_boxes(text, 1)
    return None if boxes is None else boxes[-1]


def answer_parts(text: str) -> int:
    """How many comma-separated parts `text` lists: commas inside (), [] or {} (so `{,}` too), thin spaces
    `\\,` and thousands separators (`1,000`) do not separate parts."""
    if "," not in text:
        return 1
    text = _NOT_SEPARATORS.sub("", text)
    parts, depth = 1, 0
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(depth - 1, 0)
        elif c == "," and depth == 0:
            parts += 1
    return parts


def final_statement(region: str) -> str | None:
    """Lenient mode's final answer when the region has no box (module docstring, step 2), or None."""
    flat = _DISPLAY_MATH.sub(lambda m: m.group().replace("\n", " "), region)
    statements = list(_ANSWER_STATEMENT.finditer(flat))
    lines = flat[statements[-1].end():].split("\n") if statements else reversed(flat.split("\n"))
    return next((cleaned for line in lines if (cleaned := _STATEMENT_EDGES.sub("", line))), None)


def final_answer(region: str, gold_parts: int, lenient: bool) -> tuple[str, str] | None:
    """The final answer in the answer region and its worker-task key: ("answer") box content, or math that
    is read like it, ("text") lenient text for math-verify's extraction. None: there is none."""
    boxes = final_boxes(region, gold_parts)
    if boxes is not None:
        return ", ".join(boxes), "answer"
    if not lenient or _BOX_OPEN.search(region):  # an unclosed last box is no answer in both modes
        return None
    statement = final_statement(region)
    if statement is None:
        return None
    span = _MATH_SPAN.fullmatch(statement)
    if span is not None:
        return next(g for g in span.groups() if g is not None).strip(), "answer"
    return statement, "text"


def nesting_depth(text: str) -> int:
    """How deep (), [] and {} nest in `text`, all kinds together (an unmatched closer counts for nothing)."""
    depth = deepest = 0
    for c in text:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _log10(number: str) -> float:
    """log10 of the digits of a plain number read as one integer (0 for zero), without converting it."""
    digits = number.replace(".", "").lstrip("0")
    if not digits:
        return 0.0
    head = digits[:15]
    return math.log10(int(head)) + len(digits) - len(head)


def value_digits(answer: str) -> float:
    """The most digits any power (numeric base and exponent) or factorial of a number in `answer` evaluates
    to, estimated from logarithms (a power's value, read with its base as an integer); 0 if it has none."""
    if "^" not in answer and "!" not in answer:
        return 0.0
    sizes = [0.0]
    if "^" in answer:
        sizes += [abs(float(exp)) * log for base, exp in _POWER.findall(answer) if (log := _log10(base)) > 0]
    if "!" in answer:
        sizes += [math.lgamma(float(n) + 1) / math.log(10) for n in _FACTORIAL.findall(answer)]
    return max(sizes)


def precheck(answer: str, limits: AnswerLimits) -> str | None:
    """Why `answer` must not reach sympy, or None if it may (module docstring, step 3)."""
    others = len(answer.translate(_NO_DIGITS))
    if len(answer) - others > limits.max_digits:
        return f"more than {limits.max_digits} digits"
    if _PLAIN_NUMBER.fullmatch(answer.strip()):  # cheap however long it is; none of the rest can apply
        return None
    if others > limits.max_chars:
        return f"more than {limits.max_chars} chars besides digits"
    if nesting_depth(answer) > limits.max_depth:
        return f"brackets nested deeper than {limits.max_depth}"
    for pattern, reason in _PATHOLOGICAL:
        if pattern.search(answer):
            return reason
    if value_digits(answer) > limits.max_digits:
        return f"a power or factorial of more than {limits.max_digits} digits"
    return None


def plain_number(text: str) -> Decimal | None:
    """`text` as a Decimal if it is a plain integer (any length) or a decimal of at most 15 significant
    digits, else None."""
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    if "." in text and len(text.lstrip("-").replace(".", "").lstrip("0")) > _MAX_FAST_DIGITS:
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


def is_number(text: str) -> bool:
    """Whether `text` (normalized) is a plain number: an integer or a decimal, maybe with a sign, thousands
    separators, a dollar sign or a unit, and maybe after `x =` (the value is what follows the last `=`). An
    expression, a fraction or scientific notation is not, whatever its value."""
    if answer_parts(text) > 1:
        return False
    value = _CURRENCY.sub("", text.rpartition("=")[2].strip())
    return bool(_NUMERAL.fullmatch(_DIGIT_GROUPS.sub("", _UNIT.sub("", value))))


def strip_percent(text: str) -> str:
    r"""`50\%` -> `50`. math-verify 0.9 cannot parse a boxed percent at all (it falls back to comparing
    strings, so 50 vs 50\% is wrong); like units, the sign is treated as decoration."""
    return _PERCENT.sub("", text)


def normalize(text: str) -> str:
    r"""An answer or a gold as math-verify gets it: no trailing percent, no leading `=` (math-verify 0.9 reads
    `= 5` as nothing, and `x = 5` as 5), every empty set `\emptyset` (it reads `\varnothing` as a symbol)."""
    text = _LEADING_EQUALS.sub("", strip_percent(text.strip()))
    return _EMPTY_SET.sub(lambda _: "\\emptyset", text) if "\\" in text or "\u2205" in text else text


@functools.lru_cache(maxsize=4096)
def prepared_gold(gold: str) -> tuple[str, int, bool]:
    """The gold as math-verify gets it (normalized, without surrounding $), how many parts it lists, and whether
    it is a plain number; cached, as the responses of a group share their gold."""
    gold = normalize(gold.strip().strip("$"))
    return gold, answer_parts(gold), is_number(gold)


def prepare_math(response: str, gold: str, *, mode: str, think_start: str, think_end: str,
                 limits: AnswerLimits, numeric: bool = True) -> Grade | dict:
    """Grade what can be graded here; otherwise return the worker task {"gold", "answer" | "text", "numeric"}.
    numeric: reward.math_numeric (a plain-number gold needs a plain-number answer).
    Grades made here: "correct" | "wrong" (fast path, info["fast_path"] True) | "no_answer" | "rejected";
    info["extracted"] is the answer text (or None), info["reason"] says why no_answer / rejected."""
    region = answer_region(response, think_start, think_end)
    if region is None:
        return Grade("no_answer", {"extracted": None, "reason": "unclosed think block"})
    gold, gold_parts, gold_is_number = prepared_gold(gold)
    found = final_answer(region, gold_parts, lenient=mode == "lenient")
    if found is None:
        return Grade("no_answer", {"extracted": None, "reason": _NO_ANSWER[mode]})
    answer, key = found
    if not answer.strip():  # `\boxed{}` copied from the instruction: an answer format with no answer in it
        return Grade("no_answer", {"extracted": None, "reason": "empty \\boxed{}"})
    reason = precheck(answer, limits)
    if reason is not None:
        return Grade("rejected", {"extracted": answer[:200], "reason": reason})
    answer = normalize(answer)
    numeric = numeric and gold_is_number
    if numeric and key == "answer" and not is_number(answer):
        return Grade("wrong", {"extracted": answer, "reason": _NOT_A_NUMBER})
    verdict = fast_verdict(gold, answer)
    if verdict is not None:
        return Grade("correct" if verdict else "wrong", {"extracted": answer, "fast_path": True})
    return {"gold": gold, key: answer, "numeric": numeric}


# ---- the grader: the "math" entry of rewards.registry.GRADERS ---------------------------------------------


def prepare_math_row(response: str, row: Mapping[str, Any], cfg: RewardConfig) -> Grade | dict:
    """prepare_math on the row's gold, with the run's settings."""
    limits = AnswerLimits(cfg.max_answer_digits, cfg.max_answer_chars, cfg.max_brace_depth)
    return prepare_math(response, str(row["answer"]), mode=cfg.math_mode, think_start=cfg.think_start,
                        think_end=cfg.think_end, limits=limits, numeric=cfg.math_numeric)


def math_pool_options(cfg: RewardConfig) -> dict:
    """make_math_worker's options: the workers' address-space limit, math-verify's own alarms at half the
    hard deadline (at least 1 s), and the longest number the pre-checks let through."""
    return {"memory_mb": cfg.math_memory_mb, "alarm_s": max(1, int(cfg.timeout_s // 2)),
            "max_digits": cfg.max_answer_digits}


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
    """Pool factory. options: {"memory_mb": int, "alarm_s": int (math-verify's own timeouts), "max_digits": int}.
    Python refuses to convert numbers of more than 4300 digits from text (sympy then leaves such a number in
    an expression unparsed); the pre-checks bound every number to max_digits, so the limit is raised to that."""
    import logging
    import resource
    import sys

    sys.set_int_max_str_digits(max(options["max_digits"], sys.int_info.default_max_str_digits))

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
        """task: {"gold": str, "answer": str} (box content, or math read like it) or {"gold": str, "text": str}
        (lenient mode's final answer text: only math-verify's last candidate in it is read), and "numeric": bool
        (the gold is a plain number and reward.math_numeric is on, so what is read from the text must be one).
        Grade status: "correct" | "wrong" | "no_answer" (text only) | "gold_unparseable"."""
        gold = self._gold(task["gold"])
        if not gold:
            return Grade("gold_unparseable", {"extracted": None})
        if "answer" in task:
            pred = self._mv.parse("\\boxed{" + task["answer"] + "}", extraction_config=self._strict_target,
                                  parsing_timeout=self._alarm_s)
            extracted = task["answer"]
        else:
            pred = self._mv.parse(task["text"], extraction_mode="first_match", parsing_timeout=self._alarm_s)
            if not pred:
                return Grade("no_answer", {"extracted": None})
            # The raw string math-verify matched; str() of a sympy object can itself hang.
            extracted = pred[-1] if isinstance(pred[-1], str) else None
            if task["numeric"] and not (extracted and is_number(extracted)):
                return Grade("wrong", {"extracted": extracted, "reason": _NOT_A_NUMBER})
        ok = bool(pred) and self._mv.verify(gold, pred, timeout_seconds=self._alarm_s)
        return Grade("correct" if ok else "wrong", {"extracted": extracted})
