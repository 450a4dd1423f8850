"""RMSNorm and fused add + RMSNorm kernels (``mllm_kernels.rms_norm``) vs the eager reference.

Accuracy rule (FlashAttention's): for every output and every gradient,
    max|kernel − oracle64| ≤ 2 · max|eager − oracle64| + ATOL[dtype] · max(1, max|oracle64|)
where ``eager`` is ``mllm_kernels.reference`` run at the same dtype and ``oracle64`` is the same formula evaluated
entirely in float64 (the reference itself upcasts to fp32 only, so it cannot serve as the fp64 oracle). For
the fused op the oracle rounds h = x + residual to the input dtype first, as the specification says, and passes
gradients straight through that rounding (as autograd does).

Shape grid (rows × width): every width in {1, 7, 1000, 1023, 4096} at 1 and 3 rows, and 513 rows at widths
{1, 7, 1023} plus 129 × 4096. Width 1 and 7 are narrower than any tile (many rows share one program); 1000 and
1023 leave a ragged, masked tail in a 1024-wide tile; 4096 is the model-scale width. 513 rows (given as
[27, 19, C] to exercise leading dims) is one more than a multiple of every row-tile height, so the last program is
almost empty, and spans several backward programs (dw partial sums); 129 × 4096 does the same at full width.
513 × 4096 is left out because the interpreter needs ~5 s per case for it. The wide-row (column-looped) path is
driven at small widths by forcing a 256-wide chunk, and natively at 40,000 columns. Under the interpreter the file
runs in about a minute on 2 cores; on CUDA the same tests run compiled.
"""
import os
import subprocess
import sys

import pytest
import torch
from fa_rule import assert_fa
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_kernels import reference as R
K = __import__("importlib").import_module("mllm_kernels.rms_norm")  # the package root exports a function of the same name
from mllm_kernels._common import last_path

# absolute slack added to the 2x rule, in units of max(1, max|oracle|): fp32 rounding of a reduction over
# ~1e3 terms sits near 1e-6; bf16 outputs are rounded to 8 bits (2^-9 ≈ 2e-3 relative), so 1e-2 covers one ulp
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(r, w) for r in (1, 3) for w in (1, 7, 1000, 1023, 4096)] + [(513, 1), (513, 7), (513, 1023), (129, 4096)]
EPS = 1e-6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_PATH = "triton" if DEVICE == "cuda" else "interpreter"


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF  # fresh each run; reported on failure


def _shape(rows: int, width: int):
    return (27, 19, width) if rows == 513 else (rows, width)


def _inputs(shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    res = torch.randn(shape, generator=g)
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    dh = torch.randn(shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, res, w, dy, dh)]


def _oracle_rms_norm(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _oracle_fused(x, res, w, eps, dtype):
    h = x.double() + res.double()
    h = h + (h.to(dtype).double() - h).detach()  # the spec rounds h to the input dtype; gradient passes through
    return _oracle_rms_norm(h, w, eps), h


def _assert_fa(name, kern, eager, oracle, dtype, ctx):
    assert_fa(name, kern, eager, oracle, ATOL[dtype], ctx)


def _run(fn, tensors, grads_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, leaves, grads_out[: len(outs)])
    return [o.detach() for o in outs] + list(grads)


def _check_rms_norm(shape, dtype, seed, block_cols=None):
    x, _, w, dy, _ = _inputs(shape, dtype, seed)
    ctx = f"shape={shape} dtype={dtype} seed={seed} block_cols={block_cols}"
    if block_cols is None:
        kern = _run(lambda a, b: K.rms_norm(a, b, EPS), (x, w), (dy,))
        assert last_path("rms_norm") == KERNEL_PATH
    else:  # launcher level, to force the looped wide-row path at a small width
        y, _ = K.rms_norm_fwd(x, w, EPS, block_cols=block_cols)
        kern = [y, *K.rms_norm_bwd(dy, x, w, EPS, block_cols=block_cols)]
    eager = _run(lambda a, b: R.rms_norm(a, b, EPS), (x, w), (dy,))
    oracle = _run(lambda a, b: _oracle_rms_norm(a, b, EPS), (x.double(), w.double()), (dy.double(),))
    for name, k, e, o in zip(("y", "dx", "dw"), kern, eager, oracle):
        _assert_fa(name, k, e, o, dtype, ctx)


def _check_fused(shape, dtype, seed, block_cols=None):
    x, res, w, dy, dh = _inputs(shape, dtype, seed)
    ctx = f"fused shape={shape} dtype={dtype} seed={seed} block_cols={block_cols}"
    if block_cols is None:
        kern = _run(lambda a, r, b: K.fused_add_rms_norm(a, r, b, EPS), (x, res, w), (dy, dh))
        assert last_path("fused_add_rms_norm") == KERNEL_PATH
    else:
        y, h = K.rms_norm_fwd(x, w, EPS, residual=res, block_cols=block_cols)
        dx, dw = K.rms_norm_bwd(dy, h, w, EPS, dh=dh, block_cols=block_cols)
        kern = [y, h, dx, dx, dw]
    eager = _run(lambda a, r, b: R.fused_add_rms_norm(a, r, b, EPS), (x, res, w), (dy, dh))
    oracle = _run(lambda a, r, b: _oracle_fused(a, r, b, EPS, dtype), (x.double(), res.double(), w.double()),
                  (dy.double(), dh.double()))
    for name, k, e, o in zip(("y", "h", "dx", "dresidual", "dw"), kern, eager, oracle):
        _assert_fa(name, k, e, o, dtype, ctx)


# ----------------------------------------------------------------------------------------------------
# accuracy over the shape grid
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_rms_norm_matches_reference(rows, width, dtype):
    _check_rms_norm(_shape(rows, width), dtype, _seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_fused_add_rms_norm_matches_reference(rows, width, dtype):
    _check_fused(_shape(rows, width), dtype, _seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_cols", [((3, 1000), 256), ((37, 1023), 256), ((5, 7), 4)])
def test_wide_row_loop_path(shape, block_cols, dtype):
    _check_rms_norm(shape, dtype, _seed(), block_cols=block_cols)
    _check_fused(shape, dtype, _seed(), block_cols=block_cols)


@pytest.mark.parametrize("width", [16384, 40000])
def test_very_wide_rows(width):
    # 16,384 is the widest row the issue asks for (one register tile); 40,000 exceeds MAX_SINGLE_PASS and loops
    _check_rms_norm((2, width), torch.bfloat16, _seed())
    _check_fused((2, width), torch.float32, _seed())


def test_dw_reduction_is_deterministic():
    x, res, w, dy, dh = _inputs((513, 1000), torch.float32, _seed())
    a = K.rms_norm_bwd(dy, x, w, EPS)
    b = K.rms_norm_bwd(dy, x, w, EPS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_rows():
    x = torch.randn(0, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    assert K.rms_norm(x, w).shape == (0, 8)


@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 0), (0, 5), (2, 0, 5)], ids=str)
def test_zero_size_inputs_forward_and_backward(shape):
    """Empty inputs, including an empty last dim C = 0 (which used to fail in reshape(-1, 0) before any kernel): the
    outputs and gradients of the reference, i.e. empty tensors of the inputs' shapes and a zero weight gradient."""
    seed = _seed()
    x, res, w, dy, dh = _inputs(shape, torch.float32, seed)
    for name, fn, ref, tensors, grads in (
        ("rms_norm", lambda a, b: K.rms_norm(a, b, EPS), lambda a, b: R.rms_norm(a, b, EPS), (x, w), (dy,)),
        ("fused_add_rms_norm", lambda a, r, b: K.fused_add_rms_norm(a, r, b, EPS),
         lambda a, r, b: R.fused_add_rms_norm(a, r, b, EPS), (x, res, w), (dy, dh)),
    ):
        kern = _run(fn, tensors, grads)
        assert last_path(name) == KERNEL_PATH
        eager = _run(ref, tensors, grads)
        for k, e in zip(kern, eager):
            assert k.shape == e.shape and k.dtype == e.dtype, f"{name} {shape}: {k.shape} vs {e.shape}"
            assert torch.equal(k, e), f"{name} {shape} (seed {seed})"


# ----------------------------------------------------------------------------------------------------
# autocast layout: bf16 branch output into an fp32 residual stream, output straight to bf16
# ----------------------------------------------------------------------------------------------------
def _assert_fa_mixed(name, kern, eager, oracle, ctx):
    # the tolerance follows each output's own dtype (y, dx: bf16; h, dresidual, dw: fp32)
    assert kern.dtype == eager.dtype, f"{name}: dtype {kern.dtype} vs eager {eager.dtype} ({ctx})"
    _assert_fa(name, kern, eager, oracle, kern.dtype, ctx)


@pytest.mark.parametrize("shape", [(3, 1023), (27, 19, 64), (129, 4096)])
def test_mixed_dtypes_and_out_dtype(shape):
    """x bf16 + residual fp32 -> h fp32 (the stream), y bf16 (out_dtype): what the model runs under autocast.
    Gradients: d residual fp32, dx bf16 (the same sum, rounded to x's dtype), dw fp32."""
    seed = _seed()
    x, res, w, dy, dh = _inputs(shape, torch.float32, seed)
    x = x.bfloat16()
    dy = dy.bfloat16()
    ctx = f"mixed shape={shape} seed={seed}"
    fn = lambda mod: (lambda a, r, b: mod.fused_add_rms_norm(a, r, b, EPS, torch.bfloat16))
    kern = _run(fn(K), (x, res, w), (dy, dh))
    assert last_path("fused_add_rms_norm") == KERNEL_PATH
    eager = _run(fn(R), (x, res, w), (dy, dh))
    oracle = _run(lambda a, r, b: _oracle_fused(a, r, b, EPS, torch.float32), (x.double(), res.double(), w.double()),
                  (dy.double(), dh.double()))
    assert [t.dtype for t in kern] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32]
    for name, k, e, o in zip(("y", "h", "dx", "dresidual", "dw"), kern, eager, oracle):
        _assert_fa_mixed(name, k, e, o, ctx)
    # one backward pass writes both inputs' gradient: x's is the residual's rounded once (as the eager cast does)
    assert torch.equal(kern[2], kern[3].bfloat16()), ctx

    # plain norm of an fp32 tensor with a bf16 output
    kern = _run(lambda a, b: K.rms_norm(a, b, EPS, torch.bfloat16), (res, w), (dy,))
    eager = _run(lambda a, b: R.rms_norm(a, b, EPS, torch.bfloat16), (res, w), (dy,))
    oracle = _run(lambda a, b: _oracle_rms_norm(a, b, EPS), (res.double(), w.double()), (dy.double(),))
    assert [t.dtype for t in kern] == [torch.bfloat16, torch.float32, torch.float32]
    for name, k, e, o in zip(("y", "dx", "dw"), kern, eager, oracle):
        _assert_fa_mixed(name, k, e, o, ctx)


@pytest.mark.parametrize("block_cols,tune", [(None, None), (32, None), (None, {"block_rows": 4, "num_warps": 4})],
                         ids=["single_pass", "looped", "gpu_tile"])
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_copy_in_a_second_dtype(block_cols, tune, copy_dtype):
    """``rms_norm_bwd(copy_dtype=)`` (the fused op's backward when x and residual differ in dtype) stores dx twice
    from the same fp32 value: the copy is bitwise dx.to(copy_dtype), and dx, dw equal those of the launch without a
    copy (bitwise with the same tile), on the single-pass and the looped wide-row path and with the GPU's 4-row tile
    for this launch (``_config(copy=True)``; 37 rows leave a partial last tile)."""
    x, _, w, dy, dh = _inputs((37, 100), torch.float32, _seed())
    dx, dw = K.rms_norm_bwd(dy, x, w, EPS, dh=dh, block_cols=block_cols, tune=tune)
    dx2, dw2, dxc = K.rms_norm_bwd(dy, x, w, EPS, dh=dh, block_cols=block_cols, tune=tune, copy_dtype=copy_dtype)
    assert dxc.dtype == copy_dtype and dxc.shape == dx.shape
    assert torch.equal(dxc, dx.to(copy_dtype))
    assert torch.equal(dx2, dx) and torch.equal(dw2, dw)
    if tune is not None:  # another tile sums dw in another order: equal up to fp32 rounding
        ref_dx, ref_dw = K.rms_norm_bwd(dy, x, w, EPS, dh=dh)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)
    empty = K.rms_norm_bwd(dy[:0], x[:0], w, EPS, dh=dh[:0], copy_dtype=copy_dtype)
    assert len(empty) == 3 and empty[2].shape == (0, 100) and empty[2].dtype == copy_dtype


def test_out_dtype_validation():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out_dtype must be None or one of"):
        K.rms_norm(x, torch.ones(8, device=DEVICE), EPS, torch.int32)


# ----------------------------------------------------------------------------------------------------
# torch.library
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    x, res, w, dy, dh = _inputs((5, 33), dtype, _seed())
    x.requires_grad_()
    res.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(torch.ops.mllm.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.mllm.fused_add_rms_norm.default, (x, res, w, EPS))
    torch.library.opcheck(torch.ops.mllm.rms_norm_backward.default, (dy, x.detach(), w.detach(), EPS))
    torch.library.opcheck(torch.ops.mllm.fused_add_rms_norm_backward.default,
                          (dy, dh, x.detach(), w.detach(), EPS))
    # the autocast layout: bf16 branch output, fp32 stream, bf16 normalised output
    torch.library.opcheck(torch.ops.mllm.fused_add_rms_norm.default,
                          (x.detach().bfloat16().requires_grad_(), res.float(), w, EPS, torch.bfloat16))
    torch.library.opcheck(torch.ops.mllm.rms_norm.default, (x, w, EPS, torch.bfloat16))
    torch.library.opcheck(torch.ops.mllm.fused_add_rms_norm_backward_cast.default,
                          (dy.float(), dh.float(), res.detach().float(), w.detach(), EPS, torch.bfloat16))
    torch.library.opcheck(torch.ops.mllm.fused_add_rms_norm_backward.default,  # h unused downstream: no dh
                          (dy, None, x.detach(), w.detach(), EPS))


# ----------------------------------------------------------------------------------------------------
# validation and layouts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,match", [
    ("weight_rank", "weight must have 1 dimensions"),
    ("weight_width", "weight has shape"),
    ("int_dtype", "x has dtype int64"),
    ("residual_shape", "residual has shape"),
    ("residual_dtype", "residual has dtype"),  # float64 is not a kernel dtype (bf16/fp32 mixes are fine)
    ("mixed_device", "weight is on meta"),
    ("negative_eps", "eps must be"),
    ("inf_eps", "eps must be a finite"),  # normalises every row to 0
    ("bool_eps", "eps must be"),  # True is an int in Python: eps=1 by accident
    ("scalar", "x must have at least 1 dimension"),
])
def test_validation_errors(case, match):
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    res = torch.randn(4, 8, device=DEVICE)
    eps = EPS
    if case == "weight_rank":
        w = torch.ones(1, 8, device=DEVICE)
    elif case == "weight_width":
        w = torch.ones(9, device=DEVICE)
    elif case == "int_dtype":
        x = torch.ones(4, 8, dtype=torch.int64, device=DEVICE)
    elif case == "residual_shape":
        res = torch.randn(4, 9, device=DEVICE)
    elif case == "residual_dtype":
        res = res.double()
    elif case == "mixed_device":
        w = torch.ones(8, device="meta")
    elif case == "negative_eps":
        eps = -1.0
    elif case == "inf_eps":
        eps = float("inf")
    elif case == "bool_eps":
        eps = True
    elif case == "scalar":
        x = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        if case.startswith("residual"):
            K.fused_add_rms_norm(x, res, w, eps)
        else:
            K.rms_norm(x, w, eps)


@pytest.mark.parametrize("layout", ["transposed", "column_slice", "row_stride"])
def test_non_contiguous_inputs(layout):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":      # last-dim stride != 1: copied before the launch
        base = torch.randn(100, 6, generator=g).to(DEVICE)
        view = lambda t: t.t()
    elif layout == "column_slice":  # rows 260 apart, 100 wide: read in place through the row stride
        base = torch.randn(6, 260, generator=g).to(DEVICE)
        view = lambda t: t[:, 50:150]
    else:                           # every other row of a 3-D tensor
        base = torch.randn(4, 6, 100, generator=g).to(DEVICE)
        view = lambda t: t[:, ::2]
    w = (1 + 0.5 * torch.randn(100, generator=g)).to(DEVICE)
    rbase = torch.randn(base.shape, generator=g).to(DEVICE)
    x = view(base)
    assert not x.is_contiguous()
    dy = torch.randn(x.shape, generator=g).to(DEVICE)

    b1 = base.clone().requires_grad_()
    y = K.rms_norm(view(b1), w, EPS)
    (gb,) = torch.autograd.grad(y, b1, dy)
    b2 = base.clone().requires_grad_()
    y_ref = R.rms_norm(view(b2), w, EPS)
    (gb_ref,) = torch.autograd.grad(y_ref, b2, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(gb, gb_ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")

    y, h = K.fused_add_rms_norm(view(base), view(rbase), w, EPS)
    y_ref, h_ref = R.fused_add_rms_norm(view(base), view(rbase), w, EPS)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")


def test_stride_zero_grad():
    # .sum() hands the backward an expanded (stride-0) gradient
    x = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    w = torch.randn(50, device=DEVICE, requires_grad=True)
    gx, gw = torch.autograd.grad(K.rms_norm(x, w, EPS).sum(), (x, w))
    rx, rw = torch.autograd.grad(R.rms_norm(x, w, EPS).sum(), (x, w))
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unused_residual_output(monkeypatch, x_dtype):
    """Only y is used (the model's final norm): the gradient of h arrives as None, and the backward launches
    without dh (no zero-filled [N, C] tensor) and gives the reference's gradients, for one stream dtype and for
    the autocast layout (bf16 x into an fp32 stream)."""
    x, res, w, dy, _ = _inputs((4, 64), torch.float32, _seed())
    x = x.to(x_dtype).requires_grad_()
    res.requires_grad_()
    seen = []
    launch = K.rms_norm_bwd
    monkeypatch.setattr(K, "rms_norm_bwd", lambda *a, **kw: seen.append(kw.get("dh")) or launch(*a, **kw))
    y, _h = K.fused_add_rms_norm(x, res, w, EPS)
    gx, gr = torch.autograd.grad(y, (x, res), dy)
    assert seen == [None]
    x2 = x.detach().clone().requires_grad_()
    r2 = res.detach().clone().requires_grad_()
    y2, _ = R.fused_add_rms_norm(x2, r2, w, EPS)
    rx, rr = torch.autograd.grad(y2, (x2, r2), dy)
    assert gx.dtype == x_dtype and gr.dtype == torch.float32
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gr, rr, atol=1e-5, rtol=1e-5)


def test_module_and_dispatch_path():
    m = K.RMSNorm(64).to(DEVICE)
    x = torch.randn(2, 5, 64, device=DEVICE)
    y = m(x)
    assert last_path("rms_norm") == KERNEL_PATH
    torch.testing.assert_close(y, R.rms_norm(x, m.weight, m.eps))
    y2, h = m(x, x)
    assert last_path("fused_add_rms_norm") == KERNEL_PATH
    torch.testing.assert_close(h, 2 * x)
    (y.sum() + y2.sum()).backward()
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()


# ----------------------------------------------------------------------------------------------------
# property-based shape fuzzing
# ----------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=0, max_size=2),
    width=st.integers(1, 700),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fused=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes(lead, width, dtype, fused, seed):
    shape = (*lead, width)
    if fused:
        _check_fused(shape, dtype, seed)
    else:
        _check_rms_norm(shape, dtype, seed)


def test_gpu_backward_tiles(monkeypatch):
    """The GPU launch configs at the model's width (the interpreter uses bigger tiles): ~8K-element backward tiles
    with 4 warps, and 4K for the backward that also writes the bf16 copy of dx, whose 8-row tile spills on sm_90
    (ptxas: 255 registers + 148 B; ``python -m benchmarks.aot_check``)."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    assert K._config(1024, backward=True) == (8, 1024, True, 4)
    assert K._config(1024, backward=True, copy=True) == (4, 1024, True, 4)
    assert K._config(1024) == (4, 1024, True, 8)


def test_double_backward_is_an_error_and_tracers_take_the_op():
    """The eager Function's backward builds no graph: create_graph=True raises instead of a silently wrong second
    derivative. Under a dispatcher-level tracer (make_fx, FakeTensorMode) calls go through the registered op, whose
    fake runs, instead of launching a kernel on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, _, w = _inputs((4, 8), torch.float32, 0)[:3]
    xx = x.clone().requires_grad_()
    y = K.rms_norm(xx, w, EPS)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((y * y).sum(), xx, create_graph=True)
    gm = make_fx(lambda a, b: K.rms_norm(a, b, EPS), tracing_mode="fake")(x, w)
    assert any("mllm.rms_norm" in str(n.target) for n in gm.graph.nodes)
    with FakeTensorMode() as mode:
        out = K.rms_norm(mode.from_tensor(x), mode.from_tensor(w), EPS)
    assert out.shape == x.shape and out.dtype == x.dtype
