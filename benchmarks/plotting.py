"""One figure per kernel: median time (top) and throughput (bottom, when the rows report GB/s or TFLOP/s)
against problem size, one line per provider, one column per (mode, dtype).

x positions (``x_positions``): every distinct shape of an op gets its own position and its own tick label (the
shape itself). When the shapes' sizes are all different, the axis is the size on a log2 scale: a row's size is its
``size`` when given, else the product of the integers in its ``shape`` (so ``(8, 1024, 1024)`` and
``"8x1024x1024"`` both give 8,388,608 elements). When two shapes have the same size (``(32, 1024, 16, 16, 64)``
and ``(8, 2048, 32, 8, 128)`` both hold 2^29 elements) or a shape holds no integer, a size axis would draw them
at one point, so the axis is categorical instead: the shapes in order of size, then of first appearance (also for
an op with a single shape, which then sits in the middle of its panel).

The time axis is logarithmic with labelled ticks at 1-2-5 steps (or finer ones when the times span less than a
decade). A provider whose times were extrapolated is drawn dashed with "(extrapolated)" in the legend; one whose
row is marked ``not_comparable`` (different work than the others at that mode) says so in the legend. A provider keeps
one colour in every panel, and the figure has one legend, to the right of the panels (a legend inside a panel hid
data points); the bottom panels' x axes are labelled.
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


def x_positions(rows: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, float], bool]:
    """({shape label: x}, log_axis) for the rows of one op: distinct shapes always get distinct x values."""
    from benchmarks.run import format_shape

    sizes: Dict[str, Optional[float]] = {}
    for r in rows:
        sizes.setdefault(format_shape(r.get("shape")), row_size(r))
    vals = list(sizes.values())
    if len(vals) > 1 and all(v is not None and v > 0 for v in vals) and len(set(vals)) == len(vals):
        return {label: float(v) for label, v in sizes.items()}, True
    order = sorted(range(len(sizes)), key=lambda i: (vals[i] is None, vals[i] or 0.0, i))
    labels = list(sizes)
    return {labels[i]: float(pos) for pos, i in enumerate(order)}, False


def log_ticks(lo: float, hi: float) -> List[float]:
    """Tick values for a log axis over [lo, hi] (> 0) that a reader can label: 1-2-5 per decade when the data span
    a decade or more (thinned to 1-per-decade beyond ~8 ticks), else evenly spaced round numbers."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"log_ticks: need finite positive bounds, got lo={lo!r}, hi={hi!r}")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi / lo >= 10:
        for subs in ((1, 2, 5), (1,)):
            ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                     for m in subs]
            ticks = [t for t in ticks if lo / 1.001 <= t <= hi * 1.001]
            if len(ticks) <= 8:
                return ticks
        return ticks
    from matplotlib.ticker import MaxNLocator

    ticks = [float(t) for t in MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
             if lo / 1.001 <= t <= hi * 1.001 and t > 0]
    if len(ticks) < 2:  # a very narrow span: label its ends
        ticks = sorted({lo, hi})
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_") or "op"


def _throughput_key(rows: Sequence[Dict[str, Any]]) -> Optional[Tuple[str, str]]:
    for key, label in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if any(isinstance(r.get(key), (int, float)) for r in rows):
            return key, label
    return None


def make_figure(op: str, op_rows: Sequence[Dict[str, Any]], title_suffix: str = ""):
    """The matplotlib figure of one op (see the module docstring); the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the benchmark machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    from benchmarks.run import format_shape

    panels: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in op_rows:
        panels.setdefault((str(r.get("mode", "")), str(r.get("dtype", ""))), []).append(r)
    tp = _throughput_key(op_rows)
    n_rows_fig = 2 if tp else 1
    fig, axes = plt.subplots(n_rows_fig, len(panels), figsize=(5.2 * len(panels) + 1.8, 3.6 * n_rows_fig),
                             squeeze=False, layout="constrained")
    xpos, log_x = x_positions(op_rows)
    # one colour per provider across every panel, and one legend for the figure (outside the panels, where it
    # cannot hide a line: a per-panel legend at loc="best" covered the eager-sinks line of the attention plots)
    all_providers = sorted({str(r["provider"]) for r in op_rows})
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colors = {p: cycle[i % len(cycle)] for i, p in enumerate(all_providers)}
    handles: Dict[str, Any] = {}
    xlabel = "shape (x: problem size, log\u2082 scale)" if log_x else "shape"
    for col, ((mode, dtype), prow) in enumerate(panels.items()):
        providers: Dict[str, List[Tuple[float, Dict[str, Any]]]] = {}
        ticks: Dict[float, str] = {}
        for r in prow:
            label = format_shape(r.get("shape"))
            providers.setdefault(str(r["provider"]), []).append((xpos[label], r))
            ticks[xpos[label]] = label
        metrics = [("ms", "median time (ms)")] + ([tp] if tp else [])
        for ax_row, (key, ylabel) in enumerate(metrics):
            ax = axes[ax_row][col]
            ys: List[float] = []
            for prov, pts in sorted(providers.items()):
                extrap = any(r.get("extrapolated") for _, r in pts)
                other = any(r.get("not_comparable") for _, r in pts)
                pts = sorted((x, r[key]) for x, r in pts if isinstance(r.get(key), (int, float)))
                if not pts:
                    continue
                name = prov + (" (extrapolated)" if extrap else "") + (" (not comparable)" if other else "")
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=colors[prov],
                                  linestyle="--" if extrap else "-", markerfacecolor="none" if extrap else None)
                handles.setdefault(name, line)
                ys += [p[1] for p in pts]
            if log_x:
                ax.set_xscale("log", base=2)
            else:
                ax.set_xlim(-0.5, len(xpos) - 0.5)
            xs = sorted(ticks)
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos, t=dict(ticks): t.get(x, "")))
            ax.xaxis.set_minor_locator(NullLocator())  # a log2 axis would add unlabelled powers of two
            for lab in ax.get_xticklabels():
                lab.set_rotation(35)
                lab.set_horizontalalignment("right")
                lab.set_fontsize(7)
            positive = [y for y in ys if y > 0 and math.isfinite(y)]
            if key == "ms" and positive:
                ax.set_yscale("log")
                pad = max(1.05, (max(positive) / min(positive)) ** 0.08)  # margin proportional to the span
                lo, hi = min(positive) / pad, max(positive) * pad
                ax.yaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_label(v)))
                ax.yaxis.set_minor_locator(NullLocator())
                ax.set_ylim(lo, hi)
            ax.set_ylabel(ylabel)
            if ax_row == n_rows_fig - 1:
                ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            if ax_row == 0:
                ax.set_title(" ".join(s for s in (mode, dtype) if s and s != "None") or op, fontsize=10)
    if handles:
        names = sorted(handles)
        try:  # "outside" legend locations need matplotlib >= 3.7 (the GPU image's version is not pinned)
            fig.legend([handles[n] for n in names], names, loc="outside right upper", fontsize=8, title="provider")
        except ValueError:
            fig.legend([handles[n] for n in names], names, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                       title="provider")
    fig.suptitle(f"{op}" + (f" — {title_suffix}" if title_suffix else ""))
    return fig


def plot_rows(rows: Sequence[Dict[str, Any]], out_dir: Path, title_suffix: str = "") -> Dict[str, Path]:
    """Write ``<out_dir>/<op>.png`` for every op with timed rows; return {op: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "ms" in r and "error" not in r and "skipped" not in r]
    ops: Dict[str, List[Dict[str, Any]]] = {}
    for r in timed:
        ops.setdefault(r["op"], []).append(r)
    out_dir = Path(out_dir)
    written: Dict[str, Path] = {}
    for op, op_rows in ops.items():
        fig = make_figure(op, op_rows, title_suffix)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{_safe_name(op)}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps a legend placed right of the figure
        plt.close(fig)
        written[op] = path
    return written
