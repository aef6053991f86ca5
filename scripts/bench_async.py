"""Generation ahead of the update: samples/s and held-out accuracy at algo.max_staleness 0, 1, 2, side by side.

    python scripts/bench_async.py [--staleness 0 1 2] [--seeds 0 1 2] [--steps 80] [--server-cpus 0]
                                  [--trainer-cpus 1] [--out runs/bench_async] [-- extra Hydra overrides]

Each run is `scripts/train.py rollout.mode=server` (the default run's task and model) with one rollout server
pinned to --server-cpus and the trainer pinned to --trainer-cpus (one core each on a 2-core machine), seed S
(model.tiny.seed is left at its default, so every run starts from the same warm-started model; the cache is
shared, and built by the first run). Runs go seed by seed, the staleness values of one seed back to back.
Staleness > 0 sets algo.tis_cap=2.0 (cispo/sampling/pipeline.py).

samples/s: responses generated in the RL steps over the steps' wall time (start-up and evaluations excluded).
overlap ceiling: what perfect overlap could give at staleness 1, from each staleness-0 run: (g + t) / max(g, t),
with g the trainer's wait for its batch and t the rest of its step; the ratio cannot pass it.
accuracy: held-out greedy accuracy after the last step, i.e. after the same number of samples in every run.
With rollout.server.in_flight set (after --), "en idle" is the time with no request on the server.
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
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._follow import follow  # noqa: E402


def run(k: int, seed: int, args, extra: list[str]) -> dict:
    name = f"staleness{k}-seed{seed}"
    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["taskset", "-c", args.trainer_cpus, sys.executable, str(ROOT / "scripts" / "train.py"),
           "rollout.mode=server", f"algo.max_staleness={k}", f"rollout.server.cpus=[{args.server_cpus}]",
           f"rollout.server.port={args.port}", f"trainer.seed={seed}", f"rollout.seed={seed}",
           f"trainer.steps={args.steps}", "trainer.eval_every=0", f"model.cache_dir={args.out / 'cache'}",
           f"trainer.output_dir={run_dir}", "logger.progress=false", "logger.wandb_mode=disabled",
           *(["algo.tis_cap=2.0"] if k else []), *extra]
    start = time.perf_counter()
    follow(cmd, args.out / f"{name}.log", name, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    group = json.loads((run_dir / "config.json").read_text())["algo"]["group_size"]
    steps = [r for r in rows if r["step"] > 0]
    seconds = sum(r["time/step_s"] for r in steps)
    samples = sum(r["sampling/prompts"] * group for r in steps)
    syncs = [r["sync/seconds"] for r in steps if "sync/seconds" in r]
    return {
        "staleness": k, "seed": seed, "total_s": time.perf_counter() - start, "rl_s": seconds, "samples": samples,
        "samples_per_s": samples / seconds, "step_s_median": statistics.median(r["time/step_s"] for r in steps),
        "trainer_idle_s": sum(r["async/trainer_idle_s"] for r in steps),
        "engine_idle_s": sum(r.get("async/engine_idle_s", r.get("async/server_idle_s", 0.0)) for r in steps),
        "staleness_hist": dict(sorted(Counter(int(r["async/staleness"]) for r in steps).items())),
        "sync_ms_median": 1e3 * statistics.median(syncs) if syncs else None,
        "before": rows[0]["eval/accuracy"], "after": [r for r in rows if "eval/accuracy" in r][-1]["eval/accuracy"],
    }


def overlap_ceiling(r: dict) -> float:
    """Samples/s of a perfectly overlapped run over this synchronous (staleness 0) run's: (g + t) / max(g, t), with g
    the trainer's wait for each batch (generation, the sync's load, grading) and t the rest of its time."""
    g = r["trainer_idle_s"]
    return r["rl_s"] / max(g, r["rl_s"] - g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--trainer-cpus", default="1")
    parser.add_argument("--port", type=int, default=8250)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_async")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for k in args.staleness:
            results.append(run(k, seed, args, extra))
            r = results[-1]
            print(f"staleness {k} seed {seed}: {r['samples_per_s']:.1f} samples/s, accuracy {r['before']:.3f} -> "
                  f"{r['after']:.3f} ({r['total_s']:.0f} s)", flush=True)
    head = ("stale", "seed", "samples", "RL s", "samp/s", "step s", "tr idle", "en idle", "sync ms", "before", "after",
            "staleness histogram")
    print(" ".join(f"{h:>8}" for h in head))
    for r in results:
        cells = [r["staleness"], r["seed"], r["samples"], f"{r['rl_s']:.0f}", f"{r['samples_per_s']:.1f}",
                 f"{r['step_s_median']:.2f}", f"{r['trainer_idle_s']:.0f}", f"{r['engine_idle_s']:.0f}",
                 f"{r['sync_ms_median']:.0f}" if r["sync_ms_median"] is not None else "-", f"{r['before']:.3f}",
                 f"{r['after']:.3f}", json.dumps(r["staleness_hist"])]
        print(" ".join(f"{c:>8}" for c in cells))
    summary = {}
    for k in args.staleness:
        mine = [r for r in results if r["staleness"] == k]
        summary[k] = {"samples_per_s_median": statistics.median(r["samples_per_s"] for r in mine),
                      "accuracy": [r["after"] for r in mine]}
    base = summary[args.staleness[0]]
    if args.staleness[0] == 0:  # what perfect overlap could give: the step time over its longer half
        ceilings = [overlap_ceiling(r) for r in results if r["staleness"] == 0]
        summary[0]["overlap_ceiling_median"] = statistics.median(ceilings)
        print(f"staleness 0: overlap ceiling x{statistics.median(ceilings):.2f} (seed by seed: "
              f"{', '.join(f'{c:.2f}' for c in ceilings)})")
    for k, s in summary.items():
        ratios = [r["samples_per_s"] / b["samples_per_s"] for r, b in zip(
            [r for r in results if r["staleness"] == k], [r for r in results if r["staleness"] == args.staleness[0]])]
        print(f"staleness {k}: samples/s median {s['samples_per_s_median']:.1f} "
              f"(x{statistics.median(ratios):.2f} staleness {args.staleness[0]}, seed by seed), accuracy "
              f"{min(s['accuracy']):.3f}..{max(s['accuracy']):.3f} (staleness {args.staleness[0]}: "
              f"{min(base['accuracy']):.3f}..{max(base['accuracy']):.3f})")
    (args.out / "summary.json").write_text(json.dumps({"runs": results, "summary": summary, "extra": extra}, indent=1))


if __name__ == "__main__":
    main()
