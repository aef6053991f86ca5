"""Multi-turn rollouts in lockstep on a colocated engine (phase 1): every active trajectory generates its next
turn in one engine call, the environments step concurrently, and the rendered environment tokens are appended.

    result = lockstep_rollout(engine, envs, rows, renderer, sampling, limits)   # LockstepResult

One environment and one row per trajectory (a group of n is n environments on the same row). Each turn:
  1. one `engine.generate(contexts, n=1)` over the active trajectories, from token ids (prompt + all so far)
  2. the generated ids and logprobs are appended as they came back (mask True; an early stop's forced EOS False)
  3. each environment steps on the turn's text; its reward is appended to the trajectory's rewards
  4. not done: `renderer.turn_boundary` ids are appended as environment tokens (mask False, logprob 0)
Generated ids are never re-encoded: the text goes to the environment, the ids stay in the trajectory.

Decisions:
- `sampling.max_tokens` is the per-turn cap. The one engine call asks for the largest remaining allowance of the
  active trajectories; a trajectory whose own `limits.token_budget` runs out mid-turn keeps the prefix of its
  turn that fits (a prefix of a sample is a sample of the prefix, logprobs unchanged), finish "budget". So a
  context may reach prompt + token_budget - 1 tokens with a whole turn asked after it: the engine's
  max_model_len must hold prompt + token_budget + sampling.max_tokens (cispo.multiturn.check_config).
- An environment reply that leaves no room for one generated token ends the trajectory before it is appended
  (finish "budget"); so does a turn that used the budget up exactly.
- After the last allowed turn (`limits.max_turns`) the environment still steps (its reward counts), but nothing
  more is appended (finish "max_turns"). An early stop ends the trajectory without an environment step.
- Seeds: turn t asks with seed `sampling.seed + t`, so turns draw different streams (None stays None).
- `limits.trajectory_timeout_s` is one deadline for the call (its trajectories start together): no turn starts
  after it, an environment step still running at it is abandoned, and the trajectories still active end with
  finish "timeout" (the rewards of the steps they finished are kept). The first turn always runs.
- The result times the engine calls (`generate_s`) and the environment steps (`env_s`), each as wall time: the
  environments of one turn step concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rollout.base import SamplingParams
from rollout.env import Env, Limits
from rollout.trajectory import Trajectory


@dataclass
class LockstepResult:
    trajectories: list[Trajectory]  # one per environment, in order
    generate_s: float  # wall time of the engine calls
    env_s: float  # wall time of the environment steps


def lockstep_rollout(engine, envs: Sequence[Env], rows: Sequence[Mapping[str, Any]], renderer,
                     sampling: SamplingParams, limits: Limits = Limits()) -> LockstepResult:
    """The trajectories of `envs[i]` on `rows[i]` (see the module docstring). Runs its own event loop; from
    async code await `run_lockstep` instead."""
    return asyncio.run(run_lockstep(engine, envs, rows, renderer, sampling, limits))


async def run_lockstep(engine, envs: Sequence[Env], rows: Sequence[Mapping[str, Any]], renderer,
                       sampling: SamplingParams, limits: Limits = Limits()) -> LockstepResult:
    if len(envs) != len(rows):
        raise ValueError(f"one environment per row: {len(envs)} environments, {len(rows)} rows")
    if sampling.n != 1:
        raise ValueError("multi-turn rollouts take one sample per environment: pass n=1 and one env per sample")
    firsts = await asyncio.gather(*(env.reset(row) for env, row in zip(envs, rows)))
    trajs = [Trajectory(renderer.prompt(messages)) for messages in firsts]
    active = list(range(len(trajs)))
    deadline = time.monotonic() + limits.trajectory_timeout_s
    generate_s = env_s = 0.0
    for turn in range(limits.max_turns):
        if turn and time.monotonic() >= deadline:
            for i in active:
                trajs[i].finish_reason = "timeout"
            break
        if not active:
            break
        room = {i: limits.token_budget - len(trajs[i].token_ids) for i in active}
        ask = replace(sampling, max_tokens=min(sampling.max_tokens, max(room.values())),
                      seed=None if sampling.seed is None else sampling.seed + turn)
        tick = time.perf_counter()
        rollout = engine.generate([trajs[i].context() for i in active], ask)
        generate_s += time.perf_counter() - tick
        stepping = []
        for i, c in zip(active, rollout.completions):
            t, keep = trajs[i], min(len(c.token_ids), room[i])
            trainable = [True] * keep
            if c.finish_reason == "early_stop" and keep == len(c.token_ids):
                trainable[-1] = False  # the forced EOS was not sampled from the policy
            t.add_model(c.token_ids[:keep], c.logprobs[:keep], trainable)
            if c.finish_reason == "early_stop":
                t.finish_reason = "early_stop"
            elif keep == room[i]:
                t.finish_reason = "budget"
            else:
                stepping.append((i, c.text))
        tick = time.perf_counter()
        steps = await asyncio.gather(*(_step_until(envs[i], text, deadline) for i, text in stepping))
        env_s += time.perf_counter() - tick
        for (i, _), step in zip(stepping, steps):
            t = trajs[i]
            if step is None:
                t.finish_reason = "timeout"
                continue
            t.rewards.append(float(step.reward))
            if step.done:
                t.finish_reason = "done"
            elif turn == limits.max_turns - 1:
                t.finish_reason = "max_turns"
            else:
                env_ids = renderer.turn_boundary(t.model_turns()[-1], step.observation or [])
                if len(t.token_ids) + len(env_ids) >= limits.token_budget:
                    t.finish_reason = "budget"
                else:
                    t.add_env(env_ids)
        active = [i for i in active if not trajs[i].finish_reason]
    return LockstepResult(trajs, generate_s, env_s)


async def _step_until(env: Env, text: str, deadline: float):
    """env.step(text), or None when it is still running at `deadline` (time.monotonic)."""
    try:
        return await asyncio.wait_for(env.step(text), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return None
