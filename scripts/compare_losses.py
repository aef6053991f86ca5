"""CISPO vs DAPO vs GRPO on the tiny task: the CPU-scale version of M1's Figure 2, with a learning-rate sweep,
several updates-per-step settings, seeds, and ablations that switch on one difference between the losses at a time.

    python scripts/compare_losses.py [--variants cispo dapo grpo] [--lrs 1e-5 3e-5 1e-4] [--updates 16 4]
                                     [--seeds 0 1 2 3 4] [--steps 40] [--eval-every 5] [--threshold 0.6]
                                     [--jobs 2] [--out runs/compare] [-- extra Hydra overrides for every run]

Every run starts from the same warm-started tiny model (the warm start depends on the model seed, which stays
fixed; `trainer.seed` and `rollout.seed` vary) and is one `scripts/train.py` process at one torch thread; `--jobs`
run at once, and a finished run is not run again (its folder is the cache). A variant is a row of VARIANTS: the
three losses as configs/algo/ defines them, and ablations that move one knob of one loss to the other's value.

Writes `<out>/summary.json` (per run: the accuracy curve and per-step diagnostics; per variant, lr and updates:
final accuracy over seeds, steps and samples to `--threshold`, diagnostics) and `<out>/accuracy.png` (held-out
greedy accuracy against step and against generated samples, each variant at its best lr, mean over seeds with
the min-max band; one row per updates-per-step setting), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> the Hydra overrides that make it. The ablations differ from a loss in one knob each (see cispo/algo/loss.py):
# inside the trust region CISPO's and PPO's per-token gradients are equal (d(r A)/d theta = sg(r) A grad log pi),
# so the losses differ in (a) the tokens outside it, which PPO's clip drops and CISPO keeps, and (b) the normaliser.
# CISPO's rows set clip_high to DAPO's 0.28: without the mask it changes nothing in the loss, and the trust/*
# diagnostics of every CISPO and DAPO row then measure the same region [0.8, 1.28].
CISPO = ["algo=cispo", "algo.clip_high=0.28"]
VARIANTS: dict[str, list[str]] = {
    "cispo": CISPO,
    "dapo": ["algo=dapo"],
    "grpo": ["algo=grpo"],
    "cispo+token_batch": [*CISPO, "algo.loss_agg=token_batch"],  # (b) moved to DAPO's normaliser
    "cispo+mask": [*CISPO, "algo.unified_mask=true"],  # (a): M1 Eq. 7 drops what PPO's clip drops
    "cispo+mask+token_batch": [*CISPO, "algo.unified_mask=true", "algo.loss_agg=token_batch"],  # both: DAPO's
    # gradient but for weights above 5
    "dapo+token_group": ["algo=dapo", "algo.loss_agg=token_group"],  # (b) the other way
}
DIAGNOSTICS = ("trust/exit_frac_pos_adv", "trust/exit_frac_neg_adv", "trust/exit_grad_share_pos_adv",
               "trust/exit_grad_share_neg_adv", "loss/entropy", "train/grad_norm", "loss/ratio_max")


@dataclass(frozen=True)
class Job:
    variant: str
    lr: float
    updates: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-lr{self.lr:g}-u{self.updates}-seed{self.seed}"


def run(job: Job, out: Path, extra: list[str]) -> Path:
    run_dir = out / job.name
    if not (run_dir / "final" / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *VARIANTS[job.variant], f"trainer.lr={job.lr}",
               f"algo.updates_per_step={job.updates}", f"trainer.seed={job.seed}", f"rollout.seed={job.seed}",
               f"trainer.output_dir={run_dir}", "logger.wandb_mode=disabled", "logger.progress=false",
               "trainer.threads=1", *extra]
        with (out / f"{job.name}.log").open("w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return run_dir


def read_run(run_dir: Path) -> dict:
    """A finished run's accuracy curve (step, generated samples so far, accuracy) and its per-step diagnostics."""
    group_size = json.loads((run_dir / "config.json").read_text())["algo"]["group_size"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples, curve, diag = 0, [], {k: [] for k in DIAGNOSTICS}
    updates: dict[str, list[float]] = {}
    for r in rows:
        samples += int(r.get("sampling/prompts", 0)) * group_size
        if "eval/accuracy" in r:
            curve.append((r["step"], samples, r["eval/accuracy"]))
        for k in DIAGNOSTICS:
            if k in r:
                diag[k].append(r[k])
        for k, v in r.items():
            if k.startswith("trust/update_"):
                updates.setdefault(k.removeprefix("trust/"), []).append(v)
    return {"curve": curve, "diagnostics": {k: statistics.mean(v) for k, v in diag.items() if v},
            "entropy_last": diag["loss/entropy"][-1] if diag["loss/entropy"] else None,
            "by_update": {k: statistics.mean(v) for k, v in sorted(updates.items())}}


def first_reaching(curve: list[tuple[int, int, float]], threshold: float) -> tuple[int, int] | None:
    """(step, samples) of the first evaluation at or above `threshold`, None if none is."""
    return next(((s, n) for s, n, a in curve if a >= threshold), None)


def summarise(runs: dict[Job, dict], threshold: float) -> dict:
    """Per (variant, lr, updates): accuracy over seeds, steps / samples to threshold, mean diagnostics."""
    cells: dict[tuple, list[dict]] = {}
    for job, r in runs.items():
        cells.setdefault((job.variant, job.lr, job.updates), []).append(r)
    out = {}
    for (variant, lr, updates), rs in cells.items():
        final = [r["curve"][-1][2] for r in rs]
        reached = [first_reaching(r["curve"], threshold) for r in rs]
        hit = [x for x in reached if x]
        out[f"{variant}|{lr:g}|{updates}"] = {
            "variant": variant, "lr": lr, "updates": updates, "seeds": len(rs),
            "before": statistics.mean(r["curve"][0][2] for r in rs),
            "final_mean": statistics.mean(final), "final_min": min(final), "final_max": max(final),
            "final_sd": statistics.stdev(final) if len(final) > 1 else 0.0,
            "reached": len(hit),
            "steps_to_threshold_median": statistics.median(s for s, _ in hit) if hit else None,
            "samples_to_threshold_median": statistics.median(n for _, n in hit) if hit else None,
            "diagnostics": {k: statistics.mean(r["diagnostics"][k] for r in rs if k in r["diagnostics"])
                            for k in DIAGNOSTICS if any(k in r["diagnostics"] for r in rs)},
            "entropy_last": statistics.mean(h) if (h := [r["entropy_last"] for r in rs
                                                         if r["entropy_last"] is not None]) else None,
            "by_update": {k: statistics.mean(r["by_update"].get(k, 0.0) for r in rs)
                          for k in sorted({k for r in rs for k in r["by_update"]})},
        }
    return out


def best_lr(cells: dict, variant: str, updates: int) -> float | None:
    """The lr with the highest mean final accuracy for this variant and updates-per-step."""
    mine = [c for c in cells.values() if c["variant"] == variant and c["updates"] == updates]
    return max(mine, key=lambda c: c["final_mean"])["lr"] if mine else None


def print_tables(cells: dict, threshold: float) -> None:
    print(f"\n{'variant':<24}{'lr':>8}{'upd':>5}{'before':>8}{'final mean':>12}{'min':>7}{'max':>7}"
          f"{'reach':>7}{'steps to ' + format(threshold, 'g'):>14}{'exit+':>8}{'exit-':>8}{'grad+':>8}{'grad-':>8}"
          f"{'H last':>8}")
    for c in sorted(cells.values(), key=lambda c: (-c["updates"], c["variant"], c["lr"])):
        d = c["diagnostics"]
        steps = c["steps_to_threshold_median"]
        print(f"{c['variant']:<24}{c['lr']:>8g}{c['updates']:>5}{c['before']:>8.3f}{c['final_mean']:>12.3f}"
              f"{c['final_min']:>7.3f}{c['final_max']:>7.3f}{c['reached']:>4}/{c['seeds']:<2}"
              f"{'-' if steps is None else format(steps, 'g'):>14}"
              f"{d.get('trust/exit_frac_pos_adv', 0):>8.4f}{d.get('trust/exit_frac_neg_adv', 0):>8.4f}"
              f"{d.get('trust/exit_grad_share_pos_adv', 0):>8.4f}{d.get('trust/exit_grad_share_neg_adv', 0):>8.4f}"
              f"{'-' if c['entropy_last'] is None else format(c['entropy_last'], '.3f'):>8}")
    print("exit+/-: share of tokens outside the trust region in the advantage's direction (A > 0 / A < 0); "
          "grad+/-: their share of the loss's |d loss / d log pi|; H last: entropy at the last step.")


def plot(runs: dict[Job, dict], cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = sorted({j.updates for j in runs}, reverse=True)
    variants = list(dict.fromkeys(j.variant for j in runs))
    fig, axes = plt.subplots(len(updates), 2, figsize=(11, 3.8 * len(updates)), squeeze=False)
    for row, u in zip(axes, updates):
        for variant in variants:
            lr = best_lr(cells, variant, u)
            curves = [r["curve"] for j, r in runs.items() if (j.variant, j.lr, j.updates) == (variant, lr, u)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            acc = [[c[i][2] for c in curves] for i in range(length)]
            for ax, x in zip(row, ([curves[0][i][0] for i in range(length)],
                                   [statistics.mean(c[i][1] for c in curves) for i in range(length)])):
                ax.plot(x, [statistics.mean(a) for a in acc], marker=".", label=f"{variant} lr {lr:g} ({len(curves)} seeds)")
                ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], alpha=0.15)
        for ax, xlabel in zip(row, ("RL step", "generated samples")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out accuracy (greedy)")
            ax.set_title(f"{u} updates per generation batch")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heartbeat(out: Path, running: dict, done: list, total: int, stop: threading.Event) -> None:
    """A line every 10 s: runs done, the running ones and their last logged step."""
    started = time.time()
    while not stop.wait(10):
        steps = []
        for name in list(running):
            metrics = out / name / "metrics.jsonl"
            last = metrics.read_text().splitlines()[-1:] if metrics.exists() else []
            steps.append(f"{name} step {json.loads(last[0])['step'] if last else 0}")
        print(f"[{time.time() - started:6.0f} s] {len(done)}/{total} runs done; running: {', '.join(steps) or '-'}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["cispo", "dapo", "grpo"], choices=sorted(VARIANTS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 3e-5, 1e-4])
    parser.add_argument("--updates", nargs="+", type=int, default=[16, 4], help="algo.updates_per_step values")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=40, help="trainer.steps of every run")
    parser.add_argument("--eval-every", type=int, default=5, help="trainer.eval_every of every run")
    parser.add_argument("--threshold", type=float, default=0.6, help="held-out accuracy for steps-to-threshold")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [f"trainer.steps={args.steps}", f"trainer.eval_every={args.eval_every}", *args.overrides]
    jobs = [Job(v, lr, u, s) for u in args.updates for s in args.seeds for lr in args.lrs for v in args.variants]
    print(f"{len(jobs)} runs: {len(args.variants)} variants x {len(args.lrs)} lrs x {len(args.updates)} updates "
          f"settings x {len(args.seeds)} seeds, {args.steps} steps each, {args.jobs} at once", flush=True)
    running: dict[str, float] = {}
    done: list[str] = []

    def one(job: Job) -> Path:
        running[job.name] = time.time()
        try:
            return run(job, args.out, extra)
        finally:
            print(f"{job.name}: {time.time() - running.pop(job.name):.0f} s", flush=True)
            done.append(job.name)

    stop = threading.Event()
    threading.Thread(target=heartbeat, args=(args.out, running, done, len(jobs), stop), daemon=True).start()
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(one, jobs))
    stop.set()
    runs = {job: read_run(d) for job, d in zip(jobs, dirs)}
    cells = summarise(runs, args.threshold)
    print_tables(cells, args.threshold)
    plot(runs, cells, args.out / "accuracy.png")
    summary = {"overrides": extra, "threshold": args.threshold, "cells": cells,
               "runs": {j.name: r for j, r in runs.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'accuracy.png'} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
