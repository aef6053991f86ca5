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
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
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
