"""Kernel-backend dispatch for the model: one place that maps ``cfg.kernel_backend`` to the five ops.

    ops = get_ops("eager")   # mllm_kernels.reference: the spec, always importable
    ops = get_ops("triton")  # the fused functional API (mllm_kernels.rms_norm / swiglu / rope / attention)

Both expose the same signatures (the kernels are tested against the references), so the model body never
branches on the backend except for the eager SDPA fast path in ``attention.py``. The Triton modules are
imported here, lazily, so the eager path works on machines (or checkouts) without them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

BACKENDS = ("eager", "triton")

# op name -> (module, function) of the fused implementation
_TRITON_SOURCES = {
    "rms_norm": ("mllm_kernels.rms_norm", "rms_norm"),
    "fused_add_rms_norm": ("mllm_kernels.rms_norm", "fused_add_rms_norm"),
    "swiglu": ("mllm_kernels.swiglu", "swiglu"),
    "apply_rope": ("mllm_kernels.rope", "apply_rope"),
    "attention": ("mllm_kernels.attention", "attention"),
}


@dataclass(frozen=True)
class KernelOps:
    """The functions one backend provides (signatures identical to ``mllm_kernels.reference``)."""

    backend: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    swiglu: Callable
    apply_rope: Callable
    attention: Callable


def get_ops(backend: str) -> KernelOps:
    """Resolve a backend name to its ops; raises ValueError for an unknown name or a missing kernel module."""
    if backend == "eager":
        from mllm_kernels import reference as ref

        return KernelOps("eager", ref.rms_norm, ref.fused_add_rms_norm, ref.swiglu, ref.apply_rope, ref.attention)
    if backend == "triton":
        fns = {}
        for op, (mod_name, fn_name) in _TRITON_SOURCES.items():
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as e:
                raise ValueError(
                    f"kernel_backend='triton' needs {mod_name}.{fn_name}, which could not be imported ({e}); "
                    "use kernel_backend='eager' or install triton"
                ) from e
            if not hasattr(mod, fn_name):
                raise ValueError(f"kernel_backend='triton': {mod_name} has no function '{fn_name}'")
            fns[op] = getattr(mod, fn_name)
        return KernelOps("triton", **fns)
    raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {backend!r}")
