"""The env group: multi-turn tool-use rollouts (`env.*`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from cispo.config.base import ConfigError, _one_of, _positive


@dataclass
class EnvConfig:
    """Multi-turn tool-use rollouts (cispo/sampling/tool_rollouts.py; rollout/env/environment.py, rollout/env/multiturn.py). `name: null` is
    single-turn generation, as without this group. Set, every sample is a trajectory: a model turn of at most
    rollout.max_tokens tokens, the tool results, the next turn, ..., graded on its final answer by the reward's
    graders; only the model's tokens are loss tokens. The knobs other paths cannot honour are refused at start-up
    (cispo.sampling.tool_rollouts.check_config)."""

    name: str | None = None  # a registered environment (rollout.env.environment.ENVS: tools, calculator) | null = single turn
    tools: list[str] = field(default_factory=list)  # env=tools: names in rollout.env.tools.TOOLS ([] = all of them)
    # modules imported before the names above are checked: your register_tool / register_env calls
    modules: list[str] = field(default_factory=list)
    tool_format: str = "hermes"  # the call syntax: hermes (<tool_call>, Qwen / Hermes) | minimax (M1's <tool_calls>)
    renderer: str = "template"  # the turn-boundary tokens (rollout.env.render.RENDERERS), self-tested at start-up
    system_prompt: str = ""  # before the tools' description in the system message
    describe_tools: bool = True  # the tools' schemas and call syntax in the system message; false: a model taught them
    max_turns: int = 4  # model turns per trajectory
    max_calls_per_turn: int = 4
    max_output_tokens: int = 256  # of one tool result; longer ones are cut
    tool_timeout_s: float = 10.0  # one tool call
    trajectory_timeout_s: float = 600.0  # a trajectory's wall clock, generation included; then it ends ("timeout")
    token_budget: int = 1024  # response tokens over all turns, generated and tool alike
    # the python tool (rollout/env/python_tool.py): programs run in the code grader's sandbox, with its limits
    # (reward.code_python, code_memory_mb, code_max_procs, code_tmpfs_mb)
    python_workers: int = 2  # sandbox worker processes: the most programs running at once
    python_timeout_s: float = 5.0  # wall clock of one program; below tool_timeout_s
    python_uid_base: int = 60000  # as root: worker i runs programs as this uid + i (unused uids, as reward.code_uid_base)

    def __post_init__(self):
        from rollout.env.environment import ENVS
        from rollout.env.render import RENDERERS
        from rollout.env.tools import FORMATS, TOOLS

        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"env.modules: cannot import {module!r} ({e}); name a module on the python "
                                  "path, e.g. env.modules=[mypkg.tools]") from e
        if self.name is not None:
            _one_of("env.name", self.name, ENVS)
        _one_of("env.tool_format", self.tool_format, FORMATS)
        _one_of("env.renderer", self.renderer, RENDERERS)
        for tool in self.tools:
            _one_of("env.tools[*]", tool, TOOLS)
        for name in ("max_turns", "max_calls_per_turn", "max_output_tokens", "tool_timeout_s", "trajectory_timeout_s",
                     "token_budget", "python_workers", "python_timeout_s"):
            _positive(f"env.{name}", getattr(self, name))
        if self.python_timeout_s >= self.tool_timeout_s:
            raise ConfigError(f"env.python_timeout_s ({self.python_timeout_s}) must be below env.tool_timeout_s "
                              f"({self.tool_timeout_s}): the sandbox's own limit must end a program first")
        if self.python_uid_base < 1000:
            raise ConfigError(f"env.python_uid_base must be an unused uid >= 1000, got {self.python_uid_base}")
