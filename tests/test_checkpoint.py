"""Checkpoints: atomic saves, keep-last, exact resume after SIGKILL, DeepSpeed ZeRO-3 resume, HF export.

The end-to-end tests run `scripts/train.py` for real (tiny model after a short cached warm start, HF rollout
engine, math reward with a format bonus so that groups have reward variance and the policy trains), on CPU,
deterministic. Timing metrics are excluded from the comparisons; everything else must be identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cispo.train.checkpoint import Checkpointer, list_checkpoints, resolve_resume, trim_metrics
from cispo.config import ConfigError, TrainerConfig
from cispo.train.collective import Dist
from cispo.train.optim import TorchUpdater

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time", "tokens_per_s", "seconds", "memory/")


def small_run(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.cache_dir={cache}", "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=1",
        "model.tiny.intermediate_size=128", "model.warm_start.max_steps=30", "model.warm_start.eval_every=30",
        "model.warm_start.eval_problems=20", "model.warm_start.warmup_steps=10", "model.warm_start.lr=3e-3",
        "model.warm_start.batch_size=64", "rollout.engine=hf",
        "algo.prompts_per_step=8", "algo.group_size=4", "data.eval_size=16", "trainer.eval_every=0",
        "reward.format_score=0.5", "reward.num_workers=1", "logger.wandb_mode=disabled", "logger.progress=false",
        "logger.plot=false", f"trainer.output_dir={out}", *extra,
    ]


def env() -> dict:
    # CPU ranks (gloo) even on a GPU machine
    return dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "scripts" / "train.py"), *overrides]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            str(REPO / "scripts" / "train.py"), *overrides]


def run(cmd: list[str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows}


def prompt_versions(run_dir: Path) -> dict[int, int]:
    """prompts.jsonl: each step's policy version, the one that generated its samples."""
    return {r["step"]: r["version"] for r in map(json.loads, (run_dir / "prompts.jsonl").read_text().splitlines())}


def assert_same_steps(a: dict, b: dict, steps) -> float:
    """Identical metrics at `steps`; returns the largest absolute difference (0.0 when bitwise equal)."""
    worst = 0.0
    for step in steps:
        assert a[step].keys() == b[step].keys(), step
        for k, v in a[step].items():
            assert b[step][k] == pytest.approx(v, rel=1e-9, abs=1e-12), (step, k, v, b[step][k])
            worst = max(worst, abs(b[step][k] - v))
    return worst


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # tiny model + warm start, built by the first run, reused after


def test_exact_resume_after_sigkill(cache, tmp_path):
    steps, every = 6, 2
    full = tmp_path / "full"
    run(train_cmd(*small_run(cache, full, f"trainer.steps={steps}", "logger.samples=3")))
    reference = metrics(full)
    assert sum(reference[s]["train/samples"] for s in range(1, steps + 1)) > 0  # the policy really trains
    assert prompt_versions(full) == {s: s - 1 for s in range(1, steps + 1)}  # step s samples the policy of s - 1

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*small_run(cache, killed, f"trainer.steps={steps}", f"trainer.save_every={every}",
                                                 "logger.samples=3")),
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list_checkpoints(killed / "checkpoints") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-run, right after the first checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not (killed / "final").exists()
    saved = list_checkpoints(killed / "checkpoints")
    k = int(saved[-1].name.split("-")[1])
    assert k < steps

    with (killed / "samples.jsonl").open("a") as f:  # as if the killed run had logged step k + 1 before dying
        f.write(json.dumps({"step": k + 1, "response": "logged after the checkpoint"}) + "\n")
    run(train_cmd(*small_run(cache, killed, f"trainer.steps={steps}", f"trainer.save_every={every}",
                             "logger.samples=3")))  # resume=auto
    resumed = metrics(killed)
    assert sorted(resumed) == list(range(steps + 1))  # rows logged after step k by the killed run were dropped
    assert prompt_versions(killed) == prompt_versions(full)  # the resumed engine serves the checkpoint's policy
    worst = assert_same_steps(reference, resumed, range(k + 1, steps + 1))
    print(f"killed after checkpoint {k}; steps {k + 1}..{steps} after resume: max |diff| {worst}")
    # samples.jsonl: the first 3 responses of every step, decoded, once each (the killed run's later rows trimmed)
    logged = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [s for s in range(1, steps + 1) for _ in range(3)]
    assert all(r["status"] in ("correct", "wrong", "no_answer") and isinstance(r["response"], str) for r in logged)
    assert (killed / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text()
    # the phases of a step add up to no more than the step
    for row in map(json.loads, (full / "metrics.jsonl").read_text().splitlines()[1:]):
        phases = sum(row[f"time/{p}_s"] for p in ("rollout", "old_logp", "update", "sync"))
        assert 0 < phases <= row["time/step_s"] and min(row[f"time/{p}_s"] for p in ("rollout", "update")) > 0
    from safetensors.torch import load_file

    w_full, w_res = load_file(str(full / "final" / "model.safetensors")), load_file(str(killed / "final" / "model.safetensors"))
    assert all(torch.equal(w_full[n], w_res[n]) for n in w_full)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_zero3_two_ranks_resume_and_export(cache, tmp_path):
    """2-rank ZeRO-3 (torchrun): a run resumed from its step-2 checkpoint repeats step 3 exactly; the step-3
    checkpoint, exported offline to HF format (python -m cispo.train.checkpoint export), holds the run's final weights."""
    ds = ["trainer.zero_stage=3", "trainer.optimizer_impl=torch", "trainer.steps=3", "trainer.save_every=2",
          "trainer.keep_last=5", "+trainer.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
    full = tmp_path / "full"
    run(train_cmd(*small_run(cache, full, *ds), nproc=2))
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == ["step-000002", "step-000003"]
    resumed = tmp_path / "resumed"
    run(train_cmd(*small_run(cache, resumed, *ds, f"trainer.resume={full / 'checkpoints' / 'step-000002'}"), nproc=2))
    assert sorted(metrics(resumed)) == [3]
    worst = assert_same_steps(metrics(full), metrics(resumed), [3])
    print(f"ZeRO-3 resume, step 3: max |diff| {worst}")

    from cispo.train.checkpoint import main as checkpoint_cli

    checkpoint_cli(["export", str(full), str(tmp_path / "export")])  # the newest checkpoint: step 3
    from safetensors.torch import load_file

    final = load_file(str(full / "final" / "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    assert (tmp_path / "export" / "tokenizer_config.json").exists()


# ---------------------------------------------------------------------------------------------------- unit


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


@pytest.fixture
def updater():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                      intermediate_size=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    return TorchUpdater(Qwen2ForCausalLM(cfg), TrainerConfig(lr=1e-2))


def train_one(updater):
    updater.backward(updater.policy(torch.tensor([[1, 2, 3]])).logits.square().mean())
    return updater.step(1e-2)


def test_save_load_round_trip_restores_everything(updater, tmp_path):
    counter = Counter()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2, dist=Dist())
    train_one(updater)
    counter.n = 7
    path = ckpt.save(1, updater, {"counter": counter})
    expected_next = train_one(updater), {k: v.clone() for k, v in updater.policy.state_dict().items()}, torch.rand(3)

    counter.n = 0
    for p in updater.policy.parameters():
        p.data.add_(1.0)
    torch.manual_seed(123)
    assert ckpt.load(path, updater, {"counter": counter}) == 1
    assert counter.n == 7
    norm = train_one(updater)
    assert norm == expected_next[0]
    assert all(torch.equal(v, expected_next[1][k]) for k, v in updater.policy.state_dict().items())
    assert torch.equal(torch.rand(3), expected_next[2])  # the RNG continues where the checkpoint was taken


def test_keep_last_and_an_interrupted_save(updater, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep_last=2, dist=Dist())
    for step in (2, 4, 6):
        ckpt.save(step, updater, {})
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000006"]
    assert (root / "latest").read_text().strip() == "step-000006"

    # a crash half way through writing step 8 (simulated: the updater fails after writing part of its files)
    real_save = updater.save

    def crash(path):
        real_save(path)
        raise KeyboardInterrupt("simulated crash while saving")

    monkeypatch.setattr(updater, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(8, updater, {})
    assert (root / ".tmp-step-000008").exists()
    assert resolve_resume("auto", tmp_path) == root / "step-000006"  # the previous one is intact and chosen
    assert (root / "latest").read_text().strip() == "step-000006"
    monkeypatch.undo()
    ckpt.save(8, updater, {})
    assert not list(root.glob(".tmp-*"))
    assert [p.name for p in list_checkpoints(root)] == ["step-000006", "step-000008"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    for step in (3, 12):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").write_text("{}")
    newest = tmp_path / "checkpoints" / "step-000012"
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == newest
    assert resolve_resume(str(tmp_path / "checkpoints" / "step-000003"), tmp_path).name == "step-000003"
    with pytest.raises(ConfigError):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)


def test_checkpoint_of_another_zero_stage_is_refused(updater, tmp_path):
    path = Checkpointer(tmp_path, keep_last=1, dist=Dist()).save(1, updater, {})
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps(state | {"zero_stage": 3, "world_size": 2}))
    with pytest.raises(ConfigError, match="zero_stage"):
        Checkpointer(tmp_path, keep_last=1, dist=Dist()).load(path, updater, {})


def test_trim_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)))
    assert [r["step"] for r in trim_metrics(path, 3)] == [0, 1, 2, 3]
    assert len(path.read_text().splitlines()) == 4
