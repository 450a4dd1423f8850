"""Benchmark: the fused attention kernel vs SDPA (flash), FlexAttention (sinks through its LSE) and the eager
reference with sinks.

GPU (``triton.testing.do_bench`` medians), bf16, B·T = 16,384 tokens and H·D = 2,048 (H = 32 at D = 64,
16 at D = 128), T = 1k, 2k, 4k, 8k, 16k, causal, modes fwd / bwd / fwd+bwd. Providers:
  * ``mllm``          ours, features off (causal + fused RoPE);
  * ``mllm-norope``   ours without RoPE (the same work as SDPA: the like-for-like kernel comparison);
  * ``mllm-sinks``    ours + learned sinks;
  * ``mllm-all``      ours + learned sinks + window T/4 with 4 sink tokens + packed documents [T/2, T/4, T/4];
  * ``mllm-atomicdq`` ``mllm`` with the atomic-dq backward (``attention.BWD_DQ = "atomic"``; every ``mllm*``
                      provider sets the mode it measures on each forward call, so the backward that follows uses it);
  * ``sdpa-flash``    ``F.scaled_dot_product_attention`` on the flash backend (no sinks: the bound to beat);
  * ``flex-sinks``    compiled FlexAttention, causal block mask, sinks by renormalising with its LSE:
                      out · exp(lse − logaddexp(lse, sink)); ``flex-all`` the same mask as ``mllm-all``;
  * ``eager-sinks``   ``reference.attention`` with sinks (skipped where its [B, H, T, T] tensors would not fit).
TFLOP/s use the causal FLOP count 2·B·H·T²·D (half of 4·B·H·T²·D) for fwd, 2.5× that for bwd and 3.5× for
fwd+bwd, for every provider: masked variants do less work, so their TFLOP/s is "causal-equivalent" speed.
``peak_mem_mb`` is the extra memory of one fwd+bwd step above the inputs. Each provider is checked against
``mllm-norope``/``mllm`` semantics at the first shape (``max_abs_diff`` vs the matching reference).

CPU: ``cpu_cases`` (the eager reference with sinks, forward, at ``CPU_SHAPE``, fp32) are timed by pytest-benchmark
(``benchmarks/pytest_cpu.py``; ``python -m benchmarks.run --only attention``); ``run(cpu)`` returns those rows.

    python benchmarks/bench_attention.py --out benchmarks/results/   # bench_attention_<UTC date-time>_<card>.json/.md
    python benchmarks/bench_attention.py --tune                      # GPU tile sweep (prints a table)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mllm_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import TIMER_DO_BENCH, CpuCase  # noqa: E402
from mllm_kernels import reference as R  # noqa: E402

SEQ_LENS = [1024, 2048, 4096, 8192, 16384]
QUICK_SEQ_LENS = [1024, 4096]
HEAD_DIMS = [64, 128]
TOKENS = 16384
HIDDEN = 2048
MODES = ("fwd", "bwd", "fwd+bwd")
FLEX_SEQ_LENS = {1024, 4096, 16384}  # each new shape recompiles FlexAttention (~tens of seconds)
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _shape(T: int, D: int):
    return max(1, TOKENS // T), HIDDEN // D


def _causal_flops(B, H, T, D):
    return 2.0 * B * H * T * T * D  # two T×T×D matmuls, half of them masked


def _docs(B, T, device):
    """cu_seqlens with documents of lengths [T/2, T/4, T/4] in every row."""
    lens = [T // 2, T // 4, T - T // 2 - T // 4]
    bounds = [0]
    for _ in range(B):
        for n in lens:
            bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _all_features(B, T, device):
    return dict(cu_seqlens=_docs(B, T, device), window=T // 4, n_sink_tokens=4)


# ----------------------------------------------------------------------------------------------------
# providers: make(B, H, T, D, device) -> (inputs tuple, fn(*inputs) -> out)
# ----------------------------------------------------------------------------------------------------
def _bthd(B, H, T, D, device, g):
    return [torch.randn(B, T, H, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3)]


def _mllm(kind):
    A = __import__("importlib").import_module("mllm_kernels.attention")  # the package root exports a function of the same name
    dq_mode = "atomic" if kind == "atomicdq" else "separate"

    def make(B, H, T, D, device, g):
        q, k, v = _bthd(B, H, T, D, device, g)
        sinks = torch.randn(H, generator=g, device=device) if kind in ("sinks", "all") else None
        kw = dict(rope_theta=None) if kind == "norope" else {}
        if kind == "all":
            kw.update(_all_features(B, T, device))

        def fn(q, k, v, s):
            A.BWD_DQ = dq_mode  # read by the backward launcher: a module setting, not an argument of the op
            return A.attention(q, k, v, sinks=s, **kw)

        return (q, k, v, sinks), fn

    return make


def _sdpa(B, H, T, D, device, g):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.transpose(1, 2).contiguous() for x in _bthd(B, H, T, D, device, g))

    def fn(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return (q, k, v), fn


def _flex(kind):
    def make(B, H, T, D, device, g):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = (x.transpose(1, 2).contiguous() for x in _bthd(B, H, T, D, device, g))
        sinks = torch.randn(H, generator=g, device=device)
        if kind == "all":
            feats = _all_features(B, T, device)
            start = R.doc_start_from_cu_seqlens(feats["cu_seqlens"], B, T, device)
            W, NS = feats["window"], feats["n_sink_tokens"]

            def mask_mod(b, h, i, j):
                st = start[b, i]
                return (j <= i) & (j >= st) & (((i - j) < W) | ((j - st) < NS))
        else:
            def mask_mod(b, h, i, j):
                return j <= i
        block_mask = create_block_mask(mask_mod, B, None, T, T, device=device)
        flex = _compiled_flex(flex_attention)

        def fn(q, k, v, s):
            out, lse = _flex_call(flex, q, k, v, block_mask)
            lse = lse.float()
            w = torch.exp(lse - torch.logaddexp(lse, s.float()[None, :, None]))  # 1 − P_sink per row
            return (out.float() * w[..., None]).to(q.dtype)

        return (q, k, v, sinks), fn

    return make


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex_call(flex, q, k, v, block_mask):
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = flex(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    except ImportError:  # older torch: return_lse
        return flex(q, k, v, block_mask=block_mask, return_lse=True)


def _eager(B, H, T, D, device, g):
    q, k, v = _bthd(B, H, T, D, device, g)
    sinks = torch.randn(H, generator=g, device=device)
    return (q, k, v, sinks), lambda q, k, v, s: R.attention(q, k, v, sinks=s)


def _eager_fits(B, H, T, device) -> bool:
    # scores, probs, masks and their gradients: ~6 fp32 [B, H, T, T] tensors alive in fwd+bwd
    need = 6 * 4 * B * H * T * T
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.8 * free


PROVIDERS = {
    "mllm": _mllm("plain"),
    "mllm-norope": _mllm("norope"),
    "mllm-sinks": _mllm("sinks"),
    "mllm-all": _mllm("all"),
    "mllm-atomicdq": _mllm("atomicdq"),
    "sdpa-flash": _sdpa,
    "flex-sinks": _flex("sinks"),
    "flex-all": _flex("all"),
    "eager-sinks": _eager,
}
# providers that skip most of the causal triangle (window T/4 + packed documents): less work than sdpa-flash's full
# causal attention, so the runner must not report a speed-up of theirs against it (``not_comparable``)
NOT_COMPARABLE = {p: "window T/4 + 4 sink tokens + packed documents: a fraction of the causal work of sdpa-flash"
                  for p in ("mllm-all", "flex-all")}
# which of our providers computes the same function (for the correctness column)
SAME_AS = {"flex-sinks": "mllm-sinks-norope", "flex-all": "mllm-all-norope", "sdpa-flash": "mllm-norope",
           "eager-sinks": "mllm-sinks"}


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
def _measure(fn, inputs, mode):
    """(median ms, peak extra MiB or None) for one mode."""
    import triton.testing

    float_ins = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if mode == "fwd":
        with torch.no_grad():
            ms = triton.testing.do_bench(lambda: fn(*inputs), warmup=10, rep=60, return_mode="median")
        return ms, None
    leaves = [x.detach().requires_grad_() for x in float_ins]
    it = iter(leaves)
    args = [next(it) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    out = fn(*args)
    g = torch.randn_like(out)
    if mode == "bwd":
        ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True),
                                     warmup=10, rep=60, return_mode="median")
        return ms, None

    def step():
        o = fn(*args)
        torch.autograd.grad(o, leaves, g)

    del out
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median")
    return ms, peak


def _max_diff(name, B, H, T, D, device):
    """max |provider − our kernel on the same inputs| (fp32), for the providers that compute our function."""
    A = __import__("importlib").import_module("mllm_kernels.attention")  # the package root exports a function of the same name

    g = torch.Generator(device=device).manual_seed(1)
    inputs, fn = PROVIDERS[name](B, H, T, D, device, g)
    with torch.no_grad():
        out = fn(*inputs).float()
        if name in ("sdpa-flash", "flex-sinks", "flex-all"):
            q, k, v = (x.transpose(1, 2) for x in inputs[:3])
            kw = dict(rope_theta=None, sinks=inputs[3] if len(inputs) > 3 else None)
            if name == "flex-all":
                kw.update(_all_features(B, T, device))
            ours = A.attention(q, k, v, **kw).float().transpose(1, 2)
        else:
            ours = A.attention(*inputs[:3], sinks=inputs[3]).float()
    return (out - ours).abs().max().item()


def run(device=None, quick: bool = False, providers=None, seq_lens=None, head_dims=None, log_path=None):
    """Rows: op (attention_d<D>), shape, size (T), dtype, mode, provider, ms, tflops, peak_mem_mb,
    plus max_abs_diff (vs our kernel, first shape only) and skipped/error where a provider cannot run.
    ``log_path``: also append every row as a JSON line as soon as it is measured (survives a killed run)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        from benchmarks.pytest_cpu import module_rows

        return module_rows(__file__, quick)
    from tqdm import tqdm

    seq_lens = seq_lens or (QUICK_SEQ_LENS if quick else SEQ_LENS)
    head_dims = head_dims or HEAD_DIMS
    names = providers or list(PROVIDERS)
    rows = []
    n_logged = 0
    jobs = [(D, T, name) for D in head_dims for T in seq_lens for name in names]
    for D, T, name in tqdm(jobs, desc="bench_attention"):
        B, H = _shape(T, D)
        base = dict(op=f"attention_d{D}", shape=f"B{B}xT{T}xH{H}xD{D}", size=T, dtype="bfloat16")
        if name.startswith("flex") and T not in FLEX_SEQ_LENS and not quick:
            rows.append(dict(base, provider=name, mode="fwd+bwd", skipped="FlexAttention timed at T in "
                             f"{sorted(FLEX_SEQ_LENS)} only (one compile per shape)"))
            continue
        if name == "eager-sinks" and not _eager_fits(B, H, T, device):
            rows.append(dict(base, provider=name, mode="fwd+bwd", skipped="[B, H, T, T] fp32 tensors would not fit"))
            continue
        extra = {"not_comparable": NOT_COMPARABLE[name]} if name in NOT_COMPARABLE else {}
        if T == seq_lens[0] and name in SAME_AS:
            try:
                extra["max_abs_diff"] = _max_diff(name, B, H, T, D, device)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                extra["max_abs_diff_error"] = f"{type(e).__name__}: {e}"[:300]
        g = torch.Generator(device=device).manual_seed(0)
        try:
            inputs, fn = PROVIDERS[name](B, H, T, D, device, g)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(base, provider=name, mode="fwd+bwd", error=f"{type(e).__name__}: {e}"[:300]))
            continue
        for mode in MODES:
            try:
                ms, peak = _measure(fn, inputs, mode)
                flops = _causal_flops(B, H, T, D) * MODE_FLOPS[mode]
                rows.append(dict(base, provider=name, mode=mode, ms=ms, timer=TIMER_DO_BENCH, tflops=flops / ms / 1e9,
                                 peak_mem_mb=peak, **extra))
            except torch.OutOfMemoryError:
                rows.append(dict(base, provider=name, mode=mode, skipped="out of memory"))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, provider=name, mode=mode, error=f"{type(e).__name__}: {e}"[:300]))
            torch.cuda.empty_cache()
        del inputs, fn
        torch.cuda.empty_cache()
        if log_path:
            with open(log_path, "a") as f:
                for r in rows[n_logged:]:
                    f.write(json.dumps(r) + "\n")
            n_logged = len(rows)
    return rows


CPU_SHAPE = (1, 256, 4, 64)  # B, T, H, D (--quick)
CPU_SHAPES = [CPU_SHAPE, (1, 64, 4, 64), (1, 1024, 4, 64)]  # a time-vs-T plot on CPU too


def _cpu_inputs(shape=CPU_SHAPE):
    B, T, H, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    return q, k, v, torch.randn(H, generator=g)


def _eager_sinks_fwd(shape=CPU_SHAPE):
    q, k, v, s = _cpu_inputs(shape)
    return lambda: R.attention(q, k, v, sinks=s)


def cpu_cases(quick: bool = False):
    """The CPU rows: the eager reference with sinks, forward, at ``CPU_SHAPES`` (``CPU_SHAPE`` alone with ``quick``;
    fp32); FLOPs the causal count."""
    return [CpuCase(dict(op=f"attention_d{D}", shape=f"B{B}xT{T}xH{H}xD{D}", size=T, dtype="float32", mode="fwd",
                         provider="eager-sinks", peak_mem_mb=None),
                    prepare=lambda s=(B, T, H, D): _eager_sinks_fwd(s), flops=_causal_flops(B, H, T, D))
            for B, T, H, D in ([CPU_SHAPE] if quick else CPU_SHAPES)]


# ----------------------------------------------------------------------------------------------------
# GPU tile sweep
# ----------------------------------------------------------------------------------------------------
TUNE_CANDIDATES = {  # (BLOCK_M, BLOCK_N, warps, stages); those that spill registers on sm_90 are left out
    "fwd": {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 4),
                 (64, 128, 4, 3)],
            128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 4), (128, 32, 8, 3)]},
    "dkdv": {64: [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 2)],
             128: [(64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 8, 2)]},
    "dq": {64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
           128: [(64, 64, 8, 3), (64, 32, 8, 3), (64, 32, 8, 2)]},
}


def candidates_from_aot(path, max_spill: int = 0, min_tile: int = 0) -> Dict[str, List[tuple]]:
    """Tiles per kernel from a ``python -m benchmarks.aot_check --sweep-attention D,bf16 --variant causal`` JSON: those
    that compiled for the GPU with at most ``max_spill`` bytes spilled and BLOCK_M·BLOCK_N >= ``min_tile``, so the GPU
    spends no time on the rest (each tile costs a compile there, ~1-3 s)."""
    rows = json.loads(Path(path).read_text())["rows"]
    out: Dict[str, List[tuple]] = {}
    for r in rows:
        if not r["error"] and (r["spill_stores"] or 0) <= max_spill and r["BLOCK_M"] * r["BLOCK_N"] >= min_tile:
            tile = (r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])
            if tile not in out.setdefault(r["kernel"], []):
                out[r["kernel"]].append(tile)
    return out


def tune(B: int = 8, H: int = 16, T: int = 1024, D: int = 64, provider: str = "mllm", kernels=("fwd", "dkdv", "dq"),
         candidates: Optional[Dict[str, List[tuple]]] = None, device="cuda", measure=None) -> List[dict]:
    """Time attention tiles at one shape, by default one layer of the gpu-full model (B 8, T 1,024, 16 heads of 64,
    causal + fused RoPE: ``provider`` "mllm"; "mllm-all" adds documents, window and sinks). One kernel at a time, the
    other two at their ``GPU_CONFIGS`` tile: "fwd" rows time the forward, "dkdv" and "dq" rows the whole backward.
    The shipped tile is timed first and again last (the drift between the two bounds what a difference means).
    Rows: kernel, tile (BLOCK_M, BLOCK_N, warps, stages), ms, shipped (bool), error. ``measure(fn, inputs, mode)``
    returns ms (default: ``do_bench`` medians). Changes nothing: ``tune_markdown`` names the winners."""
    A = __import__("importlib").import_module("mllm_kernels.attention")  # the package root exports a function of the same name

    measure = measure or (lambda fn, inputs, mode: _measure(fn, inputs, mode)[0])
    g = torch.Generator(device=device).manual_seed(0)
    inputs, fn = PROVIDERS[provider](B, H, T, D, device, g)
    rows = []
    for kernel in kernels:
        key = (kernel, D, 2)
        shipped = dict(A.GPU_CONFIGS[key])
        ship_tile = (shipped["BLOCK_M"], shipped["BLOCK_N"], shipped["num_warps"], shipped["num_stages"])
        cands = candidates.get(kernel, []) if candidates is not None else TUNE_CANDIDATES[kernel][D]
        order = [ship_tile] + [c for c in cands if tuple(c) != ship_tile] + [ship_tile]
        mode = "fwd" if kernel == "fwd" else "bwd"
        try:
            for n, (bm, bn, w, st) in enumerate(order):
                A.GPU_CONFIGS[key] = {**shipped, **dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)}
                row = dict(kernel=kernel, D=D, shape=f"{B}x{T}x{H}x{D}", provider=provider, tile=[bm, bn, w, st],
                           shipped=(bm, bn, w, st) == ship_tile, repeat=n == len(order) - 1, ms=None, error=None)
                try:
                    row["ms"] = float(measure(fn, inputs, mode))
                except Exception as e:  # noqa: BLE001 - a tile that cannot launch (shared memory) is a row
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
                rows.append(row)
                print(f"  {kernel} D={D} {tuple(row['tile'])}: "
                      + (f"{row['ms']:.4f} ms" if row["ms"] is not None else row["error"]), flush=True)
        finally:
            A.GPU_CONFIGS[key] = shipped
    return rows


def tune_verdicts(rows: List[dict]) -> List[dict]:
    """Per kernel of a ``tune`` run: the fastest tile against the shipped one (mean of its two timings) and whether it
    wins, i.e. is faster by more than the shipped tile's drift and 1%. Dicts: kernel, D, best (row), base_ms, drift,
    wins."""
    out = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        rk = [r for r in rows if r["kernel"] == kernel]
        ship = [r["ms"] for r in rk if r["shipped"] and r["ms"] is not None]
        ok = [r for r in rk if r["ms"] is not None and not r["shipped"]]
        if not ship or not ok:
            continue
        base = sum(ship) / len(ship)
        best = min(ok, key=lambda r: r["ms"])
        drift = max(ship) / min(ship) - 1 if len(ship) > 1 else 0.0
        out.append(dict(kernel=kernel, D=best["D"], best=best, base_ms=base, drift=drift,
                        wins=best["ms"] < base / (1 + max(drift, 0.01))))
    return out


def tiles_table(rows: List[dict], env: Optional[dict] = None, command: str = "") -> dict:
    """The winning tiles of a ``tune`` run as a tile table (``mllm_kernels.attention.read_tiles`` format, 16-bit
    entries): what ``MLLM_ATTN_TILES`` loads over the shipped ``GPU_CONFIGS``. Empty when nothing wins."""
    tiles = []
    for v in tune_verdicts(rows):
        if v["wins"]:
            bm, bn, w, st = v["best"]["tile"]
            tiles.append(dict(kernel=v["kernel"], head_dim=v["D"], dtype="bf16", BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                              num_stages=st, ms=v["best"]["ms"], shipped_ms=v["base_ms"], shape=v["best"]["shape"]))
    return {"environment": env or {}, "command": command, "tiles": tiles}


def tune_markdown(rows: List[dict], env: Optional[dict] = None, command: str = "") -> str:
    """Table of every tile, then per kernel the fastest tile against the shipped one (mean of its two timings)."""
    lines = []
    if env:
        lines += [f"# Attention tile sweep: {env.get('card') or env.get('device')}", "",
                  f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}, driver "
                  f"{env.get('driver')}, commit {env.get('git_commit')}, {env.get('date_utc')}."
                  + (f" Command: `{command}`." if command else ""), ""]
    lines += ["| kernel | shape | tile (BLOCK_M, BLOCK_N, warps, stages) | ms | vs shipped |", "|---|---|---|---|---|"]
    verdicts = {v["kernel"]: v for v in tune_verdicts(rows)}
    winners = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        base = verdicts[kernel]["base_ms"] if kernel in verdicts else None
        for r in (r for r in rows if r["kernel"] == kernel):
            tag = " (shipped" + (", again" if r["repeat"] else "") + ")" if r["shipped"] else ""
            if r["ms"] is None:
                lines.append(f"| {kernel} | {r['shape']} | {tuple(r['tile'])}{tag} | {r['error']} | |")
            else:
                rel = f"{base / r['ms']:.3f}x" if base else ""
                lines.append(f"| {kernel} | {r['shape']} | {tuple(r['tile'])}{tag} | {r['ms']:.4f} | {rel} |")
        v = verdicts.get(kernel)
        if v:
            best, base, drift = v["best"], v["base_ms"], v["drift"]
            bm, bn, w, st = best["tile"]
            verdict = (f"`(\"{kernel}\", {best['D']}, 2): dict(BLOCK_M={bm}, BLOCK_N={bn}, num_warps={w}, "
                       f"num_stages={st})`" if v["wins"] else "keep the shipped tile")
            winners.append(f"- {kernel}: fastest {tuple(best['tile'])} {best['ms']:.4f} ms vs shipped {base:.4f} ms "
                           f"({base / best['ms']:.3f}x; shipped drift {100 * drift:.1f}%): {verdict}")
    return "\n".join(lines + ["", "Winners (a tile counts only if faster than the shipped one by more than its drift "
                                  "and 1%):"] + winners) + "\n"


# ----------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------
def to_markdown(rows):
    lines = ["| head dim | shape | mode | provider | ms (median) | TFLOP/s (causal-equiv.) | peak extra MiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["op"].split("_d")[-1]
        if "ms" not in r:
            lines.append(f"| {d} | {r['shape']} | {r['mode']} | {r['provider']} | – | – | – | "
                         f"{r.get('skipped') or r.get('error')} |")
            continue
        peak = "" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        note = f"max diff vs ours {r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
        lines.append(f"| {d} | {r['shape']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                     f"{peak} | {note} |")
    return "\n".join(lines)


def summary(rows):
    """The issue's goals, read off the rows (reported, never asserted)."""
    def get(provider, D, T, mode):
        for r in rows:
            if r["provider"] == provider and r["op"] == f"attention_d{D}" and r.get("size") == T and r["mode"] == mode:
                return r.get("ms")
        return None

    out = []
    for D in HEAD_DIMS:
        for T in SEQ_LENS:
            a, b = get("mllm", D, T, "fwd+bwd"), get("sdpa-flash", D, T, "fwd+bwd")
            c, e = get("mllm-norope", D, T, "fwd+bwd"), get("mllm-all", D, T, "fwd+bwd")
            s = get("mllm-sinks", D, T, "fwd+bwd")
            ea = get("eager-sinks", D, T, "fwd+bwd")
            parts = []
            if a and b:
                parts.append(f"SDPA/ours {b / a:.2f}x (no-RoPE {b / c:.2f}x)" if c else f"SDPA/ours {b / a:.2f}x")
            if a and s:
                parts.append(f"sinks cost {100 * (s / a - 1):+.1f}%")
            if a and e:
                parts.append(f"all features {100 * (e / a - 1):+.1f}%")
            if ea and s:
                parts.append(f"{ea / s:.1f}x faster than eager-sinks")
            if parts:
                out.append(f"- D={D}, T={T}: " + "; ".join(parts))
    return "\n".join(out)


def write_results(out_dir, rows, env: dict, command: str = ""):
    """``<out_dir>/bench_attention_<UTC date-time>_<card>.json`` (environment, command, rows) and ``.md``: a run never
    overwrites an earlier one, and each names the card, driver, CUDA, versions, commit (dirty or not), date and host
    (``benchmarks.run.environment``). Returns the JSON path."""
    from benchmarks.run import device_tag, jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["date_utc"][:19].replace("-", "").replace(":", "").replace("T", "-")
    stem = f"bench_attention_{stamp}_{device_tag(env)}"
    commit = f"{env.get('git_commit')}" + (" (dirty)" if env.get("git_dirty") else "")
    head = (f"# Attention benchmark: {env.get('card')} ({env.get('date_utc')})\n\n"
            f"driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, torch {env.get('torch')}, triton "
            f"{env.get('triton')}, commit {commit}, host `{env.get('host')}`."
            + (f" Command: `{command}`." if command else "") + "\n")
    (out / f"{stem}.json").write_text(json.dumps(jsonable({"environment": env, "command": command, "rows": rows}),
                                                 indent=2) + "\n")
    (out / f"{stem}.md").write_text(f"{head}\n{to_markdown(rows)}\n\n{summary(rows)}\n")
    return out / f"{stem}.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", default=None,
                    help="folder for bench_attention_<UTC date-time>_<card>.json / .md (or the --tune sweep's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true", help="sweep GPU tiles instead of benchmarking (see tune())")
    ap.add_argument("--tune-shape", default="8,1024,16,64", help="--tune: B,T,H,D (default: a gpu-full layer)")
    ap.add_argument("--tune-provider", default="mllm", choices=["mllm", "mllm-sinks", "mllm-all", "mllm-norope"])
    ap.add_argument("--tune-kernels", default="fwd,dkdv,dq")
    ap.add_argument("--candidates", default=None,
                    help="--tune: an aot_check --sweep-attention JSON; its spill-free tiles are the candidates")
    ap.add_argument("--min-tile", type=int, default=0, help="--candidates: only tiles with BLOCK_M*BLOCK_N >= this")
    ap.add_argument("--write-tiles", default=None, metavar="PATH",
                    help="--tune: also write the winning tiles as a tile table (MLLM_ATTN_TILES=PATH loads it)")
    ap.add_argument("--providers", nargs="*", default=None, choices=sorted(PROVIDERS))
    ap.add_argument("--seq-lens", nargs="*", type=int, default=None)
    ap.add_argument("--head-dims", nargs="*", type=int, default=None)
    ap.add_argument("--log", default=None, help="append rows as JSON lines while running")
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/bench_attention.py", *(sys.argv[1:] if argv is None else argv)])
    if args.tune:
        if not torch.cuda.is_available():
            raise SystemExit("bench_attention.py --tune times GPU tiles and needs CUDA "
                             "(tests/test_bench_attention_tune.py checks its bookkeeping on CPU)")
        from benchmarks.run import environment, write_sweep

        B, T, H, D = (int(x) for x in args.tune_shape.split(","))
        cands = candidates_from_aot(args.candidates, min_tile=args.min_tile) if args.candidates else None
        rows = tune(B, H, T, D, args.tune_provider, tuple(args.tune_kernels.split(",")), cands)
        env = environment("cuda")
        text = tune_markdown(rows, env, command)
        print(text)
        if args.out:
            path = write_sweep(args.out, "bench_attention_tune", env, rows, text)
            print(f"wrote {path} and {path.with_suffix('.md').name}")
        if args.write_tiles:
            table = tiles_table(rows, env, command)
            Path(args.write_tiles).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write_tiles).write_text(json.dumps(table, indent=2) + "\n")
            print(f"wrote {args.write_tiles}: {len(table['tiles'])} winning tile(s)")
        return
    rows = run(quick=args.quick, providers=args.providers, seq_lens=args.seq_lens, head_dims=args.head_dims,
               log_path=args.log)
    md = to_markdown(rows)
    summ = summary(rows)
    print(md)
    print(summ)
    if args.out:
        from benchmarks.run import environment

        path = write_results(args.out, rows, environment(), command)
        print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
