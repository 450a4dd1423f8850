"""Shared helpers for the kernel modules: dispatch between compiled Triton / interpreter / eager reference,
host-side validation with errors that name the argument, and dtype choices that survive the interpreter.

Dispatch rule (documented in the README and tested):
  * CUDA tensors                       -> the compiled Triton kernel;
  * CPU tensors with TRITON_INTERPRET=1 -> the same Triton kernel under the interpreter;
  * CPU tensors otherwise              -> the eager reference in ``mllm_kernels.reference``.
``last_path(op)`` tells which one ran last for an op (tests use it).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

import torch

_LAST_PATH: Dict[str, str] = {}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency
        return False
    return True


def kernel_path(t: torch.Tensor) -> str:
    """'triton' (compiled), 'interpreter' or 'eager' for a tensor on t.device."""
    if t.is_cuda and triton_available():
        return "triton"
    if t.device.type == "cpu" and interpreting() and triton_available():
        return "interpreter"
    return "eager"


def record_path(op: str, path: str) -> None:
    _LAST_PATH[op] = path


def last_path(op: str) -> Optional[str]:
    """Which path ('triton' | 'interpreter' | 'eager') the op's last call took."""
    return _LAST_PATH.get(op)


def check_tensor(name: str, t, *, ndim: Optional[Iterable[int] | int] = None, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    d0 = items[0][1].device
    for k, v in items[1:]:
        if v.device != d0:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {d0}: all inputs must share a device")


def check_same_dtype(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    d0 = items[0][1].dtype
    for k, v in items[1:]:
        if v.dtype != d0:
            raise ValueError(f"{k} has dtype {v.dtype} but {items[0][0]} has {d0}: they must match")


def dot_dtype_for(dtype: torch.dtype):
    """Operand dtype for tl.dot: the input's 16-bit type on the GPU (tensor cores); fp32 under the
    interpreter, whose bf16 arithmetic is wrong (see shared/docs/toolchain-notes.md)."""
    import triton.language as tl

    if interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def warm_rope_table(make_table, head_dim: int, theta: float, device) -> None:
    """Build a cached RoPE table while torch.compile traces an op (called from its fake implementation).

    The kernels read per-(head dim, θ, device) tables that are cached for the life of the process. Built at the
    first real call, a table made inside a CUDA-graph capture (torch.compile mode="reduce-overhead") would sit in
    the graph's private memory pool without being a graph output, which CUDA-graph trees refuse. Tracing runs
    before any capture, so building the real table here (fake mode switched off) keeps it out of the pool."""
    if device.type == "meta":
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        make_table(int(head_dim), float(theta), device)
