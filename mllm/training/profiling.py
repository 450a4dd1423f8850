"""Named ranges for Nsight Systems (NVTX) and for ``torch.profiler`` traces, with the same names.

The trainer wraps each step in::

    step ⊃ data, forward, backward (per micro-batch), optimizer

``trace_range(name)`` pushes an NVTX range, through the ``nvtx`` package when it is importable (a silent no-op
without a GPU), else ``torch.cuda.nvtx`` on a CUDA build with a GPU (on CPU builds it raises, so it is never used
there), else nothing; and always opens ``torch.profiler.record_function(name)``, so a CPU ``torch.profiler`` trace
shows the same names. ``StepProfiler`` is what ``--profile`` turns on: it records a few steps after a warm-up and
writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch

RANGE_NAMES = ("data", "forward", "backward", "optimizer", "step")


def _nvtx_backend():
    """(push, pop, name) for the NVTX implementation available here, or (None, None, 'none')."""
    try:
        import nvtx  # the NVIDIA package; works without CUDA (then it does nothing)

        return (lambda name: nvtx.push_range(message=name, domain="mllm")), \
            (lambda: nvtx.pop_range(domain="mllm")), "nvtx"
    except ImportError:
        pass
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop, "torch.cuda.nvtx"
    return None, None, "none"


_PUSH, _POP, NVTX_BACKEND = _nvtx_backend()


@contextlib.contextmanager
def trace_range(name: str) -> Iterator[None]:
    """NVTX range + ``record_function`` range named ``name`` around the block."""
    if _PUSH is not None:
        _PUSH(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if _POP is not None:
            _POP()


class StepProfiler:
    """``torch.profiler`` over steps [wait+warmup, wait+warmup+active) of a run, exported as a Chrome trace.

    Call ``step()`` after every training step; the trace is written to ``out_dir/<prefix>_rank<r>.json`` once the
    active window ends (or at ``stop()`` if the run is shorter).
    """

    def __init__(self, out_dir: str | Path, prefix: str, rank: int = 0, *, wait: int = 1, warmup: int = 1,
                 active: int = 3, record_shapes: bool = False):
        if min(wait, warmup) < 0 or active <= 0:
            raise ValueError(f"profiler schedule needs wait, warmup >= 0 and active > 0, got {wait}, {warmup}, {active}")
        self.path = Path(out_dir) / f"{prefix}_rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written: Optional[Path] = None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=self._export,
            record_shapes=record_shapes,
        )
        self._running = False

    def _export(self, prof) -> None:
        prof.export_chrome_trace(str(self.path))
        self.written = self.path

    def start(self) -> "StepProfiler":
        self._prof.start()
        self._running = True
        return self

    def step(self) -> None:
        if self._running:
            self._prof.step()

    def stop(self) -> Optional[Path]:
        if self._running:
            self._prof.stop()
            self._running = False
        return self.written


def maybe_profiler(enabled: bool, out_dir: Optional[Path], prefix: str, rank: int,
                   **schedule) -> Optional[StepProfiler]:
    if not enabled:
        return None
    if out_dir is None:
        raise ValueError("profiling needs a run directory to write the trace into (run_dir is None)")
    return StepProfiler(out_dir, prefix, rank, **schedule).start()


__all__ = ["RANGE_NAMES", "NVTX_BACKEND", "trace_range", "StepProfiler", "maybe_profiler"]
