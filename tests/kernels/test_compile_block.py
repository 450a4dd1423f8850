"""The three element-wise/row kernels together: a pre-norm transformer-style block under ``torch.compile``, and the
dispatch rule (which path each op takes on each device and ``TRITON_INTERPRET`` setting).

Block (d=64, 4 query heads / 2 kv heads of 16, SwiGLU width 96):
    h = fused_add_rms_norm(x, residual) -> q, k = apply_rope(h Wq, h Wk, positions) -> a = (q·k-free mixing) ->
    y = rms_norm(a) -> out = swiglu(y Wg, y Wu) Wd
Attention itself is not part of this file (it has its own kernel); q and k are folded back into the stream by a
plain sum so every op stays on the gradient path.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mllm_kernels import reference as R
KN = __import__("importlib").import_module("mllm_kernels.rms_norm")  # the package root exports a function of the same name
KR = __import__("importlib").import_module("mllm_kernels.rope")  # the package root exports a function of the same name
KS = __import__("importlib").import_module("mllm_kernels.swiglu")  # the package root exports a function of the same name
from mllm_kernels._common import last_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_PATH = "triton" if DEVICE == "cuda" else "interpreter"
REPO = Path(__file__).resolve().parents[2]


class Block(torch.nn.Module):
    def __init__(self, ops, d=64, hq=4, hkv=2, hd=16, f=96):
        super().__init__()
        self.ops, self.hq, self.hkv, self.hd = ops, hq, hkv, hd
        self.w_norm1 = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.w_norm2 = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.wq = torch.nn.Linear(d, hq * hd, bias=False)
        self.wk = torch.nn.Linear(d, hkv * hd, bias=False)
        self.wo = torch.nn.Linear(hq * hd + hkv * hd, d, bias=False)
        self.wgu = torch.nn.Linear(d, 2 * f, bias=False)
        self.wd = torch.nn.Linear(f, d, bias=False)

    def forward(self, x, residual, pos):
        B, T, _ = x.shape
        h, res = self.ops["fused_add_rms_norm"](x, residual, self.w_norm1, 1e-6)
        q = self.wq(h).view(B, T, self.hq, self.hd)
        k = self.wk(h).view(B, T, self.hkv, self.hd)
        q, k = self.ops["apply_rope"](q, k, pos, 10000.0)
        a = res + self.wo(torch.cat([q.flatten(2), k.flatten(2)], -1))
        y = self.ops["rms_norm"](a, self.w_norm2, 1e-6)
        gate, up = self.wgu(y).chunk(2, dim=-1)  # strided halves, read in place by the kernel
        return a + self.wd(self.ops["swiglu"](gate, up))


KERNEL_OPS = {"fused_add_rms_norm": KN.fused_add_rms_norm, "rms_norm": KN.rms_norm,
              "apply_rope": KR.apply_rope, "swiglu": KS.swiglu}
REFERENCE_OPS = {"fused_add_rms_norm": R.fused_add_rms_norm, "rms_norm": R.rms_norm,
                 "apply_rope": R.apply_rope, "swiglu": R.swiglu}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 64, generator=g).to(DEVICE)
    res = torch.randn(2, 12, 64, generator=g).to(DEVICE)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, 12).to(DEVICE)  # two packed documents
    return x, res, pos


def _fwd_bwd(block, x, res, pos):
    x = x.clone().requires_grad_()
    res = res.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = block(x, res, pos)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return [out.detach(), x.grad, res.grad] + [p.grad for p in block.parameters()]


def test_compiled_block_matches_eager_and_reference():
    torch.manual_seed(0)
    block = Block(KERNEL_OPS).to(DEVICE)
    ref_block = Block(REFERENCE_OPS).to(DEVICE)
    ref_block.load_state_dict(block.state_dict())
    x, res, pos = _inputs()

    eager = _fwd_bwd(block, x, res, pos)
    for op in ("rms_norm", "fused_add_rms_norm", "apply_rope", "swiglu"):
        assert last_path(op) == KERNEL_PATH, op
    reference = _fwd_bwd(ref_block, x, res, pos)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, x, res, pos)
    got_again = _fwd_bwd(compiled, *_inputs(seed=1)[:2], pos)  # second call reuses the graph
    assert all(torch.isfinite(t).all() for t in got_again)

    names = ["out", "dx", "dresidual"] + [n for n, _ in block.named_parameters()]
    for name, a, b, r in zip(names, got, eager, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"compiled vs eager kernels: {name}")
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, msg=f"compiled kernels vs reference: {name}")


def test_compiled_graph_holds_the_custom_ops():
    """fullgraph=True already forbids graph breaks; also check the captured graphs call the mllm:: ops (forward
    and the separate backward ops), i.e. nothing fell back to the reference during tracing."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def record(gm, _example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    block = Block(KERNEL_OPS).to(DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x, res, pos = _inputs()
    _fwd_bwd(compiled, x, res, pos)
    text = " ".join(seen)
    for op in ("mllm.fused_add_rms_norm.default", "mllm.rms_norm.default", "mllm.apply_rope.default",
               "mllm.swiglu.default", "mllm.fused_add_rms_norm_backward.default", "mllm.rms_norm_backward.default",
               "mllm.apply_rope_backward.default", "mllm.swiglu_backward.default"):
        assert op in text, f"{op} missing from the compiled graphs"
    assert "fused_add_rms_norm_backward_cast" not in text
    # a bf16 branch output into the fp32 stream (the autocast layout): one backward op writes both gradients (before,
    # the x gradient was an aten._to_copy of the fp32 one in the backward graph)
    seen.clear()
    grads = _fwd_bwd(compiled, x.bfloat16(), res, pos)
    text = " ".join(seen)
    assert "mllm.fused_add_rms_norm_backward_cast.default" in text and "aten._to_copy" not in text, text
    assert grads[1].dtype == torch.bfloat16 and torch.equal(grads[1], grads[2].bfloat16())


_DISPATCH_SCRIPT = r"""
import json, torch
import importlib
KN, KR, KS = (importlib.import_module(f"mllm_kernels.{m}") for m in ("rms_norm", "rope", "swiglu"))
from mllm_kernels import reference as R
from mllm_kernels._common import last_path
x = torch.randn(3, 8); w = torch.ones(8); q = torch.randn(1, 3, 2, 8); pos = torch.arange(3)[None]
ok = torch.equal(KN.rms_norm(x, w), R.rms_norm(x, w))
ok &= torch.equal(KN.fused_add_rms_norm(x, x, w)[0], R.fused_add_rms_norm(x, x, w)[0])
ok &= torch.equal(KS.swiglu(x, x), R.swiglu(x, x))
ok &= torch.equal(KR.apply_rope(q, q, pos)[0], R.apply_rope(q, q, pos)[0])
print(json.dumps({"paths": {op: last_path(op) for op in ("rms_norm", "fused_add_rms_norm", "swiglu", "apply_rope")},
                  "same_as_reference": bool(ok)}))
"""


def test_dispatch_cpu_without_interpreter_is_eager():
    """TRITON_INTERPRET is read when triton is imported, so the 'off' case needs a fresh interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _DISPATCH_SCRIPT], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["paths"] == {op: "eager" for op in ("rms_norm", "fused_add_rms_norm", "swiglu", "apply_rope")}
    assert report["same_as_reference"]


def test_dispatch_kernel_path_in_this_process():
    x = torch.randn(3, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    q = torch.randn(1, 3, 2, 8, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)[None]
    KN.rms_norm(x, w)
    KN.fused_add_rms_norm(x, x, w)
    KS.swiglu(x, x)
    KR.apply_rope(q, q, pos)
    for op in ("rms_norm", "fused_add_rms_norm", "swiglu", "apply_rope"):
        assert last_path(op) == KERNEL_PATH, op
