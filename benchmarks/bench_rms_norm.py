"""Benchmark: RMSNorm and fused add + RMSNorm kernels vs the eager reference and torch.compile of it.

GPU (bf16; median of ``triton.testing.do_bench``; see ``benchmarks/common.py`` for the columns):
  * shapes (rows x width): 8,192 x 1,024 (the model: 8 sequences of 1,024 tokens, d_model 1,024), and the large
    32,768 x 4,096 and 16,384 x 16,384 (a wide row);
  * modes fwd, bwd, fwd+bwd; providers triton, eager (``reference``), compile (``torch.compile(reference)``).
Minimal bytes with N·C elements of b bytes and a C-wide weight of b_w bytes:
    rms_norm            fwd: read x, w; write y = 2·N·C·b + C·b_w
                        bwd: read dy, x, w; write dx, dw = 3·N·C·b + 2·C·b_w
    fused_add_rms_norm  fwd: read x, residual; write y, h = 4·N·C·b + C·b_w
                        bwd: read dy, dh, h, w; write d(x + residual) once, dw = 4·N·C·b + 2·C·b_w
    fwd+bwd is the sum of the two.
Goals on H100 (reported, never asserted): fwd and bwd ≥ 85% of the measured copy bandwidth at the large shapes,
≥ 1.5x eager at the model's shape.

CPU: the same ``run`` times the eager reference at small shapes; ``pytest benchmarks/bench_rms_norm.py
--benchmark-enable`` runs the pytest-benchmark tests below.

    python benchmarks/bench_rms_norm.py --out benchmarks/results/      # JSON + Markdown
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mllm_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Case, cli, reference_providers, run_shapes  # noqa: E402
from mllm_kernels import reference as R  # noqa: E402

EPS = 1e-6
GPU_SHAPES = [(8192, 1024), (32768, 4096), (16384, 16384)]
QUICK_GPU_SHAPES = [(8192, 1024), (32768, 4096)]
CPU_SHAPES = [(256, 1024)]


def _cases(shape, dtype, device):
    N, C = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    res = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device=device, dtype=dtype)
    b, bw = x.element_size(), w.element_size()
    plain = {"fwd": 2 * N * C * b + C * bw, "bwd": 3 * N * C * b + 2 * C * bw}
    fused = {"fwd": 4 * N * C * b + C * bw, "bwd": 4 * N * C * b + 2 * C * bw}
    for d in (plain, fused):
        d["fwd+bwd"] = d["fwd"] + d["bwd"]
    return [Case("rms_norm", shape, dtype, (x, w), diff=(0, 1), bytes=plain),
            Case("fused_add_rms_norm", shape, dtype, (x, res, w), diff=(0, 1, 2), bytes=fused)]


def _providers(op: str):
    K = __import__("importlib").import_module("mllm_kernels.rms_norm")  # the package root exports a function of the same name

    if op == "rms_norm":
        return reference_providers(lambda x, w: K.rms_norm(x, w, EPS), lambda x, w: R.rms_norm(x, w, EPS))
    return reference_providers(lambda x, r, w: K.fused_add_rms_norm(x, r, w, EPS),
                               lambda x, r, w: R.fused_add_rms_norm(x, r, w, EPS))


def run(device=None, quick: bool = False, progress: bool = True):
    """Rows: op, shape, dtype, mode, provider, ms, gbps, pct_copy_bw, peak_mem_mb (+ bytes, copy_bw_gbps)."""
    return run_shapes(_cases, _providers, device, quick, progress, gpu_shapes=GPU_SHAPES,
                      quick_gpu_shapes=QUICK_GPU_SHAPES, cpu_shapes=CPU_SHAPES)


# ----------------------------------------------------------------------------------------------------
# CPU: pytest-benchmark of the eager paths (kept runnable without a GPU)
# ----------------------------------------------------------------------------------------------------
def test_rms_norm_eager_fwd_cpu(benchmark):
    x, w = _cases(CPU_SHAPES[0], torch.float32, "cpu")[0].args
    benchmark(R.rms_norm, x, w, EPS)


def test_rms_norm_eager_fwd_bwd_cpu(benchmark):
    x, w = (t.clone().requires_grad_() for t in _cases(CPU_SHAPES[0], torch.float32, "cpu")[0].args)
    gy = torch.randn_like(x)
    benchmark(lambda: torch.autograd.grad(R.rms_norm(x, w, EPS), (x, w), gy))


def test_fused_add_rms_norm_eager_fwd_cpu(benchmark):
    x, r, w = _cases(CPU_SHAPES[0], torch.float32, "cpu")[1].args
    benchmark(R.fused_add_rms_norm, x, r, w, EPS)


if __name__ == "__main__":
    cli("rms_norm", run)
