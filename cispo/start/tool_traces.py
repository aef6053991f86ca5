"""Gold tool-use traces for the tiny model's warm start (env.name set): one calculator call on the question's
expression, the calculator's answer, then the boxed result.

    sequences = tool_sequences(tokenizer, rows, cfg)   # [(ids, labels)]: labels -100 except on the model's tokens

A trace is made by the same loop RL samples with (rollout.env.multiturn.lockstep_rollout, the run's environment,
renderer and limits), driven by `GoldPolicy`, an engine that writes the gold turns instead of sampling them. So
its tokens are exactly those a greedy rollout would produce if the model reproduced the gold turns, and a
teacher-forced check of its model tokens is the greedy accuracy with the tool (cispo.start.warm_start).

Decisions: the call is written in env.tool_format on the row's question `What is <expression>?` (the generated
tasks' prompts, cispo/data/arithmetic.py); other rows, or an environment without the calculator, are refused. The
answer turn is `\\boxed{<tool result>}`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cispo.config import Config, ConfigError
from cispo.sampling.tool_rollouts import ToolRollouts
from rollout.base import Completion, Rollout, SamplingParams
from rollout.env.multiturn import lockstep_rollout
from rollout.env.tools import calculator, format_tool_calls

QUESTION = re.compile(r"What is (.+)\?")


class GoldPolicy:
    """An engine that writes given turns: its k-th call answers its j-th prompt with the k-th turn of the j-th
    trajectory still running (turns[j][k], encoded, ending in the stop token; logprobs 0). For the lockstep loop,
    where each trajectory runs until its turns do."""

    def __init__(self, tokenizer, turns: Sequence[Sequence[str]], stop_id: int):
        self.tokenizer, self.turns, self.stop_id, self.calls = tokenizer, turns, stop_id, 0

    def generate(self, prompts, sampling) -> Rollout:
        k, self.calls = self.calls, self.calls + 1
        running = [ts for ts in self.turns if len(ts) > k]
        if len(running) != len(prompts):
            raise RuntimeError(f"gold turn {k}: {len(prompts)} trajectories asked, {len(running)} have a turn")
        out = []
        for i, ts in enumerate(running):
            ids = self.tokenizer.encode(ts[k], add_special_tokens=False) + [self.stop_id]
            if len(ids) > sampling.max_tokens:
                raise ConfigError(f"a gold turn has {len(ids)} tokens, more than rollout.max_tokens="
                                  f"{sampling.max_tokens} lets the policy write in one turn: raise rollout.max_tokens")
            out.append(Completion(i, ids, [0.0] * len(ids), "stop", ts[k]))
        return Rollout(out, 0.0)


def gold_turns(row: dict, fmt: str) -> list[str]:
    """The calculator call on the row's question, and the boxed answer."""
    found = QUESTION.fullmatch(row["prompt"].strip()) if isinstance(row["prompt"], str) else None
    if found is None:
        raise ConfigError(f"the tool warm start writes calculator traces for questions 'What is <expression>?'; "
                          f"row {row.get('id')!r} is not one: set model.warm_start.enabled=false")
    expression = found.group(1)
    return [format_tool_calls([("calculator", {"expression": expression})], fmt),
            f"\\boxed{{{calculator(expression)}}}"]


def tool_sequences(tokenizer, rows: Sequence[dict], cfg: Config) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each row's gold trace: prompt + trajectory ids, labels the ids on the model's tokens and
    -100 elsewhere."""
    tools = ToolRollouts(cfg, tokenizer, sandbox=False)
    if "calculator" not in getattr(tools.new_env(), "tools", {}):
        raise ConfigError(f"the tool warm start writes calculator traces, and env.name={cfg.env.name!r} has no "
                          "calculator: set model.warm_start.enabled=false or use env.name=calculator")
    turns = [gold_turns(row, cfg.env.tool_format) for row in rows]
    policy = GoldPolicy(tokenizer, turns, tools.renderer.stop_id)
    envs = [tools.new_env() for _ in rows]
    result = lockstep_rollout(policy, envs, [tools.env_row(r) for r in rows], tools.renderer,
                              SamplingParams(n=1, max_tokens=cfg.rollout.max_tokens), tools.limits)
    out = []
    for t in result.trajectories:
        if t.end != "done":
            raise ConfigError(f"a gold tool trace ended with {t.end!r}, not done: raise env.token_budget "
                              "(or rollout.max_tokens) so that a call, its result and the answer fit")
        labels = [-100] * len(t.prompt_ids) + [i if m else -100 for i, m in zip(t.token_ids, t.loss_mask)]
        out.append((t.prompt_ids + t.token_ids, labels))
    return out
