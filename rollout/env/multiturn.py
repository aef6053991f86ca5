"""Multi-turn rollouts: in lockstep on a colocated engine (phase 1), or one session per trajectory on a server
fleet (phase 2).

    result = rollout_trajectories(engine, envs, rows, renderer, sampling, limits)   # MultiTurnResult

One environment and one row per trajectory (a group of n is n environments on the same row).
Lockstep (any engine), each turn:
  1. one `engine.generate(contexts, n=1)` over the active trajectories, from token ids (prompt + all so far)
  2. the generated ids and logprobs are appended as they came back (mask True; an early stop's forced EOS False)
  3. each environment steps on the turn's text; its reward is appended to the trajectory's rewards
  4. not done: `renderer.turn_boundary` ids are appended as environment tokens (mask False, logprob 0)
Sessions (a rollout.base.SessionEngine, the fleet): every trajectory runs steps 1-4 on its own, one request per
turn (`engine.complete`) on its session's server, so a trajectory waiting on its tool holds nobody else back and
a fast one is not held back by a slow one. Same appends, same limits, same ends (Trajectory.end).
Generated ids are never re-encoded: the text goes to the environment, the ids stay in the trajectory.

Decisions:
- `sampling.max_tokens` is the per-turn cap. The one engine call asks for the largest remaining allowance of the
  active trajectories; a trajectory whose own `limits.token_budget` runs out mid-turn keeps the prefix of its
  turn that fits (a prefix of a sample is a sample of the prefix, logprobs unchanged), end "budget". So a
  context may reach prompt + token_budget - 1 tokens with a whole turn asked after it: the engine's
  max_model_len must hold prompt + token_budget + sampling.max_tokens (cispo.sampling.tool_rollouts.check_config).
- An environment reply that leaves no room for one generated token ends the trajectory before it is appended
  (end "budget"); so does a turn that used the budget up exactly.
- The engine's window (`limits.max_context`, rollout.max_model_len) bounds each trajectory's room too: context +
  turn must fit it. In lockstep the one call asks for no more than the tightest active context leaves, so a
  trajectory next to a long one may get a shorter turn (as if rollout.max_tokens were lower for that turn); a
  trajectory with no room left in the window ends "budget" before the call.
- After the last allowed turn (`limits.max_turns`) the environment still steps (its reward counts), but nothing
  more is appended (end "max_turns"). An early stop ends the trajectory without an environment step.
- Seeds: turn t asks with seed `sampling.seed + t`, so turns draw different streams (None stays None). In
  lockstep the engine gives the i-th active context its own stream of that seed (rollout.base.prompt_seed); a
  session's request for trajectory k asks with prompt_seed(sampling.seed + t, k, 1), which does not depend on
  which trajectories are still running.
- A session asks for exactly the turn its budget has room for (lockstep asks for the largest room of the batch).
- `limits.trajectory_timeout_s` is one deadline for the call (its trajectories start together): no turn starts
  after it, an environment step still running at it is abandoned, and the trajectories still active end with
  end "timeout" (the rewards of the steps they finished are kept). The first turn always runs.
- The result times the engine calls (`generate_s`) and the environment steps (`env_s`), each as the wall time
  during which at least one of them ran: in lockstep the environments of one turn step concurrently; with
  sessions generation and tools overlap, so the two may add up to more than the call took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rollout.base import Completion, SamplingParams, SessionEngine, prompt_seed
from rollout.env.environment import Env, Limits, Step
from rollout.trajectory import Trajectory


@dataclass
class MultiTurnResult:
    trajectories: list[Trajectory]  # one per environment, in order
    generate_s: float  # wall time with an engine call running
    env_s: float  # wall time with an environment step running
    sessions: list = field(default_factory=list)  # sessions: each trajectory's (the engine's Session objects)


def rollout_trajectories(engine, envs: Sequence[Env], rows: Sequence[Mapping[str, Any]], renderer,
                         sampling: SamplingParams, limits: Limits = Limits()) -> MultiTurnResult:
    """The trajectories of `envs[i]` on `rows[i]`: one session each on a SessionEngine, else lockstep."""
    if isinstance(engine, SessionEngine):
        return engine.run(run_sessions(engine, envs, rows, renderer, sampling, limits))
    return lockstep_rollout(engine, envs, rows, renderer, sampling, limits)


def lockstep_rollout(engine, envs: Sequence[Env], rows: Sequence[Mapping[str, Any]], renderer,
                     sampling: SamplingParams, limits: Limits = Limits()) -> MultiTurnResult:
    """The trajectories of `envs[i]` on `rows[i]`, turns in lockstep (see the module docstring). Runs its own event
    loop; from async code await `run_lockstep` instead."""
    return asyncio.run(run_lockstep(engine, envs, rows, renderer, sampling, limits))


def _check(envs, rows, sampling) -> None:
    if len(envs) != len(rows):
        raise ValueError(f"one environment per row: {len(envs)} environments, {len(rows)} rows")
    if sampling.n != 1:
        raise ValueError("multi-turn rollouts take one sample per environment: pass n=1 and one env per sample")


async def run_lockstep(engine, envs: Sequence[Env], rows: Sequence[Mapping[str, Any]], renderer,
                       sampling: SamplingParams, limits: Limits = Limits()) -> MultiTurnResult:
    _check(envs, rows, sampling)
    firsts = await asyncio.gather(*(env.reset(row) for env, row in zip(envs, rows)))
    trajs = [Trajectory(renderer.prompt(messages)) for messages in firsts]
    active = list(range(len(trajs)))
    deadline = time.monotonic() + limits.trajectory_timeout_s
    generate_s = env_s = 0.0
    for turn in range(limits.max_turns):
        if turn and time.monotonic() >= deadline:
            for i in active:
                trajs[i].end = "timeout"
            break
        if not active:
            break
        room = {i: _room(trajs[i], limits) for i in active}
        for i in [i for i in active if room[i] < 1]:
            trajs[i].end = "budget"
        active = [i for i in active if room[i] >= 1]
        if not active:
            break
        window = min(_window_room(trajs[i], limits) for i in active)
        ask = replace(sampling, max_tokens=min(sampling.max_tokens, max(room[i] for i in active), window),
                      seed=None if sampling.seed is None else sampling.seed + turn)
        tick = time.perf_counter()
        rollout = engine.generate([trajs[i].context() for i in active], ask)
        generate_s += time.perf_counter() - tick
        stepping = [(i, c.text) for i, c in zip(active, rollout.completions) if _add_turn(trajs[i], c, room[i])]
        tick = time.perf_counter()
        steps = await asyncio.gather(*(_step_until(envs[i], text, deadline) for i, text in stepping))
        env_s += time.perf_counter() - tick
        for (i, _), step in zip(stepping, steps):
            _add_step(trajs[i], step, turn, renderer, limits)
        active = [i for i in active if not trajs[i].end]
    return MultiTurnResult(trajs, generate_s, env_s)


async def run_sessions(engine: SessionEngine, envs: Sequence[Env], rows: Sequence[Mapping[str, Any]], renderer,
                       sampling: SamplingParams, limits: Limits = Limits()) -> MultiTurnResult:
    """The trajectories of `envs[i]` on `rows[i]`, each in its own session of `engine` (await it on the engine's
    loop; `rollout_trajectories` does)."""
    _check(envs, rows, sampling)
    deadline = time.monotonic() + limits.trajectory_timeout_s
    generating, stepping = _Busy(), _Busy()
    sessions = [engine.session() for _ in envs]

    async def one(k: int) -> Trajectory:
        env, session = envs[k], sessions[k]
        t = Trajectory(renderer.prompt(await env.reset(rows[k])))
        for turn in range(limits.max_turns):
            if turn and time.monotonic() >= deadline:
                t.end = "timeout"
                break
            room = _room(t, limits)
            if room < 1:
                t.end = "budget"
                break
            ask = replace(sampling, max_tokens=min(sampling.max_tokens, room),
                          seed=None if sampling.seed is None else prompt_seed(sampling.seed + turn, k, 1))
            with generating():
                c = await engine.complete(t.context(), ask, session)
            if not _add_turn(t, c, room):
                break
            with stepping():
                step = await _step_until(env, c.text, deadline)
            _add_step(t, step, turn, renderer, limits)
            if t.end:
                break
        return t

    trajs = await asyncio.gather(*(one(k) for k in range(len(envs))))
    return MultiTurnResult(list(trajs), generating.total, stepping.total, sessions)


def _window_room(t: Trajectory, limits: Limits) -> int:
    """Tokens the engine's window has left after `t`'s context."""
    return limits.max_context - len(t.context()) if limits.max_context else 1 << 62


def _room(t: Trajectory, limits: Limits) -> int:
    """Tokens `t` may still generate: within its budget and the engine's window."""
    return min(limits.token_budget - len(t.token_ids), _window_room(t, limits))


def _add_turn(t: Trajectory, c: Completion, room: int) -> bool:
    """Append the turn `c` (at most `room` tokens of it); True when the environment steps on it next."""
    keep = min(len(c.token_ids), room)
    trainable = [True] * keep
    if c.finish_reason == "early_stop" and keep == len(c.token_ids):
        trainable[-1] = False  # the forced EOS was not sampled from the policy
    t.add_model(c.token_ids[:keep], c.logprobs[:keep], trainable)
    if c.finish_reason == "early_stop":
        t.end = "early_stop"
    elif keep == room:
        t.end = "budget"
    return not t.end


def _add_step(t: Trajectory, step: Step | None, turn: int, renderer, limits: Limits) -> None:
    """Record the environment's step after turn `turn` (None: it ran past the deadline), and append its reply
    unless the trajectory ends here."""
    if step is None:
        t.end = "timeout"
        return
    t.rewards.append(float(step.reward))
    if step.done:
        t.end = "done"
    elif turn == limits.max_turns - 1:
        t.end = "max_turns"
    else:
        env_ids = renderer.turn_boundary(t.model_turns()[-1], step.observation or [])
        if len(t.token_ids) + len(env_ids) >= limits.token_budget:
            t.end = "budget"
        else:
            t.add_env(env_ids)


async def _step_until(env: Env, text: str, deadline: float):
    """env.step(text), or None when it is still running at `deadline` (time.monotonic)."""
    try:
        return await asyncio.wait_for(env.step(text), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return None


class _Busy:
    """Wall time during which at least one of the sections it timed was running (one event loop, no locks)."""

    def __init__(self):
        self.running, self.since, self.total = 0, 0.0, 0.0

    @contextlib.contextmanager
    def __call__(self):
        if not self.running:
            self.since = time.perf_counter()
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            if not self.running:
                self.total += time.perf_counter() - self.since
