"""Benchmark: SwiGLU kernel vs the eager reference and torch.compile of it.

GPU (bf16; median of ``triton.testing.do_bench``; see ``benchmarks/common.py`` for the columns):
  * shapes (tokens x width F): 8,192 x 4,096 (the model: 8 x 1,024 tokens, ffn_dim 4,096), and the large
    32,768 x 4,096 and 32,768 x 11,008;
  * modes fwd, bwd, fwd+bwd; providers triton, eager (``reference``), compile (``torch.compile(reference)``).
Minimal bytes with N·F elements of b bytes: fwd reads gate, up and writes out = 3·N·F·b; bwd reads dout, gate, up
and writes dgate, dup = 5·N·F·b; fwd+bwd = 8·N·F·b.
Goals on H100 (reported, never asserted): fwd and bwd ≥ 85% of the measured copy bandwidth at the large shapes,
≥ 1.5x eager at the model's shape. ``peak_mem_mb`` of fwd+bwd shows the activation memory the kernel saves by
recomputing silu (see ``mllm_kernels/swiglu.py``).

CPU: ``cpu_cases`` (``CPU_SHAPES``, fp32, the same ``_cases``) are timed by pytest-benchmark: the eager reference per
mode, triton and compile skipped (``benchmarks/pytest_cpu.py``; ``python -m benchmarks.run --only swiglu`` or
``pytest benchmarks/pytest_cpu.py --benchmark-enable -k swiglu``). ``run(cpu)`` returns those same rows.

    python benchmarks/bench_swiglu.py --out benchmarks/results/
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Case, cli, reference_providers, run_shapes, shape_cpu_cases  # noqa: E402
from mllm_kernels import reference as R  # noqa: E402

GPU_SHAPES = [(8192, 4096), (32768, 4096), (32768, 11008)]
QUICK_GPU_SHAPES = [(8192, 4096), (32768, 4096)]
CPU_SHAPES = [(256, 1024), (64, 1024), (1024, 1024)]  # the first: --quick


def _cases(shape, dtype, device):
    N, F = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    gate = torch.randn(N, F, generator=g).to(device=device, dtype=dtype)
    up = torch.randn(N, F, generator=g).to(device=device, dtype=dtype)
    b = gate.element_size()
    nbytes = {"fwd": 3 * N * F * b, "bwd": 5 * N * F * b, "fwd+bwd": 8 * N * F * b}
    return [Case("swiglu", shape, dtype, (gate, up), diff=(0, 1), bytes=nbytes)]


def _providers(op: str):
    K = __import__("importlib").import_module("mllm_kernels.swiglu")  # the package root exports a function of the same name

    return reference_providers(K.swiglu, R.swiglu)


def run(device=None, quick: bool = False, progress: bool = True):
    """Rows: op, shape, dtype, mode, provider, ms, gbps, pct_copy_bw, peak_mem_mb (+ bytes, copy_bw_gbps)."""
    return run_shapes(_cases, _providers, device, quick, progress, gpu_shapes=GPU_SHAPES,
                      quick_gpu_shapes=QUICK_GPU_SHAPES, module_file=__file__)


def cpu_cases(quick: bool = False):
    """The CPU rows (``CPU_SHAPES``, fp32), timed by pytest-benchmark (``benchmarks/pytest_cpu.py``): eager
    timed per mode, triton and compile skipped."""
    return shape_cpu_cases(_cases, _providers, CPU_SHAPES[:1] if quick else CPU_SHAPES)


if __name__ == "__main__":
    cli("swiglu", run)
