"""Tool use at toy scale: the tiny model learns 2-digit products with a calculator, for several seeds.

    python scripts/demo_tools.py [--seeds 0 1 2] [--steps 40] [--out runs/demo_tools] [--eval-size 200]
                                 [-- extra Hydra overrides for every run]

Each seed is one `scripts/train.py experiment=tiny_tools` run (model.tiny.seed = trainer.seed = rollout.seed = S,
its own model.cache_dir): the tiny model is built, warm-started on gold calculator traces and direct answers
(cispo/start/tool_traces.py), then trained with CISPO on multi-turn trajectories with env=calculator. Reported, on the
held-out products:
  with the tool      the run's own held-out evaluation (greedy trajectories, calculator answering), at step 0
                     (after the warm start: "before RL") and after the last step
  without the tool   greedy single-turn answers to the plain prompt (no system message, no tool), on the HF
                     engine, of the warm-started model and of the final policy
Prints a table and writes <out>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def overrides(seed: int, steps: int, eval_size: int, out: Path, extra: list[str]) -> list[str]:
    return ["experiment=tiny_tools", f"model.tiny.seed={seed}", f"trainer.seed={seed}", f"rollout.seed={seed}",
            f"trainer.steps={steps}", f"data.eval_size={eval_size}", f"model.cache_dir={out / f'seed{seed}-cache'}",
            f"trainer.output_dir={out / f'seed{seed}'}", "logger.progress=false", "logger.wandb_mode=disabled",
            "trainer.resume=null", *extra]


def compose(args: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cispo.cli import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return OmegaConf.to_object(hydra_compose("train", overrides=args))


def without_tool(model_dir: str, cfg, rows: list[dict], scorer) -> float:
    """Greedy single-turn accuracy on the plain prompts (cispo.data.prompts.encode_prompts: no tool, no system message)."""
    from cispo.data.prompts import encode_prompts
    from cispo.sampling.evaluation import greedy_accuracy
    from rollout.engines.hf_engine import build

    engine = build(model_dir, cfg.rollout, cfg.model, cfg.trainer.seed)
    try:
        prompts = encode_prompts(engine.tokenizer, rows, cfg.data)
        return greedy_accuracy(engine, prompts, rows, scorer, cfg.rollout.max_tokens)["eval/accuracy"]
    finally:
        engine.close()


def run(seed: int, steps: int, eval_size: int, out: Path, extra: list[str]) -> dict:
    from cispo.data.load import load_splits
    from cispo.start.warm_start import RESULT_FILE, prepare_model
    from rewards import RewardScorer

    args = overrides(seed, steps, eval_size, out, extra)
    shutil.rmtree(out / f"seed{seed}", ignore_errors=True)  # a fresh run; the cache (its warm start) is kept
    log = out / f"seed{seed}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"seed {seed} failed: see {log}")
    seconds = time.perf_counter() - start
    cfg = compose(args)
    rows = [json.loads(line) for line in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    with RewardScorer(cfg.reward) as scorer:
        train_rows, eval_rows = load_splits(cfg.data, scorer)
        warm = prepare_model(cfg, train_rows)  # cached by the run: its path
        before, after = (without_tool(d, cfg, eval_rows, scorer) for d in (warm, str(out / f"seed{seed}" / "final")))
    return {"seed": seed, "seconds": seconds, "run_dir": str(out / f"seed{seed}"),
            "warm_start": json.loads((Path(warm) / RESULT_FILE).read_text()),
            "with_tool": {"before": evals[0]["eval/accuracy"], "after": evals[-1]["eval/accuracy"]},
            "without_tool": {"before": before, "after": after},
            "curve": [(r["step"], r["eval/accuracy"]) for r in evals],
            "tool_calls_per_episode_after": evals[-1].get("eval/tool_calls")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_tools")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = [run(seed, args.steps, args.eval_size, out, extra) for seed in args.seeds]
    head = ("seed", "warm", "tool:before", "tool:after", "gain", "no-tool:before", "no-tool:after", "time")
    print(" ".join(f"{h:>14}" for h in head))
    for r in results:
        w, n = r["with_tool"], r["without_tool"]
        cells = [r["seed"], f"{r['warm_start']['steps']} steps", f"{w['before']:.3f}", f"{w['after']:.3f}",
                 f"{w['after'] - w['before']:+.3f}", f"{n['before']:.3f}", f"{n['after']:.3f}", f"{r['seconds']:.0f}s"]
        print(" ".join(f"{c:>14}" for c in cells))
    mean = {f"{kind}_{when}": statistics.fmean(r[kind][when] for r in results)
            for kind in ("with_tool", "without_tool") for when in ("before", "after")}
    print("mean: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    (out / "summary.json").write_text(json.dumps({"runs": results, "mean": mean, "steps": args.steps,
                                                  "eval_size": args.eval_size, "extra": extra}, indent=1))
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
