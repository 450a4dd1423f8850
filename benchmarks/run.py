"""Run every ``benchmarks/bench_*.py`` on the current device and write JSON + Markdown + plots.

    python -m benchmarks.run [--only NAME ...] [--out benchmarks/results/] [--quick] [--device auto|cpu|cuda]
                             [--threads N]

Per run this writes, under ``--out``:
  * ``<stem>.json``: ``{"environment": {card, driver, CUDA, torch, triton, git commit, date, host, ...},
    "args": {...}, "modules": {name: {"status", "seconds", "n_rows", "error"?}}, "rows": [...]}``;
  * ``<stem>.md``: one Markdown table per bench module (plus failures and skips);
  * ``<stem>_plots/<op>.png``: per kernel, median time (and GB/s or TFLOP/s when reported) vs size, one
    line per provider, one column per (mode, dtype).
``<stem>`` is ``<UTC date-time>_<device tag>`` (``result_stem``; ``-2``, ``-3``, ... appended if that name is taken),
so no run overwrites another.

Timers (every timed row says which in ``timer``): on CUDA each module's ``run`` (``triton.testing.do_bench`` for the
kernels). On CPU a module that lists ``cpu_cases()`` is timed by pytest-benchmark: ``benchmarks/pytest_cpu.py`` runs
them in a pytest subprocess (``--benchmark-enable --benchmark-only --benchmark-json``) and maps each entry's ``stats``
back to its row (``ms`` = median x 1e3, plus min/max/mean/stddev/quartiles, ``rounds``, ``iterations``; GB/s and
TFLOP/s derived from the case's bytes and FLOPs as on the GPU); pytest-benchmark's JSON is kept in
``<stem>_pytest_benchmark/bench_<name>.json``. ``--quick`` also shortens those timings (``pytest_cpu.TIMING``).
Modules without ``cpu_cases`` keep their own CPU timer (``bench_packing``: wall + process CPU time of the same calls;
``bench_host_overhead``: providers interleaved per repeat), stated in their rows.

The bench-module contract is in ``benchmarks/__init__.py``. A module that fails to import, raises, or
returns rows that break the contract becomes an ``error`` row; the others still run. A row whose TFLOP/s is
above the card's dense bf16 peak is flagged ``implausible`` (its FLOP accounting is wrong). The exit code is 1
when any module or row failed or was implausible, 0 otherwise.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"

# Columns of the Markdown table, in order; everything else stays in the JSON only.
TABLE_COLUMNS = ("op", "shape", "dtype", "mode", "provider", "ms", "gbps", "tflops", "pct_copy_bw", "peak_mem_mb")
COLUMN_TITLES = {"ms": "ms (median)", "gbps": "GB/s", "tflops": "TFLOP/s", "pct_copy_bw": "% copy BW", "peak_mem_mb": "peak MiB"}
# A row's speed-up is reported against the first of these providers present for the same (op, shape,
# dtype, mode): the eager PyTorch path is the baseline every kernel has to beat ("dispatcher": the custom-op
# launch path that bench_host_overhead compares the autograd.Function path with; "sdpa-flash": PyTorch's attention,
# bench_attention's baseline at every shape, where its eager reference is skipped at long T).
BASELINE_PROVIDERS = ("eager", "torch", "reference", "pytorch", "dispatcher", "sdpa-flash")


# ----------------------------------------------------------------------------------------------------
# Environment: everything needed to reproduce or compare a number
# ----------------------------------------------------------------------------------------------------
def _run_cmd(cmd: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _nvidia_driver() -> Optional[str]:
    out = _run_cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:  # the kernel module reports it even where nvidia-smi is not installed
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+([\d.]+)", text)
    return m.group(1) if m else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device=None) -> Dict[str, Any]:
    """Card, driver, CUDA, torch/triton versions, git commit, date and host for a results file."""
    import torch

    dev = resolve_device(device)
    env: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": str(dev),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - a missing/broken triton is itself worth recording
        env["triton"] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
            driver=_nvidia_driver(),
        )
    else:
        env.update(card="cpu", capability=None, driver=None)
    env["git_commit"], env["git_dirty"] = git_state()
    return env


_DIRTY_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def git_state() -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the code being measured; dirty: tracked files had uncommitted changes (None: unknown).

    ``MLLM_GIT_COMMIT`` names the commit for a copied tree whose .git may be stale or absent (a GPU box), with
    ``MLLM_GIT_DIRTY`` (1/0) its state as the caller saw it (``gpu_check.sh`` exports both). Without
    ``MLLM_GIT_DIRTY``, the state is read from this tree's git when its HEAD is the named commit (a caller that
    exported only the hash), else left unknown."""
    named = os.environ.get("MLLM_GIT_COMMIT")
    dirty_env = os.environ.get("MLLM_GIT_DIRTY")
    dirty: Optional[bool] = None
    if dirty_env not in (None, ""):
        if dirty_env.strip().lower() not in _DIRTY_VALUES:
            raise ValueError(f"MLLM_GIT_DIRTY={dirty_env!r}: expected 1 or 0 (true/false, yes/no)")
        dirty = _DIRTY_VALUES[dirty_env.strip().lower()]
    head = _run_cmd(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    commit = named or head
    if dirty is None and commit and head and (head == commit or head.startswith(commit)):
        # uncommitted changes to tracked files make the commit hash an incomplete description of the code
        status = _run_cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
        dirty = None if status is None else bool(status)
    return commit, dirty


def resolve_device(device=None):
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: not a device name (use 'auto', 'cpu' or 'cuda[:i]')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: only 'cpu', 'cuda[:i]' or 'auto' are supported")
    return dev


def device_tag(env: Dict[str, Any]) -> str:
    """'nvidia-h100-80gb-hbm3' / 'cpu': a file-name-safe name of the card."""
    name = str(env.get("card") or env.get("device") or "unknown").lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


# ----------------------------------------------------------------------------------------------------
# Discovery and execution
# ----------------------------------------------------------------------------------------------------
def result_stem(out_dir, env: Dict[str, Any], prefix: Optional[str] = None,
                suffixes: Sequence[str] = (".json", ".md")) -> str:
    """``[<prefix>_]<UTC YYYYMMDD-HHMMSS>_<card>`` from ``env["date_utc"]`` (now when absent) and ``device_tag(env)``,
    made free in ``out_dir``: when a file with that stem and one of ``suffixes`` (or a ``<stem>_*`` folder) exists,
    ``-2``, ``-3``, ... is appended, so two runs in the same second keep both results."""
    date = env.get("date_utc") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    stamp = str(date)[:19].replace("-", "").replace(":", "").replace("T", "-")
    base = f"{prefix}_{stamp}_{device_tag(env)}" if prefix else f"{stamp}_{device_tag(env)}"
    out = Path(out_dir)

    def taken(stem: str) -> bool:
        return any((out / f"{stem}{sfx}").exists() for sfx in suffixes) or any(out.glob(f"{stem}_*"))

    stem, n = base, 1
    while taken(stem):
        n += 1
        stem = f"{base}-{n}"
    return stem


def write_sweep(out_dir, name: str, env: Dict[str, Any], rows: List[Dict[str, Any]], markdown: str) -> Path:
    """A launch-config sweep's results: ``<name>_<UTC stamp>_<card>.json`` (env + rows) and ``.md`` (``markdown``)
    in ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{env['date_utc'][:19].replace('-', '').replace(':', '')}_{device_tag(env)}"
    (out / f"{stem}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown)
    return out / f"{stem}.json"


def discover(bench_dir: Path = BENCH_DIR, only: Optional[Iterable[str]] = None) -> List[Tuple[str, Path]]:
    """[(name, path)] for every ``bench_<name>.py`` in bench_dir, sorted; ``only`` filters by name.

    ``only`` accepts ``rms_norm``, ``bench_rms_norm`` or ``bench_rms_norm.py``; an unknown name is a
    ValueError listing the available ones (a typo must not silently run nothing)."""
    bench_dir = Path(bench_dir)
    if not bench_dir.is_dir():
        raise ValueError(f"--bench-dir {bench_dir}: not a directory")
    found = {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}
    if only is None:
        return sorted(found.items())
    wanted: List[str] = []
    for item in only:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            name = name[:-3] if name.endswith(".py") else name
            name = name[len("bench_"):] if name.startswith("bench_") else name
            if name not in found:
                avail = ", ".join(sorted(found)) or "(none)"
                raise ValueError(f"--only {name!r}: no benchmarks/bench_{name}.py in {bench_dir}; available: {avail}")
            if name not in wanted:
                wanted.append(name)
    return [(n, found[n]) for n in wanted]


def load_module(name: str, path: Path):
    """Import a bench module. Inside the ``benchmarks`` package it is imported as ``benchmarks.bench_<name>``
    (so ``from benchmarks.common import ...`` and relative imports work); elsewhere (tests, --bench-dir)
    from its file, with its folder on sys.path for sibling imports."""
    path = Path(path).resolve()
    if path.parent == BENCH_DIR:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        return importlib.import_module(f"benchmarks.{path.stem}")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_mllm_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def describe_exception(e: BaseException) -> str:
    """'Type: first line of the message', plus the root cause when the exception was raised from another
    (Triton's CompilationError shows only a source excerpt; the reason is in its __cause__)."""
    def one(x: BaseException) -> str:
        lines = [ln for ln in str(x).splitlines() if ln.strip()]
        return f"{type(x).__name__}: {lines[0].strip()}" if lines else type(x).__name__

    root, seen = e, set()
    while root.__cause__ is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__
    msg = one(e)
    return msg if root is e else f"{msg} (caused by {one(root)})"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_rows(name: str, rows) -> List[Dict[str, Any]]:
    """Check the contract; raise ValueError naming the module, the row index and the problem."""
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"bench_{name}.run() must return a list of dicts, got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"bench_{name}.run() returned no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"bench_{name}.run() row {i}: expected a dict, got {type(row).__name__}")
        for key in ("op", "provider"):
            if not isinstance(row.get(key), str) or not row.get(key):
                raise ValueError(f"bench_{name}.run() row {i}: missing or non-string '{key}' ({row!r})")
        if "error" in row or "skipped" in row:
            continue
        ms = row.get("ms")
        if not _is_number(ms) or ms < 0:
            raise ValueError(f"bench_{name}.run() row {i}: 'ms' must be a number >= 0, got {ms!r} ({row!r})")
        for key in ("gbps", "tflops", "peak_mem_mb", "size"):
            if row.get(key) is not None and not _is_number(row[key]):
                raise ValueError(f"bench_{name}.run() row {i}: '{key}' must be a number, got {row[key]!r}")
        if "extrapolated" in row and not isinstance(row["extrapolated"], (bool, str)):
            raise ValueError(f"bench_{name}.run() row {i}: 'extrapolated' must be a bool or a str saying how, got "
                             f"{row['extrapolated']!r}")
        if "not_comparable" in row and not isinstance(row["not_comparable"], str):
            raise ValueError(f"bench_{name}.run() row {i}: 'not_comparable' must be a str (the reason), got "
                             f"{row['not_comparable']!r}")
    out = [dict(r) for r in rows]
    for r in out:
        # a NaN/inf time is how some modules report an out-of-memory or failed shape: keep the row as a
        # per-row failure instead of discarding the module's other measurements
        if "error" not in r and "skipped" not in r and not math.isfinite(r["ms"]):
            r["error"] = f"no valid time (ms={r['ms']})"
    return out


def jsonable(x):
    """Rows may carry torch dtypes, devices or tuples: make them JSON-friendly and readable."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    s = str(x)
    return s[len("torch."):] if s.startswith("torch.") else s


def _free_device_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_module(name: str, path: Path, device, quick: bool,
               cpu_json_dir: Optional[Path] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Run one module; never raises. Returns (rows, summary) where a failure is one error row.

    On CPU a module with ``cpu_cases`` is timed by pytest-benchmark (``benchmarks.pytest_cpu.time_module``; its JSON
    kept as ``cpu_json_dir/bench_<name>.json`` when given), any other through its ``run``. A timed row that does not
    name its timer gets ``timer = "not stated by bench_<name>.run"``."""
    t0 = time.perf_counter()
    info: Dict[str, Any] = {}
    try:
        module = load_module(name, path)
        if device.type != "cuda" and callable(getattr(module, "cpu_cases", None)):
            from benchmarks.pytest_cpu import time_module

            json_out = Path(cpu_json_dir) / f"bench_{name}.json" if cpu_json_dir is not None else None
            raw, info = time_module(name, path, quick, json_out=json_out)
        else:
            fn = getattr(module, "run", None)
            if not callable(fn):
                raise ValueError(f"{path}: no run(device, quick=False) function")
            raw = fn(device, quick=quick)
        rows = validate_rows(name, raw)
    except Exception as e:  # noqa: BLE001 - one broken benchmark must not stop the others
        seconds = time.perf_counter() - t0
        msg = describe_exception(e)
        row = {"bench": name, "op": name, "provider": "-", "error": msg, "traceback": traceback.format_exc()}
        return [row], {"status": "error", "seconds": round(seconds, 3), "n_rows": 0, "error": msg}
    finally:
        try:
            _free_device_memory(device)
        except Exception:  # noqa: BLE001 - a poisoned CUDA context shows up in the next module's error
            pass
    seconds = time.perf_counter() - t0
    for r in rows:
        r.setdefault("bench", name)
        if "ms" in r and "error" not in r and "skipped" not in r:
            r.setdefault("timer", f"not stated by bench_{name}.run")
    n_err = sum("error" in r for r in rows)
    status = "ok" if n_err == 0 else "row_errors"
    summary = {"status": status, "seconds": round(seconds, 3), "n_rows": len(rows), "n_row_errors": n_err}
    timers = sorted({str(r["timer"]) for r in rows if "timer" in r and "ms" in r})
    if timers:
        summary["timers"] = timers
    if info:
        summary["cpu_timing"] = info
    return rows, summary


def peak_tflops(card: Optional[str]) -> Optional[float]:
    """The card's dense bf16 tensor-core peak in TFLOP/s (``mllm.training.metrics.PEAK_BF16_FLOPS``), None when the
    card is not in that table. No row of these benchmarks (bf16, fp16, fp32; no fp8) can honestly exceed it."""
    from mllm.training.metrics import PEAK_BF16_FLOPS

    for key, _label, peak in PEAK_BF16_FLOPS:
        if card and key in card:
            return peak / 1e12
    return None


def flag_implausible(rows: List[Dict[str, Any]], env: Dict[str, Any]) -> int:
    """Mark every timed row whose TFLOP/s exceeds the card's peak with ``implausible`` (the FLOPs credited to it
    are more than the work it did: a bug in the benchmark's accounting, not a fast kernel); return how many."""
    peak = peak_tflops(env.get("card"))
    n = 0
    if not peak:
        return n
    for r in rows:
        tf = r.get("tflops")
        if "error" in r or "skipped" in r or not _is_number(tf) or not math.isfinite(tf) or tf <= peak:
            continue
        r["implausible"] = (f"{tf:.0f} TFLOP/s is above the {env.get('card')} dense bf16 peak of {peak:.0f}: the "
                            f"FLOPs credited to this row exceed the work it does")
        n += 1
    return n


def run_all(modules: Sequence[Tuple[str, Path]], device, quick: bool = False, progress: bool = True,
            env: Optional[Dict[str, Any]] = None, cpu_json_dir: Optional[Path] = None):
    """Every module through ``run_module`` (``cpu_json_dir``: where pytest-benchmark's JSON of each CPU-timed module
    is kept); with ``env`` (its ``card``), rows above the card's peak TFLOP/s are flagged ``implausible`` and their
    module's status is no longer ``ok``."""
    from tqdm import tqdm

    rows: List[Dict[str, Any]] = []
    summary: Dict[str, Any] = {}
    bar = tqdm(modules, desc="benchmarks", unit="module", disable=not progress)
    for name, path in bar:
        bar.set_postfix_str(name)
        mrows, msum = run_module(name, path, device, quick, cpu_json_dir=cpu_json_dir)
        n_bad = flag_implausible(mrows, env) if env else 0
        if n_bad:
            msum["n_implausible"] = n_bad
            if msum["status"] == "ok":
                msum["status"] = "implausible_rows"
            tqdm.write(f"[benchmarks] bench_{name}: {n_bad} row(s) above the card's peak TFLOP/s")
        rows.extend(mrows)
        summary[name] = msum
        if msum["status"] == "error":
            tqdm.write(f"[benchmarks] bench_{name} FAILED: {msum['error']}")
    return rows, summary


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------
def format_shape(shape) -> str:
    if shape is None:
        return ""
    if isinstance(shape, dict):
        return ", ".join(f"{k}={v}" for k, v in shape.items())
    if isinstance(shape, (list, tuple)):
        return "x".join(str(s) for s in shape)
    return str(shape)


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.4g}" if abs(x) < 10 else f"{x:.1f}"
        return f"{x:.3e}"
    return jsonable(x) if not isinstance(x, str) else x


def _row_key(r) -> Tuple[str, str, str, str]:
    return (r.get("op"), format_shape(r.get("shape")), str(jsonable(r.get("dtype"))), str(r.get("mode")))


def row_note(r: Dict[str, Any]) -> str:
    """What a reader must know before using the row's numbers: extrapolated, not comparable, implausible."""
    parts = []
    if r.get("implausible"):
        parts.append(f"IMPLAUSIBLE: {r['implausible']}")
    if r.get("extrapolated"):
        how = r["extrapolated"]
        parts.append("extrapolated" + (f" ({how})" if isinstance(how, str) else ""))
    if r.get("not_comparable"):
        parts.append(f"not comparable: {r['not_comparable']}")
    return "; ".join(parts)


def speedups(rows: Sequence[Dict[str, Any]]) -> List[Optional[float]]:
    """baseline_ms / ms per row, the baseline being the first BASELINE_PROVIDERS entry timed for the same
    (op, shape, dtype, mode); None where there is no baseline or the row is the baseline itself."""
    base: Dict[Tuple, Tuple[int, float]] = {}
    for r in rows:
        if "ms" not in r or "error" in r or "skipped" in r or r.get("provider") not in BASELINE_PROVIDERS:
            continue
        rank = BASELINE_PROVIDERS.index(r["provider"])
        k = _row_key(r)
        if k not in base or rank < base[k][0]:
            base[k] = (rank, float(r["ms"]))
    out: List[Optional[float]] = []
    for r in rows:
        k = _row_key(r)
        if ("ms" not in r or "error" in r or "skipped" in r or k not in base or r.get("provider") in BASELINE_PROVIDERS
                or r.get("not_comparable")):
            out.append(None)
        else:
            out.append(base[k][1] / r["ms"] if r["ms"] > 0 else None)
    return out


def markdown_report(env: Dict[str, Any], rows: Sequence[Dict[str, Any]], summary: Dict[str, Any],
                    plots: Dict[str, str]) -> str:
    lines = [f"# Benchmarks: {env.get('card')} ({env.get('date_utc')})", ""]
    commit = (env.get("git_commit") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    lines += [
        f"- device: `{env.get('device')}` ({env.get('card')}"
        + (f", CC {env['capability']}, {env.get('sm_count')} SMs, {env.get('memory_gb')} GiB" if env.get("capability") else "")
        + ")",
        f"- driver {env.get('driver') or 'n/a'}, CUDA runtime {env.get('cuda_runtime') or 'n/a'}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, python {env.get('python')}",
        f"- git {commit}, host `{env.get('host')}`, CPU {env.get('cpu')} ({env.get('cpu_count')} cores)",
        "- `ms` is the median time; GB/s and TFLOP/s are the minimal bytes / FLOPs of the op (see "
        "benchmarks/NOTES.md) over that time; `× base` = baseline-provider time / this time; `*` marks a time "
        "extrapolated from a smaller measured run (see the note column).",
        "",
    ]
    spd = speedups(rows)
    by_bench: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        by_bench.setdefault(r.get("bench", r.get("op")), []).append(i)
    for bench, idxs in by_bench.items():
        timed = [i for i in idxs if "ms" in rows[i] and "error" not in rows[i] and "skipped" not in rows[i]]
        st = summary.get(bench, {})
        lines.append(f"## bench_{bench} ({st.get('status', '?')}, {st.get('seconds', '?')} s)")
        lines.append("")
        if st.get("timers"):
            timing = st.get("cpu_timing", {})
            opts = timing.get("options") or {}
            how = ""
            if opts:
                warm = opts.get("warmup")
                warm = (f"warm-up on, --benchmark-warmup-iterations {warm}" if warm
                        else "no warm-up but the unrecorded calibration call")
                how = (f" (pytest-benchmark {timing.get('pytest_benchmark')}: median of >= {opts.get('min_rounds')} "
                       f"rounds over ~{opts.get('max_time')} s per case, {warm}, clock {opts.get('timer')}"
                       + (f"; JSON `{timing['json']}`" if timing.get("json") else "") + ")")
            lines += [f"timer: {', '.join(st['timers'])}{how}", ""]
        if timed:
            # a column nobody in this module reports (e.g. TFLOP/s for a bandwidth-bound op) is left out
            cols = [c for c in TABLE_COLUMNS if c in ("op", "provider", "ms")
                    or any(rows[i].get(c) not in (None, "") for i in timed)]
            has_spd = any(spd[i] is not None for i in timed)
            has_note = any(row_note(rows[i]) for i in timed)
            header = ([COLUMN_TITLES.get(c, c) for c in cols] + (["× base"] if has_spd else [])
                      + (["note"] if has_note else []))
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            for i in timed:
                r = rows[i]
                cells = [format_shape(r.get(c)) if c == "shape" else _fmt(r.get(c)) for c in cols]
                if r.get("extrapolated"):
                    cells[cols.index("ms")] = f"{cells[cols.index('ms')]}*"
                if has_spd:
                    cells.append(f"{spd[i]:.2f}" if spd[i] is not None else "")
                if has_note:
                    cells.append(row_note(r).replace("|", "/"))
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
            lines.append("")
        for op in sorted({rows[i]["op"] for i in timed}):
            if op in plots:
                lines += [f"![{op}]({plots[op]})", ""]
        skipped: Dict[str, Dict[str, int]] = {}
        for i in idxs:
            r = rows[i]
            if "error" in r:
                where = " ".join(str(x) for x in (format_shape(r.get("shape")), r.get("dtype"), r.get("mode"))
                                 if x not in (None, ""))
                lines.append(f"- **error** `{r['op']}` {where} {r.get('provider')}: {r['error']}")
            elif r.get("implausible"):
                where = " ".join(str(x) for x in (format_shape(r.get("shape")), r.get("dtype"), r.get("mode"))
                                 if x not in (None, ""))
                lines.append(f"- **implausible** `{r['op']}` {where} {r.get('provider')}: {r['implausible']}")
            elif "skipped" in r:
                # one line per reason: a CPU run skips every GPU provider at every shape and mode
                key = f"{r['op']}/{r.get('provider')}"
                skipped.setdefault(str(r["skipped"]), {})[key] = skipped.get(str(r["skipped"]), {}).get(key, 0) + 1
        for reason, items in skipped.items():
            lines.append(f"- skipped ({reason}): " + ", ".join(f"`{k}` ×{n}" for k, n in items.items()))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------
# Writing a run
# ----------------------------------------------------------------------------------------------------
def write_results(out_dir: Path, env: Dict[str, Any], rows: List[Dict[str, Any]], summary: Dict[str, Any],
                  args: Dict[str, Any], make_plots: bool = True, stem: Optional[str] = None) -> Dict[str, Any]:
    """Write <stem>.json, <stem>.md and <stem>_plots/*.png; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        stem = result_stem(out_dir, env)
    for msum in summary.values():  # pytest-benchmark's kept JSON, named relative to the results like the plots
        kept = msum.get("cpu_timing", {}).get("json") if isinstance(msum, dict) else None
        if kept:
            msum["cpu_timing"]["json"] = os.path.relpath(kept, out_dir)
    plot_paths: Dict[str, Path] = {}
    plot_error = None
    if make_plots:
        try:  # a plotting failure (an old matplotlib on a GPU image) must not lose the measured rows
            from benchmarks.plotting import plot_rows

            plot_paths = plot_rows(rows, out_dir / f"{stem}_plots", title_suffix=str(env.get("card")))
        except Exception as e:  # noqa: BLE001 - reported in the JSON, the Markdown and on stderr
            plot_error = describe_exception(e)
            print(f"benchmarks.run: plots not written: {plot_error}", file=sys.stderr)
    rel_plots = {op: os.path.relpath(p, out_dir) for op, p in plot_paths.items()}
    payload = {"environment": env, "args": args, "modules": summary, "plots": rel_plots, "rows": rows}
    if plot_error is not None:
        payload["plot_error"] = plot_error
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    md_path = out_dir / f"{stem}.md"
    md = markdown_report(env, rows, summary, rel_plots)
    md_path.write_text(md + (f"\nPlots not written: {plot_error}\n" if plot_error is not None else ""))
    return {"json": json_path, "markdown": md_path, "plots": plot_paths}


def any_failed(rows: Sequence[Dict[str, Any]]) -> bool:
    return any("error" in r for r in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="run only bench_NAME (repeatable or comma-separated)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: benchmarks/results/)")
    p.add_argument("--quick", action="store_true", help="small sweep (each module's quick shapes)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available) | cpu | cuda[:i]")
    p.add_argument("--bench-dir", default=str(BENCH_DIR), help="folder holding bench_*.py (default: benchmarks/)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--list", action="store_true", help="list the bench modules and exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch here and in the pytest-benchmark process (default: torch's); 1 avoids "
                        "OpenMP stalls on a shared CPU, which quantise CPU medians to the scheduler's time slice")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")

    try:
        modules = discover(Path(args.bench_dir), args.only)
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.list:
        for name, path in modules:
            print(f"{name}\t{path}")
        return 0
    if not modules:
        p.error(f"no bench_*.py modules in {args.bench_dir}")

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the pytest-benchmark subprocess
            os.environ[var] = str(args.threads)
    env = environment(device)  # records torch_threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(out, env)  # chosen first: pytest-benchmark's JSON is kept under it while the modules run
    print(f"[benchmarks] {len(modules)} module(s) on {env['device']} ({env['card']}), quick={args.quick}")
    rows, summary = run_all(modules, device, quick=args.quick, progress=not args.no_progress, env=env,
                            cpu_json_dir=out / f"{stem}_pytest_benchmark")
    paths = write_results(out, env, rows, summary, vars(args), make_plots=not args.no_plots, stem=stem)
    print(f"[benchmarks] wrote {paths['json']}")
    print(f"[benchmarks] wrote {paths['markdown']}")
    for op, path in paths["plots"].items():
        print(f"[benchmarks] plot  {path}")
    failed = [n for n, s in summary.items() if s["status"] != "ok"]
    if failed:
        print(f"[benchmarks] FAILED: {', '.join(failed)} (see the error rows in {paths['markdown']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
