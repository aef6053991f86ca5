"""The batch entry point the trainer calls once per step: routing, worker pools, length shaping, metrics.

Rows are routed by `row["source"]` (rewards.registry.row_source: "math" when missing) to the grader
registered for it in rewards.registry.GRADERS ("math": `row["answer"]` is the gold; "code": `row["tests"]`,
format in rewards.code; more from reward.grader_modules), and rows of a source with no grader to the user's
function named by `reward.custom`. A source with neither is an error before anything is graded. A pool-backed
grader's pool starts on first use and lives until close(), so worker start-up happens once per scorer, not per
step; the pools run one after another.

Scores: a built-in grade's score is correct_score / wrong_score / no_answer_score by status (code in "fraction"
mode interpolates by the pass fraction), plus format_score when the answer was extracted and graded; a user
function's result keeps its own score. BatchRewards.scores add the overlong penalty on top. Rows whose gold
or tests cannot be used ("gold_unparseable", "bad_tests") carry no signal about the response and are not
trainable.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from rewards.base import Grade, RewardResult, resolve_reward_fn
from rewards.config import RewardConfig
from rewards.pool import TaskOutcome, WorkerPool
from rewards.registry import GRADERS, Grader, PoolBacked, find_grader, import_grader_modules, row_source

log = logging.getLogger(__name__)

# Always present in the metrics (as fractions of the batch), so dashboards get stable keys.
STATUSES = ("correct", "wrong", "no_answer", "rejected", "timeout", "gold_unparseable", "bad_tests", "error")
UNGRADABLE = ("gold_unparseable", "bad_tests")
GRADED = ("correct", "wrong")  # the answer was extracted and compared: these earn format_score


@dataclass
class BatchRewards:
    """One entry per response, in input order.

    scores: result.score + overlong penalty (what the advantages are computed from).
    results: the grade of each response.
    trainable: False = leave this response out of the loss (truncated with reward.truncated="mask", or a
        row that cannot be graded).
    penalties: the overlong penalty in each score (<= 0; 0 without reward.overlong_buffer).
    metrics: "reward/mean", "reward/std", "reward/accuracy" (fraction "correct"), "reward/status/<status>"
        (fraction of the batch; the built-in statuses always present), "reward/overlong_penalty_mean"
        (mean penalty added, <= 0), "reward/overlong_frac", "reward/masked_frac", "reward/truncated_frac"
        (when flags were given), "reward/<source>/mean" per source, "reward/<source>/<key>" for the metrics
        of the source's registered grader (Grader.metrics: "reward/math/fast_path_frac", the math responses
        decided without math-verify; "reward/code/pass_fraction_mean"), "reward/time_s".
    """

    scores: list[float]
    results: list[RewardResult]
    trainable: list[bool]
    penalties: list[float]
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
        import_grader_modules(cfg.grader_modules)
        self._fallback = custom_grader(cfg)
        self._pools: dict[str, WorkerPool] = {}
        self._errors_logged: set[str] = set()

    def grader(self, source: str) -> Grader:
        """The grader of rows with this source: the registered one, else reward.custom; UnknownSource if none."""
        return find_grader(source, self._fallback)

    # ---- pools -------------------------------------------------------------------------------------------

    def _pool(self, source: str) -> WorkerPool:
        """The worker pool of a pool-backed grader's source, started on first use."""
        if source not in self._pools:
            pooled = self.grader(source).grade
            self._pools[source] = WorkerPool(pooled.factory, self.cfg.num_workers, pooled.options(self.cfg))
        return self._pools[source]

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
        n, start = len(responses), time.monotonic()
        self._check_inputs(n, rows, response_lengths, max_tokens, truncated)
        graders = [self.grader(row_source(row)) for row in rows]
        results: list[RewardResult | None] = [None] * n
        tasks: dict[str, list[tuple[int, Any]]] = {}
        bar = tqdm(total=n, desc="rewards", unit="resp", disable=not progress, leave=False)
        for i, (response, row, grader) in enumerate(zip(responses, rows, graders, strict=True)):
            here = self._grade_here(grader, response, row)
            if isinstance(here, RewardResult):
                results[i] = here
                bar.update()
            else:
                tasks.setdefault(grader.source, []).append((i, here))
        for source, items in tasks.items():
            self._run_pool(source, items, results, bar)
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

    def _grade_here(self, grader: Grader, response: str, row: Mapping) -> RewardResult | Any:
        """The result, when it is decided in this process; otherwise the worker task of a pool-backed grader."""
        if not isinstance(grader.grade, PoolBacked):
            return self._call_fn(grader, response, row)
        prep = grader.grade.prepare(response, row, self.cfg)
        return self._result(prep) if isinstance(prep, Grade) else prep

    def _call_fn(self, grader: Grader, response: str, row: Mapping) -> RewardResult:
        """Run an in-process grader's function; an exception is status "error" (logged once per grader)."""
        try:
            out = grader.grade(response, row)
        except Exception as e:  # a user function failing on odd model output must not stop training
            if grader.source not in self._errors_logged:
                log.exception("grader %r raised; such responses get status 'error' (logged once)", grader.source)
                self._errors_logged.add(grader.source)
            return RewardResult(self.cfg.wrong_score, "error", {"reason": repr(e)[:500]})
        return as_result(grader.source, out)

    def _run_pool(self, source: str, items: list[tuple[int, Any]], results: list, bar: tqdm) -> None:
        """Grade the tasks [(response index, task)] of a pool-backed source in its pool, into `results`."""
        deadline_s = self.grader(source).grade.deadline_s
        deadlines = [deadline_s(self.cfg, task) for _, task in items]

        def done(j: int, outcome: TaskOutcome) -> None:
            results[items[j][0]] = self._result(_outcome_grade(outcome))
            bar.update()

        self._pool(source).map([task for _, task in items], deadlines, done)

    def _result(self, grade: Grade) -> RewardResult:
        return RewardResult(grade_score(self.cfg, grade.status, grade.info), grade.status, grade.info)

    def _finish(self, results, rows, response_lengths, max_tokens, truncated, elapsed: float) -> BatchRewards:
        cfg, n = self.cfg, len(results)
        penalties = [overlong_penalty(length, max_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
                     for length in response_lengths] if cfg.overlong_buffer > 0 else [0.0] * n
        scores = [r.score + p for r, p in zip(results, penalties, strict=True)]
        mask_truncated = cfg.truncated == "mask"
        trainable = [r.status not in UNGRADABLE and not (mask_truncated and truncated[i])
                     for i, r in enumerate(results)]
        return BatchRewards(scores, results, trainable, penalties,
                            batch_metrics(results, rows, scores, penalties, trainable, truncated, elapsed))


def custom_grader(cfg: RewardConfig) -> Grader | None:
    """reward.custom as the grader of every source that has no registered one; None when it is not set."""
    return Grader(f"reward.custom={cfg.custom}", resolve_reward_fn(cfg.custom, cfg)) if cfg.custom else None


def as_result(source: str, out: Any) -> RewardResult:
    """A user function's return as a RewardResult: itself, or a number as the score (status "custom")."""
    if isinstance(out, RewardResult):
        return out
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        return RewardResult(float(out), "custom", {})
    raise TypeError(f"grader {source!r} returned {type(out).__name__}; return a RewardResult or a number")


def _outcome_grade(outcome: TaskOutcome) -> Grade:
    if outcome.status == "ok":
        return outcome.value
    if outcome.status == "timeout":
        return Grade("timeout", {})
    return Grade("error", {"reason": f"grader worker {outcome.status}: {outcome.detail[-500:]}"})


def batch_metrics(results: list[RewardResult], rows: list[Mapping], scores: list[float], penalties: list[float],
                  trainable: list[bool], truncated: list[bool] | None, elapsed: float) -> dict[str, float]:
    """The metrics documented on BatchRewards."""
    n = max(len(results), 1)
    counts = Counter(r.status for r in results)
    m = {
        "reward/mean": statistics.fmean(scores) if scores else 0.0,
        "reward/std": statistics.pstdev(scores) if scores else 0.0,
        "reward/accuracy": counts["correct"] / n,
        "reward/overlong_penalty_mean": statistics.fmean(penalties) if penalties else 0.0,
        "reward/overlong_frac": sum(p < 0 for p in penalties) / n,
        "reward/masked_frac": trainable.count(False) / n,
        "reward/time_s": elapsed,
    }
    for status in (*STATUSES, *sorted(set(counts) - set(STATUSES))):
        m[f"reward/status/{status}"] = counts[status] / n
    if truncated is not None:
        m["reward/truncated_frac"] = sum(map(bool, truncated)) / n
    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_source.setdefault(row_source(row), []).append(i)
    for source, idx in by_source.items():
        m[f"reward/{source}/mean"] = statistics.fmean(scores[i] for i in idx)
        extra = source_metrics(source, [results[i] for i in idx])
        m |= {f"reward/{source}/{key}": value for key, value in extra.items()}
    return m


def source_metrics(source: str, results: list[RewardResult]) -> dict[str, float]:
    """The registered grader's own metrics over its results; none for a source graded by reward.custom."""
    grader = GRADERS.get(source)
    return {} if grader is None else grader.metrics(results)
