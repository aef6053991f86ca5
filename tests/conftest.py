"""Shared test set-up: one torch thread per process (two cores are easily oversubscribed), CPU by default,
Triton in its interpreter when there is no GPU."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU tensors (tests/test_logprobs_triton.py). It is chosen when
    # a kernel is decorated, triton's own library included, so it is set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
