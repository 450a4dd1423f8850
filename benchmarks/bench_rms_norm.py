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

CPU: ``cpu_cases`` (``CPU_SHAPES``, fp32, the same ``_cases``) are timed by pytest-benchmark: the eager reference per
mode, triton and compile skipped (``benchmarks/pytest_cpu.py``; ``python -m benchmarks.run --only rms_norm`` or
``pytest benchmarks/pytest_cpu.py --benchmark-enable -k rms_norm``). ``run(cpu)`` returns those same rows.

    python benchmarks/bench_rms_norm.py --out benchmarks/results/      # JSON + Markdown
    python benchmarks/bench_rms_norm.py --sweep --out benchmarks/results/   # GPU: backward launch-config sweep

The backward sweep times ``rms_norm_bwd`` (plain, with the fused op's dh, and the autocast layout's fp32 stream with
the bf16 copy of dx) per launch config: rows per tile, warps, programs per SM. Why: the shipped backward (8 rows x
1,024 with 4 warps) was measured fastest on an H100 among the configs tried then, yet sits at 53% of bandwidth, and ptxas gives it 253-255 registers, i.e. 2 CTAs = 8 warps
per SM (``python -m benchmarks.aot_check``, benchmarks/NOTES.md tuning step 12): 8 or 16 warps per tile halve or
quarter the registers per thread.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mllm_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Case, cli, cpu_median_ms, cuda_median_ms, reference_providers, run_shapes,  # noqa: E402
                               shape_cpu_cases)
from mllm_kernels import reference as R  # noqa: E402

EPS = 1e-6
GPU_SHAPES = [(8192, 1024), (32768, 4096), (16384, 16384)]
QUICK_GPU_SHAPES = [(8192, 1024), (32768, 4096)]
CPU_SHAPES = [(256, 1024), (64, 1024), (1024, 1024)]  # the first: --quick


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
                      quick_gpu_shapes=QUICK_GPU_SHAPES, module_file=__file__)


def cpu_cases(quick: bool = False):
    """The CPU rows (``CPU_SHAPES``, fp32), timed by pytest-benchmark (``benchmarks/pytest_cpu.py``): eager
    timed per mode, triton and compile skipped."""
    return shape_cpu_cases(_cases, _providers, CPU_SHAPES[:1] if quick else CPU_SHAPES)


# ----------------------------------------------------------------------------------------------------
# GPU: backward launch-config sweep
# ----------------------------------------------------------------------------------------------------
SWEEP_SHAPES = [(8192, 1024), (32768, 4096)]
SWEEP_CONFIGS = [None] + [dict(block_rows=br, num_warps=nw, per_sm=ps)
                          for br in (4, 8, 16) for nw in (4, 8, 16) for ps in (2, 4, 8)]


MAX_SWEEP_TILE = 32768


def sweep(device="cuda", shapes=SWEEP_SHAPES, configs=SWEEP_CONFIGS, dtype=torch.bfloat16):
    """Median ms of ``rms_norm_bwd`` per launch config and its GB/s over the minimal bytes; ``None`` is the shipped
    config. A config that cannot launch is a row with its error. Variants (the ``variant`` field):
      plain    the plain norm's backward: read dy, x; write dx (all ``dtype``)
      dh       the fused op's backward with one stream dtype: also read dh
      dh+copy  the fused op under autocast: fp32 stream (h, dh, dx fp32) and ``dtype`` dy, plus the copy of dx in
               ``dtype`` for the branch (``copy_dtype``, the gpu-full training step's fused norms)
    (each plus w read and dw written). On CPU (tests, under the interpreter) the timing is perf_counter's and
    means nothing."""
    K = __import__("importlib").import_module("mllm_kernels.rms_norm")
    dev = torch.device(device)
    time_ms = cuda_median_ms if dev.type == "cuda" else (lambda fn: cpu_median_ms(fn, reps=1))
    rows = []
    for N, C in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        x, dy, dh = (torch.randn(N, C, generator=g).to(dev, dtype) for _ in range(3))
        w = (1 + 0.1 * torch.randn(C, generator=g)).to(dev, dtype)
        b, bw = x.element_size(), 2 * C * w.element_size()
        x32, dh32 = x.float(), dh.float()
        variants = {
            "plain": (3 * N * C * b + bw, lambda tune: K.rms_norm_bwd(dy, x, w, EPS, tune=tune)),
            "dh": (4 * N * C * b + bw, lambda tune: K.rms_norm_bwd(dy, x, w, EPS, dh=dh, tune=tune)),
            "dh+copy": (N * C * (2 * b + 12) + bw,
                        lambda tune: K.rms_norm_bwd(dy, x32, w, EPS, dh=dh32, tune=tune, copy_dtype=dtype)),
        }
        for variant, (nbytes, launch) in variants.items():
            for tune in configs:
                if tune is not None and tune["block_rows"] * triton.next_power_of_2(C) > MAX_SWEEP_TILE:
                    continue  # 64K-element register tiles: minutes of compile for a config that cannot win
                try:
                    ms = time_ms(lambda: launch(tune))
                    err = None
                except Exception as e:  # noqa: BLE001 - an unlaunchable config is a sweep result
                    ms, err = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(dict(shape=f"{N}x{C}", variant=variant, config="shipped" if tune is None else tune,
                                 ms=ms, gbps=nbytes / ms / 1e6 if ms == ms else None, error=err))
                print(rows[-1], flush=True)
    return rows


def sweep_markdown(rows, env) -> str:
    lines = [f"# RMSNorm backward launch-config sweep: {env.get('card')} ({env.get('date_utc')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}, driver "
             f"{env.get('driver')}, git {env.get('git_commit')}; `python benchmarks/bench_rms_norm.py --sweep`", "",
             "| shape | variant | rows/tile | warps | programs/SM | ms | GB/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        br, nw, ps = ("shipped",) * 3 if c == "shipped" else (c["block_rows"], c["num_warps"], c["per_sm"])
        gb = "n/a" if r["gbps"] is None else f"{r['gbps']:.0f}"
        lines.append(f"| {r['shape']} | {r['variant']} | {br} | {nw} | {ps} | {r['ms']:.4f} | {gb} |"
                     + (f" {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def main_sweep(argv) -> list:
    import argparse

    from benchmarks.run import environment, write_sweep

    ap = argparse.ArgumentParser(description="RMSNorm backward launch-config sweep (GPU)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    env = environment(args.device)
    rows = sweep(args.device) if args.device != "cpu" else sweep("cpu", shapes=[(64, 256)], configs=SWEEP_CONFIGS[:3],
                                                                 dtype=torch.float32)
    text = sweep_markdown(rows, env)
    print(text)
    if args.out:
        write_sweep(args.out, "bench_rms_norm_sweep", env, rows, text)
    return rows


if __name__ == "__main__":
    if "--sweep" in sys.argv[1:]:
        main_sweep(sys.argv[1:])
    else:
        cli("rms_norm", run)
