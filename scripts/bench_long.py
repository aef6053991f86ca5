"""Peak memory and time of one training step against response length: does the long path stay bounded?

    python scripts/bench_long.py                                   # 4k, 16k, 40k, 80k; checkpointing off and on
    python scripts/bench_long.py --lengths 4000,16000 --threads 1 --out bench_long.json --png bench_long.png

Each point runs in a fresh process (so its peak is its own) on the tiny model of experiment=tiny_80k (random
weights; speed and memory depend on neither them nor the token ids) with `--responses` responses of T tokens
after a 32-token prompt, and measures two phases with cispo.phases.PhaseMonitor:

  pi_old   the forward-only pass the trainer runs for every mini-batch but the first (no_grad)
  update   cispo.train.update.update_policy with one update: the packed micro-batch's forward (attention
           cispo.model.policy.packed_attention, LM head cispo.model.logprobs in chunks), the CISPO loss, backward, AdamW

Memory is the process's resident set at its peak in each phase, less the resident set before the first phase
(the model, the optimizer, torch itself). The table gives, per phase, the slope of a least-squares line through
the points (MB per 1k tokens) and its R^2: a slope that stays put from 4k to 80k is memory linear in T, with
nothing quadratic (T x T scores) or T x V (full logits) in it. Time is quadratic in T (causal attention).
The kernel line says which scaled-dot-product-attention kernel the packed path ran (profiled at 1k tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts._follow import follow  # noqa: E402

PROMPT = 32


def worker(length: int, responses: int, checkpointing: bool, threads: int, cache_dir: str) -> dict:
    import torch

    from cispo.algo.batch import Sample, micro_batches
    from cispo.train.collective import Dist
    from cispo.config import Config, ModelConfig, TinyModelConfig
    from cispo.phases import PhaseMonitor, rss_bytes
    from cispo.train.optim import TorchUpdater
    from cispo.model.policy import load_policy, micro_batch_logprobs
    from cispo.model.tiny_model import make_tiny_model
    from cispo.train.update import update_policy

    torch.set_num_threads(threads)
    tiny = TinyModelConfig(max_positions=81920)
    cfg = Config(model=ModelConfig(tiny=tiny, gradient_checkpointing=checkpointing))
    cfg.trainer.max_tokens_per_micro = responses * (PROMPT + length)  # one micro-batch, as tiny_80k packs it
    cfg.algo.updates_per_step = 1
    policy, _ = load_policy(str(make_tiny_model(tiny, cache_dir)), cfg.model)
    updater = TorchUpdater(policy, cfg.trainer, Dist())
    vocab, rng = policy.config.vocab_size, torch.Generator().manual_seed(0)  # the same tokens at every point
    samples = [Sample(prompt_ids=torch.randint(3, vocab, (PROMPT,), generator=rng).tolist(),
                      response_ids=torch.randint(3, vocab, (length,), generator=rng).tolist(), loss_mask=[True] * length,
                      rollout_logp=torch.full((length,), -6.0), adv=1.0 if i % 2 else -1.0, group=0)
               for i in range(responses)]
    memory, base = PhaseMonitor(lambda text: print(text, file=sys.stderr, flush=True)), rss_bytes()
    timings = {}
    with memory.phase("pi_old"), torch.no_grad():
        start = time.perf_counter()
        for mb in micro_batches(samples, list(range(responses)), cfg.trainer.max_tokens_per_micro, None):
            micro_batch_logprobs(policy, mb, temperature=1.0, fp32_head=False)
        timings["pi_old"] = time.perf_counter() - start
    with memory.phase("update"):
        start = time.perf_counter()
        stats = update_policy(cfg, 1, updater, samples)
        timings["update"] = time.perf_counter() - start
    peaks = memory.metrics()
    return {"length": length, "responses": responses, "checkpointing": checkpointing, "threads": threads,
            "base_gb": base / 2**30, "grad_norm": stats["train/grad_norm"],
            **{f"{p}_s": timings[p] for p in timings},
            **{f"{p}_gb": peaks[f"memory/{p}_peak_gb"] - base / 2**30 for p in timings}}


def attention_kernel(threads: int) -> list[str]:
    """The aten attention ops the packed path runs, forward and backward, on a 1k-token sequence."""
    import torch

    from cispo.model.attention import packed_attention

    torch.set_num_threads(threads)
    q = torch.randn(1, 2, 1024, 64, requires_grad=True)
    kv = torch.randn(1, 1, 1024, 64, requires_grad=True)
    with torch.profiler.profile() as prof:
        packed_attention(None, q, kv, kv, None, position_ids=torch.arange(1024)[None])[0].sum().backward()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::_")})


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys against xs, and R^2."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    ss = sum((y - my) ** 2 for y in ys)
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, 1 - resid / ss if ss else 1.0


def run_point(args, length: int, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(length), "--responses", str(args.responses),
           "--threads", str(args.threads), "--cache-dir", args.cache_dir, "--checkpointing", "on" if checkpointing else "off"]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    label = f"T={length} checkpointing={'on' if checkpointing else 'off'}"
    log = Path(tempfile.gettempdir()) / f"bench_long-T{length}-{'ckpt' if checkpointing else 'plain'}.log"
    follow(cmd, log, label, env=env)
    return json.loads(next(line for line in reversed(log.read_text().splitlines()) if line.startswith("{")))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for gc in sorted({r["checkpointing"] for r in rows}):
        pts = [r for r in rows if r["checkpointing"] == gc]
        xs = [r["length"] / 1000 for r in pts]
        tag = "checkpointing" if gc else "no checkpointing"
        mem.plot(xs, [r["update_gb"] for r in pts], "o-", label=f"update, {tag}")
        mem.plot(xs, [r["pi_old_gb"] for r in pts], "s--", label=f"pi_old, {tag}")
        sec.plot(xs, [r["update_s"] for r in pts], "o-", label=f"update, {tag}")
        sec.plot(xs, [r["pi_old_s"] for r in pts], "s--", label=f"pi_old, {tag}")
    mem.set(xlabel="response tokens (k)", ylabel="peak RSS above the model (GB)", title="memory")
    sec.set(xlabel="response tokens (k)", ylabel="seconds", title="time")
    for ax in (mem, sec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4000,16000,40000,80000", help="response lengths, comma-separated")
    p.add_argument("--responses", type=int, default=1, help="responses of that length in the step")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on or off,on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/cispo-rl"))
    p.add_argument("--out", default="bench_long.json")
    p.add_argument("--png", default="bench_long.png")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        gc = args.checkpointing == "on"
        print(json.dumps(worker(args.worker, args.responses, gc, args.threads, args.cache_dir)))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = [{"off": False, "on": True}[m] for m in args.checkpointing.split(",")]
    kernel = attention_kernel(args.threads)
    print(f"attention kernels of the packed path: {', '.join(kernel)}", flush=True)
    rows = []
    for gc in modes:
        for length in lengths:
            print(f"T={length} x {args.responses}, checkpointing {'on' if gc else 'off'} ...", flush=True)
            rows.append(run_point(args, length, gc))
    print(f"\n{'T':>7} {'ckpt':>5} {'pi_old s':>9} {'pi_old GB':>10} {'update s':>9} {'update GB':>10} {'base GB':>8}")
    for r in rows:
        print(f"{r['length']:>7} {'on' if r['checkpointing'] else 'off':>5} {r['pi_old_s']:>9.1f} "
              f"{r['pi_old_gb']:>10.3f} {r['update_s']:>9.1f} {r['update_gb']:>10.3f} {r['base_gb']:>8.2f}")
    slopes = {}
    for gc in modes:
        pts = [r for r in rows if r["checkpointing"] == gc]
        for phase in ("pi_old", "update"):
            if len(pts) > 1:
                slope, r2 = fit([r["length"] / 1000 for r in pts], [r[f"{phase}_gb"] * 1024 for r in pts])
                slopes[f"{phase}/{'on' if gc else 'off'}"] = {"mb_per_1k_tokens": slope, "r2": r2}
                print(f"memory slope, {phase}, checkpointing {'on' if gc else 'off'}: {slope:.1f} MB per 1k tokens "
                      f"(R^2 {r2:.4f})")
    result = {"rows": rows, "slopes": slopes, "attention_kernels": kernel, "responses": args.responses,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": __import__("torch").__version__}
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(rows, args.png)
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
