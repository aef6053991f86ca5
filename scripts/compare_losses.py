"""CISPO vs DAPO vs GRPO on the tiny task, several seeds: the CPU-scale version of M1's Figure 2.

    python scripts/compare_losses.py [--losses cispo dapo grpo] [--seeds 0 1 2] [--jobs 2] [--out runs/compare]
                                     [-- extra Hydra overrides for every run, e.g. trainer.steps=30]

Every run starts from the same warm-started tiny model and uses `algo.updates_per_step` > 1 (the default preset
has 4), so the ratio pi / pi_old leaves 1 and the clipping of each loss matters. Each run is a separate
`scripts/train.py` process (one torch thread each); `--jobs` runs that many at once. Writes
`<out>/accuracy.png` (held-out greedy accuracy vs step, mean over seeds with the min-max band) and
`<out>/summary.json` (per run: accuracy before / after; per loss: mean and range).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(loss: str, seed: int, out: Path, extra: list[str]) -> Path:
    run_dir = out / f"{loss}-seed{seed}"
    if not (run_dir / "final" / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"algo={loss}", f"trainer.seed={seed}",
               f"rollout.seed={seed}", f"trainer.output_dir={run_dir}", "logger.wandb_mode=disabled",
               "logger.progress=false", "trainer.threads=1", *extra]
        log = (out / f"{loss}-seed{seed}.log").open("w")
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return run_dir


def accuracy_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]


def plot(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for loss, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        values = list(zip(*[[a for _, a in r] for r in runs]))  # per step, one value per seed
        ax.plot(steps, [statistics.mean(v) for v in values], marker=".", label=f"{loss} ({len(runs)} seeds)")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["cispo", "dapo", "grpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda job: run(*job, args.out, args.overrides), jobs))
    curves: dict[str, list] = {loss: [] for loss in args.losses}
    summary: dict = {"runs": {}, "losses": {}, "overrides": args.overrides}
    for (loss, seed), run_dir in zip(jobs, dirs):
        curve = accuracy_curve(run_dir)
        curves[loss].append(curve)
        summary["runs"][f"{loss}-seed{seed}"] = {"before": curve[0][1], "after": curve[-1][1]}
    print(f"{'loss':<8}{'before':>9}{'after (mean)':>14}{'after min':>11}{'after max':>11}")
    for loss, runs in curves.items():
        before, after = [r[0][1] for r in runs], [r[-1][1] for r in runs]
        summary["losses"][loss] = {"before_mean": statistics.mean(before), "after_mean": statistics.mean(after),
                                   "after_min": min(after), "after_max": max(after)}
        print(f"{loss:<8}{statistics.mean(before):>9.3f}{statistics.mean(after):>14.3f}{min(after):>11.3f}{max(after):>11.3f}")
    plot(curves, args.out / "accuracy.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'accuracy.png'} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
