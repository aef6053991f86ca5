r"""A dataset's columns mapped onto row fields (cispo/data/load.py lists the fields), and each row checked
against the grader of its source.

The field mapping (`data.prompt_field`, `answer_field`, `tests_field`, `id_field`) lists candidate columns; the
first one the dataset has is used for all its rows (so a row missing it is reported, not quietly read from
another column). "a.b" reads a nested field, "a.0.b" an item of a list. Without an id column a row's id is
"row-<index>". `data.prompt_pattern` / `answer_pattern` cut the prompt / gold out of a longer text (group 1 of
the first match). Code tests may be the dict of rewards/code.py, its JSON string, a list of {"input", "output"}
pairs, or {"input": [...], "output": [...]}; all become the dict.

Each row's grader (found by its source in rewards.registry.GRADERS) says which fields it needs (Grader.needs); a row
missing one is malformed. A needed "answer" is read as text (answer_pattern applied), a needed "tests" as the dict
of rewards/code.py; other needed fields are data.keep_fields columns. With the run's scorer, a source that has no
grader (registered, or reward.custom) is malformed too.

Malformed rows (a missing field, an empty prompt, a source with no grader, a gold the grader cannot parse, tests the
code grader cannot use, a duplicate id) are found before training starts. `data.on_bad_row=error` stops with the
file, the row number (counting records from 1; for a jsonl without blank lines, the line number) and the field;
`skip` leaves them out and reports how many (`Splits.report`), never silently. The gold check grades the grader's
reference response (Grader.reference; math: the gold itself, boxed) with the run's own reward config: a gold that
does not grade correct against itself can never reward anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cispo.config import ConfigError, DataConfig
from rewards.code import parse_tests
from rewards.registry import GRADERS, Grader, UnknownSource

_ROLES = ("system", "user", "assistant")

# source -> its grader; None: not known here and not checked (no scorer); raises UnknownSource: the run has none.
GraderLookup = Callable[[str], "Grader | None"]


@dataclass(frozen=True)
class BadRow:
    where: str  # the dataset: file path or "name[subset]:split"
    row: int  # counting records from 1
    field: str  # prompt | answer | tests | source | id
    reason: str

    def __str__(self) -> str:
        return f"{self.where} row {self.row}, field {self.field!r}: {self.reason}"


class RowError(Exception):
    """A malformed row: the field and why."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


def resolve_fields(cfg: DataConfig, column_names: list[str], where: str,
                   graders: GraderLookup = GRADERS.get) -> dict[str, str | None]:
    """Each logical field -> the column path used for it (None: the dataset has none of its candidates).
    ConfigError when a field every row needs has no column at all, or when every row has data.default_source and
    it has no grader."""
    columns = set(column_names)

    def first(candidates: list[str]) -> str | None:
        return next((c for c in candidates if c.split(".")[0] in columns), None)

    resolved = {"prompt": first(cfg.prompt_field), "answer": first(cfg.answer_field),
                "tests": first(cfg.tests_field), "id": first(cfg.id_field), "source": cfg.source_field}
    resolved |= {f"keep:{name}": name for name in cfg.keep_fields}
    required = [("prompt", cfg.prompt_field, "data.prompt_field")]
    if cfg.source_field is None:
        try:
            grader = graders(cfg.default_source)
        except UnknownSource as err:
            raise ConfigError(f"data.default_source: {err}") from None
        required += [(name, getattr(cfg, f"{name}_field"), f"data.{name}_field") for name in _needs(grader)
                     if name in _GOLD_FIELDS]
    else:
        required.append(("source", [cfg.source_field], "data.source_field"))
    required += [(f"keep:{name}", [name], "data.keep_fields") for name in cfg.keep_fields]
    for name, candidates, key in required:
        if resolved[name] is None or resolved[name].split(".")[0] not in columns:
            raise ConfigError(f"data: {where} has no column for {name.removeprefix('keep:')} (looked for "
                              f"{', '.join(candidates)}); its columns are {', '.join(column_names)}. Set {key}")
    return resolved


def get_path(raw, path: str):
    """raw["a"]["b"] for "a.b"; list items by index ("a.0.b"). Raises KeyError when a step is missing."""
    value = raw
    for step in path.split("."):
        if isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        elif isinstance(value, dict) and step in value:
            value = value[step]
        else:
            raise KeyError(path)
    return value


def map_row(raw: dict, columns: dict[str, str | None], cfg: DataConfig, graders: GraderLookup = GRADERS.get) -> dict:
    """One dataset record -> a row (id None when the dataset has no id column), with the fields its grader needs.
    Raises RowError."""

    def value(name: str):
        if columns[name] is None:
            return None
        try:
            v = get_path(raw, columns[name])
        except KeyError:
            return None
        return None if isinstance(v, float) and math.isnan(v) else v  # csv / pandas write NaN for a blank cell

    prompt = value("prompt")
    if prompt is None:
        raise _missing("prompt", columns["prompt"], cfg.prompt_field)
    source = cfg.default_source
    if cfg.source_field is not None:
        raw_source = value("source")
        if raw_source is None or not str(raw_source).strip():
            raise _missing("source", columns["source"], [cfg.source_field])
        source = cfg.source_map.get(str(raw_source), str(raw_source))
    try:
        needs = _needs(graders(source))
    except UnknownSource as err:
        raise RowError("source", str(err)) from None
    raw_id = value("id")
    row = {"prompt": prompt, "answer": value("answer"), "tests": value("tests"), "source": source,
           "id": None if raw_id is None else str(raw_id)} | {name: value(f"keep:{name}") for name in cfg.keep_fields}
    for name in needs:
        if row.get(name) is None:
            raise _missing_need(name, columns, cfg)
    row |= {name: _GOLD_FIELDS[name](row[name], cfg) for name in needs if name in _GOLD_FIELDS}
    if "answer" not in needs and row["answer"] is not None and not isinstance(row["answer"], (list, dict)):
        row["answer"] = str(row["answer"])  # a gold the grader does not need is still text, as the row format says
    row["prompt"] = clean_prompt(prompt, cfg.prompt_pattern)
    return row


def _needs(grader: Grader | None) -> tuple[str, ...]:
    """The fields a grader needs; none for a source not known here (loaded without a scorer)."""
    return () if grader is None else grader.needs


def _missing(name: str, column: str | None, candidates: list[str]) -> RowError:
    where = f"column {column!r}" if column else f"no column of {', '.join(candidates)}"
    return RowError(name, f"missing ({where})")


def _missing_need(name: str, columns: dict[str, str | None], cfg: DataConfig) -> RowError:
    """A field the row's grader needs and the row lacks, saying where it was looked for."""
    if name in _GOLD_FIELDS:
        return _missing(name, columns[name], getattr(cfg, f"{name}_field"))
    if name in cfg.keep_fields:
        return _missing(name, columns[f"keep:{name}"], [name])
    return RowError(name, "missing (not a field of the row: list its column in data.keep_fields)")


def _read_answer(answer, cfg: DataConfig) -> str:
    """A needed answer: gold_answer."""
    return gold_answer(answer, cfg.answer_pattern)


def _read_tests(tests, cfg: DataConfig) -> dict:
    """Needed tests: normalize_tests."""
    try:
        return normalize_tests(tests)
    except ValueError as err:
        raise RowError("tests", f"the code grader cannot use them: {err}") from None


# The row fields with a fixed form (module docstring): a grader that needs one gets it read by this function.
_GOLD_FIELDS: dict[str, Callable[[Any, DataConfig], Any]] = {"answer": _read_answer, "tests": _read_tests}


def gold_answer(answer, pattern: str | None) -> str:
    """A gold answer as text (answer_pattern applied), for a grader that needs "answer". Raises RowError."""
    if isinstance(answer, (list, dict, bool)):
        raise RowError("answer", f"a {type(answer).__name__}, not a text or a number: {str(answer)[:80]!r}")
    answer = str(answer).strip()
    if pattern is not None:
        m = re.search(pattern, answer)
        if m is None:
            raise RowError("answer", f"does not match data.answer_pattern: {answer[-80:]!r}")
        answer = (m.group(1) if m.re.groups else m.group(0)).strip()
    if not answer:
        raise RowError("answer", "empty")
    return answer


def clean_prompt(prompt, pattern: str | None) -> str | list[dict]:
    """A text prompt (prompt_pattern applied, stripped) or a list of chat messages. Raises RowError."""
    if isinstance(prompt, str):
        if pattern is not None:
            m = re.search(pattern, prompt, flags=re.DOTALL)
            if m is None:
                raise RowError("prompt", f"does not match data.prompt_pattern: {prompt[:80]!r}")
            prompt = m.group(1) if m.re.groups else m.group(0)
        if not prompt.strip():
            raise RowError("prompt", "empty")
        return prompt.strip()
    if not isinstance(prompt, list):
        raise RowError("prompt", f"a {type(prompt).__name__}, not a text or a list of chat messages")
    if pattern is not None:
        raise RowError("prompt", "a list of messages; data.prompt_pattern applies to a text (map one: prompt.0.content)")
    messages = []
    for m in prompt:
        if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
            raise RowError("prompt", f"not a list of chat messages {{role: {'|'.join(_ROLES)}, content: text}}: "
                                      f"{str(m)[:80]!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    users = [m for m in messages if m["role"] == "user"]
    if not users or not users[-1]["content"].strip():
        raise RowError("prompt", "empty (no user message with content)")
    return messages


def normalize_tests(tests) -> dict:
    """Code tests in one of the accepted shapes (module docstring) -> the dict of rewards/code.py, validated by the
    code grader's own parser. Raises ValueError."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err})") from None
    if isinstance(tests, list):
        if not all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            raise ValueError("a list of tests must hold {input, output} pairs")
        tests = {"inputs": [t["input"] for t in tests], "outputs": [t["output"] for t in tests]}
    elif isinstance(tests, dict) and "inputs" not in tests and isinstance(tests.get("input"), list):
        tests = {"inputs": tests["input"], "outputs": tests.get("output")}
    if isinstance(tests, dict) and tests.get("fn_name") is None:
        tests = {k: v for k, v in tests.items() if k != "fn_name"}
    parse_tests(tests, max_tests=1 << 30)
    return tests


def check_graders(where: str, rows: list[dict], scorer) -> list[BadRow]:
    """Rows whose gold their grader cannot use: the grader's reference response (math: the gold, boxed) does not
    grade correct against the row. One scorer call for all such rows: math numbers take the grader's fast path,
    the rest go to math-verify in the scorer's worker pool."""
    checked = [(row, grader) for row in rows if (grader := scorer.grader(row["source"])).reference is not None]
    if not checked:
        return []
    n = len(checked)
    graded = scorer.score([grader.reference(row) for row, grader in checked], [row for row, _ in checked],
                          response_lengths=[0] * n, max_tokens=max(scorer.cfg.overlong_buffer, 1),
                          truncated=[False] * n, progress=n > 10000)
    return [BadRow(where, row["_row"], grader.needs[0], f"the {row['source']} grader cannot use "
                   f"{str(row[grader.needs[0]])[:80]!r} as a gold answer (status {result.status!r} when graded "
                   "against itself)")
            for (row, grader), result in zip(checked, graded.results) if result.status != "correct"]


# ---- prompts ---------------------------------------------------------------------------------------------------

