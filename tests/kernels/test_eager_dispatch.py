"""The two launch paths of every kernel op (``mllm_kernels._common.call_op``): eager calls run an
``autograd.Function`` built from the op's implementation (``eager_function``), torch.compile traces the
registered ``torch.library`` op, and ``dispatcher_in_eager()`` sends eager calls through the op too.

Both paths run the same launchers and kernels, so their outputs and gradients must be *identical* (not merely
close) on random inputs; the grad_fn names tell which path ran. Accuracy against the references is tested per op
in the other files (they call the functional API, i.e. the Function path); the compiled path is tested in
``test_compile_block.py`` / ``test_model_backend.py``. Shapes are tiny (the interpreter), with odd sizes.
"""
import importlib

import pytest
import torch

from mllm_kernels import reference as R
from mllm_kernels._common import dispatcher_in_eager, kernel_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = {m: importlib.import_module(f"mllm_kernels.{m}")  # the package root exports functions of the same names
     for m in ("rms_norm", "rope", "swiglu", "attention", "dpo_logprobs", "lm_loss")}

pytestmark = pytest.mark.skipif(kernel_path(torch.empty(0, device=DEVICE)) == "eager",
                                reason="needs CUDA or TRITON_INTERPRET=1 (the kernel paths)")


def _leaf(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()


def _cases(seed):
    """name -> (op name in the Function/custom-op tables, leaves, fn(*leaves) -> tensor or tuple)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda hi, *shape: torch.randint(0, hi, shape, generator=g).to(DEVICE)  # noqa: E731
    pos = torch.arange(13, device=DEVICE)[None].expand(2, 13)
    hid, w_head = _leaf(g, 2, 13, 24), _leaf(g, 37, 24, scale=0.2)
    return {
        "rms_norm": ([_leaf(g, 5, 33), _leaf(g, 33)], lambda x, w: K["rms_norm"].rms_norm(x, w)),
        "fused_add_rms_norm": ([_leaf(g, 5, 33), _leaf(g, 5, 33), _leaf(g, 33)],
                               lambda x, r, w: K["rms_norm"].fused_add_rms_norm(x, r, w)),
        "swiglu": ([_leaf(g, 3, 7, 19), _leaf(g, 3, 7, 19)], lambda a, b: K["swiglu"].swiglu(a, b)),
        "apply_rope": ([_leaf(g, 2, 13, 3, 8), _leaf(g, 2, 13, 1, 8)],
                       lambda q, k: K["rope"].apply_rope(q, k, pos)),
        "attention": ([_leaf(g, 2, 13, 2, 64), _leaf(g, 2, 13, 1, 64), _leaf(g, 2, 13, 1, 64)],
                      lambda q, k, v: K["attention"].attention(q, k, v, pos, return_lse=True)),
        "sequence_logprobs": ([hid, w_head],
                              lambda h, w, y=ids(37, 2, 13): K["dpo_logprobs"].sequence_logprobs(h, w, y)),
        "linear_cross_entropy": ([hid.detach().clone().requires_grad_(), w_head.detach().clone().requires_grad_()],
                                 lambda h, w, y=ids(30, 2, 13): K["lm_loss"].linear_cross_entropy(h, w, y, 30)),
    }


def _run(leaves, fn, seed):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(DEVICE)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves)
    return outs[0].grad_fn.name(), [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("name", ["rms_norm", "fused_add_rms_norm", "swiglu", "apply_rope", "attention",
                                  "sequence_logprobs", "linear_cross_entropy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_function_and_dispatcher_paths_are_identical(name, seed):
    leaves, fn = _cases(seed)[name]
    f_name, f_outs, f_grads = _run(leaves, fn, seed)
    with dispatcher_in_eager():
        d_name, d_outs, d_grads = _run(leaves, fn, seed)
    assert f_name == f"{name}Backward", f"eager call did not run the autograd.Function: grad_fn {f_name}"
    assert d_name.startswith(f"GeneratedBackwardFor_mllm_{name}"), f"dispatcher path not taken: grad_fn {d_name}"
    for i, (a, b) in enumerate(zip(f_outs + f_grads, d_outs + d_grads)):
        assert torch.equal(a, b), f"{name}: output/gradient {i} differs between the two paths"


def test_dispatcher_in_eager_restores_the_default():
    leaves, fn = _cases(0)["swiglu"]
    with dispatcher_in_eager():
        with dispatcher_in_eager(False):
            assert _run(leaves, fn, 0)[0] == "swigluBackward"
        assert _run(leaves, fn, 0)[0].startswith("GeneratedBackwardFor_mllm_swiglu")
    assert _run(leaves, fn, 0)[0] == "swigluBackward"


def test_unused_outputs_get_no_gradient_work():
    """Outputs whose gradient is never used arrive in the backward as None (``set_materialize_grads(False)``): the
    fused norm with only h used, attention with only lse used, the LM loss (whose dh/dW outputs are internal).
    Each still gives the reference's gradients."""
    g = torch.Generator().manual_seed(3)
    x, r, w = _leaf(g, 4, 40), _leaf(g, 4, 40), _leaf(g, 40)
    _, h = K["rms_norm"].fused_add_rms_norm(x, r, w)
    got = torch.autograd.grad((h * h).sum(), (x, r, w), allow_unused=True)
    _, h_ref = R.fused_add_rms_norm(x, r, w)
    want = torch.autograd.grad((h_ref * h_ref).sum(), (x, r), allow_unused=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2] is None or torch.count_nonzero(got[2]) == 0  # y unused: no weight gradient

    q, k, v = _leaf(g, 1, 9, 2, 64), _leaf(g, 1, 9, 2, 64), _leaf(g, 1, 9, 2, 64)
    _, lse = K["attention"].attention(q, k, v, return_lse=True)
    _, lse_ref = R.attention(q, k, v, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k))
    want = torch.autograd.grad(lse_ref.sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
