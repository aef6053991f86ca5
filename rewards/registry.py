"""The table of graders: which grader scores a row, found by the row's `source`.

`GRADERS` maps a source name to its `Grader`. The package registers "math" and "code" (rewards/__init__.py);
a user registers more from their own module, which the run imports by naming it in `reward.grader_modules`:

    from rewards import Grader, PoolBacked, RewardResult, add_grader, register_grader

    @register_grader("echo", needs=("answer",))          # graded here, in the trainer process
    def echo(response, row):
        ok = response.strip() == row["answer"]
        return RewardResult(1.0 if ok else 0.0, "correct" if ok else "wrong")

    add_grader(Grader("countdown", PoolBacked(...), needs=("answer", "nums")))   # graded in worker processes

Both the scorer (rewards.scorer) and the data checks (cispo.data) consult the table: the data checks require
each grader's `needs` on every row of its source and reject a source with no grader before training starts.
A row without a source is a "math" row (`row_source`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewards.base import Grade, RewardFn, RewardResult

if TYPE_CHECKING:
    from rewards.config import RewardConfig

DEFAULT_SOURCE = "math"  # the source of a row that names none


def no_metrics(results: list[RewardResult]) -> dict[str, float]:
    """The metrics of a grader that adds none beyond reward/<source>/mean."""
    return {}


@dataclass(frozen=True)
class PoolBacked:
    """How a grader runs in killable worker processes (rewards.pool): `prepare` decides what it can in the
    trainer process and turns the rest into tasks; each task runs in a worker under a hard deadline, and a
    worker that overruns it is killed and replaced (the task gets status "timeout").

    prepare: (response, row, cfg) -> a Grade decided here, or the task (picklable) for a worker.
    factory: "module:name" of `factory(slot, options) -> handler`, called once in each worker process;
        `handler(task) -> Grade`. The module must be importable in a fresh interpreter.
    options: cfg -> the factory's options (called when the pool starts, on first use).
    deadline_s: (cfg, task) -> the seconds that task may run.
    A Grade is scored from the config (rewards.scorer.grade_score).
    """

    prepare: Callable[[str, Mapping[str, Any], RewardConfig], Grade | Any]
    factory: str
    options: Callable[[RewardConfig], dict]
    deadline_s: Callable[[RewardConfig, Any], float]


@dataclass(frozen=True)
class Grader:
    """One entry of GRADERS: how the rows of one source are graded.

    source: the `row["source"]` it grades.
    grade: a RewardFn `(response, row) -> RewardResult | number`, called in the trainer process (a number is
        scored as it is, status "custom"; an exception is status "error"), or a PoolBacked grader.
    needs: the row fields it reads, gold first; the data checks require them (not None) on each of its rows.
        "answer" arrives as text (data.answer_pattern applied), "tests" as the dict of rewards/code.py; other
        names are columns listed in data.keep_fields, as loaded.
    reference: row -> a response that must grade "correct" against that row (math: the gold, boxed). The data
        checks grade it for every row and reject the rows where it does not, naming the field needs[0]: a
        gold the grader cannot use can never reward anything. None: no such check.
    metrics: this source's results -> more metrics, logged as reward/<source>/<key>.
    """

    source: str
    grade: RewardFn | PoolBacked
    needs: tuple[str, ...] = ()
    reference: Callable[[Mapping[str, Any]], str] | None = None
    metrics: Callable[[list[RewardResult]], dict[str, float]] = no_metrics

    def __post_init__(self) -> None:
        if not self.source or not isinstance(self.source, str):
            raise ValueError(f"a grader's source must be a non-empty name, got {self.source!r}")
        if isinstance(self.needs, str):
            raise TypeError(f"grader {self.source!r}: needs is a tuple of field names, e.g. ({self.needs!r},)")
        if self.reference is not None and not self.needs:
            raise ValueError(f"grader {self.source!r} has a reference but no needs: name its gold field first")


GRADERS: dict[str, Grader] = {}


class UnknownSource(ValueError):
    """A row's source has no grader."""

    def __init__(self, source: str):
        known = ", ".join(sorted(GRADERS)) or "none"
        super().__init__(
            f"row source {source!r} has no grader (registered: {known}). Register one in a module named in "
            f"reward.grader_modules, e.g. @rewards.register_grader({source!r}, needs=('answer',)) on a function "
            "(response, row) -> RewardResult, or set reward.custom to a function that grades every unregistered "
            "source; data.source_map renames sources")


def row_source(row: Mapping[str, Any]) -> str:
    """The source of a row: row["source"], or DEFAULT_SOURCE when it is missing or empty."""
    return row.get("source") or DEFAULT_SOURCE


def add_grader(grader: Grader) -> Grader:
    """Put `grader` in GRADERS under its source. Adding the same entry again is a no-op (a module imported
    twice); another grader for a source already taken is an error."""
    existing = GRADERS.get(grader.source)
    if existing is not None and existing != grader:
        raise ValueError(f"source {grader.source!r} already has a grader ({existing.grade!r})")
    GRADERS[grader.source] = grader
    return grader


def register_grader(source: str, fn: RewardFn | None = None, *, needs: tuple[str, ...] = ()):
    """Make `fn(response, row) -> RewardResult | number` the grader of rows whose source is `source`, run in
    the trainer process. Without `fn`, a decorator: `@register_grader("echo", needs=("answer",))`."""

    def register(f: RewardFn) -> RewardFn:
        add_grader(Grader(source, f, needs))
        return f

    return register if fn is None else register(fn)


def find_grader(source: str, fallback: Grader | None = None) -> Grader:
    """The grader of `source`: its entry in GRADERS, else `fallback` (reward.custom); UnknownSource if neither."""
    grader = GRADERS.get(source, fallback)
    if grader is None:
        raise UnknownSource(source)
    return grader


def import_grader_modules(names: Iterable[str]) -> None:
    """Import each module of reward.grader_modules, so that its register_grader / add_grader calls run."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"reward.grader_modules: cannot import {name!r} ({e})") from e
