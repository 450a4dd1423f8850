"""One figure per kernel: median time (top) and throughput (bottom, when the rows report GB/s or TFLOP/s)
against problem size, one line per provider, one column per (mode, dtype).

The x value of a row is its ``size`` when given, else the product of the integers in its ``shape``
(so ``(8, 1024, 1024)`` and ``"8x1024x1024"`` both give 8,388,608 elements); rows whose shape holds no
integer are placed in order of appearance. Tick labels show the shapes themselves.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


def row_size(row: Dict[str, Any]) -> Optional[float]:
    size = row.get("size")
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return float(size)
    shape = row.get("shape")
    if isinstance(shape, dict):
        ints = [v for v in shape.values() if isinstance(v, int) and not isinstance(v, bool)]
    elif isinstance(shape, (list, tuple)):
        ints = [v for v in shape if isinstance(v, int) and not isinstance(v, bool)]
    elif isinstance(shape, str):
        ints = [int(s) for s in re.findall(r"\d+", shape)]
    else:
        ints = []
    return float(math.prod(ints)) if ints else None


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_") or "op"


def _throughput_key(rows: Sequence[Dict[str, Any]]) -> Optional[Tuple[str, str]]:
    for key, label in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if any(isinstance(r.get(key), (int, float)) for r in rows):
            return key, label
    return None


def plot_rows(rows: Sequence[Dict[str, Any]], out_dir: Path, title_suffix: str = "") -> Dict[str, Path]:
    """Write ``<out_dir>/<op>.png`` for every op with timed rows; return {op: path}."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the benchmark machines
    import matplotlib.pyplot as plt

    from benchmarks.run import format_shape

    timed = [r for r in rows if "ms" in r and "error" not in r and "skipped" not in r]
    ops: Dict[str, List[Dict[str, Any]]] = {}
    for r in timed:
        ops.setdefault(r["op"], []).append(r)
    out_dir = Path(out_dir)
    written: Dict[str, Path] = {}
    for op, op_rows in ops.items():
        panels: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
        for r in op_rows:
            panels.setdefault((str(r.get("mode", "")), str(r.get("dtype", ""))), []).append(r)
        tp = _throughput_key(op_rows)
        n_rows_fig = 2 if tp else 1
        fig, axes = plt.subplots(n_rows_fig, len(panels), figsize=(5.2 * len(panels), 3.6 * n_rows_fig),
                                 squeeze=False)
        # rows without an integer shape: order of first appearance keeps the sweep's own order
        fallback = {}
        for r in op_rows:
            fallback.setdefault(format_shape(r.get("shape")), float(len(fallback) + 1))
        for col, ((mode, dtype), prow) in enumerate(panels.items()):
            providers: Dict[str, List[Tuple[float, Dict[str, Any]]]] = {}
            ticks: Dict[float, str] = {}
            for r in prow:
                x = row_size(r)
                if x is None or x <= 0:
                    x = fallback[format_shape(r.get("shape"))]
                providers.setdefault(str(r["provider"]), []).append((x, r))
                ticks.setdefault(x, format_shape(r.get("shape")))
            metrics = [("ms", "median time (ms)")] + ([tp] if tp else [])
            for ax_row, (key, label) in enumerate(metrics):
                ax = axes[ax_row][col]
                for prov, pts in sorted(providers.items()):
                    pts = sorted((x, r[key]) for x, r in pts if isinstance(r.get(key), (int, float)))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                ax.set_xscale("log", base=2)
                if key == "ms":
                    ax.set_yscale("log")
                ax.set_ylabel(label)
                xs = sorted(ticks)
                ax.set_xticks(xs)
                ax.set_xticklabels([ticks[x] for x in xs], rotation=35, ha="right", fontsize=7)
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
                if ax_row == 0:
                    ax.set_title(" ".join(s for s in (mode, dtype) if s and s != "None") or op, fontsize=10)
                ax.legend(fontsize=8)
        fig.suptitle(f"{op}" + (f" — {title_suffix}" if title_suffix else ""))
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{_safe_name(op)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[op] = path
    return written
