"""cispo.model.logprobs.token_logprobs against a float64 log_softmax on the same input values."""

from dataclasses import asdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cispo.config import AlgoConfig
from cispo.model.logprobs import CPU_CHUNK, default_chunk_size, token_logprobs
from cispo.algo.loss import logp_grad, loss_knobs, policy_loss

aten = torch.ops.aten


def make_inputs(T, H=24, V=300, dtype=torch.float32, device="cpu", seed=0):
    """hidden [T, H], weight [V, H] with logits of std ~3 (peaked, like a trained LM), targets [T] of which half
    are the argmax (logp near 0) and half uniform (logp far below), grad_logp [T]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 3 * H**-0.5
    targets = torch.randint(0, V, (T,), generator=gen)
    targets[::2] = (hidden @ weight.T).argmax(-1)[::2]
    grad_logp = torch.randn(T, generator=gen)
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(),
            targets.to(device), grad_logp.to(device))


def reference(hidden, weight, targets, grad_logp, temperature=1.0):
    """float64 logp, entropy, d(sum grad_logp * logp)/d hidden and /d weight, from the same input values."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax(h @ w.T / temperature, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logp.backward(grad_logp.double())
    return logp.detach(), entropy.detach(), h.grad, w.grad


def run(hidden, weight, targets, grad_logp, **kwargs):
    """logp, entropy, hidden.grad, weight.grad of token_logprobs (grads None where not required)."""
    out = token_logprobs(hidden, weight, targets, **kwargs)
    assert out.logp.dtype == out.entropy.dtype == torch.float32
    assert not out.entropy.requires_grad
    if out.logp.requires_grad:
        out.logp.backward(grad_logp)
    return out.logp.detach(), out.entropy, hidden.grad, weight.grad


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "T, chunk_size, temperature",
    [
        (64, 16, 1.0),  # chunks divide T
        (37, 8, 1.0),  # last chunk partial
        (37, 8, 0.7),
        (5, 16, 1.3),  # T < chunk
        (1, 4, 0.7),  # one token
        (9, 1, 1.0),  # one token per chunk
    ],
)
def test_fp32_matches_float64(T, chunk_size, temperature):
    hidden, weight, targets, grad_logp = make_inputs(T)
    ref = reference(hidden, weight, targets, grad_logp, temperature)
    got = run(hidden, weight, targets, grad_logp, temperature=temperature, chunk_size=chunk_size)
    # fp32 rounding over 300-term sums leaves ~1e-7 (up to ~2e-6 for one near-zero logp); a wrong term >1e-2
    for name, g, r in zip(["logp", "entropy", "d hidden", "d weight"], got, ref):
        assert rel_err(g, r) < 1e-5, name


def test_bf16_fp32_head_is_fp32_accurate():
    """bf16 inputs: fp32_head logits are exact products summed in fp32, so logp and entropy match float64 at fp32
    precision, far better than bf16-rounded logits; gradients come back in bf16 at bf16 precision."""
    hidden, weight, targets, grad_logp = make_inputs(50, H=64, V=1000, dtype=torch.bfloat16)
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    head32 = run(hidden, weight, targets, grad_logp, temperature=0.7, fp32_head=True, chunk_size=16)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert rel_err(head32[0], ref[0]) < 1e-5 and rel_err(head32[1], ref[1]) < 1e-5
    # bf16 has 8 significant bits (relative rounding <= 2^-9 = 2e-3) on dz and on the returned gradients
    assert rel_err(head32[2], ref[2]) < 1e-2 and rel_err(head32[3], ref[3]) < 1e-2

    hidden.grad = weight.grad = None
    head16 = run(hidden, weight, targets, grad_logp, temperature=0.7, fp32_head=False, chunk_size=16)
    logp_err16 = rel_err(head16[0], ref[0])
    assert logp_err16 < 2e-2  # logits rounded to bf16, still a faithful logp
    assert logp_err16 > 100 * rel_err(head32[0], ref[0])  # and fp32_head is what removes that error
    # dz also carries the logit rounding (~|z| 2^-9)
    assert rel_err(head16[2], ref[2]) < 2e-2 and rel_err(head16[3], ref[3]) < 2e-2


def test_bf16_weight_grad_over_many_chunks():
    """A long response of one repeated token: every chunk adds the same bf16 partial to d weight. Summed in bf16,
    the running sum stops growing once a partial falls under half its ulp (errors of tens of percent)."""
    hidden, weight, targets, _ = make_inputs(1, H=64, V=1000, dtype=torch.bfloat16)
    T = 512
    hidden = hidden.detach().expand(T, -1).clone().requires_grad_()
    targets, grad_logp = targets.expand(T).clone(), torch.full((T,), 0.3)
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    got = run(hidden, weight, targets, grad_logp, temperature=0.7, fp32_head=True, chunk_size=2)
    assert rel_err(got[3], ref[3]) < 1e-2


@pytest.mark.parametrize("hidden_grad, weight_grad", [(True, False), (False, True), (False, False)])
def test_inputs_without_grad(hidden_grad, weight_grad):
    hidden, weight, targets, grad_logp = make_inputs(37)
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    hidden.requires_grad_(hidden_grad)
    weight.requires_grad_(weight_grad)
    logp, entropy, d_hidden, d_weight = run(hidden, weight, targets, grad_logp, temperature=0.7, chunk_size=8)
    assert rel_err(logp, ref[0]) < 1e-5 and rel_err(entropy, ref[1]) < 1e-5
    assert (d_hidden is not None) == hidden_grad and (d_weight is not None) == weight_grad
    if hidden_grad:
        assert rel_err(d_hidden, ref[2]) < 1e-5
    if weight_grad:
        assert rel_err(d_weight, ref[3]) < 1e-5


def test_no_tokens():
    hidden, weight, targets, grad_logp = make_inputs(0)
    logp, entropy, d_hidden, d_weight = run(hidden, weight, targets, grad_logp)
    assert logp.shape == entropy.shape == d_hidden.shape[:1] == (0,)
    assert torch.equal(d_weight, torch.zeros_like(weight))


def test_autocast_does_not_lower_precision():
    """A trainer running the model under bf16 autocast must still get fp32 logits from fp32 inputs."""
    hidden, weight, targets, grad_logp = make_inputs(37)
    ref = reference(hidden, weight, targets, grad_logp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(hidden, weight, targets, grad_logp, chunk_size=8)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-5


class _Probe(TorchDispatchMode):
    """Records the largest tensor any aten op returns and counts the matmuls."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func.overloadpacket in (aten.mm, aten.addmm, aten.addmm_)
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.max_numel = max([self.max_numel, *sizes])
        return out


@pytest.mark.parametrize("hidden_grad, weight_grad", [(True, True), (True, False), (False, True)])
def test_memory_and_matmuls_per_chunk(hidden_grad, weight_grad):
    """No tensor larger than [chunk, V] ever exists (T x V would), and forward + backward is one logits matmul
    per chunk, one recompute and one matmul per gradient: the forward is not run twice."""
    T, H, V, chunk = 256, 8, 1024, 16
    hidden, weight, targets, grad_logp = make_inputs(T, H=H, V=V)
    hidden.requires_grad_(hidden_grad)
    weight.requires_grad_(weight_grad)
    with _Probe() as probe:
        token_logprobs(hidden, weight, targets, chunk_size=chunk).logp.backward(grad_logp)
    assert probe.max_numel <= chunk * V
    assert probe.matmuls == (T // chunk) * (2 + hidden_grad + weight_grad)

    with _Probe() as probe:  # the probe does see [T, V] logits where they exist
        reference(hidden, weight, targets, grad_logp)
    assert probe.max_numel >= T * V


def chunks(T, chunk):
    return -(-T // chunk)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_right_grad_hint_computes_the_gradients_in_forward(dtype, tol):
    """The loss sum(c * exp(logp)) hinted from each chunk's logp: the gradients are the float64 ones and
    forward + backward is 3 matmuls per chunk (the logits, both gradients), none in backward."""
    T, chunk = 37, 8
    hidden, weight, targets, c = make_inputs(T, dtype=dtype)
    ref_logp = reference(hidden, weight, targets, torch.zeros(T))[0]
    ref = reference(hidden, weight, targets, c * ref_logp.exp().float())  # d loss / d logp = c * p
    calls = []

    def hint(logp, rows):
        calls.append(rows)
        return c[rows] * logp.exp()

    with _Probe() as probe:
        out = token_logprobs(hidden, weight, targets, chunk_size=chunk, grad_hint=hint)
        forward_matmuls = probe.matmuls
        (c * out.logp.exp()).sum().backward()
    assert calls == [slice(s, s + chunk) for s in range(0, T, chunk)]
    assert forward_matmuls == probe.matmuls == 3 * chunks(T, chunk)
    for name, g, r in zip(["logp", "entropy", "d hidden", "d weight"],
                          (out.logp.detach(), out.entropy, hidden.grad, weight.grad), ref):
        assert rel_err(g, r) < tol, name


def test_scaled_grad_hint_scales_the_saved_gradients():
    """A loss scale (x world size, / accumulation steps) between the hint and the backward costs no matmul."""
    hidden, weight, targets, grad_logp = make_inputs(37)
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    with _Probe() as probe:
        got = run(hidden, weight, targets, grad_logp, temperature=0.7, chunk_size=8,
                  grad_hint=lambda logp, rows: grad_logp[rows] / 2.5)
    assert probe.matmuls == 3 * chunks(37, 8)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("hidden_grad, weight_grad", [(True, True), (True, False), (False, True)])
def test_wrong_grad_hint_still_gives_the_exact_gradients(hidden_grad, weight_grad):
    """A hint that is not what the loss sends back: the remainder goes through the recomputing backward."""
    hidden, weight, targets, grad_logp = make_inputs(37)
    hidden.requires_grad_(hidden_grad)
    weight.requires_grad_(weight_grad)
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    wrong = torch.randn(37, generator=torch.Generator().manual_seed(1))
    with _Probe() as probe:
        got = run(hidden, weight, targets, grad_logp, temperature=0.7, chunk_size=8,
                  grad_hint=lambda logp, rows: wrong[rows])
    n = chunks(37, 8)
    assert probe.matmuls == (1 + hidden_grad + weight_grad) * n + (1 + hidden_grad + weight_grad) * n
    assert rel_err(got[0], ref[0]) < 1e-5
    if hidden_grad:
        assert rel_err(got[2], ref[2]) < 1e-5
    if weight_grad:
        assert rel_err(got[3], ref[3]) < 1e-5


@pytest.mark.parametrize("hinted", [False, True])
def test_mask_is_selecting_the_kept_rows(hinted):
    """Masked tokens: logp and entropy 0, no gradient, not computed; the rest as if selected first. A hint
    sees the kept tokens' positions."""
    T, chunk = 37, 8
    hidden, weight, targets, grad_logp = make_inputs(T)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(3)) < 0.6
    kept = mask.nonzero().squeeze(1)
    h, w = hidden.detach()[kept].requires_grad_(), weight.detach().clone().requires_grad_()
    ref = reference(h, w, targets[kept], grad_logp[kept], temperature=0.7)
    seen = []

    def hint(logp, rows):
        seen.append(rows)
        return grad_logp[rows]

    with _Probe() as probe:
        logp, entropy, d_hidden, d_weight = run(hidden, weight, targets, grad_logp, temperature=0.7, chunk_size=chunk,
                                                mask=mask, grad_hint=hint if hinted else None)
    assert chunks(len(kept), chunk) < chunks(T, chunk)  # masked rows never reach a matmul:
    assert probe.matmuls == (3 if hinted else 4) * chunks(len(kept), chunk)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all() and (d_hidden[~mask] == 0).all()
    for g, r in zip((logp[mask], entropy[mask], d_hidden[mask], d_weight), ref):
        assert rel_err(g, r) < 1e-5
    if hinted:
        assert torch.equal(torch.cat(seen), kept)


def test_grad_hint_is_not_called_without_gradients():
    hidden, weight, targets, _ = make_inputs(9)

    def hint(logp, rows):
        raise AssertionError("hint called in a pass without gradients")

    with torch.no_grad():
        token_logprobs(hidden, weight, targets, chunk_size=4, grad_hint=hint)
    token_logprobs(hidden.detach(), weight.detach(), targets, chunk_size=4, grad_hint=hint)


def test_default_chunk_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(152064, torch.bfloat16, False, cpu) == CPU_CHUNK
    # Qwen's head in bf16: 320 MiB of bf16 logits is 1103 rows; fp32 logits plus a bf16 gradient, 367 rows
    assert default_chunk_size(152064, torch.bfloat16, False, cuda) == 1024
    assert default_chunk_size(152064, torch.bfloat16, True, cuda) == 256
    assert default_chunk_size(152064, torch.float32, True, cuda) == 512
    assert default_chunk_size(512, torch.bfloat16, False, cuda) == 8192  # capped
    assert default_chunk_size(10**7, torch.float32, False, cuda) == 128  # floored


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=torch.zeros(4, 3)), "hidden"),  # H differs from weight's
        (dict(targets=torch.zeros(5, dtype=torch.int64)), "targets"),
        (dict(targets=torch.zeros(4, dtype=torch.int32)), "targets"),
        (dict(weight=torch.zeros(10, 8, dtype=torch.bfloat16)), "share one of"),
        (dict(hidden=torch.zeros(4, 8).double(), weight=torch.zeros(10, 8).double()), "share one of"),
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(mask=torch.ones(4, dtype=torch.int64)), "mask"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), "mask"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8), targets=torch.zeros(4, dtype=torch.int64))
    args.update(kwargs)
    options = {k: args.pop(k) for k in ("temperature", "chunk_size", "mask") if k in args}
    with pytest.raises(ValueError, match=match):
        token_logprobs(args["hidden"], args["weight"], args["targets"], **options)


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_head", [True, False])
def test_cuda_bf16_matches_float64(fp32_head):
    """The CUDA path (bf16 matmul with fp32 output for fp32_head) against float64, at several chunks."""
    hidden, weight, targets, grad_logp = make_inputs(300, H=128, V=5000, dtype=torch.bfloat16, device="cuda")
    ref = reference(hidden, weight, targets, grad_logp, temperature=0.7)
    got = run(hidden, weight, targets, grad_logp, temperature=0.7, fp32_head=fp32_head, chunk_size=128)
    tol = 1e-5 if fp32_head else 2e-2
    assert rel_err(got[0], ref[0]) < tol and rel_err(got[1], ref[1]) < tol
    assert rel_err(got[2], ref[2]) < 1e-2 and rel_err(got[3], ref[3]) < 1e-2


@pytest.mark.parametrize("loss, options", [
    ("cispo", dict(is_weight_max=1.2, is_weight_min=0.9)),
    ("cispo", dict(is_weight_max=1.2, unified_mask=True, clip_low=0.1, clip_high=0.1)),
    ("dapo", dict(clip_low=0.2, clip_high=0.28)),
    ("grpo", dict(clip_low=0.05, clip_high=0.05)),
    ("reinforce", {}),
])
def test_policy_loss_hint_is_exact_and_skips_the_recompute(loss, options):
    """The trainer's hint: cispo.algo.loss.logp_grad of each chunk's tokens. The backward of the micro-batch's
    policy loss (times a loss scale) then runs no matmul, and the gradients are the recomputing path's."""
    T, chunk = 37, 8
    hidden, weight, targets, adv = make_inputs(T)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # pi_old near the current policy, so that some ratios clip and some do not
        old = token_logprobs(hidden, weight, targets).logp + 0.2 * torch.randn(T, generator=gen)
    coef, tis = torch.rand(T, generator=gen), torch.rand(T, generator=gen) + 0.5
    inputs = lambda rows: dict(old_logp=old[rows], adv=adv[rows], coef=coef[rows], tis_weight=tis[rows],  # noqa: E731
                               loss=loss, **loss_knobs(loss, asdict(AlgoConfig(loss=loss, **options))))
    grads = []
    for hint in (None, lambda logp, rows: logp_grad(logp, **inputs(rows))):
        hidden.grad = weight.grad = None
        out = token_logprobs(hidden, weight, targets, chunk_size=chunk, grad_hint=hint)
        with _Probe() as probe:
            (3.0 * policy_loss(out.logp, **inputs(slice(None))).loss).backward()
        grads.append((hidden.grad, weight.grad, probe.matmuls))
    (dh, dw, recompute), (dh_hint, dw_hint, hinted) = grads
    assert recompute == 3 * chunks(T, chunk) and hinted == 0
    assert rel_err(dh_hint, dh) < 1e-5 and rel_err(dw_hint, dw) < 1e-5
