"""Time and peak memory of `cispo.model.logprobs.token_logprobs` against the naive way, forward + backward.

    python scripts/bench_logprobs.py                      # CPU grid, 1 thread, table + bench_logprobs.json
    python scripts/bench_logprobs.py --chunk-sizes 64,128,256,512 --shapes 8192x256x32768   # chunk sweep
    python scripts/bench_logprobs.py --device cuda        # GPU shapes (bf16, 80k tokens, Qwen / M1 heads)
    python scripts/bench_logprobs.py --device cuda --accuracy   # errors against float64 instead of timings
    python scripts/bench_logprobs.py --device cuda --profile hinted --shapes 81920x3584x152064  # kernel times

One step = logp and entropy for T tokens, then backward of sum(logp * adv) into hidden [T, H] and weight [V, H].
Methods:
  naive       `log_softmax(hidden @ weight.T / temperature).gather(targets)`, the entropy from the same
              log-probabilities (under no_grad, as the metric is detached)
  chunked     token_logprobs: logits recomputed in backward (4 matmuls)
  hinted      token_logprobs with grad_hint = adv, what the loss sends back: gradients in forward (3 matmuls)
  *_fp32_head the same with fp32 logits from bf16 inputs (CUDA only)
  *_torch     the same with the torch twins of the Triton kernels on CUDA (what the kernels buy)
  liger       Liger-Kernel's fused linear cross-entropy, reduction="none" (CUDA, when installed): no entropy,
              no temperature, no fp32 head; its logp is minus its per-token loss

Time is the median of --repeats steps after a warm-up step and the memory-measured step, as wall time ("ms") and
as the process's CPU time ("cpu ms", user + sys of all its threads). On CPU the ratio to naive ("time x") uses
CPU time: this machine is shared, and wall time of a fixed-thread run counts the neighbours' work too, while CPU
time counts what the method itself did (page faults included, as sys time). On CUDA it uses wall time.

Peak extra memory is measured per (shape, method) in a fresh subprocess, so that nothing one method freed can
hide another's allocations:
  - CPU: the torch CPU allocator returns large blocks to the OS, so the process's resident set tracks live
    tensors. After the inputs exist, the worker calls malloc_trim(0) (hand back freed heap), reads VmRSS, resets
    the kernel's peak-RSS mark (echo 5 > /proc/self/clear_refs), runs one step and reads VmHWM. Extra =
    VmHWM - VmRSS before the step: everything the step touched, gradients and allocator slack included. Python's
    tracemalloc cannot see torch's allocations; RSS sampling from a thread would miss short peaks.
  - CUDA: torch.cuda.max_memory_allocated() during one step minus memory_allocated() before it.
Both measure the second step of the process, after a warm-up step, as in a training loop.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cispo.model.logprobs import default_chunk_size, token_logprobs  # noqa: E402

CPU_SHAPES = "2048x256x8192,2048x256x32768,8192x256x8192,8192x256x32768"  # T x H x V; the goal case last
CUDA_SHAPES = "8192x3584x152064,81920x3584x152064,8192x6144x200064,81920x6144x200064"
TEMPERATURE = 0.7  # not 1, so the temperature scaling is part of what is timed


METHODS_CPU = ("naive", "chunked", "hinted")
METHODS_CUDA = ("naive", "chunked", "hinted", "hinted_fp32_head", "liger")


def naive(hidden, weight, targets, temperature):
    logp_all = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def run_method(method, hidden, weight, targets, adv, chunk_size):
    """(logp [T], entropy [T] or None where the method has none) of one method."""
    if method == "naive":
        return naive(hidden, weight, targets, TEMPERATURE)
    if method == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")
        return -loss[0], None
    hint = (lambda logp, rows: adv[rows]) if method.startswith("hinted") else None
    out = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE, fp32_head="fp32_head" in method,
                         chunk_size=chunk_size, grad_hint=hint)
    return out.logp, out.entropy


def make_inputs(T, H, V, device, dtype):
    """Seeded hidden [T, H] and weight [V, H] (requiring grad), targets [T], adv [T]."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=gen) * H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), device=device, generator=gen)
    return hidden, weight, targets, torch.randn(T, device=device, generator=gen)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(spec: dict) -> dict:
    """Runs in a fresh process: one method on one shape; returns ms and peak extra MiB."""
    if spec["method"].endswith("_torch"):
        import cispo.model.logprobs as lp

        lp._kernels = lambda device: (lp.softmax_stats_torch, lp.logit_grad_torch)
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    hidden, weight, targets, adv = make_inputs(spec["T"], spec["H"], spec["V"], device, dtype)

    def step():
        logp = run_method(spec["method"], hidden, weight, targets, adv, spec["chunk_size"])[0]
        (logp * adv).sum().backward()
        hidden.grad = weight.grad = None  # each step allocates its gradients again, as a training step does

    try:
        step()  # warm-up: one-time costs (kernel selection, library code paged in) stay out of both numbers
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            base = _proc_status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            step()
            extra_mib = (_proc_status_kib("VmHWM") - base) / 1024
    except torch.OutOfMemoryError:
        return {"ms": None, "cpu_ms": None, "extra_mib": None, "note": "OOM"}
    wall, cpu = [], []
    for _ in range(spec["repeats"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"ms": statistics.median(wall), "cpu_ms": statistics.median(cpu), "extra_mib": extra_mib, "note": ""}


def run_in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        error = proc.stderr.strip().splitlines()[-1:]
        return {"ms": None, "cpu_ms": None, "extra_mib": None, "note": f"failed: {error}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


ACCURACY_SHAPE = "8192x1024x32768"


def accuracy(device: str, out: str, shape: str) -> None:
    """Relative L2 error against float64 of logp, entropy and both gradients, bf16 inputs.

    "random": random hidden states and targets, adv ~ N(0, 1). "repeated": one hidden state and target repeated
    T times with adv 0.3, every chunk adding the same partial to the same rows of d weight, the worst case for a
    weight gradient summed in bf16 over chunks. Chunks of 512 (16 of them at T=8192) and the default."""
    T, H, V = (int(x) for x in shape.split("x"))
    gen = torch.Generator(device=device).manual_seed(0)
    base = dict(hidden=torch.randn(T, H, device=device, generator=gen).bfloat16(),
                weight=(torch.randn(V, H, device=device, generator=gen) * 3 * H**-0.5).bfloat16(),
                targets=torch.randint(0, V, (T,), device=device, generator=gen),
                adv=torch.randn(T, device=device, generator=gen))
    repeated = dict(hidden=base["hidden"][:1].expand(T, -1).contiguous(), weight=base["weight"],
                    targets=base["targets"][:1].expand(T).contiguous(), adv=torch.full((T,), 0.3, device=device))
    # liger is left out: it has no temperature, so it computes another function
    methods = [m for m in (METHODS_CUDA if device == "cuda" else METHODS_CPU) if m != "liger"]
    print(f"# errors against float64, T={T} H={H} V={V}, bf16 inputs, temperature {TEMPERATURE}")
    print(f"{'case':>9} {'method':>18} {'chunk':>6} {'logp':>9} {'entropy':>9} {'d hidden':>9} {'d weight':>9}")
    rows = []
    for case, x in (("random", base), ("repeated", repeated)):
        h64 = x["hidden"].double().requires_grad_()
        w64 = x["weight"].double().requires_grad_()
        logp_all = torch.log_softmax(h64 @ w64.T / TEMPERATURE, -1)
        ref_logp = logp_all.gather(1, x["targets"][:, None]).squeeze(1)
        ref_entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
        (ref_logp * x["adv"].double()).sum().backward()
        ref = (ref_logp.detach(), ref_entropy, h64.grad, w64.grad)
        del logp_all, h64, w64
        for method in methods:
            for chunk in ((None,) if method == "naive" else (512, None)):
                hidden = x["hidden"].clone().requires_grad_()
                weight = x["weight"].clone().requires_grad_()
                logp, entropy = run_method(method, hidden, weight, x["targets"], x["adv"], chunk)
                (logp * x["adv"]).sum().backward()
                got = (logp.detach(), entropy, hidden.grad, weight.grad)
                err = [((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
                shown = chunk or (None if method == "naive" else default_chunk_size(
                    V, torch.bfloat16, "fp32_head" in method, torch.device(device)))
                rows.append(dict(case=case, method=method, chunk_size=shown, logp=err[0], entropy=err[1],
                                 d_hidden=err[2], d_weight=err[3]))
                print(f"{case:>9} {method:>18} {_fmt(shown, ''):>6} " + " ".join(f"{_fmt(e, '.2e'):>9}" for e in err),
                      flush=True)
    Path(out).write_text(json.dumps({"device": _device_name(device, 1), "torch": torch.__version__, "rows": rows},
                                    indent=1))
    print(f"wrote {out}")


def profile(method: str, device: str, shape: str) -> None:
    """Kernel times of one step (after a warm-up step), the largest first."""
    T, H, V = (int(x) for x in shape.split("x"))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden, weight, targets, adv = make_inputs(T, H, V, device, dtype)

    def step():
        (run_method(method, hidden, weight, targets, adv, None)[0] * adv).sum().backward()
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        step()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(f"# {method} at T={T} H={H} V={V}, {_device_name(device, torch.get_num_threads())}")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def _available(method: str) -> bool:
    return method != "liger" or importlib.util.find_spec("liger_kernel") is not None


def _device_name(device: str, threads: int) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads} thread(s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", help="comma-separated TxHxV (default: a CPU grid, or the GPU shapes on CUDA)")
    ap.add_argument("--dtype", help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--methods", help=f"comma-separated (default: {','.join(METHODS_CPU)} on CPU, "
                                      f"{','.join(METHODS_CUDA)} on CUDA)")
    ap.add_argument("--chunk-sizes", default="auto",
                    help="comma-separated chunk sizes for token_logprobs; auto = its default for the device")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every method")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--accuracy", action="store_true", help="errors against float64 instead of timings")
    ap.add_argument("--profile", metavar="METHOD", help="one step of METHOD on the first shape under torch.profiler")
    ap.add_argument("--out", default="bench_logprobs.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.accuracy:
        return accuracy(args.device, args.out, args.shapes or ACCURACY_SHAPE)
    if args.profile:
        return profile(args.profile, args.device, (args.shapes or CUDA_SHAPES).split(",")[0])

    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    chunks = [None if c == "auto" else int(c) for c in args.chunk_sizes.split(",")]
    methods = args.methods.split(",") if args.methods else (METHODS_CUDA if cuda else METHODS_CPU)
    device_name = _device_name(args.device, args.threads)
    print(f"# {device_name}, {dtype}, temperature {TEMPERATURE}, median of {args.repeats}, torch {torch.__version__}")
    print(f"{'T':>6} {'H':>5} {'V':>7} {'method':>18} {'chunk':>6} {'ms':>9} {'cpu ms':>9} {'extra MiB':>10} "
          f"{'time x':>7} {'mem x':>7} {'TFLOP/s':>8}")
    time_key = "ms" if cuda else "cpu_ms"
    rows = []
    for shape in (args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)).split(","):
        T, H, V = (int(x) for x in shape.split("x"))
        ref = None
        for method in methods:
            for chunk in ((None,) if method in ("naive", "liger") else chunks):
                fp32_head = "fp32_head" in method
                shown = None if method in ("naive", "liger") else (
                    chunk or default_chunk_size(V, getattr(torch, dtype), fp32_head, torch.device(args.device)))
                spec = dict(device=args.device, dtype=dtype, T=T, H=H, V=V, method=method, chunk_size=shown,
                            threads=args.threads, repeats=args.repeats)
                res = _skip_reason(spec) or run_in_subprocess(spec)
                row = {**spec, **res}
                ref = row if method == "naive" else ref
                ok = ref is not None and ref["ms"] is not None and res["ms"] is not None
                row["time_vs_naive"] = res[time_key] / ref[time_key] if ok else None
                row["mem_vs_naive"] = res["extra_mib"] / ref["extra_mib"] if ok else None
                # the useful work: the three matmuls of logits, d hidden and d weight (2 T H V flops each)
                row["tflops"] = 6 * T * H * V / res["ms"] / 1e9 if res["ms"] else None
                rows.append(row)
                print(f"{T:>6} {H:>5} {V:>7} {method:>18} {_fmt(shown, ''):>6} {_fmt(res['ms'], '.1f'):>9} "
                      f"{_fmt(res['cpu_ms'], '.1f'):>9} {_fmt(res['extra_mib'], '.1f'):>10} "
                      f"{_fmt(row['time_vs_naive'], '.2f'):>7} {_fmt(row['mem_vs_naive'], '.3f'):>7} "
                      f"{_fmt(row['tflops'], '.3g'):>8} {res['note']}", flush=True)
    Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def _skip_reason(spec: dict) -> dict | None:
    """A result row for a run not worth starting: liger not installed, naive logits beyond the GPU's memory."""
    skip = None
    if not _available(spec["method"]):
        skip = "skipped: liger_kernel not installed"
    elif spec["method"] == "naive" and spec["device"] == "cuda":
        # bf16 logits, their fp32 copy, log_softmax, its gradient and the logits' gradient: ~14 bytes a logit
        need = 14 * spec["T"] * spec["V"]
        if need > torch.cuda.mem_get_info()[0]:
            skip = f"skipped: needs ~{need / 2**30:.0f} GiB"
    return skip and {"ms": None, "cpu_ms": None, "extra_mib": None, "note": skip}


if __name__ == "__main__":
    main()
