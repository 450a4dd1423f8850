"""Benchmark: chunked DPO log-prob kernel vs eager logits + log_softmax.

GPU (``triton.testing.do_bench`` median): N=16 sequences, T=1,024, d=1,024, V=50,257, bf16 — forward and
forward+backward time and peak memory (``torch.cuda.max_memory_allocated`` above the inputs) for
  * ``triton``: ``mllm_kernels.dpo_logprobs.sequence_logprobs`` (never materialises [N, T, V]);
  * ``eager``:  ``mllm_kernels.reference.sequence_logprobs`` (fp32 logits, logsumexp, gather).
Goal on H100 (reported, not asserted): ≤ 20% of eager's peak memory and no slower.

CPU: ``pytest benchmarks/bench_dpo.py --benchmark-enable`` times the eager reference at a small shape.

    python benchmarks/bench_dpo.py --out benchmarks/results/     # JSON + Markdown
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mllm_kernels import reference as R

GPU_SHAPES = [(16, 1024, 1024, 50257), (8, 1024, 1024, 50257)]
QUICK_GPU_SHAPES = [(16, 1024, 1024, 50257)]
CPU_SHAPES = [(2, 64, 64, 1000)]


def _inputs(N, T, D, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, T, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, D, generator=g) * D ** -0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (N, T), generator=g).to(device)
    return h, w, y


def _providers():
    from mllm_kernels import dpo_logprobs as K

    return {
        "triton": lambda h, w, y: K.sequence_logprobs(h, w, y, check_labels=False),
        "eager": R.sequence_logprobs,
    }


def _measure_cuda(fn, h, w, y, mode):
    import triton.testing

    hh = h.detach().clone().requires_grad_(mode == "fwd_bwd")
    ww = w.detach().clone().requires_grad_(mode == "fwd_bwd")
    g = torch.ones(h.shape[0], device=h.device)

    def step():
        out = fn(hh, ww, y)
        if mode == "fwd_bwd":
            torch.autograd.backward(out, g)
            hh.grad = None
            ww.grad = None

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")
    return ms, peak


def run(device=None, quick: bool = False):
    """Rows: op, shape, dtype, mode, provider, ms, tflops, peak_mem_mb (extra memory above the inputs)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    if device.type != "cuda":
        for N, T, D, V in CPU_SHAPES:
            h, w, y = _inputs(N, T, D, V, torch.float32, device)
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                R.sequence_logprobs(h, w, y)
            ms = (time.perf_counter() - t0) / reps * 1e3
            rows.append(dict(op="dpo_logprobs", shape=f"N{N}xT{T}xd{D}xV{V}", dtype="float32", mode="fwd",
                             provider="eager", ms=ms, tflops=2 * N * T * D * V / ms / 1e9, peak_mem_mb=None))
        return rows
    for N, T, D, V in (QUICK_GPU_SHAPES if quick else GPU_SHAPES):
        h, w, y = _inputs(N, T, D, V, torch.bfloat16, device)
        flops_fwd = 2 * N * T * D * V
        for mode in ("fwd", "fwd_bwd"):
            for name, fn in _providers().items():
                try:
                    ms, peak = _measure_cuda(fn, h, w, y, mode)
                except torch.OutOfMemoryError:
                    ms, peak = float("nan"), float("nan")
                torch.cuda.empty_cache()
                flops = flops_fwd * (3 if mode == "fwd_bwd" else 1)  # useful FLOPs: z, dh, dW
                rows.append(dict(op="dpo_logprobs", shape=f"N{N}xT{T}xd{D}xV{V}", dtype="bfloat16", mode=mode,
                                 provider=name, ms=ms, tflops=flops / ms / 1e9, peak_mem_mb=peak))
    return rows


def to_markdown(rows):
    lines = ["| shape | dtype | mode | provider | ms (median) | TFLOP/s | peak extra MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {peak} |")
    return "\n".join(lines)


def test_eager_reference_cpu(benchmark):
    h, w, y = _inputs(*CPU_SHAPES[0], torch.float32, "cpu")
    benchmark(R.sequence_logprobs, h, w, y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = run(quick=args.quick)
    md = to_markdown(rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_dpo.json").write_text(json.dumps(rows, indent=2))
        (out / "bench_dpo.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
