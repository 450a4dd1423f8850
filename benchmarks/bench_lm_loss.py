"""Benchmark: fused LM head + cross-entropy (``mllm_kernels.lm_loss``) vs logits + cross-entropy.

GPU (bf16; median of ``triton.testing.do_bench``; columns from ``benchmarks/common.py``):
  * shapes (tokens M, width d, table rows V_rows, vocabulary V): the gpu-full micro-batch 8,192 x 1,024 over the
    padded table 50,304 (V = 50,257), and 16,384 tokens;
  * modes fwd (no gradient wanted: one GEMM + the row pass), bwd, fwd+bwd; providers
    ``triton`` (``lm_loss.linear_cross_entropy``: the gradient is taken in the forward, so its ``fwd`` under
    autograd costs what ``fwd+bwd`` shows), ``eager`` (``reference.linear_cross_entropy``: bf16 logits, fp32
    cross-entropy) and ``compile`` (``torch.compile`` of the reference).
Work credited per provider and mode (``work``): FLOPs 2·M·d·V_rows per GEMM (``tflops`` column, useful work) and the
minimal bytes (``gbps``). ``eager`` / ``compile``: fwd = 1 GEMM, bwd = 2 (dh, dW), fwd+bwd = 3. ``triton`` computes dh
and dW inside its forward whenever a gradient is wanted (``lm_loss._backward`` only multiplies them by the upstream
gradient), so its ``fwd+bwd`` row holds all 3 GEMMs, its ``fwd`` row (no_grad) 1, and its ``bwd`` row no GEMM at
all: two element-wise scalings (bytes: read dh, dW, write them scaled), reported without TFLOP/s and marked
``not_comparable`` (no speed-up against eager's 2-GEMM backward). Compare the providers on ``fwd+bwd``.
``peak_mem_mb`` shows what the fusion saves: eager keeps [M, V] logits in bf16 plus their fp32 copy and softmax
gradient.

CPU: ``cpu_cases`` (``CPU_SHAPES``, fp32, the same ``_cases``) are timed by pytest-benchmark: the eager reference per
mode, triton and compile skipped (``benchmarks/pytest_cpu.py``; ``python -m benchmarks.run --only lm_loss`` or
``pytest benchmarks/pytest_cpu.py --benchmark-enable -k linear_cross_entropy``). ``run(cpu)`` returns those same rows.

    python benchmarks/bench_lm_loss.py --out benchmarks/results/
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Case, cli, reference_providers, run_shapes, shape_cpu_cases  # noqa: E402
from mllm_kernels import reference as R  # noqa: E402

GPU_SHAPES = [(8192, 1024, 50304, 50257), (16384, 1024, 50304, 50257)]
QUICK_GPU_SHAPES = [(8192, 1024, 50304, 50257)]
CPU_SHAPES = [(256, 64, 1024, 1000), (64, 64, 1024, 1000), (1024, 64, 1024, 1000)]  # the first: --quick


TRITON_BWD_NOTE = ("gradients are computed in the forward under autograd (in the fwd+bwd row); this row times only "
                   "scaling dh and dW by the upstream gradient")


def work(shape, elem_bytes: int, mode: str, provider: str):
    """(bytes, FLOPs or None) that ``provider`` does in ``mode`` at ``shape`` = (M, d, V_rows, V): see the module
    docstring. None: no GEMM work, so no TFLOP/s."""
    M, d, v_rows, _ = shape
    gemm = 2 * M * d * v_rows
    operands = (M * d + v_rows * d) * elem_bytes  # h and W (or dh and dW)
    io = operands + 8 * M  # h, W, int64 labels read once
    if provider == "triton" and mode == "bwd":
        return 2 * operands, None  # dh, dW read and written scaled; no GEMM
    n_gemm = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    nbytes = io if mode == "fwd" else io + operands  # + dh, dW written
    return nbytes, n_gemm * gemm


def _cases(shape, dtype, device):
    M, d, v_rows, V = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(M, d, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(v_rows, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (M,), generator=g).to(device)
    b = h.element_size()
    nbytes, flops = {}, {}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        nbytes[mode], flops[mode] = work(shape, b, mode, "eager")
    nbytes["bwd", "triton"], flops["bwd", "triton"] = work(shape, b, "bwd", "triton")
    return [Case("linear_cross_entropy", shape, dtype, (h, w, y, V), diff=(0, 1), bytes=nbytes, flops=flops,
                 notes={("bwd", "triton"): TRITON_BWD_NOTE})]


def _providers(op: str):
    from mllm_kernels import lm_loss as K

    return reference_providers(lambda h, w, y, V: K.linear_cross_entropy(h, w, y, V, check_labels=False),
                               R.linear_cross_entropy)


def run(device=None, quick: bool = False, progress: bool = True):
    """Rows: op, shape, dtype, mode, provider, ms, tflops (useful GEMM work of that provider in that mode, see
    ``work``), peak_mem_mb, gbps; the triton ``bwd`` row has no tflops and a ``not_comparable`` note."""
    return run_shapes(_cases, _providers, device, quick, progress, gpu_shapes=GPU_SHAPES,
                      quick_gpu_shapes=QUICK_GPU_SHAPES, module_file=__file__)


def cpu_cases(quick: bool = False):
    """The CPU rows (``CPU_SHAPES``, fp32), timed by pytest-benchmark (``benchmarks/pytest_cpu.py``): eager
    timed per mode, triton and compile skipped."""
    return shape_cpu_cases(_cases, _providers, CPU_SHAPES[:1] if quick else CPU_SHAPES)


if __name__ == "__main__":
    cli("lm_loss", run)
