"""Multi-turn episodes: environments, tools, chat renderers and the lockstep driver that turns them into
trajectories. The built-in tools are registered here: the calculator (tools.py) and `python`, a program run in the
code grader's sandbox (python_tool.py)."""

import rollout.env.python_tool  # noqa: F401  registers "python" in rollout.env.tools.TOOLS
