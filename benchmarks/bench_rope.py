"""Benchmark: RoPE kernel vs the eager reference and torch.compile of it.

GPU (bf16; median of ``triton.testing.do_bench``; see ``benchmarks/common.py`` for the columns):
  * shapes (B, T, Hq, Hkv, D): (8, 1024, 16, 16, 64) (the model's attention), (32, 1024, 16, 16, 64) (large) and
    (8, 2048, 32, 8, 128) (large GQA);
  * modes fwd, bwd, fwd+bwd; providers triton, eager (``reference.apply_rope``, which builds cos/sin per call
    like the model's eager path), compile (``torch.compile(reference.apply_rope)``).
Minimal bytes with b-byte elements: read q, k and the [B, T] int64 positions, write q_rot, k_rot =
2·B·T·(Hq + Hkv)·D·b + 8·B·T, the same for bwd (dq_rot, dk_rot -> dq, dk); fwd+bwd is the sum.
Goal on H100 (reported, never asserted): ≥ 1.5x eager.

CPU: ``cpu_cases`` (``CPU_SHAPES``, fp32, the same ``_cases``) are timed by pytest-benchmark: the eager reference per
mode, triton and compile skipped (``benchmarks/pytest_cpu.py``; ``python -m benchmarks.run --only rope`` or
``pytest benchmarks/pytest_cpu.py --benchmark-enable -k apply_rope``). ``run(cpu)`` returns those same rows.

    python benchmarks/bench_rope.py --out benchmarks/results/
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Case, cli, reference_providers, run_shapes, shape_cpu_cases  # noqa: E402
from mllm_kernels import reference as R  # noqa: E402

THETA = 10000.0
GPU_SHAPES = [(8, 1024, 16, 16, 64), (32, 1024, 16, 16, 64), (8, 2048, 32, 8, 128)]
QUICK_GPU_SHAPES = [(8, 1024, 16, 16, 64)]
CPU_SHAPES = [(2, 128, 4, 2, 64), (2, 32, 4, 2, 64), (2, 512, 4, 2, 64)]  # the first: --quick


def _cases(shape, dtype, device):
    B, T, Hq, Hkv, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device=device, dtype=dtype)
    pos = torch.arange(T, device=device)[None].repeat(B, 1)
    one = 2 * B * T * (Hq + Hkv) * D * q.element_size() + 8 * B * T
    return [Case("apply_rope", shape, dtype, (q, k, pos), diff=(0, 1),
                 bytes={"fwd": one, "bwd": one, "fwd+bwd": 2 * one})]


def _providers(op: str):
    K = __import__("importlib").import_module("mllm_kernels.rope")  # the package root exports a function of the same name

    return reference_providers(lambda q, k, p: K.apply_rope(q, k, p, THETA),
                               lambda q, k, p: R.apply_rope(q, k, p, THETA))


def run(device=None, quick: bool = False, progress: bool = True):
    """Rows: op, shape, dtype, mode, provider, ms, gbps, pct_copy_bw, peak_mem_mb (+ bytes, copy_bw_gbps)."""
    return run_shapes(_cases, _providers, device, quick, progress, gpu_shapes=GPU_SHAPES,
                      quick_gpu_shapes=QUICK_GPU_SHAPES, module_file=__file__)


def cpu_cases(quick: bool = False):
    """The CPU rows (``CPU_SHAPES``, fp32), timed by pytest-benchmark (``benchmarks/pytest_cpu.py``): eager
    timed per mode, triton and compile skipped."""
    return shape_cpu_cases(_cases, _providers, CPU_SHAPES[:1] if quick else CPU_SHAPES)


if __name__ == "__main__":
    cli("rope", run)
