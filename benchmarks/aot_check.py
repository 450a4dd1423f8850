"""Compile every Triton kernel for a GPU target on a machine without one, and report its resources.

    python -m benchmarks.aot_check                     # sm_90 (H100/H200), every case, JSON + Markdown
    python -m benchmarks.aot_check --arch 80 --quick   # sm_80 (A100), the model's kernels only
    PYTHONPATH=/path/to/triton-3.6 python -m benchmarks.aot_check   # another Triton version, same cases
    python -m benchmarks.aot_check --sweep-attention 128,fp32          # resources of every attention tile
    python -m benchmarks.aot_check --compare BEFORE.json AFTER.json    # what a change (or a triton upgrade) moved

Why: GPU time is scarce (a few sessions get 15 minutes), and the first GPU run of the attention kernel was lost
to a compile error that only Triton's CUDA code generator reports (``_load_rows`` returning fp32 in one branch
and bf16 in the other, triton 3.6). Triton's compiler and ``ptxas`` need no GPU: this script runs the real
launchers (the functional APIs, their validation, dispatch, ``_config`` choice and autograd backward) on CPU
tensors with the GPU configs, and turns every launch into a compile for ``--arch`` instead. Per kernel
specialisation it records what ``ptxas -v`` reports and what the launch would need:

    registers / thread, spill stores (bytes), shared memory (bytes, Triton's dynamic allocation)
    CTAs per SM = min(resident warps / warps per CTA,  65,536 regs / (warps · ⌈regs · 32 / 256⌉ · 256),
                      SM shared memory / (shared + 1 KiB reserved per CTA),  resident CTAs)

with the per-arch limits of ``ARCH_LIMITS`` (64 warps and 32 CTAs per SM on sm_80/sm_90; 48 warps and 16 (sm_86)
or 24 (sm_89) CTAs on the others)

and fails (exit 1) on a compile error or on shared memory above the per-CTA limit (which Triton would only raise
as ``OutOfResources`` at the first launch). Spills are reported, not failed (``--max-spill`` makes them fail).

How: ``triton.runtime.driver`` is pointed at a stand-in driver whose target is ``GPUTarget("cuda", arch, 32)``,
and ``JITFunction.run`` is wrapped to compile with ``warmup=True`` (compile, never launch), so the kernel sees the
same argument specialisation (pointer alignment, divisibility by 16, integer 1) as on a GPU. The kernels'
outputs are left uninitialised: only the launch arguments matter here. Cases choose the functional API over the
raw launchers wherever one exists, so a kernel the model uses but no case names is still compiled by the model
case. It must run in a fresh process with ``TRITON_INTERPRET`` off (``@triton.jit`` decides at import whether a
kernel is interpreted).

Works with triton 3.6-3.9 (the GPU image has 3.6; CI has 3.9): only ``JITFunction.run(*args, grid, warmup,
**kwargs)``, ``driver.set_active`` / ``driver._active``, ``knobs.compilation.always_compile`` and
``knobs.nvidia.dump_ptxas_log`` are used.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

# run as a script: before triton or mllm_kernels is imported, so that decorated kernels are JITFunctions and not
# interpreted ones (importing this module elsewhere changes no environment variable)
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# per-arch limits, CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": shared memory per
# SM and per CTA (bytes), resident warps per SM (64 on the data-centre parts; 48 = 1,536 threads on sm_86 and
# sm_89) and resident CTAs per SM (32; 16 on sm_86, 24 on sm_89)
ARCH_LIMITS = {
    80: dict(smem_sm=167936, smem_cta=166912, warps_sm=64, ctas_sm=32, card="A100"),
    86: dict(smem_sm=102400, smem_cta=101376, warps_sm=48, ctas_sm=16, card="RTX 30xx / A10"),
    89: dict(smem_sm=102400, smem_cta=101376, warps_sm=48, ctas_sm=24, card="L4 / RTX 40xx"),
    90: dict(smem_sm=233472, smem_cta=232448, warps_sm=64, ctas_sm=32, card="H100 / H200"),
}
REGS_PER_SM = 65536
KERNEL_MODULES = ("rms_norm", "swiglu", "rope", "attention", "lm_loss", "dpo_logprobs")


# ----------------------------------------------------------------------------------------------------
# compile-only launches
# ----------------------------------------------------------------------------------------------------
class _CompileOnlyDriver:
    """The parts of a Triton driver that ``JITFunction.run`` asks for before compiling."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one binder cache per arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@dataclasses.dataclass
class Record:
    case: str
    kernel: str
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    compile_s: float
    shared: Optional[int] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    ctas_per_sm: Optional[int] = None
    limit: Optional[str] = None  # what bounds ctas_per_sm
    error: Optional[str] = None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers and spill bytes from a ``ptxas -v`` log (one entry function)."""
    out: Dict[str, int] = {}
    m = _PTXAS_REGS.search(log)
    if m:
        out["registers"] = int(m.group(1))
    m = _PTXAS_SPILL.search(log)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out


def ctas_per_sm(registers: int, num_warps: int, shared: int, arch: int):
    """(CTAs per SM, the bound that sets it) from the formula in the module docstring."""
    lim = ARCH_LIMITS[arch]
    warps = lim["warps_sm"] // num_warps
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    regs = REGS_PER_SM // (num_warps * regs_per_warp)
    smem = lim["smem_sm"] // (shared + 1024)
    bounds = {"warps": warps, "registers": regs, "shared": smem, "max": lim["ctas_sm"]}
    limit = min(bounds, key=lambda k: bounds[k])
    return bounds[limit], limit


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


class Compiler:
    """Context manager: while active, Triton launches compile for ``arch`` and are recorded, never run."""

    def __init__(self, arch: int):
        self.arch = arch
        self.records: List[Record] = []
        self.case = "?"
        self._seen = set()

    def __enter__(self):
        self._saved_run = JITFunction.run
        compiler = self

        def run(fn, *args, grid, warmup, **kwargs):
            return compiler._compile(fn, args, kwargs)

        JITFunction.run = run
        # the previous active driver, or None (reset_active() would create the default one, which fails without
        # a GPU); ``_active`` is DriverConfig's attribute in triton 3.6-3.9
        self._saved_driver = getattr(_driver, "_active", None)
        _driver.set_active(_CompileOnlyDriver(self.arch))
        self._saved_paths = _force_kernel_paths()
        # every specialisation runs ptxas (a cache hit would give no resource report), whose log is printed
        knobs = triton.knobs
        self._saved_knobs = (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log)
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._saved_run
        _driver._active = self._saved_driver
        triton.knobs.compilation.always_compile, triton.knobs.nvidia.dump_ptxas_log = self._saved_knobs
        _restore_kernel_paths(self._saved_paths)
        return False

    def _compile(self, fn, args, kwargs):
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        consts = {p.name: _plain(bound.get(p.name)) for p in fn.params if p.is_constexpr}
        key = (fn.__name__, tuple(sorted(consts.items())), kwargs.get("num_warps"), kwargs.get("num_stages"),
               tuple(str(getattr(bound.get(n), "dtype", type(bound.get(n)).__name__)) for n in names))
        if key in self._seen:  # same specialisation as an earlier launch (next layer, next chunk)
            return None
        self._seen.add(key)
        rec = Record(self.case, fn.__name__, consts, int(kwargs.get("num_warps", 4)),
                     int(kwargs.get("num_stages", 3)), 0.0)
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = self._saved_run(fn, *args, grid=None, warmup=True, **kwargs)
        except Exception as e:  # a compile error is the finding, not a crash of the check
            rec.error = f"{type(e).__name__}: {e}".strip()[:2000]
            kernel = None
        rec.compile_s = time.perf_counter() - t0
        if kernel is not None:
            if hasattr(kernel, "result"):  # async-compile futures (not used here, but cheap to honour)
                kernel = kernel.result()
            rec.shared = int(kernel.metadata.shared)
            rec.num_warps = int(kernel.metadata.num_warps)
            rec.num_stages = int(kernel.metadata.num_stages)
            for k, v in parse_ptxas(log.getvalue()).items():
                setattr(rec, k, v)
            if rec.registers is not None:
                rec.ctas_per_sm, rec.limit = ctas_per_sm(rec.registers, rec.num_warps, rec.shared, self.arch)
            if rec.shared > ARCH_LIMITS[self.arch]["smem_cta"]:
                rec.error = (f"needs {rec.shared} B of shared memory per CTA; sm_{self.arch} allows "
                             f"{ARCH_LIMITS[self.arch]['smem_cta']} (OutOfResources at launch)")
        self.records.append(rec)
        return None


def _kernel_modules():
    import importlib

    return [importlib.import_module(f"mllm_kernels.{m}") for m in KERNEL_MODULES]


def _force_kernel_paths():
    """Make the functional APIs take their Triton path for CPU tensors (as they do for CUDA ones)."""
    saved = []
    for mod in _kernel_modules():
        if hasattr(mod, "kernel_path"):
            saved.append((mod, mod.kernel_path))
            mod.kernel_path = lambda t: "triton"
    return saved


def _restore_kernel_paths(saved):
    for mod, fn in saved:
        mod.kernel_path = fn


# ----------------------------------------------------------------------------------------------------
# cases: each calls the functional APIs (forward and backward) with one dtype / shape / flag combination
# ----------------------------------------------------------------------------------------------------
def _t(*shape, dtype, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


class _Fp32CpuMatmul:
    """While a case runs, CPU matrix products with bf16/fp16 operands are computed in fp32 and rounded back.

    Every Triton launch is replaced by a compile here, so nothing depends on the values the cases compute; but the
    cases still run the GEMMs that cuBLAS would run, on the CPU, and on a CPU without AVX-512 bf16 instructions
    PyTorch's bf16 GEMM runs at ≈ 0.4 GFLOP/s against ≈ 26 GFLOP/s in fp32 (2-core AVX2 EPYC, torch 2.13): the
    gpu-full step at T = 256 (≈ 0.4 TFLOP) then took ≈ 1,000 s per bf16 model case instead of seconds.

    The patch is at the Python level (``F.linear`` as autocast would run it, ``torch.mm`` with ``out=``,
    ``torch.matmul`` and ``@``: every GEMM the model and the kernels' launchers call), so the products' backward
    runs through fp32 autograd nodes as well. A ``TorchDispatchMode`` would also catch the autograd GEMMs, but
    with one on the stack the kernels run through the ``torch.library`` ops instead of their eager
    ``autograd.Function`` path (``_common.call_op``), and inside those ops the mode is no longer active."""

    _LOW = (torch.bfloat16, torch.float16)

    def __enter__(self):
        F = torch.nn.functional
        self._saved = (F.linear, torch.mm, torch.matmul, torch.Tensor.__matmul__)
        linear, mm, matmul, tmatmul = self._saved
        low = self._LOW

        def _lowp(*ts):
            ts = [t for t in ts if isinstance(t, torch.Tensor)]
            if not ts or any(t.device.type != "cpu" for t in ts):
                return None
            if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low \
                    and all(t.is_floating_point() for t in ts):
                return torch.get_autocast_dtype("cpu")
            return ts[0].dtype if ts[0].dtype in low else None

        def p_linear(x, w, b=None):
            dt = _lowp(x, w)
            if dt is None:
                return linear(x, w, b)
            with torch.autocast("cpu", enabled=False):
                return linear(x.float(), w.float(), None if b is None else b.float()).to(dt)

        def fp32_product(product):
            def patched(a, b, *, out=None):
                dt = _lowp(a, b)
                if dt is None:
                    return product(a, b, out=out) if out is not None else product(a, b)
                with torch.autocast("cpu", enabled=False):
                    r = product(a.float(), b.float()).to(dt)
                return r if out is None else out.copy_(r)
            return patched

        p_mm, p_matmul = fp32_product(mm), fp32_product(matmul)

        F.linear, torch.mm, torch.matmul = p_linear, p_mm, p_matmul
        torch.Tensor.__matmul__ = lambda a, b: p_matmul(a, b)
        return self

    def __exit__(self, *exc):
        F = torch.nn.functional
        F.linear, torch.mm, torch.matmul, torch.Tensor.__matmul__ = self._saved
        return False


def _backward(*outs):
    torch.autograd.backward([o.float().sum() for o in outs])


def case_model(dtype_name: str = "bf16", packed: bool = True, preset: str = "gpu-full",
               residual_dtype: str = "param") -> None:
    """One forward + backward of a preset model (triton backend, its own loss path) at T = 256, B = 1."""
    from mllm.config import load_config
    from mllm.models.transformer import Transformer

    cfg = load_config(preset)
    model = Transformer(dataclasses.replace(cfg.model, kernel_backend="triton", residual_dtype=residual_dtype))
    T = min(256, cfg.model.max_seq_len)
    ids = torch.randint(0, cfg.model.vocab_size, (1, T))
    cu = torch.tensor([0, T // 3, T], dtype=torch.int32) if packed else None
    pos = torch.cat([torch.arange(T // 3), torch.arange(T - T // 3)])[None] if packed else None
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype_name == "bf16" else contextlib.nullcontext()
    with ctx:
        loss = model(ids, position_ids=pos, cu_seqlens=cu, labels=ids)
    loss.backward()


def case_attention(dtype: torch.dtype, head_dim: int, variant: str) -> None:
    from mllm_kernels.attention import attention

    B, T, HQ = 1, 192, 4
    hkv = 2 if variant in ("gqa", "features") else HQ
    q = _t(B, T, HQ, head_dim, dtype=dtype)
    k, v = _t(B, T, hkv, head_dim, dtype=dtype), _t(B, T, hkv, head_dim, dtype=dtype)
    kw: Dict[str, Any] = {}
    if variant == "features":  # packed documents + sliding window + StreamingLLM sink tokens + learned sinks
        kw = dict(cu_seqlens=torch.tensor([0, 70, T], dtype=torch.int32), window=64, n_sink_tokens=4,
                  sinks=torch.zeros(HQ, requires_grad=True))
    elif variant == "no_rope":
        kw = dict(rope_theta=None)
    elif variant == "bidirectional":
        kw = dict(causal=False)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    _backward(out, lse)


def case_rms_norm(dtype: torch.dtype, width: int, residual_dtype: Optional[torch.dtype] = None) -> None:
    from mllm_kernels.rms_norm import fused_add_rms_norm, rms_norm

    x, w = _t(64, width, dtype=dtype), _t(width, dtype=torch.float32)
    if residual_dtype is None:
        _backward(rms_norm(x, w, 1e-6))
    else:
        y, h = fused_add_rms_norm(x, _t(64, width, dtype=residual_dtype), w, 1e-6, out_dtype=dtype)
        _backward(y, h)


def case_swiglu(dtype: torch.dtype, width: int) -> None:
    from mllm_kernels.swiglu import swiglu

    _backward(swiglu(_t(64, width, dtype=dtype), _t(64, width, dtype=dtype)))


def case_rope(dtype: torch.dtype, head_dim: int) -> None:
    from mllm_kernels.rope import apply_rope

    q, k = _t(2, 64, 16, head_dim, dtype=dtype), _t(2, 64, 4, head_dim, dtype=dtype)
    _backward(*apply_rope(q, k, torch.arange(64).repeat(2, 1)))


def case_lm_loss(dtype: torch.dtype, vocab: int) -> None:
    from mllm_kernels.lm_loss import linear_cross_entropy

    h, w = _t(2, 32, 256, dtype=dtype), _t(vocab, 256, dtype=dtype)
    linear_cross_entropy(h, w, torch.randint(0, vocab, (2, 32))).backward()


def case_dpo(dtype: torch.dtype, vocab: int) -> None:
    from mllm_kernels.dpo_logprobs import sequence_logprobs

    h, w = _t(2, 32, 256, dtype=dtype), _t(vocab, 256, dtype=dtype)
    sequence_logprobs(h, w, torch.randint(0, vocab, (2, 32))).sum().backward()


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def cases(quick: bool) -> Dict[str, Callable[[], None]]:
    """name -> callable. ``quick``: the gpu-full training step only (the kernels a pretraining run compiles)."""
    out: Dict[str, Callable[[], None]] = {"model gpu-full bf16 packed": lambda: case_model("bf16", True)}
    if quick:
        return out
    out["model gpu-full bf16 unpacked"] = lambda: case_model("bf16", False)
    out["model gpu-full bf16 packed, bf16 stream"] = lambda: case_model("bf16", True, residual_dtype="autocast")
    out["model gpu-full fp32 packed"] = lambda: case_model("fp32", True)
    for dn in ("bf16", "fp32"):
        dt = DTYPES[dn]
        for d in (64, 128):
            for variant in ("causal", "gqa", "features", "no_rope", "bidirectional"):
                if dn == "fp32" and variant in ("gqa", "no_rope", "bidirectional"):
                    continue  # same tiles as "causal": only the flags differ, covered in bf16
                out[f"attention {dn} D={d} {variant}"] = (lambda dt=dt, d=d, v=variant: case_attention(dt, d, v))
            out[f"rope {dn} D={d}"] = lambda dt=dt, d=d: case_rope(dt, d)
        for width in (1024, 4096, 40000):  # 40,000 > MAX_SINGLE_PASS: the column-looped path
            out[f"rms_norm {dn} C={width}"] = lambda dt=dt, c=width: case_rms_norm(dt, c)
            out[f"fused_add_rms_norm {dn} C={width}"] = lambda dt=dt, c=width: case_rms_norm(dt, c, dt)
        out[f"swiglu {dn} F=4096"] = lambda dt=dt: case_swiglu(dt, 4096)
        out[f"swiglu {dn} F=11008"] = lambda dt=dt: case_swiglu(dt, 11008)
        out[f"lm_loss {dn} V=50304"] = lambda dt=dt: case_lm_loss(dt, 50304)
        out[f"dpo_logprobs {dn} V=50257"] = lambda dt=dt: case_dpo(dt, 50257)
    # the autocast norm: fp32 residual stream, bf16 branch output, bf16 normalised output
    out["fused_add_rms_norm bf16 x + fp32 stream C=1024"] = lambda: case_rms_norm(torch.bfloat16, 1024, torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_V", "BLOCK_K", "BLOCK_ROWS", "BLOCK_COLS", "BLOCK_T", "BLOCK_HQ",
              "BLOCK_HKV", "BLOCK_HALF", "HEAD_DIM", "SINGLE_PASS")


def _tile(c: Dict[str, Any]) -> str:
    return " ".join(f"{k.replace('BLOCK_', '')}={c[k]}" for k in _TILE_KEYS if k in c and c[k] is not None)


def _flags(c: Dict[str, Any]) -> str:
    on = [k for k, v in c.items() if k not in _TILE_KEYS and v is True]
    dt = c.get("DOT_DTYPE")
    return " ".join(on + ([f"dot={dt}"] if dt else []))


def markdown(report: Dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        f"# Ahead-of-time compile check: sm_{m['arch']} ({m['card']}), triton {m['triton']}",
        "",
        f"`{m['command']}` — {m['date']}, commit {m['git_commit']}, torch {m['torch']}, host without a GPU "
        f"({m['host']}). {m['n_kernels']} kernel specialisations from {m['n_cases']} cases in {m['wall_s']:.0f} s; "
        f"{m['n_errors']} failed, {m['n_spilling']} spill.",
        "",
        "Registers and spills are ptxas's (`-v`); shared memory is Triton's per-CTA allocation; CTAs/SM = "
        "min(64 / warps, 65,536 / (warps · ⌈regs·32/256⌉·256), SM shared / (shared + 1 KiB), 32), with the bound "
        "that sets it. Timings need the GPU (`python -m benchmarks.run`).",
        "",
        "| case | kernel | tile | flags | warps | stages | regs | spill B (st/ld) | shared B | CTAs/SM (bound) | "
        "compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        if r["error"]:
            lines.append(f"| {r['case']} | {r['kernel']} | {_tile(r['constexprs'])} | {_flags(r['constexprs'])} | "
                         f"{r['num_warps']} | {r['num_stages']} | **failed**: {r['error'].splitlines()[0][:160]} "
                         f"| | | | {r['compile_s']:.1f} |")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_stores"] is not None else "?"
        if r["spill_stores"]:
            spill = f"**{spill}**"
        lines.append(f"| {r['case']} | {r['kernel']} | {_tile(r['constexprs'])} | {_flags(r['constexprs'])} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {spill} | {r['shared']} | "
                     f"{r['ctas_per_sm']} ({r['limit']}) | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    """The commit (with "+dirty" for uncommitted tracked changes), as the benchmark runner records it."""
    from benchmarks.run import environment

    env = environment("cpu")
    return f"{env['git_commit'] or 'unknown'}{'+dirty' if env.get('git_dirty') else ''}"


def run(arch: int, quick: bool, only: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    if arch not in ARCH_LIMITS:
        raise SystemExit(f"--arch must be one of {sorted(ARCH_LIMITS)}, got {arch}")
    mods = sys.modules.get("mllm_kernels.attention")
    if mods is not None and not isinstance(getattr(mods, "_attn_fwd_kernel", None), JITFunction):
        raise SystemExit("mllm_kernels was imported with TRITON_INTERPRET=1; run this check in a fresh process")
    todo = {k: v for k, v in cases(quick).items() if only is None or only in k}
    if not todo:
        raise SystemExit(f"no case matches --only {only!r}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    comp = Compiler(arch)
    try:
        from tqdm import tqdm
        it = tqdm(todo.items(), desc=f"sm_{arch}", unit="case", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        it = todo.items()
    with comp:
        for name, fn in it:
            comp.case = name
            try:
                with _Fp32CpuMatmul():
                    fn()
            except Exception as e:  # a launcher that fails before its launch is a finding too
                comp.records.append(Record(name, "(host code)", {}, 0, 0, 0.0,
                                           error=f"{type(e).__name__}: {e}"[:2000]))
    recs = [dataclasses.asdict(r) for r in comp.records]
    import platform

    meta = dict(
        arch=arch, card=ARCH_LIMITS[arch]["card"], triton=triton.__version__, torch=torch.__version__,
        git_commit=_git_commit(), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        host=platform.processor() or platform.machine(),
        command=(" ".join(["python -m benchmarks.aot_check", *sys.argv[1:]]) if sys.argv and "aot_check" in sys.argv[0]
                 else f"run(arch={arch}, quick={quick})"),
        n_cases=len(todo), n_kernels=len(recs), n_errors=sum(1 for r in recs if r["error"]),
        n_spilling=sum(1 for r in recs if r["spill_stores"]), wall_s=time.perf_counter() - t0,
    )
    return {"meta": meta, "records": recs}


def write(report: Dict[str, Any], out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    m = report["meta"]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"aot_check_{stamp}_sm{m['arch']}_triton{m['triton']}"  # not with_suffix: the version has dots
    paths = [out_dir / f"{base}.json", out_dir / f"{base}.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    paths[1].write_text(markdown(report))
    return paths


ATTENTION_KERNELS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def sweep_attention(arch: int, head_dim: int, dtype_name: str, sizes: Sequence[int], warps: Sequence[int],
                    stages: Sequence[int], variant: str = "features") -> List[Dict[str, Any]]:
    """Resources of every attention tile (BLOCK_M, BLOCK_N in ``sizes``, ``warps``, ``stages``) for one head dim and
    dtype: each candidate is compiled for all three kernels through the ``attention case`` (``variant``: the
    "features" one, documents + window + sinks, needs the most registers). Rows: kernel (fwd / dkdv / dq), tile,
    registers, spill bytes, shared bytes, CTAs per SM."""
    import itertools

    att = sys.modules.get("mllm_kernels.attention") or __import__("importlib").import_module("mllm_kernels.attention")
    saved = att._config
    rows: List[Dict[str, Any]] = []
    try:
        for m, n, w, st in itertools.product(sizes, sizes, warps, stages):
            cfg = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
            att._config = lambda kernel, d, dtype, cfg=cfg: dict(cfg)
            comp = Compiler(arch)
            with comp:
                comp.case = f"sweep {m}x{n} w{w} s{st}"
                case_attention(DTYPES[dtype_name], head_dim, variant)
            for r in comp.records:
                if r.kernel in ATTENTION_KERNELS:
                    rows.append(dict(kernel=ATTENTION_KERNELS[r.kernel], BLOCK_M=m, BLOCK_N=n, num_warps=w,
                                     num_stages=st, registers=r.registers, spill_stores=r.spill_stores,
                                     shared=r.shared, ctas_per_sm=r.ctas_per_sm, error=r.error))
    finally:
        att._config = saved
    return rows


def sweep_markdown(rows: List[Dict[str, Any]], title: str, subtitle: str = "") -> str:
    lines = [f"# {title}", ""] + ([subtitle, ""] if subtitle else []) + ["| kernel | BLOCK_M x BLOCK_N | warps | stages | regs | spill B | shared B | CTAs/SM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])):
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | "
                         f"failed: {r['error'].splitlines()[0][:120]} | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | "
                         f"{r['registers']} | {r['spill_stores']} | {r['shared']} | {r['ctas_per_sm']} |")
    return "\n".join(lines) + "\n"


COMPARED = ("registers", "spill_stores", "shared", "ctas_per_sm", "error")


def _key(r: Dict[str, Any]):
    return r["case"], r["kernel"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"], r["num_stages"]


def compare(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    """Markdown of what changed between two reports (two commits, two triton versions, two archs): specialisations
    whose registers, spills, shared memory, CTAs per SM or error differ, and those only one report has."""
    a = {_key(r): r for r in before["records"]}
    b = {_key(r): r for r in after["records"]}
    ma, mb = before["meta"], after["meta"]
    lines = [f"# AOT report diff: {ma['git_commit']} triton {ma['triton']} sm_{ma['arch']} → "
             f"{mb['git_commit']} triton {mb['triton']} sm_{mb['arch']}", "",
             "| case | kernel | tile | warps | stages | regs | spill B | shared B | CTAs/SM | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(x, y):
        return f"{x}" if x == y else f"{x} → {y}"

    changed = 0
    for k in sorted(set(a) | set(b)):
        ra, rb = a.get(k), b.get(k)
        r = rb or ra
        head = f"| {r['case']} | {r['kernel']} | {_tile(r['constexprs'])} | {r['num_warps']} | {r['num_stages']} |"
        if ra is None or rb is None:
            changed += 1
            lines.append(head + (" only in the second report |" if ra is None else " only in the first report |")
                         + " |" * 4)
        elif any(ra[f] != rb[f] for f in COMPARED):
            changed += 1
            err = cell(bool(ra["error"]), bool(rb["error"])) if (ra["error"] or rb["error"]) else ""
            lines.append(head + " " + " | ".join(cell(ra[f], rb[f]) for f in COMPARED[:4]) + f" | {err} |")
    lines.insert(2, f"{changed} of {len(set(a) | set(b))} specialisations differ (tiles that changed appear as one "
                    f"row per report).\n")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 86, 89, 90); default 90")
    p.add_argument("--quick", action="store_true", help="only the gpu-full training step's kernels")
    p.add_argument("--only", default=None, help="run the cases whose name contains this text")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and Markdown report")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    p.add_argument("--compare", nargs=2, default=None, metavar=("BEFORE.json", "AFTER.json"),
                   help="instead of compiling: print what changed between two reports of this script")
    p.add_argument("--sweep-attention", default=None, metavar="D,DTYPE",
                   help="instead of the cases: resources of every attention tile for head dim D and DTYPE "
                        "(e.g. 128,fp32); --sizes/--warps/--stages set the grid")
    p.add_argument("--variant", default="features",
                   help="sweep: the attention case compiled (features = documents + window + sinks, the most "
                        "registers; causal = the gpu-full model's causal + RoPE; gqa, no_rope, bidirectional)")
    p.add_argument("--sizes", default="16,32,64", help="sweep: BLOCK_M and BLOCK_N values")
    p.add_argument("--warps", default="4,8", help="sweep: num_warps values")
    p.add_argument("--stages", default="1,2", help="sweep: num_stages values")
    p.add_argument("--max-spill", type=int, default=None,
                   help="fail when a kernel spills more than this many bytes (default: report only)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare(*(json.loads(Path(f).read_text()) for f in args.compare)))
        return 0
    if args.sweep_attention:
        d, dtype_name = args.sweep_attention.split(",")
        ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
        rows = sweep_attention(args.arch, int(d), dtype_name, ints(args.sizes), ints(args.warps), ints(args.stages),
                               args.variant)
        text = sweep_markdown(rows, f"Attention tile sweep: D={d} {dtype_name} {args.variant}, sm_{args.arch}, triton "
                                    f"{triton.__version__}, commit {_git_commit()}",
                              f"`{' '.join(['python -m benchmarks.aot_check', *sys.argv[1:]])}` — "
                              f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
                              "no GPU; ptxas -v resources, no timings.")
        print(text)
        if not args.no_write:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            variant = "" if args.variant == "features" else f"_{args.variant}"
            name = (f"aot_sweep_attention_{stamp}_D{d}_{dtype_name}{variant}_sm{args.arch}_"
                    f"triton{triton.__version__}.md")
            path = Path(args.out) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            meta = dict(head_dim=int(d), dtype=dtype_name, variant=args.variant, arch=args.arch,
                        triton=triton.__version__, torch=torch.__version__, git_commit=_git_commit())
            path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            print(f"wrote {path} and {path.with_suffix('.json').name}")
        return 0
    report = run(args.arch, args.quick, args.only, progress=sys.stderr.isatty())
    print(markdown(report))
    if not args.no_write:
        for p in write(report, Path(args.out)):
            print(f"wrote {p}")
    bad = [r for r in report["records"] if r["error"]]
    if args.max_spill is not None:
        bad += [r for r in report["records"] if (r["spill_stores"] or 0) > args.max_spill]
    for r in bad:
        print(f"FAILED {r['case']} / {r['kernel']}: {r['error'] or str(r['spill_stores']) + ' B spilled'}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
