"""Environments for multi-turn rollouts: a small async interface, the limits, and the tool-calling environment.

    env = make_env("calculator", tokenizer=tok)       # one environment per trajectory
    messages = await env.reset(row)                   # the conversation so far: [system, user]
    step = await env.step(assistant_text)             # Step(observation messages | None, reward, done)

`ENVS` is the table of environment factories (`register_env(name)` adds one; `make_env` builds one by name). The
built-in "tools" is a ToolEnv over any tools of rollout.env.tools.TOOLS, "calculator" one over the calculator.

ToolEnv decisions:
- A message with no tool call (and no malformed attempt at one) is the answer: the episode ends and `reward`
  (a grader `(response, row) -> number | RewardResult`) scores it. A turn with calls earns 0.
- Tool results are "tool" messages ({"role": "tool", "name", "content"}), one per call, in call order; a malformed
  call, a failing tool, a timeout and calls beyond `max_calls_per_turn` are answered with "error: ..." instead.
- A result longer than `max_output_tokens` is cut to that many tokens of `tokenizer` (4 characters a token without
  one) and marked "... [truncated]". A sync tool runs in a worker thread under `tool_timeout_s`; after a timeout
  the thread is abandoned (Python cannot kill it), so a tool that may hang must bound itself (the sandbox does).
- `max_turns`, `token_budget` and `trajectory_timeout_s` bound the trajectory, so the rollout loop enforces them
  (rollout.env.multiturn).
- `row["prompt"]` is the user message, or a list of chat messages (cispo.data.prompts.prompt_messages); a system message
  among them goes first in the system message, before `system_prompt` and the tools' description
  (`describe_tools=False` leaves the description out, for a model taught the tools and the call syntax).
- `stats` counts each tool's calls, failed calls (those answered "error: ...") and seconds, over the environment's life;
  calls naming no tool of the environment (malformed, unknown) count under "invalid".
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rollout.env.tools import TOOLS, Tool, make_tool, parse_tool_calls, tools_system_prompt


@dataclass(frozen=True)
class Limits:
    max_turns: int = 4  # model turns per trajectory
    max_calls_per_turn: int = 4
    max_output_tokens: int = 256  # per tool result
    tool_timeout_s: float = 10.0
    token_budget: int = 1024  # response tokens of a trajectory over all turns, generated and environment alike
    trajectory_timeout_s: float = 600.0  # wall clock of a trajectory, generation and environment steps alike
    max_context: int | None = None  # prompt + response tokens the engine holds (rollout.max_model_len); None: no cap


INVALID = "invalid"  # the ToolStats name of calls that name no tool of the environment


@dataclass
class ToolStats:
    """Per tool name: calls, failed calls (answered "error: ..."), seconds spent in the calls."""

    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, failed: bool, seconds: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.errors[name] = self.errors.get(name, 0) + failed
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


@dataclass
class Step:
    observation: list[dict] | None  # messages to show the model next; None when done
    reward: float
    done: bool


class Env(Protocol):
    async def reset(self, row: Mapping[str, Any]) -> list[dict]:
        """The first messages of the conversation for this row (e.g. system + user)."""
        ...

    async def step(self, assistant_text: str) -> Step:
        """React to the model's turn (its text, special tokens skipped)."""
        ...


EnvFactory = Callable[..., Env]
ENVS: dict[str, EnvFactory] = {}


def register_env(name: str) -> Callable[[EnvFactory], EnvFactory]:
    """Decorator: make `factory(**options) -> Env` the environment `name`."""

    def register(factory: EnvFactory) -> EnvFactory:
        if ENVS.get(name, factory) is not factory:
            raise ValueError(f"an environment named {name!r} is already registered")
        ENVS[name] = factory
        return factory

    return register


def make_env(name: str, **options) -> Env:
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}: the registered ones are {sorted(ENVS)} "
                         "(rollout.env.environment.register_env adds one)")
    return ENVS[name](**options)


def truncate(text: str, max_tokens: int, tokenizer=None) -> str:
    """`text` cut to at most `max_tokens` tokens (of `tokenizer`; 4 characters a token without one)."""
    if tokenizer is None:
        return text if len(text) <= 4 * max_tokens else text[: 4 * max_tokens] + "... [truncated]"
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]) + "... [truncated]"


def score(result) -> float:
    """A grader's answer as a number (a RewardResult's score, or the number itself)."""
    return float(getattr(result, "score", result))


class ToolEnv:
    """Tool calling over `tools` (Tool objects, functions, or names in TOOLS) in the format `fmt` (hermes |
    minimax, rollout.env.tools). `row["prompt"]` is the user message; `system_prompt` goes before the tools' text."""

    def __init__(self, tools: list[Tool | Callable | str], *, fmt: str = "hermes",
                 reward: Callable[[str, Mapping], Any] | None = None, limits: Limits = Limits(), tokenizer=None,
                 system_prompt: str = "", describe_tools: bool = True):
        resolved = [TOOLS[t] if isinstance(t, str) else t if isinstance(t, Tool) else make_tool(t) for t in tools]
        self.tools = {t.name: t for t in resolved}
        self.fmt, self.reward, self.limits, self.tokenizer = fmt, reward, limits, tokenizer
        described = tools_system_prompt(resolved, fmt) if describe_tools else ""
        self.system = "\n\n".join(p for p in (system_prompt, described) if p)
        self.row: Mapping[str, Any] = {}
        self.stats = ToolStats()

    async def reset(self, row: Mapping[str, Any]) -> list[dict]:
        self.row = row
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        given = [m["content"] for m in messages if m["role"] == "system"]
        system = "\n\n".join(p for p in (*given, self.system) if p)
        return [{"role": "system", "content": system}] * bool(system) + [m for m in messages if m["role"] != "system"]

    async def step(self, assistant_text: str) -> Step:
        calls = parse_tool_calls(assistant_text, self.fmt, self.tools)
        if not calls:
            return Step(None, score(self.reward(assistant_text, self.row)) if self.reward else 0.0, True)
        cap = self.limits.max_calls_per_turn
        results = await asyncio.gather(*(self._timed(c) for c in calls[:cap]))
        for c in calls[cap:]:
            results.append(f"error: at most {cap} tool calls per turn; this one was not run")
            self.stats.add(c.name if c.name in self.tools else INVALID, True, 0.0)
        return Step([{"role": "tool", "name": c.name, "content": r} for c, r in zip(calls, results)], 0.0, False)

    async def _timed(self, call) -> str:
        start = time.perf_counter()
        out, failed = await self._call(call)
        self.stats.add(call.name if call.name in self.tools else INVALID, failed, time.perf_counter() - start)
        return out

    async def _call(self, call) -> tuple[str, bool]:
        """The call's answer, and whether it failed."""
        if call.error:
            return f"error: {call.error}", True
        fn = self.tools[call.name].fn
        run = fn(**call.arguments) if inspect.iscoroutinefunction(fn) else asyncio.to_thread(fn, **call.arguments)
        try:
            out = await asyncio.wait_for(run, self.limits.tool_timeout_s)
        except asyncio.TimeoutError:
            return f"error: tool {call.name!r} timed out after {self.limits.tool_timeout_s:g} s", True
        except Exception as err:  # a tool's failure is an answer for the model, not a crash of the rollout
            return f"error: {type(err).__name__}: {err}", True
        return truncate(str(out), self.limits.max_output_tokens, self.tokenizer), False


@register_env("tools")
def tools_env(*, tools: list[str | Tool | Callable] = (), **options) -> ToolEnv:
    return ToolEnv(list(tools) or list(TOOLS), **options)


@register_env("calculator")
def calculator_env(**options) -> ToolEnv:
    return ToolEnv(["calculator"], **options)
