"""Multi-turn tool use on a fleet of real vLLM servers (phase 2: rollout.env.multiturn.run_sessions, Fleet.complete):
every trajectory runs its turns as its own requests, kept on one server.

Two servers on localhost serve the tiny model taught the calculator's call syntax (tests/test_tool_rollouts.py).
Greedy session trajectories are the lockstep trajectories of the HF engine, token for token; a seeded sampled
rollout is the same however its requests interleave, even when a server is killed under it; a training run in
server mode, one step ahead, trains on the trajectories' model tokens and saves the trajectories it has in flight.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from dataclasses import replace

import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision/torchcodec raises on CPU
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from cispo.algo.batch import trajectory_sample
from cispo.config import ServerConfig
from cispo.sampling.tool_rollouts import ToolRollouts
from cispo.sampling.dynamic import FilledBatch
from rollout.base import SamplingParams
from rollout.engines.fleet import build
from rollout.env.multiturn import rollout_trajectories
from rollout.trajectory import ENV
from test_fleet import free_port_block
from test_tool_rollouts import taught, tool_config  # noqa: F401 - `taught` is a fixture


@pytest.fixture(scope="module")
def fleet(taught, tmp_path_factory):  # noqa: F811
    path, cfg, _ = taught
    rollout = replace(cfg.rollout, mode="server", engine="auto", kv_cache_gb=0.25,
                      server=ServerConfig(count=2, port=free_port_block(2)))
    f = build(path, rollout, cfg.model, log_dir=tmp_path_factory.mktemp("servers"))
    yield f
    f.close()


def sessions(fleet, tools: ToolRollouts, rows: list[dict], sampling: SamplingParams, n: int = 1):
    envs = [tools.new_env() for _ in rows for _ in range(n)]
    return rollout_trajectories(fleet, envs, [tools.env_row(r) for r in rows for _ in range(n)], tools.renderer,
                                sampling, tools.limits)


class Gated:
    """An environment whose first step waits until `gate` is set (`waiting` lists the steps that wait)."""

    def __init__(self, env, gate: threading.Event, waiting: list):
        self.env, self.gate, self.waiting = env, gate, waiting

    def __getattr__(self, name):
        return getattr(self.env, name)

    async def step(self, text: str):
        if not self.gate.is_set():
            self.waiting.append(self)
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        return await self.env.step(text)


def test_greedy_sessions_are_the_lockstep_trajectories_and_stay_on_one_server(taught, fleet):  # noqa: F811
    from rollout.engines.hf_engine import build

    path, cfg, rows = taught
    engine = build(path, cfg.rollout, cfg.model)
    tools = ToolRollouts(cfg, engine.tokenizer)
    greedy = SamplingParams(n=1, max_tokens=cfg.rollout.max_tokens, temperature=0.0)
    reference = rollout_trajectories(engine, [tools.new_env() for _ in rows], [tools.env_row(r) for r in rows],
                                     tools.renderer, greedy, tools.limits)
    engine.close()
    assert not reference.sessions  # the HF engine runs in lockstep
    got = sessions(fleet, tools, rows, greedy)
    assert len(got.sessions) == len(rows)
    for ref, t, session in zip(reference.trajectories, got.trajectories, got.sessions):
        t.check()
        assert t.prompt_ids == ref.prompt_ids and t.token_ids == ref.token_ids and t.loss_mask == ref.loss_mask
        assert [s.source for s in t.spans] == ["model", "env", "model"]  # a call, its result, the answer
        assert t.end == ref.end == "done"
        assert len(session.turns) == t.num_turns and len(set(session.turns)) == 1 and session.moves == 0
    assert {s.turns[0] for s in got.sessions} == {s.url for s in fleet.pool.servers}  # both servers took sessions
    assert got.generate_s > 0 and got.env_s > 0


def test_a_server_killed_under_the_sessions_changes_no_trajectory(taught, fleet):  # noqa: F811
    path, cfg, rows = taught
    from transformers import AutoTokenizer

    tools = ToolRollouts(cfg, AutoTokenizer.from_pretrained(path))
    sampling = SamplingParams(n=1, max_tokens=cfg.rollout.max_tokens, temperature=1.0, seed=7)
    reference = sessions(fleet, tools, rows, sampling, n=8)
    again = sessions(fleet, tools, rows, sampling, n=8)  # the same seeds, however the requests interleave
    assert [t.token_ids for t in again.trajectories] == [t.token_ids for t in reference.trajectories]
    assert sum(any(s.source == ENV for s in t.spans) for t in reference.trajectories) >= 32  # most call the tool

    # every trajectory's first tool step waits at a gate: the victim dies between its sessions' turns
    victim, gate, waiting, out = fleet.pool.servers[0], threading.Event(), [], {}
    gated = [Gated(tools.new_env(), gate, waiting) for _ in rows for _ in range(8)]
    rows8 = [tools.env_row(r) for r in rows for _ in range(8)]
    worker = threading.Thread(target=lambda: out.setdefault("result", rollout_trajectories(
        fleet, gated, rows8, tools.renderer, sampling, tools.limits)))
    worker.start()
    deadline = time.monotonic() + 120
    while len(waiting) < len(gated) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(waiting) == len(gated)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    gate.set()
    worker.join(timeout=300)
    got = out["result"]
    assert [t.token_ids for t in got.trajectories] == [t.token_ids for t in reference.trajectories]
    assert [t.loss_mask for t in got.trajectories] == [t.loss_mask for t in reference.trajectories]
    for t in got.trajectories:
        t.check()
    on_victim = [s for s in got.sessions if s.turns[0] == victim.url and len(s.turns) > 1]
    assert on_victim and all(s.moves == 1 and victim.url not in s.turns[1:] for s in on_victim)
    assert not any(s.moves for s in got.sessions if s.turns[0] != victim.url)

    deadline = time.monotonic() + 300  # restarted; back in the pool with the fleet's weights
    while not victim.healthy and time.monotonic() < deadline:
        time.sleep(1)
    assert victim.healthy and victim.version == fleet.sink.served_version


def test_server_mode_trains_on_tool_trajectories_and_saves_those_in_flight(taught, fleet, tmp_path):  # noqa: F811
    from cispo.trainer import train

    path, _, _ = taught
    urls = ",".join(s.url for s in fleet.pool.servers)
    cfg = tool_config([f"model.path={path}", f"trainer.output_dir={tmp_path}", "trainer.steps=2",
                       "trainer.eval_every=0", "data.eval_size=8", "algo.prompts_per_step=4", "algo.group_size=4",
                       "algo.updates_per_step=1", "algo.drop_zero_variance=false", "rollout.mode=server",
                       "rollout.engine=auto", f"rollout.server.urls=[{urls}]", "algo.max_staleness=1",
                       "algo.tis_cap=2.0", "trainer.save_every=1", "trainer.keep_last=2"])
    train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for step in steps[1:]:
        assert step["tool/calls"] > 0 and step["rollout/turns"] > 1.0 and step["rollout/session_moves"] == 0
        assert step["async/staleness"] <= 1 and "eval/turns" in steps[0]
        # every episode is in the loss: its loss tokens are the model's tokens of the trajectories only
        assert step["train/tokens"] == round(step["rollout/len_mean"] * 16 * (1 - step["rollout/env_token_frac"]))
    state = json.loads((tmp_path / "checkpoints" / "step-000001" / "trainer_state.json").read_text())["state"]
    (saved,) = state["rollouts"]["ready"]  # step 2's batch, generated while step 1 trained
    filled = FilledBatch.from_json(saved["filled"])
    with_tool = 0
    for group in filled.groups:
        for e in group:
            t = e.trajectory
            t.check()
            assert set(t.versions) == {saved["version"]}  # every token carries the policy that generated the batch
            s = trajectory_sample(t, 1.0, 0)
            assert s.loss_len == t.num_trainable
            with_tool += t.num_trainable < len(t.token_ids)  # the tool's reply is in the trajectory, not the loss
    assert with_tool > 0
