"""The Triton kernels of cispo.model.logprobs against their torch twins and float64: on CUDA when there is a device,
else on CPU in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on a machine without one)."""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy deprecations inside the interpreter
from cispo.model import logprobs_triton  # noqa: E402
import cispo.model.logprobs as lp  # noqa: E402
from test_logprobs import make_inputs, reference, rel_err, run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# below one block, one block plus one, several blocks with a partial last one (the kernels step 4096 columns)
VOCABS = [300, logprobs_triton._BLOCK + 1, 9000]


def logits(C, V, dtype, seed=0):
    """z [C, V] of std ~3, targets [C] (half of them the argmax), g [C]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(C, V, generator=gen) * 3
    targets = torch.randint(0, V, (C,), generator=gen)
    targets[::2] = z.argmax(1)[::2]
    return z.to(DEVICE, dtype), targets.to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_stats_matches_float64(V, dtype):
    z, targets, _ = logits(6, V, dtype)
    zd = z.double() / 0.7
    logp_all = torch.log_softmax(zd, -1)
    ref = (torch.logsumexp(zd, -1), logp_all.gather(1, targets[:, None]).squeeze(1),
           -(logp_all.exp() * logp_all).sum(-1))
    got = logprobs_triton.softmax_stats(z, targets, 0.7)
    twin = lp.softmax_stats_torch(z, targets, 0.7)
    for name, g, t, r in zip(["lse", "logp", "entropy"], got, twin, ref):
        assert g.dtype == torch.float32, name
        # fp32 statistics of the same (possibly bf16) values; the online sum loses a little more than torch's
        assert rel_err(g, r) < 2e-6, name
        assert rel_err(t, r) < 2e-6, name


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [True, False])
def test_logit_grad_matches_torch_twin(V, dtype, in_place):
    z, targets, g = logits(6, V, dtype)
    lse = torch.logsumexp(z.float() / 0.7, -1)
    want = lp.logit_grad_torch(z.clone(), lse, targets, g, 0.7, out=torch.empty_like(z))
    src = z.clone()
    out = src if in_place else torch.full_like(z, float("nan"))  # poisoned: every element must be written
    got = logprobs_triton.logit_grad(src, lse, targets, g, 0.7, out=out)
    assert got is out and got.dtype == dtype
    # x / T against x * (1 / T) and two exp implementations: bf16 outputs may differ in the last bit (<= 2^-7)
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 8e-3)
    if not in_place:
        assert torch.equal(src, z)  # the logits are only read


def test_logit_grad_into_a_low_precision_buffer():
    """fp32 logits (fp32_head) with the gradient written as bf16 into a separate buffer."""
    z, targets, g = logits(5, 9000, torch.float32)
    lse = torch.logsumexp(z / 1.3, -1)
    want = lp.logit_grad_torch(z.clone(), lse, targets, g, 1.3, out=z.clone())
    got = logprobs_triton.logit_grad(z, lse, targets, g, 1.3, out=torch.empty_like(z, dtype=torch.bfloat16))
    assert rel_err(got, want) < 8e-3


@pytest.mark.parametrize("fp32_head", [False, True])
@pytest.mark.parametrize("hinted", [False, True])
def test_token_logprobs_with_the_kernels(monkeypatch, fp32_head, hinted):
    """The whole function with the Triton kernels doing the elementwise work, as on CUDA."""
    monkeypatch.setattr(lp, "_kernels", lambda device: (logprobs_triton.softmax_stats, logprobs_triton.logit_grad))
    hidden, weight, targets, grad_logp = make_inputs(37, H=32, V=5000, dtype=torch.bfloat16, device=DEVICE)
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    hint = (lambda logp, rows: grad_logp[rows]) if hinted else None
    got = run(hidden, weight, targets, grad_logp, temperature=0.7, fp32_head=fp32_head, chunk_size=16,
              grad_hint=hint)
    tol = 1e-5 if fp32_head else 2e-2  # bf16 logits, as in test_logprobs
    assert rel_err(got[0], ref[0]) < tol and rel_err(got[1], ref[1]) < tol
    assert rel_err(got[2], ref[2]) < 2e-2 and rel_err(got[3], ref[3]) < 2e-2
