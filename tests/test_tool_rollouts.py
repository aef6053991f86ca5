"""Multi-turn tool use in the trainer (env.name; cispo/sampling/tool_rollouts.py, cispo/sampling/sampler.py, cispo/trainer.py), on the real
HF engine and a tiny model taught the calculator's call syntax here (about 100 supervised steps on 8 gold traces).

The config refuses what the multi-turn path cannot honour, naming the key; a chat template that fails the renderer
self-test stops a run before any weights load; the sampler's episodes carry trajectories whose loss samples train
on the model's tokens only and whose scores are the graders' on the final answer; one training step logs the
tool and turn metrics, and its loss tokens are the model's tokens of the batch, not its tool results.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cispo.train.collective import Dist
from cispo.cli import register_configs
from cispo.config import Config, ConfigError, EnvConfig
from cispo.data.load import load_splits
from cispo.sampling.tool_rollouts import ToolRollouts, check_config, check_env_renderer
from cispo.sampling.sampler import EngineSampler, episode_sample
from cispo.model.tiny_model import make_tiny_model
from cispo.start.warm_start import gold_batch, greedy_exact_match
from rewards import RewardScorer
from rollout.base import EngineSink
from rollout.env.environment import ToolEnv, register_env
from rollout.trajectory import ENV
from test_multiturn import THINK_STRIP
from test_presets import CONFIGS

register_configs()
FAST = ["experiment=tiny_tools", "rollout.engine=hf", "reward.num_workers=1", "logger.wandb_mode=disabled",
        "logger.progress=false", "logger.plot=false"]


def tool_config(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return OmegaConf.to_object(compose("train", overrides=FAST + overrides))


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """(model dir, config, the 8 rows it was taught): the tiny model after supervised steps on gold calculator
    traces of 8 training rows, until it reproduces all 8 greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path_factory.mktemp("cache")
    cfg = tool_config([f"model.cache_dir={cache}"])
    rows = load_splits(cfg.data, None).train[:8]
    base = make_tiny_model(cfg.model.tiny, cache)
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    batch = gold_batch(tok, rows, cfg, mixed=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 9 and greedy_exact_match(model, batch) == 1.0:
            break
    assert greedy_exact_match(model, batch) == 1.0
    out = tmp_path_factory.mktemp("taught")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), tool_config([f"model.path={out}", f"model.cache_dir={cache}"]), rows


@pytest.mark.parametrize("values, key", [
    ({"name": "nope"}, "env.name"), ({"tool_format": "xml"}, "env.tool_format"), ({"tools": ["shell"]}, "env.tools"),
    ({"max_turns": 0}, "env.max_turns"), ({"token_budget": 0}, "env.token_budget"),
    ({"python_timeout_s": 20.0}, "env.python_timeout_s"), ({"renderer": "nope"}, "env.renderer"),
])
def test_bad_env_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EnvConfig(**values)


@pytest.mark.parametrize("overrides, key", [
    (["rollout.min_tokens=4"], "rollout.min_tokens"),
    (["curriculum.windows=[64,96]"], "curriculum.windows"),
    (["env.token_budget=300"], "env.token_budget"),
])
def test_knobs_the_multiturn_path_cannot_honour_are_refused(overrides, key):
    check_config(tool_config([]))  # the preset itself is fine
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        check_config(tool_config(overrides))
    check_config(tool_config(overrides + ["env=none"]))  # single turn: none of them is about the env


def test_a_tool_from_the_users_module_is_named_in_env_modules():
    import asyncio

    from rollout.env.environment import make_env

    with pytest.raises(Exception, match=r"env\.tools\[\*\].*reverse"):  # not imported: not registered
        tool_config(["env.name=tools", "env.tools=[reverse]"])
    with pytest.raises(Exception, match=r"env\.modules.*mypkg\.nope"):
        tool_config(["env.modules=[mypkg.nope]"])
    cfg = tool_config(["env.name=tools", "env.tools=[reverse]", "env.modules=[tests.tool_plugin]"])
    check_config(cfg)
    env = make_env(cfg.env.name, tools=list(cfg.env.tools))
    asyncio.run(env.reset({"prompt": "reverse abc", "answer": "cba"}))
    step = asyncio.run(env.step('<tool_call>{"name": "reverse", "arguments": {"text": "abc"}}</tool_call>'))
    assert step.observation[0]["content"] == "cba" and not step.done


def test_an_unknown_env_key_fails_at_composition():
    with pytest.raises(Exception, match="env.bogus"):
        tool_config(["env.bogus=1"])


def test_a_failing_renderer_stops_the_run_before_any_weights_load(taught, tmp_path):
    from transformers import AutoTokenizer

    from cispo.trainer import train

    path, cfg, _ = taught
    broken = tmp_path / "think-stripping-model"  # a tokenizer and a config, no weights: loading them would fail
    broken.mkdir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = THINK_STRIP
    tok.save_pretrained(broken)
    shutil.copy(f"{path}/config.json", broken / "config.json")
    with pytest.raises(ConfigError, match=r"env\.renderer='template' failed its self-test.*think-stripping-model"):
        check_env_renderer(cfg, str(broken))
    cfg = tool_config([f"model.path={broken}", f"trainer.output_dir={tmp_path / 'run'}", "data.eval_size=8"])
    with pytest.raises(ConfigError, match=r"env\.renderer"):
        train(cfg)


def test_sampler_episodes_carry_trajectories_graded_on_the_final_answer(taught):
    from rollout.engines.hf_engine import build

    path, cfg, rows = taught
    with RewardScorer(cfg.reward) as scorer:
        engine = build(path, cfg.rollout, cfg.model)
        sampler = EngineSampler(cfg, engine, EngineSink(engine, version=3), scorer, engine.tokenizer, Dist())
        batch = sampler.sample(rows[:4], step=1, round_index=0, max_tokens=cfg.rollout.max_tokens)
        assert len(batch.episodes) == 4 * cfg.algo.group_size
        with_tool = 0
        for e in batch.episodes:
            t = e.trajectory
            assert t.versions == [3] * len(t.token_ids) and e.version == 3  # the sink's served version
            last = t.model_turns()[-1]
            assert t.text == engine.tokenizer.decode(last, skip_special_tokens=True)
            regraded = scorer.score([t.text], [rows[e.prompt_index]]).results[0]
            assert e.result.status == regraded.status and e.score == pytest.approx(regraded.score + t.reward)
            s = episode_sample(e, 1.0, 0)
            assert s.prompt_ids == t.prompt_ids
            assert s.loss_mask == t.loss_mask and s.loss_len == t.num_trainable
            assert s.rollout_logp.tolist() == pytest.approx([lp for lp, m in zip(t.logprobs, t.loss_mask) if m])
            with_tool += any(sp.source == ENV for sp in t.spans)
        assert with_tool >= len(batch.episodes) // 2, "the taught model calls the calculator"
        assert any(e.result.status == "correct" for e in batch.episodes)
        m = batch.metrics
        assert m["tool/calls"] >= with_tool and m["tool/calculator/calls"] <= m["tool/calls"]
        assert batch.env_seconds > 0 and m["tool/seconds"] > 0
        ev = sampler.evaluate(rows)
        assert ev["eval/accuracy"] == 1.0 and ev["eval/turns"] == 2.0 and ev["eval/tool_calls"] == 1.0
        sampler.cfg = replace(cfg, trainer=replace(cfg.trainer, eval_k=2))  # sampled trajectories too
        ev = sampler.evaluate(rows)
        assert 0.0 < ev["eval/avg@2"] <= ev["eval/pass@2"] <= 1.0 and ev["eval/accuracy"] == 1.0
        sampler.close()


class RandomDayEnv(ToolEnv):
    """A calculator environment whose reset is not deterministic (a random date line in its system message), and
    which rewards each tool turn with 0.125 (an intermediate reward, added to the grade of the final answer)."""

    async def reset(self, row):
        messages = await super().reset(row)
        return [{"role": "system", "content": f"Today is day {random.randrange(10**6)}."}] + messages

    async def step(self, assistant_text):
        step = await super().step(assistant_text)
        return step if step.done else replace(step, reward=step.reward + 0.125)


@register_env("random_day")
def random_day_env(**options) -> RandomDayEnv:
    return RandomDayEnv(["calculator"], **options)


class ContextRecorder:
    """The HF engine with the contexts of every generate call kept: what the model was really shown."""

    def __init__(self, inner):
        self.inner, self.contexts = inner, []

    def generate(self, prompts, sampling):
        self.contexts += [list(p) for p in prompts]
        return self.inner.generate(prompts, sampling)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_environment_with_a_random_reset_trains_on_the_context_the_engine_saw(taught):
    """The loss sample's prompt is the trajectory's own, the one the engine continued from, not a second rendering
    of the row (a second reset of this environment draws another date)."""
    from rollout.engines.hf_engine import build

    path, cfg, rows = taught
    cfg = replace(cfg, env=replace(cfg.env, name="random_day"))
    with RewardScorer(cfg.reward) as scorer:
        engine = ContextRecorder(build(path, cfg.rollout, cfg.model))
        sampler = EngineSampler(cfg, engine, EngineSink(engine), scorer, engine.tokenizer, Dist())
        batch = sampler.sample(rows[:2], step=1, round_index=0, max_tokens=cfg.rollout.max_tokens)
        sampler.close()
    seen = {tuple(c) for c in engine.contexts}
    for group in batch.groups():
        assert len({tuple(e.trajectory.prompt_ids) for e in group}) > 1  # the resets really differ
        for e in group:
            s = episode_sample(e, 1.0, 0)
            assert s.prompt_ids == e.trajectory.prompt_ids and tuple(s.prompt_ids) in seen
            t = e.trajectory  # the score: the grade of the final answer plus each tool turn's 0.125, once each
            assert e.score == pytest.approx(e.result.score + e.penalty + t.reward)
    assert any(e.trajectory.reward > 0 for e in batch.episodes)


@register_env("graded_calculator")
def graded_calculator_env(**options) -> ToolEnv:
    return ToolEnv(["calculator"], reward=lambda text, row: 1.0, **options)


def test_an_environment_that_grades_the_answer_itself_is_refused(taught):
    """The reward's graders grade the final answer; an environment that grades it too would add it twice."""
    from transformers import AutoTokenizer

    path, cfg, _ = taught
    cfg = replace(cfg, env=replace(cfg.env, name="graded_calculator"))
    with pytest.raises(ConfigError, match=r"env.name='graded_calculator' .* grades the final answer itself"):
        ToolRollouts(cfg, AutoTokenizer.from_pretrained(path), sandbox=False)


def test_one_training_step_trains_on_the_model_tokens_and_logs_the_tools(taught, tmp_path):
    from cispo.trainer import train

    path, _, _ = taught
    cfg = tool_config([f"model.path={path}", f"trainer.output_dir={tmp_path}", "trainer.steps=1",
                       "trainer.eval_every=0", "data.eval_size=8", "algo.prompts_per_step=4", "algo.group_size=4",
                       "algo.updates_per_step=1", "algo.drop_zero_variance=false"])
    train(cfg)
    step = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    for key in ("tool/calls", "tool/errors", "tool/seconds", "rollout/turns", "time/tool_s", "time/generate_s",
                "rollout/finish/done", "eval/turns"):
        assert key in step, key
    assert step["rollout/turns"] > 1.0 and step["rollout/env_token_frac"] > 0.1
    # every episode is in the loss (no group dropped, none masked): its loss tokens are the model's tokens only
    tokens = step["rollout/len_mean"] * 16
    assert step["train/tokens"] == round(tokens * (1 - step["rollout/env_token_frac"]))


def test_warm_start_traces_label_only_the_model_tokens(taught):
    from transformers import AutoTokenizer

    from cispo.start.tool_traces import tool_sequences
    from rollout.env.tools import format_tool_calls

    path, cfg, rows = taught
    tok = AutoTokenizer.from_pretrained(path)
    for (ids, labels), row in zip(tool_sequences(tok, rows[:2], cfg), rows):
        expression = row["prompt"].removeprefix("What is ").removesuffix("?")
        call = format_tool_calls([("calculator", {"expression": expression})], "hermes")
        assert tok.decode([i for i in labels if i != -100]) == f"{call}<|im_end|>\\boxed{{{row['answer']}}}<|im_end|>"
        assert f"<|im_end|>\n<|im_start|>tool\n{row['answer']}<|im_end|>\n<|im_start|>assistant\n" in tok.decode(ids)
    mixed = gold_batch(tok, rows[:4], cfg, mixed=True)  # rows 0, 2 traced; 1, 3 answered directly, no system message
    texts = [tok.decode(ids[m.bool()]) for ids, m in zip(mixed["input_ids"], mixed["attention_mask"])]
    assert [t.startswith("<|im_start|>system") for t in texts] == [True, True, False, False]
    assert texts[2].endswith(f"<|im_start|>assistant\n\\boxed{{{rows[1]['answer']}}}<|im_end|>")
