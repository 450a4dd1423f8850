"""SwiGLU kernel (``mllm_kernels.swiglu``) vs the eager reference.

Accuracy rule (FlashAttention's): for the output and both gradients,
    max|kernel − oracle64| ≤ 2 · max|eager − oracle64| + ATOL[dtype] · max(1, max|oracle64|)
where ``eager`` is ``reference.swiglu`` at the same dtype and ``oracle64`` is silu(g)·u evaluated in float64.

Shape grid (rows × width F): every width in {1, 7, 1000, 1023, 4096} at 1 and 3 rows, and 513 rows at widths
{1, 7, 1023} plus 129 × 4096 (4,096 is the model's SwiGLU width). Width 1 and 7 stack many rows in one tile;
1000/1023 leave masked tails in the column tile; 513 = 27 × 19 rows (as leading dims [27, 19, F]) leaves an
almost empty last row tile. 513 × 4096 is left out to keep the interpreted run short. Under the interpreter the
file runs in well under a minute; on CUDA the same tests run compiled.
"""
import os
import warnings

import pytest
import torch
from fa_rule import assert_fa
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_kernels import reference as R
K = __import__("importlib").import_module("mllm_kernels.swiglu")  # the package root exports a function of the same name
from mllm_kernels._common import last_path

# absolute slack added to the 2x rule, in units of max(1, max|oracle|) (see test_rms_norm.py for the reasoning)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(r, w) for r in (1, 3) for w in (1, 7, 1000, 1023, 4096)] + [(513, 1), (513, 7), (513, 1023), (129, 4096)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_PATH = "triton" if DEVICE == "cuda" else "interpreter"


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _shape(rows: int, width: int):
    return (27, 19, width) if rows == 513 else (rows, width)


def _inputs(shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=g) * 3  # wide enough to reach both saturated ends of the sigmoid
    up = torch.randn(shape, generator=g)
    dout = torch.randn(shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (gate, up, dout)]


def _oracle(gate, up):
    g = gate.double()
    return g * torch.sigmoid(g) * up.double()


def _run(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _assert_fa(name, kern, eager, oracle, dtype, ctx):
    assert_fa(name, kern, eager, oracle, ATOL[dtype], ctx)


def _check(shape, dtype, seed):
    gate, up, dout = _inputs(shape, dtype, seed)
    ctx = f"shape={shape} dtype={dtype} seed={seed}"
    kern = _run(K.swiglu, (gate, up), dout)
    assert last_path("swiglu") == KERNEL_PATH
    eager = _run(R.swiglu, (gate, up), dout)
    oracle = _run(_oracle, (gate.double(), up.double()), dout.double())
    for name, k, e, o in zip(("out", "dgate", "dup"), kern, eager, oracle):
        _assert_fa(name, k, e, o, dtype, ctx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_swiglu_matches_reference(rows, width, dtype):
    _check(_shape(rows, width), dtype, _seed())


def test_extreme_gates_stay_finite():
    # σ saturates: silu(−100) ≈ 0 and silu(100) = 100 exactly in fp32; no inf/nan from exp overflow
    gate = torch.tensor([[-100.0, -30.0, 0.0, 30.0, 100.0]], device=DEVICE)
    up = torch.ones_like(gate)
    with warnings.catch_warnings():  # the interpreter's numpy exp(100) overflows to inf, harmlessly: σ -> 0
        warnings.simplefilter("ignore", RuntimeWarning)
        out = K.swiglu(gate, up)
    torch.testing.assert_close(out, R.swiglu(gate, up))


def test_empty():
    gate = torch.randn(0, 16, device=DEVICE)
    assert K.swiglu(gate, gate).shape == (0, 16)


@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 0), (0, 5)], ids=str)
def test_zero_size_inputs_forward_and_backward(shape):
    """Empty inputs, including an empty last dim F = 0 (which used to fail in reshape(-1, 0) before any kernel):
    empty outputs and gradients of the inputs' shapes, as the reference gives."""
    gate, up, dout = _inputs(shape, torch.float32, _seed())
    kern = _run(K.swiglu, (gate, up), dout)
    assert last_path("swiglu") == KERNEL_PATH
    eager = _run(R.swiglu, (gate, up), dout)
    for k, e in zip(kern, eager):
        assert k.shape == e.shape == shape and k.dtype == e.dtype


def test_saves_only_gate_and_up():
    """The docstring's memory claim: the op saves gate and up (4 bytes per element in bf16) for the backward,
    the eager reference 16 bytes per element (fp32 copies of g, u, σ(g), g·σ(g))."""
    gate, up, _ = _inputs((8, 64), torch.bfloat16, _seed())
    saved = {}

    def pack(t):  # keyed by storage: autograd may save one tensor for two nodes
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def saved_bytes(fn):
        saved.clear()
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(g, u)
        return sum(saved.values())

    n = gate.numel()
    assert saved_bytes(K.swiglu) == 4 * n
    assert saved_bytes(R.swiglu) == 16 * n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    gate, up, dout = _inputs((5, 33), dtype, _seed())
    torch.library.opcheck(torch.ops.mllm.swiglu.default, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(torch.ops.mllm.swiglu_backward.default, (dout, gate.detach(), up.detach()))


@pytest.mark.parametrize("case,match", [
    ("shape", "up has shape"),
    ("dtype_mismatch", "up has dtype"),
    ("int_dtype", "gate has dtype int32"),
    ("mixed_device", "up is on meta"),
    ("scalar", "gate must have at least 1 dimension"),
    ("not_tensor", "up must be a torch.Tensor"),
])
def test_validation_errors(case, match):
    gate = torch.randn(4, 8, device=DEVICE)
    up = torch.randn(4, 8, device=DEVICE)
    if case == "shape":
        up = torch.randn(4, 9, device=DEVICE)
    elif case == "dtype_mismatch":
        up = up.to(torch.bfloat16)
    elif case == "int_dtype":
        gate = torch.ones(4, 8, dtype=torch.int32, device=DEVICE)
    elif case == "mixed_device":
        up = torch.randn(4, 8, device="meta")
    elif case == "scalar":
        gate, up = torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    elif case == "not_tensor":
        up = [[1.0] * 8] * 4
    with pytest.raises(ValueError, match=match):
        K.swiglu(gate, up)


@pytest.mark.parametrize("layout", ["fused_halves", "transposed", "row_stride"])
def test_non_contiguous_inputs(layout):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    if layout == "fused_halves":   # the two halves of a fused gate/up projection: read in place
        base = torch.randn(2, 9, 2 * 300, generator=g).to(DEVICE)
        views = lambda t: (t[..., :300], t[..., 300:])
    elif layout == "transposed":   # unit stride on the wrong axis: copied before the launch
        base = torch.randn(2, 300, 9, generator=g).to(DEVICE)
        views = lambda t: (t[0].t(), t[1].t())
    else:                          # every third row
        base = torch.randn(2, 30, 300, generator=g).to(DEVICE)
        views = lambda t: (t[0, ::3], t[1, ::3])
    gv, uv = views(base)
    assert not gv.is_contiguous()
    dout = torch.randn(gv.shape, generator=g).to(DEVICE)
    b1 = base.clone().requires_grad_()
    out = K.swiglu(*views(b1))
    (gb,) = torch.autograd.grad(out, b1, dout)
    b2 = base.clone().requires_grad_()
    out_ref = R.swiglu(*views(b2))
    (gb_ref,) = torch.autograd.grad(out_ref, b2, dout)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(gb, gb_ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")


def test_stride_zero_grad():
    gate = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    up = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    got = torch.autograd.grad(K.swiglu(gate, up).sum(), (gate, up))
    ref = torch.autograd.grad(R.swiglu(gate, up).sum(), (gate, up))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_module_splits_fused_projection_and_dispatch_path():
    gu = torch.randn(2, 5, 128, device=DEVICE)
    out = K.SwiGLU()(gu)
    assert last_path("swiglu") == KERNEL_PATH
    torch.testing.assert_close(out, R.swiglu(gu[..., :64], gu[..., 64:]))
    with pytest.raises(ValueError, match="even last dimension"):
        K.SwiGLU()(torch.randn(2, 7, device=DEVICE))


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=0, max_size=2),
    width=st.integers(1, 700),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes(lead, width, dtype, seed):
    _check((*lead, width), dtype, seed)
