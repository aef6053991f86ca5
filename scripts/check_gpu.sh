#!/usr/bin/env bash
# The GPU checks of the LM-head logprobs in one go: the logprob tests on CUDA, errors against float64, and the
# timings of scripts/bench_logprobs.py at Qwen's and MiniMax-M1's heads (80k tokens). Tables go to stdout and
# to OUTDIR. Runs with the machine's python3 (torch + triton; liger_kernel is timed too when installed).
#
#     scripts/check_gpu.sh [OUTDIR]
set -u
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_logprobs.py tests/test_logprobs_triton.py 2>&1 \
  | tail -8 | tee "$out/pytest.txt"
timeout 60 python3 scripts/bench_logprobs.py --device cuda --accuracy --out "$out/accuracy.json" 2>&1 \
  | tee "$out/accuracy.txt"
timeout 300 python3 scripts/bench_logprobs.py --device cuda --out "$out/bench.json" \
  --shapes 81920x3584x152064,8192x3584x152064,81920x6144x200064 2>&1 | tee "$out/bench.txt"
timeout 90 python3 scripts/bench_logprobs.py --device cuda --out "$out/chunks.json" --shapes 81920x3584x152064 \
  --methods hinted --chunk-sizes 1536,2048,4096 2>&1 | tee "$out/chunks.txt"
timeout 60 python3 scripts/bench_logprobs.py --device cuda --profile hinted --shapes 81920x3584x152064 2>&1 \
  | tee "$out/profile.txt"
