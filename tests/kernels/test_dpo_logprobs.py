"""Chunked DPO log-prob kernel vs the eager reference (``mllm_kernels.reference.sequence_logprobs``).

Shape grid: N sequences × T tokens × d hidden × V vocabulary. Under the interpreter the matmul tiles are 16×64×32,
so the grid covers V smaller than one tile (7), exactly one tile (64), several tiles with a ragged tail (157, 301),
d not a multiple of the K step (40, 33), single tokens (T=1) and rows where every label is ignored. On CUDA
the same grid runs compiled (128-wide V tiles, split-V forward), plus the GPT-2 vocabulary 50,257.

Accuracy rule (FlashAttention's, ``fa_rule.assert_fa``), for logp, dh and dW:
    max|kernel − oracle64| ≤ 2 · max|eager − oracle64| + ATOL[dtype][name] · max(1, max|oracle64|)
The inputs are rounded to the test dtype once; ``oracle64`` is ``reference.sequence_logprobs`` on fp64 copies of
those rounded inputs (the reference computes in fp64 for fp64 inputs), ``eager`` the reference at the test dtype,
and all three get the same upstream gradient. The slack differs per output: logp is an fp32 result for every input
dtype (fp32 accumulation of products that are exact for bf16 operands, fp32 softmax), so its slack is fp32-sized
even for bf16, while the kernel's gradients pass through dz rounded to the input dtype and a matmul in it (dh = dz·W,
dW = dzᵀ·h), which needs bf16-sized slack. ``test_rule_rejects_bf16_rounded_logits`` checks that this catches a
plausible bug (logits rounded to bf16 before the softmax) that the former slack of 2e-2·|logp| let through.
Every test draws a fresh seed and names it on failure.
"""
import math
import os

import pytest
import torch
from fa_rule import assert_fa

from mllm_kernels import dpo_logprobs as K
from mllm_kernels import reference as R
from mllm_kernels._common import interpreting, last_path

ATOL = {  # absolute slack on top of the 2x rule, in units of max(1, max|oracle64|)
    torch.float32: {"logp": 1e-5, "dh": 1e-5, "dw": 1e-5},
    torch.bfloat16: {"logp": 1e-5, "dh": 1e-2, "dw": 1e-2},
}
# CPU tensors reach the kernel only under TRITON_INTERPRET=1 (on a CUDA machine they take the eager path)
DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_PATH = {"cpu": "interpreter", "cuda": "triton"}
needs_kernel = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")

SHAPES = [  # (N, T, d, V)
    (1, 1, 16, 7),
    (2, 5, 40, 64),
    (3, 4, 33, 157),
    (2, 3, 64, 301),
]


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _inputs(N, T, D, V, dtype, device, seed, ignore_index=-100):
    """h [N, T, d], w [V, d] rounded to ``dtype``, labels [N, T] (a quarter ``ignore_index``), upstream grad [N] fp32."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * D ** -0.5 * 2
    y = torch.randint(0, V, (N, T), generator=g)
    y[torch.rand(N, T, generator=g) < 0.25] = ignore_index
    gout = torch.randn(N, generator=g)
    return h.to(device, dtype), w.to(device, dtype), y.to(device), gout.to(device)


def _grads(fn, h, w, y, gout, **kw):
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    out = fn(hh, ww, y, **kw)
    dh, dw = torch.autograd.grad(out, (hh, ww), gout)
    return [out.detach(), dh, dw]


def _check(shape, dtype, device, seed, ignore_index=-100):
    h, w, y, gout = _inputs(*shape, dtype, device, seed, ignore_index)
    ctx = f"shape={shape} dtype={dtype} device={device} ignore_index={ignore_index} seed={seed}"
    kern = _grads(K.sequence_logprobs, h, w, y, gout, ignore_index=ignore_index)
    assert last_path("sequence_logprobs") == KERNEL_PATH[device], ctx  # the kernel ran, not the eager fallback
    eager = _grads(R.sequence_logprobs, h, w, y, gout, ignore_index=ignore_index)
    oracle = _grads(R.sequence_logprobs, h.double(), w.double(), y, gout.double(), ignore_index=ignore_index)
    assert oracle[0].dtype == torch.float64  # a true fp64 oracle, not an fp32 one
    for name, k, e, o in zip(("logp", "dh", "dw"), kern, eager, oracle):
        assert_fa(name, k, e, o, ATOL[dtype][name], ctx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_fwd_bwd(shape, dtype, device):
    _check(shape, dtype, device, _seed())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_index", [-1, 3])
def test_custom_ignore_index_fwd_bwd(ignore_index, device):
    """A non-default ignore_index, in the forward and the backward: -1, and 3, which is also a valid vocabulary id
    (positions labelled 3 are ignored, not scored); no label is -100, so treating -100 as the ignored label anywhere
    would score (forward) or differentiate (backward) the ignored positions."""
    _check((2, 6, 16, 30), torch.float32, device, _seed(), ignore_index=ignore_index)


@needs_kernel
def test_rule_rejects_bf16_rounded_logits():
    """The accuracy rule is tight enough to catch a realistic kernel bug: logits rounded to bf16 before the softmax
    (the mistake of storing z in the input dtype). Its logp error is ~|z|·2^-9 per token, summed over T; a correct
    kernel's is fp32-sized."""
    seed = _seed()
    h, w, y, _ = _inputs(4, 8, 40, 157, torch.bfloat16, DEVICES[-1], seed)

    def buggy(hidden, weight, labels, ignore_index=-100):
        logits = (hidden.float() @ weight.float().t()).bfloat16().float()
        mask = labels != ignore_index
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        tok = logits.gather(-1, safe[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
        return (tok * mask).sum(-1)

    eager = R.sequence_logprobs(h, w, y)
    oracle = R.sequence_logprobs(h.double(), w.double(), y)
    assert_fa("logp", K.sequence_logprobs(h, w, y), eager, oracle, ATOL[torch.bfloat16]["logp"], f"seed {seed}")
    with pytest.raises(AssertionError, match="kernel err"):
        assert_fa("logp", buggy(h, w, y), eager, oracle, ATOL[torch.bfloat16]["logp"], f"seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,T", [(0, 4), (2, 0)])
def test_no_tokens_fwd_bwd(N, T, device):
    """N·T = 0 (no sequences, or empty sequences): logp [N] zeros, dh empty, dW zeros, as the reference gives (the
    backward's chunk loop used to step by C = N·T = 0)."""
    h, w, y, gout = _inputs(N, T, 16, 30, torch.float32, device, _seed())
    kern = _grads(K.sequence_logprobs, h, w, y, gout)
    assert last_path("sequence_logprobs") == KERNEL_PATH[device]
    eager = _grads(R.sequence_logprobs, h, w, y, gout)
    for name, k, e in zip(("logp", "dh", "dw"), kern, eager):
        assert k.shape == e.shape and k.dtype == e.dtype, f"{name}: {k.shape}/{k.dtype} vs {e.shape}/{e.dtype}"
        assert torch.equal(k, e), name


@pytest.mark.parametrize("device", DEVICES)
def test_all_labels_ignored_gives_zero_and_zero_grad(device):
    h, w, y, _ = _inputs(2, 3, 16, 30, torch.float32, device, _seed())
    y[:] = -100
    hh = h.clone().requires_grad_()
    out = K.sequence_logprobs(hh, w, y)
    assert last_path("sequence_logprobs") == KERNEL_PATH[device]
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, device=device))
    assert torch.equal(hh.grad, torch.zeros_like(hh))


def _softplus(x: float) -> float:
    """log(1 + e^x) without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@pytest.mark.parametrize("N", [1, 5])
def test_dpo_loss_matches_the_paper(N):
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7) written out independently in fp64 Python scalars: with the implicit
    rewards r_c = β(π_c − ref_c), r_r = β(π_r − ref_r) and the margin m = (π_c − ref_c) − (π_r − ref_r),
        loss = (1/N) Σ_n −log σ(β m_n) = (1/N) Σ_n softplus(−β m_n),
        ∂loss/∂π_c,n = −∂loss/∂ref_c,n = −∂loss/∂π_r,n = ∂loss/∂ref_r,n = −β σ(−β m_n) / N.
    Margins span ±60/β so that both tails (loss ≈ 0 and loss ≈ −β m) are exercised; plus torch's gradcheck."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    beta = float(torch.empty(()).uniform_(0.05, 0.5, generator=g))
    pc, pr, rc, rr = (torch.randn(N, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    pc[0] = rc[0] + 60 / beta + pr[0] - rr[0]  # β·m = 60: σ(β m) rounds to 1 in fp64
    if N > 1:
        pc[1] = rc[1] - 60 / beta + pr[1] - rr[1]  # β·m = −60
    leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    loss, rew_c, rew_r = K.dpo_loss(*leaves, beta=beta)
    loss.backward()
    m = [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist())]
    want = sum(_softplus(-beta * x) for x in m) / N
    ctx = f"N={N} beta={beta} seed={seed}"
    assert loss.dtype == torch.float64, ctx
    assert abs(loss.item() - want) <= 1e-12 * max(1.0, abs(want)), f"loss {loss.item()} vs {want} ({ctx})"
    torch.testing.assert_close(rew_c, beta * (pc - rc), rtol=1e-14, atol=0, msg=ctx)
    torch.testing.assert_close(rew_r, beta * (pr - rr), rtol=1e-14, atol=0, msg=ctx)
    assert not rew_c.requires_grad and not rew_r.requires_grad
    dm = torch.tensor([-beta * _sigmoid(-beta * x) / N for x in m], dtype=torch.float64)
    for leaf, sign in zip(leaves, (1, -1, -1, 1)):  # ∂m/∂(π_c, π_r, ref_c, ref_r)
        torch.testing.assert_close(leaf.grad, sign * dm, rtol=1e-12, atol=1e-300, msg=ctx)
    assert torch.autograd.gradcheck(lambda *t: K.dpo_loss(*t, beta=beta)[0],
                                    [t.clone().requires_grad_() for t in (pc, pr, rc, rr)])


@needs_kernel
def test_opcheck_backward_op_and_strided_inputs():
    """The backward op's fake, and both ops with a permuted hidden and a transposed weight: the implementation
    makes its inputs contiguous, so the fakes must report contiguous outputs (inductor asserts on strides)."""
    h, w, y, gout = _inputs(2, 3, 16, 40, torch.float32, DEVICES[-1], _seed())
    hp = h.transpose(0, 1).contiguous().transpose(0, 1)  # [N, T, d] with a permuted layout
    wt = w.t().contiguous().t()  # [V, d] stored as [d, V]
    torch.library.opcheck(torch.ops.mllm.sequence_logprobs.default,
                          (hp.requires_grad_(), wt.requires_grad_(), y, -100))
    _, lse = torch.ops.mllm.sequence_logprobs.default(h, w, y, -100)
    torch.library.opcheck(torch.ops.mllm.sequence_logprobs_bwd.default,
                          (gout, hp.detach(), wt.detach(), y, lse, -100))


@needs_kernel
def test_default_label_check_compiles():
    h, w, y, _ = _inputs(2, 3, 16, 40, torch.float32, DEVICES[-1], _seed())
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: K.sequence_logprobs(a, b, y), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(h, w), R.sequence_logprobs(h, w, y), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_opcheck():
    h, w, y, _ = _inputs(2, 3, 16, 40, torch.float32, DEVICES[-1], _seed())
    torch.library.opcheck(torch.ops.mllm.sequence_logprobs.default,
                          (h.requires_grad_(), w.requires_grad_(), y, -100))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, 3, dtype=torch.long)), "hidden must have 3"),
        ((torch.randn(2, 3, 4), torch.randn(5, 3), torch.zeros(2, 3, dtype=torch.long)), r"weight is \[V, d\]"),
        ((torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 4, dtype=torch.long)), "labels shape"),
        ((torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3)), "labels has dtype"),
        ((torch.randn(2, 3, 4), torch.randn(5, 4).double(), torch.zeros(2, 3, dtype=torch.long)), "weight has dtype"),
        ((torch.randn(2, 3, 4), torch.randn(5, 4), torch.full((2, 3), 5)), r"outside \[0, 5\)"),
    ],
)
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        K.sequence_logprobs(*args)


def test_empty_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="vocabulary is empty"):  # was a ZeroDivisionError in the launcher
        K.sequence_logprobs(torch.randn(2, 5, 8), torch.randn(0, 8), torch.full((2, 5), -100))


_N4 = lambda: [torch.randn(4) for _ in range(4)]  # noqa: E731


@pytest.mark.parametrize("make,match", [
    # an [N, 1] log-prob (a keepdim=True sum) used to broadcast into an [N, N] loss without error
    (lambda pc, pr, rc, rr: ((pc[:, None], pr, rc, rr), {}), r"policy_chosen must have 1 dimensions, got shape \(4, 1\)"),
    (lambda pc, pr, rc, rr: ((pc, pr[:1], rc, rr), {}), r"policy_rejected has shape \(1,\) but policy_chosen has \(4,\)"),
    (lambda pc, pr, rc, rr: ((pc, pr, rc, rr[:3]), {}), r"ref_rejected has shape \(3,\)"),
    (lambda pc, pr, rc, rr: ((pc[:0], pr[:0], rc[:0], rr[:0]), {}), "N = 0"),
    (lambda pc, pr, rc, rr: ((pc, pr, rc.long(), rr), {}), "ref_chosen has dtype int64"),
    (lambda pc, pr, rc, rr: ((pc, pr, rc.tolist(), rr), {}), "ref_chosen must be a torch.Tensor"),
    (lambda pc, pr, rc, rr: ((pc, pr, rc, rr.to("meta")), {}), "ref_rejected is on meta"),
    (lambda pc, pr, rc, rr: ((pc, pr, rc, rr), dict(beta=float("nan"))), "beta must be a finite number"),
    (lambda pc, pr, rc, rr: ((pc, pr, rc, rr), dict(beta=None)), "beta must be a finite number"),
], ids=["keepdim", "broadcast_1", "length", "empty", "int", "list", "device", "nan_beta", "none_beta"])
def test_dpo_loss_validation_errors(make, match):
    args, kw = make(*_N4())
    with pytest.raises(ValueError, match=match):
        K.dpo_loss(*args, **kw)


@pytest.mark.skipif(interpreting(), reason="under the interpreter CPU tensors do reach the kernel")
def test_raw_op_on_cpu_without_interpreter_says_why():
    h, w, y, _ = _inputs(1, 2, 16, 20, torch.float32, "cpu", _seed())
    with pytest.raises(RuntimeError, match="needs CUDA"):
        torch.ops.mllm.sequence_logprobs(h, w, y, -100)
    assert K.sequence_logprobs(h, w, y).shape == (1,)  # the functional API falls back to eager
