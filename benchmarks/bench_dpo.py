"""Benchmark: chunked DPO log-prob kernel vs eager logits + log_softmax.

GPU (``triton.testing.do_bench`` median): N=16 sequences, T=1,024, d=1,024, V=50,257, bf16 — forward and
forward+backward time and peak memory (``torch.cuda.max_memory_allocated`` above the inputs) for
  * ``triton``: ``mllm_kernels.dpo_logprobs.sequence_logprobs`` (never materialises [N, T, V]);
  * ``eager``:  ``mllm_kernels.reference.sequence_logprobs`` (fp32 logits, logsumexp, gather).
Goal on H100 (reported, not asserted): ≤ 20% of eager's peak memory and no slower.

CPU: ``cpu_cases`` (``CPU_SHAPES``, fp32, eager forward) are timed by pytest-benchmark (``benchmarks/pytest_cpu.py``;
``python -m benchmarks.run --only dpo``); ``run(cpu)`` returns those rows.

    python benchmarks/bench_dpo.py --out benchmarks/results/            # bench_dpo_<UTC date-time>_<card>.json/.md
    python benchmarks/bench_dpo.py --sweep --out benchmarks/results/    # + launch-config sweep of both kernels
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mllm_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import TIMER_DO_BENCH, CpuCase  # noqa: E402
from mllm_kernels import reference as R  # noqa: E402

GPU_SHAPES = [(16, 1024, 1024, 50257), (8, 1024, 1024, 50257)]
QUICK_GPU_SHAPES = [(16, 1024, 1024, 50257)]
CPU_SHAPES = [(2, 64, 64, 1000), (2, 16, 64, 1000), (2, 256, 64, 1000)]  # the first: --quick


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


def _eager_fwd(N, T, D, V):
    h, w, y = _inputs(N, T, D, V, torch.float32, "cpu")
    return lambda: R.sequence_logprobs(h, w, y)


def cpu_cases(quick: bool = False):
    """The CPU rows: the eager forward at each of ``CPU_SHAPES`` (fp32), FLOPs 2·N·T·d·V (the logits GEMM)."""
    return [CpuCase(dict(op="dpo_logprobs", shape=f"N{N}xT{T}xd{D}xV{V}", dtype="float32", mode="fwd",
                         provider="eager", peak_mem_mb=None),
                    prepare=lambda s=(N, T, D, V): _eager_fwd(*s), flops=2 * N * T * D * V)
            for N, T, D, V in (CPU_SHAPES[:1] if quick else CPU_SHAPES)]


def run(device=None, quick: bool = False):
    """Rows: op, shape, dtype, mode, provider, ms, tflops, peak_mem_mb (extra memory above the inputs). On CPU: the
    ``cpu_cases`` rows, timed by pytest-benchmark."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        from benchmarks.pytest_cpu import module_rows

        return module_rows(__file__, quick)
    rows = []
    for N, T, D, V in (QUICK_GPU_SHAPES if quick else GPU_SHAPES):
        h, w, y = _inputs(N, T, D, V, torch.bfloat16, device)
        flops_fwd = 2 * N * T * D * V
        for mode in ("fwd", "fwd_bwd"):
            for name, fn in _providers().items():
                try:
                    ms, peak = _measure_cuda(fn, h, w, y, mode)
                except torch.OutOfMemoryError:
                    ms, peak = float("nan"), float("nan")
                except Exception as e:  # noqa: BLE001 - one provider's failure must not discard the other rows
                    torch.cuda.empty_cache()
                    msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
                    rows.append(dict(op="dpo_logprobs", shape=f"N{N}xT{T}xd{D}xV{V}", dtype="bfloat16", mode=mode,
                                     provider=name, error=f"{type(e).__name__}: {msg}"[:300]))
                    continue
                torch.cuda.empty_cache()
                flops = flops_fwd * (3 if mode == "fwd_bwd" else 1)  # useful FLOPs: z, dh, dW
                rows.append(dict(op="dpo_logprobs", shape=f"N{N}xT{T}xd{D}xV{V}", dtype="bfloat16", mode=mode,
                                 provider=name, ms=ms, timer=TIMER_DO_BENCH, tflops=flops / ms / 1e9, peak_mem_mb=peak))
    return rows


SWEEP_CONFIGS = [  # (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages); the first is the default
    (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
]


def sweep(shape=(16, 1024, 1024, 50257), configs=SWEEP_CONFIGS, device="cuda"):
    """do_bench median of each kernel's launcher per launch config (bf16): 'fwd' = the fused matmul + online-LSE
    kernel (+ the host-side split combine), 'bwd' = the chunked dz kernel + its two cuBLAS matmuls per chunk."""
    import triton.testing

    from mllm_kernels import dpo_logprobs as K

    N, T, D, V = shape
    h, w, y = _inputs(N, T, D, V, torch.bfloat16, device)
    h2, y1 = h.reshape(N * T, D), y.reshape(N * T)
    _, lse = K._fwd_launch(h2, w, y1)
    g_tok = torch.ones(N * T, device=device)
    rows = []
    for bm, bv, bk, nw, ns in configs:
        tune = dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        for kind, fn in (("fwd", lambda: K._fwd_launch(h2, w, y1, tune=tune)),
                         ("bwd", lambda: K._bwd_launch(h2, w, y1, lse, g_tok, tune=tune))):
            try:
                ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
                err = None
            except Exception as e:  # noqa: BLE001 - an unlaunchable config (shared memory) is a sweep result
                ms, err = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            flops = 2 * N * T * D * V * (1 if kind == "fwd" else 3)
            rows.append(dict(kernel=kind, **tune, ms=ms, tflops=flops / ms / 1e9 if ms == ms else None, error=err))
            print(rows[-1], flush=True)
    return rows


def goals(rows):
    """Issue 7's goal at N=16, T=1,024, d=1,024, V=50,257 (fwd+bwd): peak memory ≤ 20% of eager's, time ≤ eager's."""
    out = {}
    for mode in ("fwd", "fwd_bwd"):
        sel = {r["provider"]: r for r in rows
               if r["shape"] == "N16xT1024xd1024xV50257" and r["mode"] == mode and "ms" in r}
        if "triton" in sel and "eager" in sel:
            t, e = sel["triton"], sel["eager"]
            out[mode] = dict(memory_ratio=t["peak_mem_mb"] / e["peak_mem_mb"], speedup=e["ms"] / t["ms"])
    return out


def to_markdown(rows):
    lines = ["| shape | dtype | mode | provider | ms (median) | TFLOP/s | peak extra MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['error']} | | |")
            continue
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {peak} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time the kernels' launch configs (CUDA)")
    args = ap.parse_args()
    from benchmarks.run import environment, jsonable, result_stem

    env = environment()
    rows = run(quick=args.quick)
    summary = goals(rows)
    swept = sweep() if args.sweep and torch.cuda.is_available() else []
    md = [f"# DPO log-probs: {env.get('card')} ({env['date_utc']})", "",
          f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}, "
          f"driver {env.get('driver')}, git {env.get('git_commit')}", "", to_markdown(rows), ""]
    for mode, g in summary.items():
        md.append(f"- {mode} at N16xT1024xd1024xV50257: triton peak memory = {g['memory_ratio']:.1%} of eager's "
                  f"(goal ≤ 20%), speed-up {g['speedup']:.2f}x (goal ≥ 1.00x)")
    if swept:
        md += ["", "| kernel | BLOCK_M | BLOCK_V | BLOCK_K | warps | stages | ms | TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
        for r in swept:
            tf = "n/a" if r["tflops"] is None else f"{r['tflops']:.0f}"
            md.append(f"| {r['kernel']} | {r['BLOCK_M']} | {r['BLOCK_V']} | {r['BLOCK_K']} | {r['num_warps']} | "
                      f"{r['num_stages']} | {r['ms']:.3f} | {tf} |" + (f" {r['error']}" if r["error"] else ""))
    text = "\n".join(md)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = result_stem(out, env, prefix="bench_dpo")  # date and time: a same-day re-run used to overwrite
        (out / f"{stem}.json").write_text(json.dumps(jsonable(dict(env=env, rows=rows, goals=summary, sweep=swept)),
                                                     indent=2))
        (out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
