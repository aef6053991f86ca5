"""Multi-turn tool-use rollouts in the trainer (env.name set): lockstep turns on colocated engines, one session per
trajectory on a server fleet (rollout.mode=server; rollout.env.multiturn).

    check_config(cfg)                          # before any work: knobs this path cannot honour
    check_env_renderer(cfg, model_dir)         # before the policy and the engine load: the renderer self-test
    tools = ToolRollouts(cfg, tokenizer)       # in the sampler
    made = tools.generate(engine, rows, sampling)   # Generated: n trajectories per row

One environment per trajectory (rollout.env.environment.make_env(env.name, ...)), on the row with its prompt as chat messages
(cispo.data.prompts.prompt_messages: data.instruction and data.system_prompt apply); turns in lockstep on a colocated
engine or in sessions on the fleet (rollout.env.multiturn.rollout_trajectories), each turn capped at the sampler's
max_tokens (rollout.max_tokens), the trajectory at env.token_budget, env.max_turns and env.trajectory_timeout_s.

Decisions:
- A trajectory is graded like a single-turn completion, by the reward's graders for the row's source
  (rewards.RewardScorer), on its final answer: the text of its last model turn. Its score is that grade's score,
  plus the overlong penalty of its whole length against env.token_budget, plus the environment's own rewards (the
  sum of Trajectory.rewards; ToolEnv gives none).
- What grading, rollout metrics and samples.jsonl read of a trajectory (`finish_trajectory`): its text is the
  last model turn's, its finish_reason "early_stop" for an early stop, "length" when a budget cut it (the last
  turn did not end in the stop token, or the environment's reply did not fit env.token_budget), else "stop". So
  rollout/len_* are trajectory lengths, and both budget truncations count as truncations. Only the model's
  tokens are loss tokens (cispo.algo.batch.trajectory_sample).
- One grader per episode: the reward's graders grade the final answer, so an environment that grades it too
  (ToolEnv's `reward`) is refused (its reward would count the answer twice); environments may still reward
  intermediate steps, which add to the grade.
- Seeds: the sampler's seed s becomes s * env.max_turns, and turn t samples with s * max_turns + t, so no two
  turns of any two calls share a seed.
- Metrics (`Generated.metrics`, additive so that rounds and ranks sum): tool/calls, tool/errors, tool/seconds
  (time inside tool calls, summed over calls) and the same per tool (tool/<name>/...), tool/python/* from the
  python tool's sandbox; per trajectory (`trajectory_metrics`): rollout/turns, rollout/finish/<reason>,
  rollout/env_token_frac, and on the fleet rollout/session_moves (turns sent to another server than the
  trajectory's first, because that one failed). The step also logs time/generate_s against time/tool_s
  (cispo.sampling.curriculum).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cispo.config import Config, ConfigError, EnvConfig
from cispo.data.prompts import prompt_messages
from rollout.env import python_tool
from rollout.base import SamplingParams
from rollout.env.environment import Env, Limits, make_env
from rollout.env.multiturn import rollout_trajectories
from rollout.env.render import check_renderer, make_renderer, self_test_conversation
from rollout.trajectory import ENDS, ENV, Trajectory


@dataclass
class Generated:
    """One generate call's samples: n per row, grouped (trajectories[k] is of row k // n)."""

    trajectories: list[Trajectory]
    seconds: float  # generation wall time
    env_seconds: float = 0.0  # wall time of the environment steps
    metrics: dict[str, float] = field(default_factory=dict)  # additive counts and seconds (tool/*)


def check_config(cfg: Config) -> None:
    """ConfigError naming each knob the multi-turn path cannot honour with env.name set (nothing without it)."""
    env = cfg.env
    if env.name is None:
        return
    if cfg.rollout.min_tokens:
        raise ConfigError(f"rollout.min_tokens={cfg.rollout.min_tokens} would hold every turn of a tool trajectory "
                          "open: set rollout.min_tokens=0 with env.name set")
    if cfg.curriculum.windows:
        raise ConfigError("curriculum.windows stages a single-turn response budget, which multi-turn trajectories "
                          "do not have: leave curriculum.windows empty with env.name set (env.token_budget bounds a "
                          "trajectory, rollout.max_tokens a turn)")
    if env.token_budget + cfg.rollout.max_tokens >= cfg.rollout.max_model_len:
        raise ConfigError(f"env.token_budget + rollout.max_tokens ({env.token_budget} + {cfg.rollout.max_tokens}) "
                          f"must be < rollout.max_model_len ({cfg.rollout.max_model_len}), with room for the prompt: "
                          "a lockstep turn may ask a trajectory near its budget for a whole turn (rollout.env.multiturn); "
                          "raise rollout.max_model_len or lower env.token_budget / rollout.max_tokens")


def renderer_for(env: EnvConfig, tokenizer):
    """The env's renderer for `tokenizer`, after its self-test on a tool conversation in env.tool_format;
    ConfigError naming the template when the turn-by-turn ids differ from the template's rendering."""
    try:
        renderer = make_renderer(tokenizer, env.renderer)
        check_renderer(renderer, tokenizer, self_test_conversation(env.tool_format))
    except ValueError as err:
        raise ConfigError(f"env.renderer={env.renderer!r} failed its self-test, so multi-turn rollouts cannot run "
                          f"with this model: {err}") from None
    return renderer


def check_env_renderer(cfg: Config, model_dir: str) -> None:
    """The renderer self-test on the tokenizer of `model_dir` (nothing without env.name)."""
    if cfg.env.name is None:
        return
    from transformers import AutoTokenizer

    renderer_for(cfg.env, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code))


def limits_of(env: EnvConfig, max_model_len: int | None = None) -> Limits:
    """The env.* limits as the rollout loop and the environments take them; `max_model_len`: the engine's window
    (rollout.max_model_len), which bounds every turn too."""
    return Limits(max_turns=env.max_turns, max_calls_per_turn=env.max_calls_per_turn,
                  max_output_tokens=env.max_output_tokens, tool_timeout_s=env.tool_timeout_s,
                  token_budget=env.token_budget, trajectory_timeout_s=env.trajectory_timeout_s,
                  max_context=max_model_len)


class ToolRollouts:
    """The environments, renderer and limits of one run (see the module docstring). `sandbox`: start the python
    tool's sandbox workers now when the environment has the tool (False: leave the tool unconfigured)."""

    def __init__(self, cfg: Config, tokenizer, sandbox: bool = True):
        check_config(cfg)
        self.cfg, self.env_cfg, self.tokenizer = cfg, cfg.env, tokenizer
        self.limits = limits_of(cfg.env, cfg.rollout.max_model_len)
        self.renderer = renderer_for(cfg.env, tokenizer)
        self.python = None
        env = self.new_env()  # a bad env option fails here, before any step
        if getattr(env, "reward", None) is not None:
            raise ConfigError(f"env.name={cfg.env.name!r} builds an environment that grades the final answer itself "
                              "(ToolEnv reward=...), which the reward's graders grade already: the answer would "
                              "count twice. Leave the environment's reward unset and register the grader instead "
                              "(rewards.register_grader)")
        if sandbox and "python" in getattr(env, "tools", {}):
            r = cfg.reward
            self.python = python_tool.configure(python_tool.PythonLimits(
                workers=cfg.env.python_workers, timeout_s=cfg.env.python_timeout_s, memory_mb=r.code_memory_mb,
                max_procs=r.code_max_procs, tmpfs_mb=r.code_tmpfs_mb, python=r.code_python,
                uid_base=cfg.env.python_uid_base))
            self.python.start()  # no bubblewrap, or a uid in use: the run stops here

    def new_env(self) -> Env:
        e = self.env_cfg
        options = dict(fmt=e.tool_format, limits=self.limits, tokenizer=self.tokenizer, system_prompt=e.system_prompt,
                       describe_tools=e.describe_tools) | ({"tools": list(e.tools)} if e.tools else {})
        try:
            return make_env(e.name, **options)
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"env.name={e.name!r} cannot be built with the env.* options: {err}") from None

    def env_row(self, row: dict) -> dict:
        """The row as an environment sees it: its prompt as chat messages."""
        return dict(row, prompt=prompt_messages(row, self.cfg.data))

    def generate(self, engine, rows: Sequence[dict], sampling: SamplingParams) -> Generated:
        """`sampling.n` trajectories of each row, grouped."""
        n = sampling.n
        envs = [self.new_env() for _ in rows for _ in range(n)]
        seed = None if sampling.seed is None else sampling.seed * self.limits.max_turns
        result = rollout_trajectories(engine, envs, [self.env_row(r) for r in rows for _ in range(n)],
                                      self.renderer, replace(sampling, n=1, seed=seed), self.limits)
        for t in result.trajectories:
            finish_trajectory(t, self.tokenizer, self.renderer.stop_id)
        metrics = tool_metrics(envs) | (self.python.take_metrics() if self.python else {})
        if result.sessions:
            metrics["rollout/session_moves"] = float(sum(s.moves for s in result.sessions))
        return Generated(result.trajectories, result.generate_s, result.env_s, metrics)

    def close(self) -> None:
        if self.python is not None:
            self.python.close()


def finish_trajectory(t: Trajectory, tokenizer, stop_id: int) -> None:
    """Set what grading reads of a finished trajectory: its text and finish_reason (see the module docstring)."""
    turns = t.model_turns()
    last = turns[-1] if turns else []
    cut = t.end == "budget" or last[-1:] != [stop_id]
    t.finish_reason = "early_stop" if t.end == "early_stop" else "length" if cut else "stop"
    t.text = tokenizer.decode(last, skip_special_tokens=True)


def tool_metrics(envs: Sequence[Env]) -> dict[str, float]:
    """tool/calls, tool/errors, tool/seconds over the environments' ToolStats (rollout.env.environment), in total and per tool;
    {} when no environment keeps stats."""
    calls, errors, seconds = Counter(), Counter(), Counter()
    kept = False
    for env in envs:
        stats = getattr(env, "stats", None)
        if stats is not None:
            kept = True
            calls.update(stats.calls)
            errors.update(stats.errors)
            seconds.update(stats.seconds)
    if not kept:
        return {}
    out = {"tool/calls": float(sum(calls.values())), "tool/errors": float(sum(errors.values())),
           "tool/seconds": float(sum(seconds.values()))}
    for name in calls:
        out |= {f"tool/{name}/calls": float(calls[name]), f"tool/{name}/errors": float(errors[name]),
                f"tool/{name}/seconds": float(seconds[name])}
    return out


def trajectory_metrics(trajectories: Sequence[Trajectory], prefix: str = "rollout/") -> dict[str, float]:
    """rollout/turns (mean model turns), rollout/finish/<end> (fractions, by Trajectory.end), rollout/env_token_frac
    (share of the response tokens the environment wrote); {} for no trajectories."""
    if not trajectories:
        return {}
    reasons = Counter(t.end for t in trajectories)
    total = sum(len(t.token_ids) for t in trajectories)
    env_tokens = sum(s.stop - s.start for t in trajectories for s in t.spans if s.source == ENV)
    return {f"{prefix}turns": statistics.fmean(t.num_turns for t in trajectories),
            f"{prefix}env_token_frac": env_tokens / total if total else 0.0,
            **{f"{prefix}finish/{r}": reasons[r] / len(trajectories) for r in ENDS}}


def sum_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise sums (for Generated.metrics over rounds and ranks)."""
    out: Counter = Counter()
    for part in parts:
        out.update(part)
    return dict(out)
