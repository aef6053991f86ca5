"""Keep the training prompts a model solves sometimes but not always (MiniMax-M1 §4: a strong reasoning model's
pass rate over 10 samples strictly between 0 and 0.9).

Samples k answers per training prompt with the rollout engine (vLLM or transformers, as in training), grades them
with the run's reward, and keeps the prompts whose pass rate (share of the k answers graded correct) lies strictly
inside (--low, --high). Writes to --out:
    train.jsonl       the kept training rows (the row format of cispo/data/, plus pass_rate)
    test.jsonl        the held-out rows, unfiltered
    pass_rates.jsonl  every sampled prompt: id, correct, k, pass_rate, kept
    summary.json      settings, counts and the pass-rate histogram before and after
so that training on the result is `data.source=<out> data.eval_split=test`.

    cispo filter --k 8 --limit 64 --out runs/filtered            # the tiny task
    cispo filter --k 10 --out data/dapo_filtered -- data=dapo_math_17k \\
        model.path=<a strong reasoning model> rollout=m1_40k rollout.engine=vllm

Everything after the options (or after --) is a Hydra override of the training config (configs/train.yaml): the
model that samples, the data, the rollout budget and temperature, the reward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from cispo.compose import compose, to_config
from cispo.config import Config
from cispo.sampling.evaluation import grade


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="cispo filter", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="answers sampled per prompt (M1: 10)")
    parser.add_argument("--low", type=float, default=0.0, help="keep pass rates strictly above this (M1: 0)")
    parser.add_argument("--high", type=float, default=0.9, help="keep pass rates strictly below this (M1: 0.9)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training prompts")
    parser.add_argument("--batch-prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    if args.k < 1 or args.batch_prompts < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--k, --batch-prompts and --limit must be >= 1")
    if not 0.0 <= args.low < args.high <= 1.0:
        parser.error("need 0 <= --low < --high <= 1")
    return args, overrides


def compose_config(overrides: list[str]) -> Config:
    return to_config(compose("train", overrides))


def histogram(correct: list[int], k: int) -> list[int]:
    """Number of prompts with c correct answers, c = 0 .. k."""
    counts = Counter(correct)
    return [counts[c] for c in range(k + 1)]


def sample_pass_counts(cfg: Config, rows: list[dict], k: int, batch_prompts: int, scorer, model_dir: str) -> list[int]:
    """Correct answers out of k for each row, sampled with the rollout engine at the training settings."""
    from transformers import AutoTokenizer
    from tqdm import tqdm

    from cispo.data.prompts import encode_prompts
    from rollout import build_engine, resolve_engine
    from rollout.base import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    kind = resolve_engine(cfg.rollout, model_dir)
    cfg.rollout.check_engine(kind)
    engine = build_engine(kind, model_dir, cfg.rollout, cfg.model, cfg.trainer.seed)
    correct = [0] * len(rows)
    try:
        for lo in tqdm(range(0, len(rows), batch_prompts), desc="sampling", unit="batch"):
            chunk = rows[lo : lo + batch_prompts]
            sampling = SamplingParams(n=k, max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature,
                                      top_p=cfg.rollout.top_p, seed=cfg.rollout.seed + lo)
            done = engine.generate(encode_prompts(tokenizer, chunk, cfg.data), sampling).completions
            graded = grade(scorer, done, [chunk[c.prompt_index] for c in done], cfg.rollout.max_tokens)
            for c, result in zip(done, graded.results):
                correct[lo + c.prompt_index] += result.status == "correct"
    finally:
        engine.close()
    return correct


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose_config(overrides)
    from cispo.data.load import load_splits
    from cispo.start.warm_start import prepare_model
    from rewards import RewardScorer

    start = time.monotonic()
    with RewardScorer(cfg.reward) as scorer:
        splits = load_splits(cfg.data, scorer)
        rows = splits.train[: args.limit] if args.limit else splits.train
        model_dir = prepare_model(cfg, splits.train)
        correct = sample_pass_counts(cfg, rows, args.k, args.batch_prompts, scorer, model_dir)
    rates = [c / args.k for c in correct]
    kept = [args.low < r < args.high for r in rates]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", [row | {"pass_rate": r} for row, r, keep in zip(rows, rates, kept) if keep])
    write_jsonl(args.out / "test.jsonl", splits.eval)
    write_jsonl(args.out / "pass_rates.jsonl", [{"id": row["id"], "correct": c, "k": args.k, "pass_rate": r,
                                                  "kept": keep} for row, c, r, keep in zip(rows, correct, rates, kept)])
    after = [c for c, keep in zip(correct, kept) if keep]
    summary = {
        "model": model_dir, "k": args.k, "band": [args.low, args.high], "data": cfg.data.source,
        "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p, "max_tokens": cfg.rollout.max_tokens,
        "prompts": len(rows), "kept": len(after), "held_out": len(splits.eval),
        "skipped_malformed": len(splits.report.skipped),
        "mean_pass_rate_before": sum(rates) / len(rates) if rates else 0.0,
        "mean_pass_rate_after": sum(after) / (args.k * len(after)) if after else 0.0,
        "histogram_before": histogram(correct, args.k), "histogram_after": histogram(after, args.k),
        "seconds": round(time.monotonic() - start, 1), "overrides": overrides,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary, args.out))
    return summary


def format_summary(s: dict, out: Path) -> str:
    k = s["k"]
    lines = [f"{s['prompts']} prompts x {k} samples ({s['model']}, temperature {s['temperature']}, "
             f"max_tokens {s['max_tokens']}): kept {s['kept']} with pass rate in ({s['band'][0]}, {s['band'][1]})",
             f"mean pass rate: {s['mean_pass_rate_before']:.3f} before, {s['mean_pass_rate_after']:.3f} after",
             f"{'correct':>8} {'rate':>6} {'before':>7} {'after':>6}"]
    for c in range(k + 1):
        lines.append(f"{c:>5}/{k:<2} {c / k:>6.3f} {s['histogram_before'][c]:>7} {s['histogram_after'][c]:>6}")
    lines.append(f"wrote {out}/train.jsonl, test.jsonl, pass_rates.jsonl, summary.json; train on it with "
                 f"data.source={out} data.eval_split=test")
    return "\n".join(lines)

