"""Time and peak memory of `cispo.logprobs.token_logprobs` against the naive way, forward + backward.

    python scripts/bench_logprobs.py                      # CPU grid, 1 thread, table + bench_logprobs.json
    python scripts/bench_logprobs.py --chunk-sizes 64,128,256,512 --shapes 8192x256x32768   # chunk sweep
    python scripts/bench_logprobs.py --device cuda        # GPU shapes (bf16, 80k tokens, Qwen / M1 heads)

One step = logp and entropy for T tokens, then backward of sum(logp * adv) into hidden [T, H] and weight [V, H].
"naive" is `log_softmax(hidden @ weight.T / temperature).gather(targets)` with the entropy from the same
log-probabilities (under no_grad, as the metric is detached).

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
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cispo.logprobs import token_logprobs  # noqa: E402

CPU_SHAPES = "2048x256x8192,2048x256x32768,8192x256x8192,8192x256x32768"  # T x H x V; the goal case last
CUDA_SHAPES = "8192x3584x152064,81920x3584x152064,8192x6144x200064,81920x6144x200064"
TEMPERATURE = 0.7  # not 1, so the temperature scaling is part of what is timed


def naive(hidden, weight, targets, temperature):
    logp_all = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(spec: dict) -> dict:
    """Runs in a fresh process: one method on one shape; returns ms and peak extra MiB."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    T, H, V = spec["T"], spec["H"], spec["V"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=gen) * H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), device=device, generator=gen)
    adv = torch.randn(T, device=device, generator=gen)

    def step():
        if spec["method"] == "naive":
            logp, _ = naive(hidden, weight, targets, TEMPERATURE)
        else:
            out = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE,
                                 fp32_head=spec["method"] == "chunked_fp32_head", chunk_size=spec["chunk_size"])
            logp = out.logp
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


def main() -> None:
    default_chunk = token_logprobs.__kwdefaults__["chunk_size"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", help="comma-separated TxHxV (default: a CPU grid, or the GPU shapes on CUDA)")
    ap.add_argument("--dtype", help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--chunk-sizes", help=f"comma-separated chunk sizes (default: {default_chunk} on CPU, 4096 on GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every method")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_logprobs.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    chunks = [int(c) for c in (args.chunk_sizes or str(4096 if cuda else default_chunk)).split(",")]
    methods = [("naive", None)] + [("chunked", c) for c in chunks]
    if cuda:
        methods.append(("chunked_fp32_head", chunks[0]))
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
    print(f"# {device_name}, {dtype}, temperature {TEMPERATURE}, median of {args.repeats}, torch {torch.__version__}")
    print(f"{'T':>6} {'H':>5} {'V':>7} {'method':>18} {'chunk':>6} {'ms':>9} {'cpu ms':>9} {'extra MiB':>10} "
          f"{'time x':>7} {'mem x':>7}")
    time_key = "ms" if cuda else "cpu_ms"
    rows = []
    for shape in (args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)).split(","):
        T, H, V = (int(x) for x in shape.split("x"))
        ref = None
        for method, chunk in methods:
            spec = dict(device=args.device, dtype=dtype, T=T, H=H, V=V, method=method, chunk_size=chunk,
                        threads=args.threads, repeats=args.repeats)
            res = run_in_subprocess(spec)
            row = {**spec, **res}
            ref = row if method == "naive" else ref
            ok = ref is not None and ref["ms"] is not None and res["ms"] is not None
            row["time_vs_naive"] = res[time_key] / ref[time_key] if ok else None
            row["mem_vs_naive"] = res["extra_mib"] / ref["extra_mib"] if ok else None
            rows.append(row)
            print(f"{T:>6} {H:>5} {V:>7} {method:>18} {_fmt(chunk, ''):>6} {_fmt(res['ms'], '.1f'):>9} "
                  f"{_fmt(res['cpu_ms'], '.1f'):>9} {_fmt(res['extra_mib'], '.1f'):>10} "
                  f"{_fmt(row['time_vs_naive'], '.2f'):>7} {_fmt(row['mem_vs_naive'], '.3f'):>7} {res['note']}",
                  flush=True)
    Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
