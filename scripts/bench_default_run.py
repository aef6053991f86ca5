"""The default run as a new user sees it: from an empty model cache, for several seeds and thread counts.

    python scripts/bench_default_run.py [--seeds 0 1 2] [--threads 1 2] [--jobs 1] [--out runs/bench_default]
                                        [-- extra Hydra overrides for every run]

Each run is `scripts/train.py` with `model.tiny.seed=S trainer.seed=S rollout.seed=S trainer.threads=T` and a
fresh `model.cache_dir`, so the tiny model is built and warm-started every time. The phases are timed from the
run's own output lines and metrics: start-up (data, reward workers), model build, warm start, engine start,
RL steps, evaluations, and the export at the end. Prints a table and writes `<out>/summary.json`.
`--jobs 2` runs two 1-thread runs at once (they share the machine: wall times are then not a user's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._follow import follow  # noqa: E402

MARKS = {"build": "building the tiny model", "warm_done": "warm start: greedy", "engine": "starting the rollout",
         "engine_ready": "rollout engine ready", "eval_before": "held-out evaluation before RL",
         "rl": "held-out accuracy before RL:", "done": "held-out accuracy:"}


def run(seed: int, threads: int, out: Path, extra: list[str]) -> dict:
    name = f"seed{seed}-threads{threads}"
    run_dir, cache = out / name, out / f"{name}-cache"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"model.tiny.seed={seed}", f"trainer.seed={seed}",
           f"rollout.seed={seed}", f"trainer.threads={threads}", f"model.cache_dir={cache}",
           f"trainer.output_dir={run_dir}", "logger.progress=false", *extra]
    seen, start = {}, time.perf_counter()

    def mark(line: str) -> None:  # when each phase of the run began (MARKS)
        for key, text in MARKS.items():
            if key not in seen and line.startswith(text):
                seen[key] = time.perf_counter() - start

    follow(cmd, out / f"{name}.log", name, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, on_line=mark)
    total = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warm = json.loads(next(cache.glob("*-warm-*/warm_start.json")).read_text())
    evals = sum(r.get("time/eval_s", 0.0) for r in rows)
    steps = sum(r.get("time/step_s", 0.0) for r in rows)
    return {
        "seed": seed, "threads": threads, "total_s": total,
        "startup_s": seen["build"], "build_s": seen["warm_done"] - seen["build"] - warm["seconds"],
        "warm_start_s": warm["seconds"],
        "warm_start_steps": warm["steps"], "warm_start_accuracy": warm["accuracy"],
        "engine_s": seen["engine_ready"] - seen["engine"], "rl_steps_s": steps, "evals_s": evals,
        "end_s": total - seen["done"],
        "before": rows[0]["eval/accuracy"], "after": [r for r in rows if "eval/accuracy" in r][-1]["eval/accuracy"],
        "curve": [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_default")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    grid = [(s, t) for t in args.threads for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda st: run(*st, args.out, extra), grid))
    head = ("seed", "thr", "total", "start", "build", "warm", "(steps)", "engine", "RL", "evals", "end", "before",
            "after", "gain")
    print(" ".join(f"{h:>7}" for h in head))
    for r in results:
        cells = [r["seed"], r["threads"], *(f"{r[k]:.0f}s" for k in ("total_s", "startup_s", "build_s",
                 "warm_start_s")), r["warm_start_steps"], *(f"{r[k]:.0f}s" for k in ("engine_s", "rl_steps_s",
                 "evals_s", "end_s")), f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['after'] - r['before']:+.3f}"]
        print(" ".join(f"{c:>7}" for c in cells))
    gains = [r["after"] - r["before"] for r in results]
    print(f"gain: median {statistics.median(gains):+.3f}, min {min(gains):+.3f}, max {max(gains):+.3f}; "
          f"total: median {statistics.median(r['total_s'] for r in results):.0f} s, "
          f"max {max(r['total_s'] for r in results):.0f} s")
    (args.out / "summary.json").write_text(json.dumps({"runs": results, "extra": extra}, indent=1))


if __name__ == "__main__":
    main()
