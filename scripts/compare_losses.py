"""CISPO vs DAPO vs GRPO (and GSPO) on the tiny task: the CPU-scale version of M1's Figure 2, with a learning-rate
sweep, several updates-per-step settings, seeds, ablations that switch on one difference between the losses at a
time, and ScaleRL's compute-performance fits.

    python scripts/compare_losses.py [--variants cispo dapo grpo] [--lrs 1e-5 3e-5 1e-4] [--updates 16 4]
                                     [--seeds 0 1 2 3 4] [--steps 40] [--eval-every 5] [--threshold 0.6]
                                     [--fit-min-samples 0] [--fit-frac 0.5] [--n-boot 200]
                                     [--jobs 2] [--out runs/compare] [-- extra Hydra overrides for every run]

Every run starts from the same warm-started tiny model (the warm start depends on the model seed, which stays
fixed; `trainer.seed` and `rollout.seed` vary) and is one `scripts/train.py` process at one torch thread; `--jobs`
run at once, and a finished run is not run again (its folder is the cache). A variant is a row of VARIANTS: the
three losses as configs/algo/ defines them, and ablations that move one knob of one loss to the other's value.

Writes `<out>/summary.json` (per run: the accuracy curve and per-step diagnostics; per variant, lr and updates:
final accuracy over seeds, steps and samples to `--threshold`, diagnostics) and `<out>/accuracy.png` (held-out
greedy accuracy against step and against generated samples, each variant at its best lr, mean over seeds with
the min-max band; one row per updates-per-step setting), and prints the tables.

Fits (cispo.algo.fit, ScaleRL, Khatri et al. 2025). Compute is generated samples (prompts x responses, counted
from the run's log); each cell of two or more seeds gets the sigmoid R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)
fitted to its seeds' evaluations past `--fit-min-samples`, with R0 the step-0 accuracy and seed-bootstrap
intervals for A, B and C_mid (`identified`: A's interval at most 0.05 wide and the runs past C_mid's interval).
Each run is also fitted on its evaluations up to `--fit-frac` of its samples and judged on the rest (the mean
absolute error of that prediction). Written to summary.json ("fits") and `<out>/fits.png` (each variant at its
best lr: the seeds' mean with the min-max band, the fitted curve, A and its interval).
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
sys.path.insert(0, str(ROOT))

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
    "gspo": ["algo=gspo"],  # the response's ratio, clipped to [1 - 3e-4, 1 + 4e-4]; a mean over responses
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


def fit_cells(runs: dict[Job, dict], min_samples: float, fit_frac: float, n_boot: int) -> dict:
    """Per (variant, lr, updates): the seed-bootstrap sigmoid fit of accuracy against samples and each run's
    early-to-late prediction (module docstring). A cell that cannot be fitted (one seed, too few points) has
    "error" instead."""
    import numpy as np

    from cispo.algo.fit import bootstrap, identified, predict_late

    cells: dict[tuple, list[tuple[Job, list]]] = {}
    for job, r in runs.items():
        cells.setdefault((job.variant, job.lr, job.updates), []).append((job, r["curve"]))
    out = {}
    for (variant, lr, updates), members in cells.items():
        cell = {"variant": variant, "lr": lr, "updates": updates, "seeds": len(members)}
        curves = [(np.array([n for _, n, _ in c], float), np.array([a for _, _, a in c], float)) for _, c in members]
        try:
            boot = bootstrap(curves, n_boot=n_boot, min_compute=min_samples)
        except ValueError as err:
            out[f"{variant}|{lr:g}|{updates}"] = cell | {"error": str(err)}
            continue
        f = boot.fit
        late = {}
        for (job, _), (C, y) in zip(members, curves):
            try:
                p = predict_late(C, y, fit_frac, min_compute=min_samples)
                late[job.seed] = {"mae": p.mae, "A_early": p.fit.A, "cutoff": p.cutoff}
            except ValueError as err:
                late[job.seed] = {"error": str(err)}
        out[f"{variant}|{lr:g}|{updates}"] = cell | {
            "A": f.A, "B": f.B, "C_mid": f.C_mid, "R0": f.R0, "rss": f.rss, "points": f.n,
            "A_ci": [boot.A.lo, boot.A.hi], "B_ci": [boot.B.lo, boot.B.hi], "C_mid_ci": [boot.C_mid.lo, boot.C_mid.hi],
            "max_samples": boot.max_compute, "identified": identified(boot), "late": late,
        }
    return out


def separated(fits: dict) -> list[tuple[str, str, str]]:
    """Pairs of fitted cells at the same updates-per-step whose A, B or C_mid intervals do not overlap:
    (cell, cell, parameter), the first cell the higher."""
    done = [f for f in fits.values() if "A" in f]
    pairs = []
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            if a["updates"] != b["updates"]:
                continue
            for name in ("A", "B", "C_mid"):
                (alo, ahi), (blo, bhi) = a[f"{name}_ci"], b[f"{name}_ci"]
                if alo > bhi or blo > ahi:
                    hi, lo = (a, b) if alo > bhi else (b, a)
                    pairs.append((f"{hi['variant']} lr {hi['lr']:g}", f"{lo['variant']} lr {lo['lr']:g}", name))
    return pairs


def print_fits(fits: dict) -> None:
    print(f"\n{'variant':<24}{'lr':>8}{'upd':>5}{'seeds':>6}{'A':>7}{'A 95%':>16}{'B':>7}{'B 95%':>16}"
          f"{'C_mid':>9}{'C_mid 95%':>20}{'ident':>7}{'late MAE':>22}")
    for f in sorted(fits.values(), key=lambda f: (-f["updates"], f["variant"], f["lr"])):
        head = f"{f['variant']:<24}{f['lr']:>8g}{f['updates']:>5}{f['seeds']:>6}"
        if "error" in f:
            print(f"{head}  not fitted: {f['error']}")
            continue
        maes = [v["mae"] for v in f["late"].values() if "mae" in v]
        late = f"{statistics.mean(maes):.3f} (max {max(maes):.3f})" if maes else "-"
        print(f"{head}{f['A']:>7.3f}{'[%.3f, %.3f]' % tuple(f['A_ci']):>16}{f['B']:>7.2f}"
              f"{'[%.2f, %.2f]' % tuple(f['B_ci']):>16}{f['C_mid']:>9.0f}{'[%.0f, %.0f]' % tuple(f['C_mid_ci']):>20}"
              f"{'yes' if f['identified'] else 'no':>7}{late:>22}")
    print("A, B, C_mid: the sigmoid fit of held-out accuracy against generated samples, seeds pooled; 95% seed-"
          "bootstrap intervals; ident: A's interval <= 0.05 wide and the runs past C_mid's; late MAE: each run fitted "
          "on its early part, mean |predicted - observed| over the rest (mean over seeds, and the worst)")
    for hi, lo, name in separated(fits):
        print(f"  {name}: {hi} > {lo}, intervals apart")


def plot_fits(runs: dict[Job, dict], cells: dict, fits: dict, path: Path) -> None:
    """Accuracy against samples (log axis; the step-0 evaluation is R0) with each cell's fitted sigmoid and A with
    its interval at the right edge, each variant at its best lr, one panel per updates-per-step setting."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cispo.algo.fit import sigmoid

    updates = sorted({j.updates for j in runs}, reverse=True)
    variants = list(dict.fromkeys(j.variant for j in runs))
    fig, axes = plt.subplots(1, len(updates), figsize=(7.5 * len(updates), 4.6), squeeze=False)
    for ax, u in zip(axes[0], updates):
        right = max(c[-1][1] for j, r in runs.items() if j.updates == u for c in [r["curve"]]) * 2.5
        for k, variant in enumerate(variants):
            lr = best_lr(cells, variant, u)
            f = fits.get(f"{variant}|{lr:g}|{u}", {})
            curves = [r["curve"] for j, r in runs.items() if (j.variant, j.lr, j.updates) == (variant, lr, u)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            x = [statistics.mean(c[i][1] for c in curves) for i in range(length)]
            acc = [[c[i][2] for c in curves] for i in range(length)]
            shown = [i for i in range(length) if x[i] > 0]
            color, label = f"C{k}", f"{variant} lr {lr:g}"
            if "A" in f:
                label += f": A {f['A']:.3f} [{f['A_ci'][0]:.2f}, {f['A_ci'][1]:.2f}]"
                grid = np.geomspace(x[shown[0]], right, 200)
                ax.plot(grid, sigmoid(grid, f["A"], f["B"], f["C_mid"], f["R0"]), color=color, lw=1.2)
                at = right * (1.0 + 0.12 * k)
                ax.errorbar([at], [f["A"]], yerr=[[f["A"] - f["A_ci"][0]], [f["A_ci"][1] - f["A"]]], color=color,
                            fmt="s", ms=4, capsize=3)
            ax.plot([x[i] for i in shown], [statistics.mean(acc[i]) for i in shown], ".", color=color, label=label)
            ax.fill_between([x[i] for i in shown], [min(acc[i]) for i in shown], [max(acc[i]) for i in shown],
                            color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("generated samples (log)")
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.set_title(f"{u} updates per batch: seeds' mean and range, sigmoid fit; at the right, A and its 95% "
                     "interval", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--fit-min-samples", type=float, default=0.0,
                        help="fits: evaluations before this many generated samples are left out (burn-in)")
    parser.add_argument("--fit-frac", type=float, default=0.5,
                        help="fits: each run fitted up to this fraction of its samples, judged on the rest")
    parser.add_argument("--n-boot", type=int, default=200, help="fits: bootstrap replicates")
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
    fits = fit_cells(runs, args.fit_min_samples, args.fit_frac, args.n_boot)
    print_fits(fits)
    plot(runs, cells, args.out / "accuracy.png")
    plot_fits(runs, cells, fits, args.out / "fits.png")
    summary = {"overrides": extra, "threshold": args.threshold, "cells": cells, "compute": "generated samples",
               "fit": {"min_samples": args.fit_min_samples, "fit_frac": args.fit_frac, "n_boot": args.n_boot},
               "fits": fits, "separated": separated(fits), "runs": {j.name: r for j, r in runs.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'accuracy.png'}, {args.out / 'fits.png'} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
