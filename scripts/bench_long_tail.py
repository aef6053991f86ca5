"""Stragglers under a long-tailed length mix: samples/s, trainer idle and server idle, for weights that change only
between batches (synchronous, and one step off) against in-flight weight updates with continuous batching.

    python scripts/bench_long_tail.py [--modes sync off1 inflight] [--seeds 0 1 2] [--steps 12]
                                      [--median 48] [--max-tokens 2048] [--server-cpus 0] [--trainer-cpus 1]
                                      [--out runs/bench_long_tail] [--reuse] [-- extra Hydra overrides]

Each run is the trainer with one rollout server (rollout.mode=server) on the default task and tiny model, pinned
to its own core, algo.prompts_per_step=16 x algo.group_size=4, under the long-tailed mix of scripts/_long_tail.py:
every request's length drawn from a Pareto (shape 1.1, median --median tokens, capped at --max-tokens; mean about
2.6x the median, the longest of a 16-group batch about 4.5x its mean). Modes:
  sync      algo.max_staleness=0: generate a batch, then train on it
  off1      algo.max_staleness=1 (and algo.tis_cap=2.0): the next batch generates while the trainer updates
  inflight  off1 with rollout.server.in_flight=keep: groups sent continuously, weights loaded mid-request
  recompute off1 with rollout.server.in_flight=recompute

samples/s: responses of the RL steps over the steps' wall time (start-up excluded); tok/s: their tokens over the
same time. In flight the two differ in kind: a step takes the groups that finish first, and a group past
algo.max_off_policy_steps is dropped, so over a short run the responses trained on are shorter than the mix's
(`len`): compare tokens/s. trainer idle: the share of the steps' time the trainer waited for its batch. server idle: the share of it with no request on the server (the
producer waiting for room: async/engine_idle_s, or async/server_idle_s in flight).
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

GROUP = 4  # algo.group_size of every run
MODES = {
    "sync": ["algo.max_staleness=0"],
    "off1": ["algo.max_staleness=1", "algo.tis_cap=2.0"],
    "inflight": ["algo.max_staleness=1", "algo.tis_cap=2.0", "rollout.server.in_flight=keep"],
    "recompute": ["algo.max_staleness=1", "algo.tis_cap=2.0", "rollout.server.in_flight=recompute"],
}


def run(mode: str, seed: int, args, extra: list[str]) -> dict:
    name = f"{mode}-seed{seed}"
    run_dir = args.out / name
    done = run_dir / "bench.json"
    if args.reuse and done.exists():  # a run an earlier invocation finished, with the same settings
        result = json.loads(done.read_text())
        if result.get("settings") == settings(args, extra):
            print(f"{name}: reusing {done}", flush=True)
            return figures(run_dir, mode, seed) | {"total_s": result["total_s"], "settings": result["settings"]}
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["taskset", "-c", args.trainer_cpus, sys.executable, str(ROOT / "scripts" / "_long_tail.py"),
           "rollout.mode=server", *MODES[mode], f"rollout.server.cpus=[{args.server_cpus}]",
           f"rollout.server.port={args.port}", f"rollout.max_tokens={args.max_tokens}",
           f"rollout.max_model_len={args.max_tokens + 128}", "rollout.kv_cache_gb=1",
           "algo.prompts_per_step=16", f"algo.group_size={GROUP}", f"trainer.seed={seed}", f"rollout.seed={seed}",
           f"trainer.steps={args.steps}", "trainer.eval_every=0", f"model.cache_dir={args.out / 'cache'}",
           f"trainer.output_dir={run_dir}", "logger.progress=false", "logger.wandb_mode=disabled", *extra]
    start = time.perf_counter()
    follow(cmd, args.out / f"{name}.log", name,
           env={**os.environ, "OMP_NUM_THREADS": "1", "LONG_TAIL_MEDIAN": str(args.median)})
    result = figures(run_dir, mode, seed) | {"total_s": time.perf_counter() - start,
                                             "settings": settings(args, extra)}
    done.write_text(json.dumps(result))
    return result


def figures(run_dir: Path, mode: str, seed: int) -> dict:
    """A run's figures from its metrics.jsonl (the RL steps only)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    seconds = sum(r["time/step_s"] for r in steps)
    samples = sum(r["sampling/prompts"] * GROUP for r in steps)
    tokens = sum(r["rollout/len_mean"] * r["sampling/prompts"] * GROUP for r in steps)
    idle = "async/server_idle_s" if mode in ("inflight", "recompute") else "async/engine_idle_s"
    return {
        "mode": mode, "seed": seed, "rl_s": seconds, "samples": samples, "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds, "len_mean": tokens / samples,
        "trainer_idle": sum(r["async/trainer_idle_s"] for r in steps) / seconds,
        "server_idle": sum(r[idle] for r in steps) / seconds,
        "span_frac": statistics.mean(r.get("async/span_frac", 0.0) for r in steps),
        "staleness_max": max(r["async/staleness"] for r in steps),
        "dropped": sum(r.get("async/dropped_groups", 0.0) for r in steps),
    }


def settings(args, extra: list[str]) -> dict:
    return {"steps": args.steps, "median": args.median, "max_tokens": args.max_tokens, "extra": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["sync", "off1", "inflight"], choices=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--median", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--trainer-cpus", default="1")
    parser.add_argument("--port", type=int, default=8260)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_long_tail")
    parser.add_argument("--reuse", action="store_true", help="keep the runs an earlier invocation finished")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for mode in args.modes:
            results.append(r := run(mode, seed, args, extra))
            print(f"{mode} seed {seed}: {r['samples_per_s']:.2f} samples/s, trainer idle {r['trainer_idle']:.0%}, "
                  f"server idle {r['server_idle']:.0%} ({r['total_s']:.0f} s)", flush=True)
    head = ("mode", "seed", "samples", "RL s", "samp/s", "tok/s", "len", "tr idle", "sv idle", "span", "stale",
            "dropped")
    print(" ".join(f"{h:>9}" for h in head))
    for r in results:
        cells = [r["mode"], r["seed"], r["samples"], f"{r['rl_s']:.0f}", f"{r['samples_per_s']:.2f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['len_mean']:.0f}", f"{r['trainer_idle']:.0%}",
                 f"{r['server_idle']:.0%}", f"{r['span_frac']:.2f}", f"{r['staleness_max']:.0f}",
                 f"{r['dropped']:.0f}"]
        print(" ".join(f"{c:>9}" for c in cells))
    base = args.modes[1] if len(args.modes) > 1 and args.modes[0] == "sync" else args.modes[0]
    summary = {}
    for mode in args.modes:
        mine = [r for r in results if r["mode"] == mode]
        pairs = [(r, b) for r in mine for b in results if b["mode"] == base and b["seed"] == r["seed"]]
        ratios = [r["samples_per_s"] / b["samples_per_s"] for r, b in pairs]
        token_ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in pairs]
        summary[mode] = {"samples_per_s_median": statistics.median(r["samples_per_s"] for r in mine),
                         f"ratio_vs_{base}_median": statistics.median(ratios),
                         "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in mine),
                         f"token_ratio_vs_{base}_median": statistics.median(token_ratios),
                         "trainer_idle_median": statistics.median(r["trainer_idle"] for r in mine),
                         "server_idle_median": statistics.median(r["server_idle"] for r in mine)}
        s = summary[mode]
        print(f"{mode}: {s['samples_per_s_median']:.2f} samples/s (x{s[f'ratio_vs_{base}_median']:.2f} {base}, "
              f"seed by seed), {s['tokens_per_s_median']:.0f} trained tokens/s (x{s[f'token_ratio_vs_{base}_median']:.2f}"
              f"), trainer idle {s['trainer_idle_median']:.0%}, server idle {s['server_idle_median']:.0%}")
    (args.out / "summary.json").write_text(json.dumps({"runs": results, "summary": summary, "extra": extra,
                                                       "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
