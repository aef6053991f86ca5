"""The batch entry point the trainer calls once per step: routing, worker pools, length shaping, metrics.

Rows are routed by `row["source"]`: "math" (also when missing) -> the math grader (`row["answer"]` is the
gold), "code" -> the code grader (`row["tests"]`, format in rewards.code), anything else -> the user's
function named by `reward.custom`. The math and code pools start on first use and live until close(),
so worker start-up happens once per scorer, not per step. Math tasks run before code tasks.

Scores: a result's score is correct_score / wrong_score / no_answer_score by status (code in "fraction"
mode interpolates by the pass fraction), plus format_score when the answer was extracted and graded.
BatchRewards.scores add the overlong penalty on top. Rows whose gold or tests cannot be used
("gold_unparseable", "bad_tests") carry no signal about the response and get loss_mask False.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from rewards.base import Grade, RewardResult, resolve_reward_fn
from rewards.code import prepare_code
from rewards.config import RewardConfig
from rewards.math import answer_region, prepare_math
from rewards.pool import TaskOutcome, WorkerPool
from rewards.sandbox import SandboxUnavailable, find_bwrap, uid_in_use

log = logging.getLogger(__name__)

# Always present in the metrics (as fractions of the batch), so dashboards get stable keys.
STATUSES = ("correct", "wrong", "no_answer", "rejected", "timeout", "gold_unparseable", "bad_tests", "error")
UNGRADABLE = ("gold_unparseable", "bad_tests")
GRADED = ("correct", "wrong")  # the answer was extracted and compared: these earn format_score
_CODE_STARTUP_SLACK_S = 2.0  # per test, over the test's own limit, for the sandbox and the interpreter


@dataclass
class BatchRewards:
    """One entry per response, in input order.

    scores: result.score + overlong penalty (what the advantages are computed from).
    results: the grade of each response.
    loss_mask: False = leave this response out of the loss (truncated with reward.truncated="mask", or a
        row that cannot be graded).
    metrics: "reward/mean", "reward/std", "reward/accuracy" (fraction "correct"), "reward/status/<status>"
        (fraction of the batch; the built-in statuses always present), "reward/overlong_penalty_mean"
        (mean penalty added, <= 0), "reward/overlong_frac", "reward/masked_frac", "reward/truncated_frac"
        (when flags were given), "reward/<source>/mean" per source, "reward/math/fast_path_frac" (math
        responses decided without math-verify), "reward/code/pass_fraction_mean", "reward/time_s".
    """

    scores: list[float]
    results: list[RewardResult]
    loss_mask: list[bool]
    metrics: dict[str, float]


def overlong_penalty(length: int, max_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO soft overlong punishment (arXiv 2503.14476, §3.4), a value <= 0 to add to the score:
    0 up to max_tokens - buffer, then linear down to -penalty at max_tokens, -penalty beyond."""
    if buffer <= 0:
        return 0.0
    over = length - (max_tokens - buffer)
    if over <= 0:
        return 0.0
    return -penalty * min(over / buffer, 1.0)


def grade_score(cfg: RewardConfig, status: str, info: Mapping[str, Any]) -> float:
    """Score of a built-in grade (see the module docstring)."""
    if status == "correct":
        score = cfg.correct_score
    elif status == "no_answer":
        score = cfg.no_answer_score
    else:
        score = cfg.wrong_score
    if cfg.code_mode == "fraction" and "pass_fraction" in info and status in GRADED:
        score = cfg.wrong_score + info["pass_fraction"] * (cfg.correct_score - cfg.wrong_score)
    if status in GRADED:
        score += cfg.format_score
    return score


class RewardScorer:
    """Scores batches of responses; owns the grader worker pools. Use as a context manager or call close()."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self._custom = resolve_reward_fn(cfg.custom, cfg) if cfg.custom else None
        self._pools: dict[str, WorkerPool] = {}
        self._custom_error_logged = False

    # ---- pools -------------------------------------------------------------------------------------------

    def _pool(self, kind: str) -> WorkerPool:
        if kind not in self._pools:
            if kind == "math":
                options = {"memory_mb": self.cfg.math_memory_mb, "alarm_s": max(1, int(self.cfg.timeout_s // 2))}
                self._pools[kind] = WorkerPool("rewards.math:make_math_worker", self.cfg.num_workers, options)
            else:
                self._pools[kind] = WorkerPool("rewards.code:make_code_worker", self.cfg.num_workers,
                                               self._code_options())
        return self._pools[kind]

    def _code_options(self) -> dict:
        cfg = self.cfg
        if cfg.unsafe_local_code:
            message = ("UNSAFE: reward.unsafe_local_code=true runs model-written code WITHOUT bubblewrap: it can "
                       "read the host's files and reach the network. Use only on a throwaway machine.")
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        elif find_bwrap() is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not on PATH, so code rows cannot be graded safely. "
                                     "Install it (apt-get install bubblewrap) or set reward.unsafe_local_code=true.")
        uid_base = cfg.code_uid_base if os.geteuid() == 0 else None
        if uid_base is not None:
            for uid in range(uid_base, uid_base + cfg.num_workers):
                if uid_in_use(uid):
                    raise ValueError(f"reward.code_uid_base={uid_base}: uid {uid} is in use (a passwd entry or "
                                     f"running processes); pick a range of {cfg.num_workers} unused uids")
        return {"uid_base": uid_base, "python": cfg.code_python, "unsafe": cfg.unsafe_local_code,
                "timeout_s": cfg.code_test_timeout_s, "memory_mb": cfg.code_memory_mb,
                "max_procs": cfg.code_max_procs, "max_output_bytes": cfg.code_max_output_bytes,
                "tmpfs_mb": cfg.code_tmpfs_mb}

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools = {}

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- scoring -----------------------------------------------------------------------------------------

    def score(self, responses: list[str], rows: list[Mapping], *, response_lengths: list[int] | None = None,
              max_tokens: int | None = None, truncated: list[bool] | None = None,
              progress: bool = False) -> BatchRewards:
        """Grade `responses[i]` against `rows[i]`. response_lengths (tokens) and max_tokens are needed when
        reward.overlong_buffer > 0; truncated (hit max_tokens) when reward.truncated == "mask"."""
        cfg, n, start = self.cfg, len(responses), time.monotonic()
        self._check_inputs(n, rows, response_lengths, max_tokens, truncated)
        results: list[RewardResult | None] = [None] * n
        tasks: dict[str, list[tuple[int, Any]]] = {"math": [], "code": []}
        bar = tqdm(total=n, desc="rewards", unit="resp", disable=not progress, leave=False)
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            source = row.get("source") or "math"
            if source == "math":
                prep = prepare_math(response, str(row["answer"]), mode=cfg.math_mode, think_start=cfg.think_start,
                                    think_end=cfg.think_end, max_chars=cfg.max_answer_chars,
                                    max_depth=cfg.max_brace_depth)
            elif source == "code":
                region = answer_region(response, cfg.think_start, cfg.think_end)
                prep = (Grade("no_answer", {"reason": "unclosed think block"}) if region is None
                        else prepare_code(region, row.get("tests"), cfg.code_max_tests))
            else:
                results[i] = self._call_custom(source, response, row)
                bar.update()
                continue
            if isinstance(prep, Grade):
                results[i] = self._result(prep)
                bar.update()
            else:
                tasks[source].append((i, prep))
        for kind, items in tasks.items():
            if items:
                self._run_pool(kind, items, results, bar)
        bar.close()
        return self._finish(results, rows, response_lengths, max_tokens, truncated, time.monotonic() - start)

    def _check_inputs(self, n, rows, response_lengths, max_tokens, truncated) -> None:
        if len(rows) != n:
            raise ValueError(f"got {n} responses but {len(rows)} rows")
        for name, values in (("response_lengths", response_lengths), ("truncated", truncated)):
            if values is not None and len(values) != n:
                raise ValueError(f"got {n} responses but {len(values)} {name}")
        if self.cfg.overlong_buffer > 0:
            if response_lengths is None or max_tokens is None:
                raise ValueError("reward.overlong_buffer > 0 needs response_lengths and max_tokens in score()")
            if self.cfg.overlong_buffer > max_tokens:
                raise ValueError(f"reward.overlong_buffer ({self.cfg.overlong_buffer}) must not exceed "
                                 f"max_tokens ({max_tokens})")
        if self.cfg.truncated == "mask" and truncated is None:
            raise ValueError("reward.truncated='mask' needs the truncated flags in score()")

    def _call_custom(self, source: str, response: str, row: Mapping) -> RewardResult:
        if self._custom is None:
            raise ValueError(f"row source {source!r} is neither 'math' nor 'code' and reward.custom is not set; "
                             f"set reward.custom to a registered name or 'pkg.module:fn'")
        try:
            out = self._custom(response, row)
        except Exception as e:  # a user function failing on odd model output must not stop training
            if not self._custom_error_logged:
                log.exception("reward.custom raised; such responses get status 'error' (logged once)")
                self._custom_error_logged = True
            return RewardResult(self.cfg.wrong_score, "error", {"reason": repr(e)[:500]})
        if isinstance(out, RewardResult):
            return out
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            return RewardResult(float(out), "custom", {})
        raise TypeError(f"reward.custom returned {type(out).__name__}; return a RewardResult or a number")

    def _run_pool(self, kind: str, items: list[tuple[int, Any]], results: list, bar: tqdm) -> None:
        if kind == "math":
            deadlines: float | list[float] = self.cfg.timeout_s
        else:
            per_test = self.cfg.code_test_timeout_s + _CODE_STARTUP_SLACK_S
            deadlines = [len(task["tests"].inputs) * per_test + 10.0 for _, task in items]

        def done(j: int, outcome: TaskOutcome) -> None:
            results[items[j][0]] = self._result(_outcome_grade(outcome))
            bar.update()

        self._pool(kind).map([task for _, task in items], deadlines, done)

    def _result(self, grade: Grade) -> RewardResult:
        return RewardResult(grade_score(self.cfg, grade.status, grade.info), grade.status, grade.info)

    def _finish(self, results, rows, response_lengths, max_tokens, truncated, elapsed: float) -> BatchRewards:
        cfg, n = self.cfg, len(results)
        penalties = [overlong_penalty(length, max_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
                     for length in response_lengths] if cfg.overlong_buffer > 0 else [0.0] * n
        scores = [r.score + p for r, p in zip(results, penalties, strict=True)]
        mask_truncated = cfg.truncated == "mask"
        loss_mask = [r.status not in UNGRADABLE and not (mask_truncated and truncated[i])
                     for i, r in enumerate(results)]
        return BatchRewards(scores, results, loss_mask,
                            batch_metrics(results, rows, scores, penalties, loss_mask, truncated, elapsed))


def _outcome_grade(outcome: TaskOutcome) -> Grade:
    if outcome.status == "ok":
        return outcome.value
    if outcome.status == "timeout":
        return Grade("timeout", {})
    return Grade("error", {"reason": f"grader worker {outcome.status}: {outcome.detail[-500:]}"})


def batch_metrics(results: list[RewardResult], rows: list[Mapping], scores: list[float], penalties: list[float],
                  loss_mask: list[bool], truncated: list[bool] | None, elapsed: float) -> dict[str, float]:
    """The metrics documented on BatchRewards."""
    n = max(len(results), 1)
    counts = Counter(r.status for r in results)
    m = {
        "reward/mean": statistics.fmean(scores) if scores else 0.0,
        "reward/std": statistics.pstdev(scores) if scores else 0.0,
        "reward/accuracy": counts["correct"] / n,
        "reward/overlong_penalty_mean": statistics.fmean(penalties) if penalties else 0.0,
        "reward/overlong_frac": sum(p < 0 for p in penalties) / n,
        "reward/masked_frac": loss_mask.count(False) / n,
        "reward/time_s": elapsed,
    }
    for status in (*STATUSES, *sorted(set(counts) - set(STATUSES))):
        m[f"reward/status/{status}"] = counts[status] / n
    if truncated is not None:
        m["reward/truncated_frac"] = sum(map(bool, truncated)) / n
    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_source.setdefault(row.get("source") or "math", []).append(i)
    for source, idx in by_source.items():
        m[f"reward/{source}/mean"] = statistics.fmean(scores[i] for i in idx)
    if "math" in by_source:
        fast = sum(bool(results[i].info.get("fast_path")) for i in by_source["math"])
        m["reward/math/fast_path_frac"] = fast / len(by_source["math"])
    code_infos = [results[i].info for i in by_source.get("code", [])]
    fractions = [info["pass_fraction"] for info in code_infos if "pass_fraction" in info]
    if fractions:
        m["reward/code/pass_fraction_mean"] = statistics.fmean(fractions)
    return m
