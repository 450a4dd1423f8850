"""Fused LM head + cross-entropy (``mllm_kernels.lm_loss``) vs the eager reference.

Accuracy rule (FlashAttention's), for the loss and both gradients:
    max|kernel − oracle64| ≤ 2 · max|eager − oracle64| + ATOL[dtype] · max(1, max|oracle64|)
with ``eager`` = ``reference.linear_cross_entropy`` at the same dtype and ``oracle64`` the same formula in
float64 (logits not rounded). The upstream gradient is a random scalar, so the backward's scaling is exercised.

Shape grid (rows M, width d, table rows V_rows, vocabulary V): a single row; 37 rows over a padded table
(509 ids in 512 rows, the model's ``vocab_pad_multiple`` case: padding columns must get no probability and no
gradient); an unpadded odd vocabulary of 1,000 with leading dims [2, 19]; and 40 rows forced through 3 chunks of
16 (the fp32 dW accumulation across chunks). Under the interpreter the file runs in a few seconds.
"""
import os

import pytest
import torch
from fa_rule import assert_fa

from mllm_kernels import reference as R
from mllm_kernels import lm_loss as K
from mllm_kernels._common import last_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_PATH = "triton" if DEVICE == "cuda" else "interpreter"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [((1,), 32, 64, 64), ((37,), 64, 512, 509), ((2, 19), 48, 1000, 1000)]


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _inputs(lead, d, v_rows, V, dtype, seed, n_ignored=3, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g) * 2
    w = torch.randn(v_rows, d, generator=g) * max(d, 1) ** -0.5
    y = torch.randint(0, V, lead, generator=g)
    y.view(-1)[: min(n_ignored, y.numel() - 1)] = ignore_index
    gscale = float(torch.rand((), generator=g)) + 0.5
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), y.to(DEVICE), gscale


def _oracle(h, w, y, V, ignore_index=-100):
    z = h.reshape(-1, h.shape[-1]) @ w[:V].t()
    return torch.nn.functional.cross_entropy(z, y.reshape(-1), ignore_index=ignore_index, reduction="sum")


def _run(fn, h, w, gscale):
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(hh, ww)
    (loss * gscale).backward()
    return [loss.detach().reshape(1), hh.grad, ww.grad]


def _assert_fa(name, kern, eager, oracle, dtype, ctx):
    assert_fa(name, kern, eager, oracle, ATOL[dtype], ctx)


def _check(lead, d, v_rows, V, dtype, seed, chunk_rows=None, ignore_index=-100):
    h, w, y, gscale = _inputs(lead, d, v_rows, V, dtype, seed, ignore_index=ignore_index)
    ctx = (f"lead={lead} d={d} rows={v_rows} V={V} dtype={dtype} seed={seed} chunk_rows={chunk_rows} "
           f"ignore_index={ignore_index}")
    if chunk_rows is None:
        kern = _run(lambda a, b: K.linear_cross_entropy(a, b, y, V, ignore_index=ignore_index), h, w, gscale)
        assert last_path("linear_cross_entropy") == KERNEL_PATH
    else:  # launcher level, to force several chunks
        loss, dh, dw = K.lce_forward(h.reshape(-1, d), w, y.reshape(-1), V, ignore_index, True, chunk_rows=chunk_rows)
        kern = [loss.reshape(1), (dh * gscale).view(h.shape), dw * gscale]
    eager = _run(lambda a, b: R.linear_cross_entropy(a, b, y, V, ignore_index), h, w, gscale)
    oracle = _run(lambda a, b: _oracle(a, b, y, V, ignore_index), h.double(), w.double(), gscale)
    for name, k, e, o in zip(("loss", "dh", "dW"), kern, eager, oracle):
        _assert_fa(name, k, e, o, dtype, ctx)
    if v_rows > V:  # padding rows of the table: never a target, never in the softmax
        assert kern[2][V:].abs().max().item() == 0.0, ctx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v_rows,V", SHAPES)
def test_matches_reference(lead, d, v_rows, V, dtype):
    _check(lead, d, v_rows, V, dtype, _seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_chunks(dtype):
    _check((40,), 32, 128, 120, dtype, _seed(), chunk_rows=16)


@pytest.mark.parametrize("ignore_index", [-1, 600])
def test_custom_ignore_index_fwd_bwd(ignore_index):
    """A non-default ignore_index (negative, or an id past the vocabulary and past the padded table's rows), in the
    loss and both gradients, through the functional API and through several chunks. No label is -100: a path that
    knew only -100 would reject these labels (the label check) or score the ignored rows. (The kernel itself gives
    every label outside [0, V) no loss and no gradient, and validation keeps ignore_index outside [0, V).)"""
    _check((2, 19), 48, 512, 509, torch.float32, _seed(), ignore_index=ignore_index)
    _check((40,), 32, 128, 120, torch.float32, _seed(), chunk_rows=16, ignore_index=ignore_index)


@pytest.mark.parametrize("lead,d", [((0,), 16), ((3,), 0), ((2, 0), 0)], ids=str)
def test_zero_size_inputs_forward_and_backward(lead, d):
    """No rows, or rows of width d = 0 (all logits 0, so each scored row costs log V): the reference's loss and
    gradients (hidden.reshape(-1, 0) used to fail before any kernel)."""
    seed = _seed()
    h, w, y, gscale = _inputs(lead, d, 64, 64, torch.float32, seed, n_ignored=1)
    kern = _run(lambda a, b: K.linear_cross_entropy(a, b, y), h, w, gscale)
    assert last_path("linear_cross_entropy") == KERNEL_PATH
    eager = _run(lambda a, b: R.linear_cross_entropy(a, b, y), h, w, gscale)
    for name, k, e in zip(("loss", "dh", "dW"), kern, eager):
        assert k.shape == e.shape and k.dtype == e.dtype, f"{name}: {k.shape} vs {e.shape}"
        torch.testing.assert_close(k, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m} (seed {seed})")


def test_all_ignored_and_no_grad():
    h, w, y, _ = _inputs((6,), 16, 64, 64, torch.float32, _seed())
    hh = h.clone().requires_grad_()
    loss = K.linear_cross_entropy(hh, w, torch.full_like(y, -100))
    loss.backward()
    assert loss.item() == 0.0 and hh.grad.abs().max().item() == 0.0
    with torch.no_grad():  # no gradient wanted: the forward skips the dz pass and both GEMMs
        got = K.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(got, R.linear_cross_entropy(h, w, y), rtol=1e-5, atol=1e-5)
    out = K._lce_op(h, w, y, 64, -100, False)
    assert out[1].numel() == 0 and out[2].numel() == 0


def test_rows_whose_logits_all_lie_below_minus_1e30():
    # fp32 logits reach -3.4e38; the running max once started at a finite floor of -1e30, so a row with every
    # logit below it summed exp(z - floor) = 0: loss -inf and an inf gradient where the reference is finite.
    # Rows 0 and 2 have every logit in [-4e34, -1e31]; row 1 is an ordinary row (logits 0 and 1).
    w = torch.zeros(8, 2)
    w[:7, 0] = 1e34 * (1 + torch.arange(7.0) / 7)
    w[7, 1] = 1.0
    h = torch.tensor([[-1.0, -1e31], [0.0, 1.0], [-2.0, -5e31]])
    y = torch.tensor([0, 7, 7])
    kern = _run(lambda a, b: K.linear_cross_entropy(a, b, y), h, w, 1.0)
    assert last_path("linear_cross_entropy") == KERNEL_PATH
    eager = _run(lambda a, b: R.linear_cross_entropy(a, b, y), h.double(), w.double(), 1.0)
    for name, k, e in zip(("loss", "dh", "dW"), kern, eager):
        assert torch.isfinite(k).all(), f"{name}: {k}"
        torch.testing.assert_close(k.double(), e, rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")


def test_gradient_of_the_weight_only():
    h, w, y, _ = _inputs((9,), 16, 64, 60, torch.float32, _seed())
    ww = w.clone().requires_grad_()
    K.linear_cross_entropy(h, ww, y, 60).backward()
    w2 = w.clone().requires_grad_()
    R.linear_cross_entropy(h, w2, y, 60).backward()
    torch.testing.assert_close(ww.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_opcheck():
    h, w, y, _ = _inputs((5,), 16, 64, 64, torch.float32, _seed())
    torch.library.opcheck(torch.ops.mllm.linear_cross_entropy.default,
                          (h.requires_grad_(), w.requires_grad_(), y, 64, -100, True))
    torch.library.opcheck(torch.ops.mllm.linear_cross_entropy.default, (h.detach(), w.detach(), y, 64, -100, False))


def test_opcheck_strided_inputs_and_inductor():
    """A weight stored as [d, V] and passed transposed: the fake must report the contiguous outputs the
    implementation returns (it makes its inputs contiguous), or inductor asserts on the strides at run time."""
    h, w, y, _ = _inputs((5,), 16, 37, 30, torch.float32, _seed())
    wt = w.t().contiguous().requires_grad_()  # [d, V]: the layout some checkpoints store
    torch.library.opcheck(torch.ops.mllm.linear_cross_entropy.default,
                          (h.requires_grad_(), wt.t(), y, 30, -100, True))

    def f(a, b):
        return K.linear_cross_entropy(a, b.t(), y, 30, check_labels=False) * 0.5

    torch._dynamo.reset()
    got = _run(torch.compile(f, backend="inductor", fullgraph=True), h, wt, 1.0)
    want = _run(lambda a, b: R.linear_cross_entropy(a, b.t(), y, 30) * 0.5, h, wt, 1.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_double_backward_is_an_error_on_both_paths():
    """The gradients are computed in the forward: a second derivative through them would miss the Hessian term
    silently, so create_graph=True must raise (eager Function path and registered-op path)."""
    from mllm_kernels._common import dispatcher_in_eager

    h, w, y, _ = _inputs((4,), 8, 16, 16, torch.float32, _seed())
    for via_op in (False, True):
        hh = h.clone().requires_grad_()
        with dispatcher_in_eager(via_op):
            loss = K.linear_cross_entropy(hh, w, y)
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(loss, hh, create_graph=True)


def test_outputs_keep_the_input_dtype_under_autocast():
    """fp32 inputs under a bf16 autocast: dW must stay fp32 like the loss and dh (a plain matmul inside would be
    autocast to bf16, and the eager path would then disagree with the compiled one)."""
    h, w, y, _ = _inputs((6,), 16, 40, 40, torch.float32, _seed())
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        out = torch.ops.mllm.linear_cross_entropy(h, w, y, 40, -100, True)
    assert [o.dtype for o in out] == [torch.float32] * 3
    ww = w.clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        K.linear_cross_entropy(h, ww, y, 40).backward()
    w2 = w.clone().requires_grad_()
    R.linear_cross_entropy(h, w2, y, 40).backward()
    torch.testing.assert_close(ww.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_default_label_check_compiles():
    """check_labels=True (the default) reads the labels on the host: skipped while torch.compile traces, so
    fullgraph compilation works with default arguments."""
    h, w, y, _ = _inputs((2, 5), 16, 64, 61, torch.float32, _seed())
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: K.linear_cross_entropy(a, b, y, 61), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(h, w), R.linear_cross_entropy(h, w, y, 61), rtol=1e-5, atol=1e-5)


def test_traces_under_torch_compile_fullgraph():
    h, w, y, _ = _inputs((2, 7), 16, 64, 61, torch.float32, _seed())

    def f(a, b):
        return K.linear_cross_entropy(a, b, y, 61, check_labels=False) / 3

    torch._dynamo.reset()
    got = _run(torch.compile(f, backend="aot_eager", fullgraph=True), h, w, 1.0)
    want = _run(lambda a, b: R.linear_cross_entropy(a, b, y, 61) / 3, h, w, 1.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,match", [
    ("label_range", "labels hold ids outside"),
    ("dtype", "weight has dtype"),
    ("width", "hidden's last dim"),
    ("labels_shape", "labels shape"),
    ("vocab_size", "vocab_size must be"),
    ("ignore_index", "ignore_index must be"),
    ("float_labels", "labels has dtype"),
])
def test_validation_errors(case, match):
    h, w, y, _ = _inputs((4,), 8, 16, 16, torch.float32, 1)
    kw = {}
    if case == "label_range":
        y = y.clone()
        y[0] = 16
    elif case == "dtype":
        w = w.double()
    elif case == "width":
        w = w[:, :7]
    elif case == "labels_shape":
        y = y[:3]
    elif case == "vocab_size":
        kw["vocab_size"] = 17
    elif case == "ignore_index":
        kw["ignore_index"] = 3
    elif case == "float_labels":
        y = y.float()
    with pytest.raises(ValueError, match=match):
        K.linear_cross_entropy(h, w, y, **kw)
