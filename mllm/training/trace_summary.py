"""Summary of a torch.profiler Chrome trace: per-range totals, how busy the GPU was, GPU time by kind (GEMMs, each
of this package's kernels, inductor's, copies, the optimizer), and the top GPU kernels.

    python -m mllm.training.trace_summary TRACE.json [--top 15]

The busy/idle part answers the question an Nsight Systems timeline answers at a glance (and that this project's
GPU image cannot, having no ``nsys``): is the step launch-bound? Over the profiled window (first kernel start to
last kernel end) it reports

    busy  = |union of kernel intervals|            (overlapping kernels count once)
    idle  = window − busy, split into gaps between consecutive busy intervals
    busy% = busy / window

A launch-bound step shows busy% well under ~90% with many gaps of tens of µs (the host enqueues kernels slower
than the GPU runs them); a GPU-bound one shows busy% near 100% and only µs-scale gaps. Memory copies/sets
(``gpu_memcpy``/``gpu_memset``) count as busy.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

RANGES = ("step", "data", "forward", "backward", "optimizer")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_BINS_US = (5, 20, 100, 1000)  # gap histogram edges: <5 µs, 5–20, 20–100, 100–1000, >= 1000
# kernel name -> kind, first match wins: the step-time budget of benchmarks/NOTES.md by part (this package's Triton
# kernels by op; PyTorch SDPA's attention kernels; cuBLAS/CUTLASS GEMMs, whose names vary by card and library
# version: sm90_xmma_gemm_*, nvjet_*, cutlass_*; inductor's generated Triton kernels; the rest of ATen). SDPA comes
# before the GEMMs because its kernels are CUTLASS templates whose full names say so
# ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<..., cutlass::bfloat16_t, ...>>",
# "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, ...>)").
KINDS = (
    ("attention (mllm)", re.compile(r"_attn_")),
    ("rms_norm (mllm)", re.compile(r"_rms_norm_")),
    ("swiglu (mllm)", re.compile(r"_swiglu_")),
    ("rope (mllm)", re.compile(r"_rope_")),
    ("lm loss / dpo (mllm)", re.compile(r"_ce_rows|_dpo_logprobs")),
    ("attention (PyTorch SDPA)", re.compile(r"flash_(?:fwd|bwd)|fmha|efficient_attention|MemEffAttention|_sdpa_|"
                                            r"flash_attn|flash::", re.I)),
    ("GEMM (cuBLAS/CUTLASS)", re.compile(r"gemm|cutlass|xmma|nvjet|cublas", re.I)),
    ("optimizer / foreach (ATen)", re.compile(r"multi_tensor_apply|adam", re.I)),
    ("inductor-generated", re.compile(r"^triton_(?:poi|red|per|tem|for)_")),
    ("copies and casts (ATen)", re.compile(r"copy|cast", re.I)),
    ("other ATen element-wise / reductions", re.compile(r"elementwise|vectorized|reduce|index|scatter|gather|fill",
                                                        re.I)),
)


def kernel_kind(name: str, cat: str = "kernel") -> str:
    """The part of the step a GPU activity belongs to (``KINDS``); memcpy/memset by their trace category."""
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "memcpy / memset"
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other"


def load_events(path: str | Path) -> List[dict]:
    with open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def gpu_busy(events: Iterable[dict]) -> Dict[str, object]:
    """Union of the GPU activity intervals: {'window_us', 'busy_us', 'busy_frac', 'n_kernels', 'gaps': {bin: (n, us)}}."""
    iv: List[Tuple[float, float]] = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS)
    n = sum(1 for _ in iv)
    if not iv:
        return {"window_us": 0.0, "busy_us": 0.0, "busy_frac": float("nan"), "n_kernels": 0, "gaps": {}}
    merged = [list(iv[0])]
    for s, e in iv[1:]:
        if s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    window = merged[-1][1] - merged[0][0]
    busy = sum(e - s for s, e in merged)
    edges = (0,) + GAP_BINS_US + (float("inf"),)
    labels = [f"{lo:g}-{hi:g} us" if hi != float("inf") else f">={lo:g} us" for lo, hi in zip(edges, edges[1:])]
    gaps = {lab: [0, 0.0] for lab in labels}
    for (_, e0), (s1, _) in zip(merged, merged[1:]):
        g = s1 - e0
        for lab, lo, hi in zip(labels, edges, edges[1:]):
            if lo <= g < hi:
                gaps[lab][0] += 1
                gaps[lab][1] += g
                break
    return {"window_us": window, "busy_us": busy, "busy_frac": busy / window if window > 0 else float("nan"),
            "n_kernels": n, "gaps": {k: tuple(v) for k, v in gaps.items()}}


def summarize(path: str | Path, top: int = 15) -> str:
    events = load_events(path)
    tot, cnt, kern, kcount, kind_ms, kind_n = (collections.Counter() for _ in range(6))
    for e in events:
        if e.get("ph") != "X":
            continue
        if e.get("cat") in GPU_CATS:
            kind = kernel_kind(e.get("name", ""), e["cat"])
            kind_ms[kind] += e.get("dur", 0) / 1e3
            kind_n[kind] += 1
        if e.get("name") in RANGES and e.get("cat") in ("user_annotation", "gpu_user_annotation"):
            # user_annotation: the host-side record_function span; gpu_user_annotation: the same range on the stream
            side = "gpu" if e["cat"] == "gpu_user_annotation" else "cpu"
            tot[e["name"], side] += e.get("dur", 0) / 1e3
            cnt[e["name"], side] += 1
        elif e.get("cat") == "kernel":
            kern[e["name"]] += e.get("dur", 0) / 1e3
            kcount[e["name"]] += 1
    lines = [f"trace: {path}", "range      side   count   total ms   mean ms"]
    for r in RANGES:
        for side in ("cpu", "gpu"):
            if cnt[r, side]:
                lines.append(f"{r:<10} {side:<5} {cnt[r, side]:>6} {tot[r, side]:>10.2f} {tot[r, side] / cnt[r, side]:>9.2f}")
    b = gpu_busy(events)
    if b["n_kernels"]:
        lines += ["", "GPU activity over the profiled window (first kernel start to last kernel end)",
                  f"window {b['window_us'] / 1e3:.2f} ms, busy {b['busy_us'] / 1e3:.2f} ms "
                  f"({100 * b['busy_frac']:.1f}%), {b['n_kernels']} kernels/copies "
                  f"(mean {b['busy_us'] / b['n_kernels']:.1f} us busy per launch)",
                  "idle gaps:  " + ", ".join(f"{lab}: {n} ({us / 1e3:.2f} ms)" for lab, (n, us) in b["gaps"].items())]
    if kind_ms:
        total = sum(kind_ms.values())
        lines += ["", "GPU time by kind (ms, share of the summed GPU time, launches; overlapping kernels both count)"]
        for kind, ms in kind_ms.most_common():
            lines.append(f"{ms:>10.2f} {100 * ms / total:>6.1f}% {kind_n[kind]:>6}  {kind}")
    if kern:
        lines += ["", f"top GPU kernels by total time (ms, launches)"]
        for name, ms in kern.most_common(top):
            lines.append(f"{ms:>10.2f} {kcount[name]:>6}  {name[:110]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("trace", help="a torch.profiler Chrome trace (.json)")
    p.add_argument("--top", type=int, default=15, help="how many kernels to list")
    args = p.parse_args(argv)
    if not Path(args.trace).is_file():
        raise SystemExit(f"trace_summary: no such file: {args.trace}")
    print(summarize(args.trace, args.top))


if __name__ == "__main__":
    main()
