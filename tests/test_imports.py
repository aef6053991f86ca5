"""The pure modules need nothing but torch: small-scale CPU tests of the loss must not pull in the stack."""

import subprocess
import sys

import pytest

HEAVY = ("vllm", "deepspeed", "hydra", "omegaconf", "wandb", "transformers")


@pytest.mark.parametrize("module", ["cispo.algo.loss", "cispo.algo.advantages", "cispo.model.logprobs", "cispo.algo.batch"])
def test_pure_module_imports_only_torch(module):
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def test_rewards_import_no_stack():
    code = "import sys, rewards, rewards.math, rewards.code, rewards.sandbox; print(' '.join(m for m in " + repr(HEAVY + ("cispo", "torch")) + " if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
