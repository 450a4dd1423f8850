"""Shared helpers of the row-kernel benchmarks (``bench_rms_norm.py``, ``bench_swiglu.py``, ``bench_rope.py``).

A benchmark *case* is a function plus its inputs: ``fn(*args)`` returns a tensor or a tuple of tensors and
``diff`` lists the indices of the arguments that gradients flow to. For each case, mode and provider we report

  * ``ms``: median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions);
  * ``gbps``: the op's *minimal* bytes (each input read once, each output written once; see each bench file)
    divided by the time; ``pct_copy_bw``: that as a percentage of the card's measured copy bandwidth
    (``copy_bandwidth_gbps``: a 1 GiB device-to-device copy, read + write bytes over time);
  * ``gpu_ms`` / ``gpu_gbps`` / ``gpu_pct_copy_bw``: the same from the summed device time of the kernels one call
    launches (``torch.profiler``), i.e. without host-side launch gaps. At the model's small shapes a Python
    launch path (the custom op, the Triton launcher, autograd) can take longer than the kernels themselves; in
    a training step the CPU runs ahead and hides it, so both numbers are shown;
  * ``peak_mem_mb``: the peak of ``torch.cuda.max_memory_allocated`` during one call, above what was allocated
    before it (inputs, and for ``bwd`` the retained forward graph, are not counted);
  * ``tflops`` (cases that give ``flops``): the useful FLOPs that provider does in that mode over the time. Bytes
    and FLOPs may differ per provider (``Case.work``); a row that times different work than the others at its mode
    carries ``not_comparable`` and gets no speed-up.

A provider that raises at one shape and mode (out of memory, a compile error, an unsupported shape) gives an
``error`` row there (``measure``); the other providers and shapes are still measured.

Modes: ``fwd`` (forward under ``no_grad``, the inference path), ``bwd`` (``autograd.grad`` through a retained
forward graph), ``fwd+bwd`` (both, as a training step runs them). Providers: ``triton`` (the fused kernel's
functional API), ``eager`` (``mllm_kernels.reference``, the model's eager path) and ``compile``
(``torch.compile`` of the reference, inductor, static shapes).

CPU: a module's ``cpu_cases()`` (``CpuCase`` list; ``shape_cpu_cases`` builds it from the same ``Case`` definitions at
the module's ``CPU_SHAPES``, fp32) is timed by pytest-benchmark in a subprocess (``benchmarks/pytest_cpu.py``): only the
``eager`` provider runs, the others are ``skipped`` rows ("needs CUDA"). ``run_shapes`` on CPU returns those rows, so
``run(cpu)``, the runner and ``cli`` agree. Every timed row names its timer (``timer``: ``TIMER_DO_BENCH``,
``TIMER_PYTEST_BENCHMARK``, or ``TIMER_CPU_MEDIAN`` for ``run_cases`` called directly on CPU).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
# What produced a row's ``ms`` (its ``timer`` field).
TIMER_DO_BENCH = "triton.testing.do_bench"
TIMER_PYTEST_BENCHMARK = "pytest-benchmark"
TIMER_CPU_MEDIAN = "common.cpu_median_ms"


@dataclass
class Case:
    """One op at one shape: ``fn(*args)``; gradients flow to ``args[i]`` for i in ``diff``.

    ``bytes`` maps each mode to the minimal number of bytes the op must move, ``flops`` (optional) to the FLOPs of its
    useful work (a ``tflops`` column). A key ``(mode, provider)`` overrides the per-mode entry for one provider whose
    work in that mode differs (a fused kernel that takes the gradient in its forward does no GEMM in ``bwd``); a value
    None there means "no FLOP count", so no TFLOP/s is reported. ``notes[(mode, provider)]`` marks a row whose time is
    not comparable with the other providers' at that mode: the runner shows the note and computes no speed-up."""

    op: str
    shape: tuple
    dtype: torch.dtype
    args: Sequence
    diff: Sequence[int]
    bytes: Dict
    extra: Dict = field(default_factory=dict)
    flops: Dict = field(default_factory=dict)
    notes: Dict = field(default_factory=dict)

    def work(self, mode: str, provider: str):
        """(bytes, flops or None) credited to ``provider`` in ``mode``."""
        def pick(table):
            return table[(mode, provider)] if (mode, provider) in table else table.get(mode)

        return pick(self.bytes), pick(self.flops)


@dataclass
class CpuCase:
    """One row that the runner times on CPU with pytest-benchmark (``benchmarks/pytest_cpu.py``).

    ``row``: the row's identity and fixed fields as in the bench-module contract (``op`` and ``provider`` required;
    ``shape``, ``dtype``, ``mode``, ``size``, ``not_comparable``, ...), JSON-serialisable once passed through
    ``benchmarks.run.jsonable``. ``prepare()`` builds the inputs (untimed) and returns the zero-argument callable whose
    calls are timed; it runs in the pytest process, so it must not rely on state set up by whoever listed the cases.
    ``bytes`` / ``flops``: the minimal bytes and the useful FLOPs of one call, from which the runner derives
    ``gbps = bytes / t / 1e9`` and ``tflops = flops / t / 1e12`` (t: the median in seconds); None: not reported.
    ``skipped``: why this row cannot run on CPU (a ``skipped`` row; ``prepare`` is then not needed)."""

    row: Dict[str, Any]
    prepare: Optional[Callable[[], Callable[[], object]]] = None
    bytes: Optional[float] = None
    flops: Optional[float] = None
    skipped: Optional[str] = None

    @property
    def id(self) -> str:
        """The pytest parameter id: ``op-shape-dtype-mode-provider`` (missing fields left out), characters other than
        letters, digits and ``_.+=-`` replaced by ``_`` (ids travel through the JUnit XML and pytest's node ids)."""
        from benchmarks.run import format_shape

        parts = [self.row.get("op"), format_shape(self.row.get("shape")), self.row.get("dtype"), self.row.get("mode"),
                 self.row.get("provider")]
        text = "-".join(str(p).replace("torch.", "") for p in parts if p not in (None, ""))
        return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text)


# ----------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------
def cuda_median_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cpu_median_ms(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_kernel_ms(fn: Callable[[], object], reps: int = 5) -> Optional[float]:
    """Sum of the device durations of the kernels (and memsets/copies) one call launches, from ``torch.profiler``:
    the time the call would take with no host-side launch gaps (as when the CPU runs ahead of the GPU in a
    training step). None when the profiler reports no device events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / reps / 1e3 if total_us > 0 else None


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30) -> float:
    """Achieved bandwidth of a large device-to-device copy (bytes read + bytes written over time); cached."""
    key = str(device)
    if key not in _COPY_BW:
        src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = cuda_median_ms(lambda: dst.copy_(src), rep_ms=200)
        _COPY_BW[key] = 2 * nbytes / (ms * 1e-3) / 1e9
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_BW[key]


# ----------------------------------------------------------------------------------------------------
# one (case, provider, mode) measurement
# ----------------------------------------------------------------------------------------------------
def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _step(fn, case: Case, mode: str):
    """A closure running ``mode`` once (plus what it needs prepared: leaves, upstream grads, a retained graph)."""
    if mode == "fwd":
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in case.args]

        def run():
            with torch.no_grad():
                return fn(*args)

        return run
    args = [a.detach().clone().requires_grad_(i in case.diff) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(case.args)]
    leaves = [args[i] for i in case.diff]
    outs = _as_tuple(fn(*args))
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    del outs
    return lambda: torch.autograd.grad(_as_tuple(fn(*args)), leaves, grads)


def _describe(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def measure(fn, case: Case, mode: str, provider: str, device: torch.device, copy_gbps: Optional[float]) -> dict:
    """One row. Any exception of this provider at this shape and mode (out of memory, a kernel that cannot
    compile, a shape it rejects) becomes the row's ``error`` (type and message), so that the other providers and
    shapes of the sweep are still measured."""
    row = dict(op=case.op, shape=tuple(case.shape), dtype=str(case.dtype).replace("torch.", ""), mode=mode,
               provider=provider, **case.extra)
    try:
        step = _step(fn, case, mode)
        if device.type == "cuda":
            step()  # compile / warm caches before the memory probe and the timing
            peak = peak_memory_mb(step, device)
            ms = cuda_median_ms(step)
            gpu_ms = gpu_kernel_ms(step)
        else:
            peak, ms, gpu_ms = None, cpu_median_ms(step), None
    except torch.OutOfMemoryError as e:  # a provider that cannot run at this size is a result, not a crash
        torch.cuda.empty_cache()
        return {**row, "error": f"out of memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001 - one provider's failure must not discard the sweep's other rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "error": _describe(e)}
    nbytes, flops = case.work(mode, provider)
    gbps = nbytes / (ms * 1e-3) / 1e9
    row.update(ms=ms, timer=TIMER_DO_BENCH if device.type == "cuda" else TIMER_CPU_MEDIAN, gbps=gbps,
               peak_mem_mb=peak, bytes=nbytes)
    if flops:
        row.update(flops=flops, tflops=flops / (ms * 1e-3) / 1e12)
    note = case.notes.get((mode, provider))
    if note:
        row["not_comparable"] = note
    if gpu_ms:
        row.update(gpu_ms=gpu_ms, gpu_gbps=nbytes / (gpu_ms * 1e-3) / 1e9)
    if copy_gbps:
        row["pct_copy_bw"] = 100.0 * gbps / copy_gbps
        if gpu_ms:
            row["gpu_pct_copy_bw"] = 100.0 * row["gpu_gbps"] / copy_gbps
    return row


def compiled(fn):
    """torch.compile of a reference function: inductor, one static graph per shape."""
    return torch.compile(fn, dynamic=False)


def reference_providers(kernel: Callable, reference: Callable) -> Dict[str, Callable]:
    """The three providers of a row-kernel case: ``triton`` (the kernel's functional API), ``eager`` (the
    ``mllm_kernels.reference`` function) and ``compile`` (``torch.compile`` of that reference)."""
    return {"triton": kernel, "eager": reference, "compile": compiled(reference)}


def run_cases(cases: Sequence[Case], providers: Dict[str, Callable], device: torch.device,
              modes: Sequence[str] = MODES, progress: bool = True) -> List[dict]:
    """All (case, mode, provider) rows, timed in this process. On CPU only the ``eager`` provider runs (timer
    ``cpu_median_ms``); the others get ``skipped`` rows. Bench modules time CPU rows with pytest-benchmark instead
    (``run_shapes``); this CPU branch serves direct callers."""
    copy_gbps = copy_bandwidth_gbps(device) if device.type == "cuda" else None
    rows: List[dict] = []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases) * len(modes) * len(providers), disable=not progress, desc=cases[0].op if cases else "")
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    for case in cases:
        torch._dynamo.reset()  # a fresh compile cache per shape keeps the recompile limit out of the way
        for mode in modes:
            for name, fn in providers.items():
                if device.type != "cuda" and name != "eager":
                    rows.append(dict(op=case.op, shape=tuple(case.shape), dtype=str(case.dtype).replace("torch.", ""),
                                     mode=mode, provider=name, skipped="needs CUDA", **case.extra))
                else:
                    rows.append(measure(fn, case, mode, name, device, copy_gbps))
                if bar is not None:
                    bar.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    if copy_gbps:
        for r in rows:
            r.setdefault("copy_bw_gbps", copy_gbps)
    return rows


def shape_cpu_cases(make_cases: Callable[[tuple, torch.dtype, torch.device], Sequence[Case]],
                    providers: Callable[[str], Dict[str, Callable]], cpu_shapes: Sequence[tuple],
                    modes: Sequence[str] = MODES) -> List[CpuCase]:
    """A row-kernel module's ``cpu_cases``: every (case, mode, provider) of ``make_cases(shape, float32, cpu)`` for
    each shape in ``cpu_shapes``, in ``run_cases``' order. The ``eager`` provider is timed (``_step`` of its mode, the
    closure the GPU path times); ``triton`` and ``compile`` are ``skipped`` ("needs CUDA": on CPU they would time the
    Triton interpreter and inductor's C++ backend, not the GPU code being benchmarked). Bytes and FLOPs are
    ``Case.work(mode, provider)``; a ``notes`` entry becomes the row's ``not_comparable``."""
    cpu = torch.device("cpu")
    out: List[CpuCase] = []
    for shape in cpu_shapes:
        for case in make_cases(shape, torch.float32, cpu):
            provs = providers(case.op)
            for mode in modes:
                for name, fn in provs.items():
                    row = dict(op=case.op, shape=tuple(case.shape), dtype=str(case.dtype).replace("torch.", ""),
                               mode=mode, provider=name, **case.extra)
                    if name != "eager":
                        out.append(CpuCase(row, skipped="needs CUDA"))
                        continue
                    nbytes, flops = case.work(mode, name)
                    note = case.notes.get((mode, name))
                    if note:
                        row["not_comparable"] = note
                    out.append(CpuCase(row, prepare=functools.partial(_step, fn, case, mode), bytes=nbytes,
                                       flops=flops or None))
    return out


def run_shapes(make_cases: Callable[[tuple, torch.dtype, torch.device], Sequence[Case]],
               providers: Callable[[str], Dict[str, Callable]], device=None, quick: bool = False,
               progress: bool = True, *, gpu_shapes: Sequence[tuple], quick_gpu_shapes: Sequence[tuple],
               module_file=None) -> List[dict]:
    """A bench module's ``run``. On CUDA (the default when there is one): every case of every shape through
    ``run_cases`` (``do_bench``), with ``providers(case.op)`` built afresh per case (a new ``torch.compile`` per shape);
    the shapes are ``quick_gpu_shapes`` (``quick``) or ``gpu_shapes``, bf16. ``make_cases(shape, dtype, device)``
    lists the cases of one shape. On CPU: the module's ``cpu_cases()`` timed by pytest-benchmark in a subprocess that
    imports ``module_file`` (pass ``__file__``), the rows the runner records."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        if module_file is None:
            raise ValueError("run_shapes on CPU needs module_file=__file__ of the bench module: its cpu_cases() are "
                             "timed by pytest-benchmark in a process that imports that file")
        from benchmarks.pytest_cpu import module_rows

        return module_rows(module_file, quick)
    rows: List[dict] = []
    for shape in (quick_gpu_shapes if quick else gpu_shapes):
        for case in make_cases(shape, torch.bfloat16, device):
            rows += run_cases([case], providers(case.op), device, progress=progress)
    return rows


# ----------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    try:
        from benchmarks.run import environment as _env

        return _env(device)
    except Exception:  # the runner is optional for the standalone CLI
        import triton

        env = {"torch": torch.__version__, "triton": triton.__version__,
               "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        env["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return env


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(rows: Sequence[dict], env: Optional[dict] = None) -> str:
    """Rows grouped by (op, shape, dtype, mode); speed-up is against ``eager`` at the same key. A TFLOP/s column is
    shown when any row reports one; a row marked ``not_comparable`` gets no speed-up but a footnote with the reason."""
    eager = {(r["op"], tuple(r["shape"]), r["dtype"], r["mode"]): r.get("ms") for r in rows if r["provider"] == "eager"}
    has_tf = any(r.get("tflops") is not None for r in rows)
    lines = []
    if env:
        lines.append(f"card: {env.get('card')}, torch {env.get('torch')}, triton {env.get('triton')}, "
                     f"{env.get('date_utc', '')}")
        cbw = next((r.get("copy_bw_gbps") for r in rows if r.get("copy_bw_gbps")), None)
        if cbw:
            lines.append(f"measured copy bandwidth: {cbw:.0f} GB/s (1 GiB device-to-device copy, read + write)")
        lines.append("")
    header = ["op", "shape", "dtype", "mode", "provider", "ms (median)", "GB/s", "% copy BW"]
    header += (["TFLOP/s"] if has_tf else []) + ["speed-up vs eager", "GPU-only ms", "GPU-only % copy BW", "peak MiB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        key = [r["op"], shape, r["dtype"], r["mode"], r["provider"]]
        if "ms" not in r:
            cells = key + [str(r.get("skipped") or r.get("error"))] + [""] * (len(header) - len(key) - 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        if r.get("not_comparable"):
            # a time of different work (e.g. gradients already taken in the forward): a ratio would mislead
            notes.append(f"{'†' * (len(notes) + 1)} {r['op']} {shape} {r['mode']} {r['provider']}: "
                         f"{r['not_comparable']}")
            sp_cell = f"not comparable {'†' * len(notes)}"
        else:
            base = eager.get((r["op"], tuple(r["shape"]), r["dtype"], r["mode"]))
            sp_cell = _fmt(base / r["ms"] if base else None, 2)
        cells = key + [_fmt(r["ms"], 4), _fmt(r["gbps"], 0), _fmt(r.get("pct_copy_bw"), 1)]
        cells += ([_fmt(r.get("tflops"), 1)] if has_tf else [])
        cells += [sp_cell, _fmt(r.get("gpu_ms"), 4), _fmt(r.get("gpu_pct_copy_bw"), 1), _fmt(r.get("peak_mem_mb"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def cli(name: str, run: Callable[..., List[dict]], argv=None) -> List[dict]:
    """``python benchmarks/bench_<name>.py [--out DIR] [--quick] [--device cuda|cpu]``: prints the Markdown table and
    writes ``<DIR>/bench_<name>_<UTC YYYYMMDD-HHMMSS>_<card>.json`` (environment + rows) and ``.md``, the runner's
    naming (``benchmarks.run.result_stem``): a re-run never overwrites an earlier file, even within the same second.
    On CPU ``run`` times the module's ``cpu_cases()`` with pytest-benchmark, as the runner does."""
    ap = argparse.ArgumentParser(description=f"benchmark of the {name} kernel vs eager and torch.compile")
    ap.add_argument("--out", default=None, help="folder for the JSON + Markdown results")
    ap.add_argument("--quick", action="store_true", help="model shapes only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from benchmarks.run import jsonable, resolve_device, result_stem

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    rows = run(device, quick=args.quick)
    env = environment(device)
    md = f"# bench_{name}\n\n" + markdown_table(rows, env)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = result_stem(out, env, prefix=f"bench_{name}")
        (out / f"{stem}.json").write_text(json.dumps(jsonable({"environment": env, "rows": rows}), indent=2) + "\n")
        (out / f"{stem}.md").write_text(md)
        print(f"wrote {out / stem}.json and .md")
    return rows
