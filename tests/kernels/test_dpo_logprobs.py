"""Chunked DPO log-prob kernel vs the eager reference (``mllm_kernels.reference.sequence_logprobs``).

Shape grid: N sequences × T tokens × d hidden × V vocabulary. Under the interpreter the matmul tiles are 16×64×32,
so the grid covers V smaller than one tile (7), exactly one tile (64), several tiles with a ragged tail (157, 301),
d not a multiple of the K step (40, 33), single tokens (T=1) and rows where every label is ignored. On CUDA
the same grid runs compiled (128-wide V tiles, split-V forward), plus the GPT-2 vocabulary 50,257.

Tolerances follow FlashAttention's rule: |kernel − fp64| ≤ 2·|eager(dtype) − fp64| + atol[dtype].
"""
import pytest
import torch

from mllm_kernels import dpo_logprobs as K
from mllm_kernels import reference as R
from mllm_kernels._common import interpreting, last_path

ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # absolute slack on top of the 2x rule (per dtype)
# CPU tensors reach the kernel only under TRITON_INTERPRET=1 (on a CUDA machine they take the eager path)
DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])

SHAPES = [  # (N, T, d, V)
    (1, 1, 16, 7),
    (2, 5, 40, 64),
    (3, 4, 33, 157),
    (2, 3, 64, 301),
]


def _inputs(N, T, D, V, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * D ** -0.5 * 2
    y = torch.randint(0, V, (N, T), generator=g)
    drop = torch.rand(N, T, generator=g) < 0.25
    y[drop] = -100
    return h.to(device), w.to(device), y.to(device)


def _grads(fn, h, w, y, dtype, gout):
    hh = h.to(dtype).requires_grad_()
    ww = w.to(dtype).requires_grad_()
    out = fn(hh, ww, y)
    dh, dw = torch.autograd.grad(out, (hh, ww), gout)
    return out.double(), dh.double(), dw.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fwd_bwd(shape, dtype, device):
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # fresh seed each run, printed on failure
    h, w, y = _inputs(*shape, dtype, device, seed)
    gout = torch.randn(shape[0], device=device)
    ref64 = _grads(R.sequence_logprobs, h.double(), w.double(), y, torch.float64, gout.double())
    eager = _grads(R.sequence_logprobs, h, w, y, dtype, gout.to(dtype) if dtype != torch.float32 else gout)
    kern = _grads(K.sequence_logprobs, h, w, y, dtype, gout)
    assert last_path("sequence_logprobs") in ("interpreter", "triton")
    for name, k, e, r in zip(("logp", "dh", "dw"), kern, eager, ref64):
        k_err = (k - r).abs().max().item()
        e_err = (e - r).abs().max().item()
        assert k_err <= 2 * e_err + ATOL[dtype] * max(1.0, r.abs().max().item()), (
            f"{name}: kernel err {k_err:.3e} > 2 x eager err {e_err:.3e} + atol (seed {seed}, {shape}, {dtype})")


def test_all_labels_ignored_gives_zero_and_zero_grad():
    h, w, y = _inputs(2, 3, 16, 30, torch.float32, "cpu", 0)
    y[:] = -100
    hh = h.clone().requires_grad_()
    out = K.sequence_logprobs(hh, w, y)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2))
    assert torch.equal(hh.grad, torch.zeros_like(hh))


def test_custom_ignore_index():
    h, w, y = _inputs(2, 4, 16, 30, torch.float32, "cpu", 1)
    y2 = torch.where(y == -100, torch.full_like(y, -1), y)
    a = K.sequence_logprobs(h, w, y2, ignore_index=-1)
    b = R.sequence_logprobs(h, w, y2, ignore_index=-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dpo_loss_from_kernel_logprobs_matches_reference():
    h, w, y = _inputs(4, 3, 16, 40, torch.float32, "cpu", 2)
    logp = K.sequence_logprobs(h, w, y)
    ref = torch.tensor([-3.0, -2.0, -4.0, -1.0])
    loss, rc, rr = K.dpo_loss(logp[:2], logp[2:], ref[:2], ref[2:], beta=0.1)
    rc_hand = 0.1 * (logp[:2] - ref[:2])
    rr_hand = 0.1 * (logp[2:] - ref[2:])
    expected = -torch.nn.functional.logsigmoid(rc_hand - rr_hand).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(rc, rc_hand)


@pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")
def test_opcheck():
    h, w, y = _inputs(2, 3, 16, 40, torch.float32, DEVICES[-1], 3)
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


@pytest.mark.skipif(interpreting(), reason="under the interpreter CPU tensors do reach the kernel")
def test_raw_op_on_cpu_without_interpreter_says_why():
    h, w, y = _inputs(1, 2, 16, 20, torch.float32, "cpu", 4)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        torch.ops.mllm.sequence_logprobs(h, w, y, -100)
    assert K.sequence_logprobs(h, w, y).shape == (1,)  # the functional API falls back to eager
