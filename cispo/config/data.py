"""The data group: where the prompts come from and how a row becomes one (`data.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.config.base import ConfigError, _one_of, _positive


@dataclass
class DataConfig:
    """Where the prompts come from and how a dataset row becomes one (formats and presets: cispo/data/)."""

    # "arithmetic" | "products" (embedded generators of sums, of products) | a local .jsonl/.json/.parquet/.csv
    # file | a local dataset directory | a hub dataset name (datasets.load_dataset). Paths starting with / ./ ../ ~
    # must exist locally.
    source: str = "arithmetic"
    subset: str | None = None  # hub config name, e.g. "main" for openai/gsm8k
    split: str = "train"  # hub / directory split to train on (a single file is its own "train" split)
    # The held-out rows: eval_source (a dataset of the same kinds as source; null = the train source) read at
    # eval_split (null = "train" for an eval_source, else no split: hold out rows of the train source).
    eval_source: str | None = None
    eval_split: str | None = None
    eval_size: int = 500  # held-out rows: at most this many (a seeded sample of a larger eval set)
    eval_fraction: float | None = None  # held out of the train source: this fraction (capped at eval_size)
    seed: int = 0  # split, eval-sample and shuffling seed
    digits: int = 2  # arithmetic: operand size
    second_digits: int | None = None  # arithmetic: the second operand's size (None: digits)
    # Field mapping: candidate columns in order, the first the dataset has is used for every row.
    # "a.b" reads a nested field, "a.0.b" an item of a list.
    prompt_field: list[str] = field(default_factory=lambda: ["prompt", "problem", "question"])
    answer_field: list[str] = field(
        default_factory=lambda: ["answer", "ground_truth", "reward_model.ground_truth", "final_answer", "solution"])
    tests_field: list[str] = field(default_factory=lambda: ["tests", "input_output", "test_cases"])
    id_field: list[str] = field(
        default_factory=lambda: ["id", "idx", "unique_id", "problem_id", "task_id", "extra_info.index"])
    # Which grader a row gets (its `source`: a rewards.GRADERS source -- math, code, one registered by
    # reward.grader_modules -- or any name reward.custom grades): the column source_field, its
    # values renamed by source_map; with no source_field, default_source for every row.
    source_field: str | None = None
    source_map: dict[str, str] = field(default_factory=dict)
    default_source: str = "math"
    # more columns carried on each row (for reward.custom, or a grader's needs)
    keep_fields: list[str] = field(default_factory=list)
    prompt_pattern: str | None = None  # regex: group 1 of its match in a text prompt is the prompt
    answer_pattern: str | None = None  # regex: group 1 of its match in the answer is the gold, e.g. '####\s*(.+)'
    instruction: str = ""  # appended to every prompt, e.g. " Put the final answer in \\boxed{}."
    system_prompt: str | None = None  # a system message before every prompt (replaces a row's own)
    # A malformed row (missing field, empty prompt, answer the grader cannot parse, unusable tests, duplicate id):
    # error = stop before training, naming file, row and field; skip = leave it out, counted and reported.
    on_bad_row: str = "error"

    def __post_init__(self):
        _positive("data.digits", self.digits)
        if self.second_digits is not None:
            _positive("data.second_digits", self.second_digits)
        _positive("data.eval_size", self.eval_size)
        _one_of("data.on_bad_row", self.on_bad_row, {"error", "skip"})
        if self.eval_fraction is not None and not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in (0, 1) or null, got {self.eval_fraction}")
        if self.eval_fraction is not None and (self.eval_source is not None or self.eval_split is not None):
            raise ConfigError("data.eval_fraction holds rows out of the train source; it cannot be combined with "
                              "data.eval_source / data.eval_split")
        for name in ("prompt_field", "answer_field", "tests_field", "id_field"):
            if not getattr(self, name) or not all(getattr(self, name)):
                raise ConfigError(f"data.{name} must list at least one column name")
        if not self.default_source:
            raise ConfigError("data.default_source must name a grader: a rewards.GRADERS source (math, code, one "
                              "registered by reward.grader_modules) or a name reward.custom grades")
        import re

        for name in ("prompt_pattern", "answer_pattern"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"data.{name} is not a valid regular expression: {err}") from None
