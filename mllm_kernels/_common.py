"""Shared helpers for the kernel modules: dispatch between compiled Triton / interpreter / eager reference,
host-side validation with errors that name the argument, and dtype choices that survive the interpreter.

Dispatch rule (documented in the README and tested):
  * CUDA tensors                       -> the compiled Triton kernel;
  * CPU tensors with TRITON_INTERPRET=1 -> the same Triton kernel under the interpreter;
  * CPU tensors otherwise              -> the eager reference in ``mllm_kernels.reference``.
``last_path(op)`` tells which one ran last for an op (tests use it).
"""
from __future__ import annotations

import contextlib
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
    """Remember which path ``op`` took. The kernel path is recorded by each op's implementation, which runs on every
    call, compiled or not; the functional APIs record only their eager fallback.

    A no-op while torch.compile traces: there the write would be a traced mutation of this global dict, which dynamo
    replays after the graph by rebuilding the dict from its trace-time contents, erasing what the implementations
    recorded at run time (bench_train listed only attention and the LM loss for triton+compile, although the norms
    and SwiGLU ran their Triton kernels)."""
    if torch.compiler.is_compiling():
        return
    _LAST_PATH[op] = path


def reset_paths() -> None:
    """Forget every recorded path (so that what ``last_path`` reports next comes from calls made after this)."""
    _LAST_PATH.clear()


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


# ----------------------------------------------------------------------------------------------------
# Eager calls without the custom-op dispatcher
# ----------------------------------------------------------------------------------------------------
def eager_function(name: str, forward, setup_context, backward) -> type:
    """An ``autograd.Function`` from an op's Python implementation and the ``setup_context`` / ``backward`` that
    its ``torch.library.custom_op`` registers (each module passes a backward that calls the backward op's
    implementation instead of the backward op).

    Why: outside torch.compile a custom op with ``register_autograd`` pays the dispatcher and torch.library's
    Python wrappers on every call, forward and backward (pytorch/pytorch#176592, #177109), and the non-compiled
    triton step was measured host-bound on an H200 (benchmarks/NOTES.md, tuning steps 6 and 11, with the CPU
    measurement of this change). The registered ops stay what torch.compile traces (``call_op``)."""
    def forward_with_ctx(ctx, *args):
        # the ctx-taking form: a Function that defines ``setup_context`` re-binds its arguments with
        # ``inspect.signature`` on every ``apply`` (torch/autograd/function.py), which costs as much host time
        # as a kernel launch
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    def first_order_backward(ctx, *grads):
        # the backward's kernels build no autograd graph, so under create_graph=True (autograd runs a backward
        # with grad mode on only then) a second derivative would be silently wrong: an error instead, as the
        # registered op gives for lack of a formula
        if torch.is_grad_enabled():
            raise RuntimeError(f"mllm::{name} does not support double backward (create_graph=True); use the eager "
                               "reference in mllm_kernels.reference for higher derivatives")
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx),
        "backward": staticmethod(first_order_backward),
        "__doc__": f"Eager form of mllm::{name} (see mllm_kernels._common.eager_function).",
    })


_VIA_DISPATCHER = False


@contextlib.contextmanager
def dispatcher_in_eager(enabled: bool = True):
    """Within this context eager calls go through the registered custom ops as under torch.compile (the path
    before ``eager_function``): for ``benchmarks/bench_host_overhead.py`` and for bisecting a suspected
    difference between the two paths."""
    global _VIA_DISPATCHER
    before, _VIA_DISPATCHER = _VIA_DISPATCHER, bool(enabled)
    try:
        yield
    finally:
        _VIA_DISPATCHER = before


def call_op(op, function, *args):
    """``op(*args)`` while torch.compile or another dispatcher-level tracer traces (an opaque node with a fake
    implementation), else
    ``function.apply(*args)`` (same kernels, no dispatcher). ``args`` are all positional, as the op's schema
    lists them, so both see the same ``inputs`` in ``setup_context``."""
    # a TorchDispatchMode on the stack (FakeTensorMode, make_fx's proxy mode) traces through the dispatcher too:
    # the Function would launch a kernel on fake tensors. One C call, cheap next to the launch it guards
    if _VIA_DISPATCHER or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return op(*args)
    return function.apply(*args)


# ----------------------------------------------------------------------------------------------------
# torch.compile: keep inductor's implicit-fallback message cheap
# ----------------------------------------------------------------------------------------------------
_INDUCTOR_PATCHED = False


def _shallow(arg, depth: int = 0) -> str:
    """One line for an inductor IR argument: its class, buffer name, size and dtype, never its inputs."""
    if isinstance(arg, (list, tuple)) and depth < 2:
        inner = ", ".join(_shallow(a, depth + 1) for a in list(arg)[:8])
        return f"[{inner}{', ...' if len(arg) > 8 else ''}]"
    if hasattr(arg, "get_size") or hasattr(arg, "get_name"):
        parts = []
        for key in ("get_name", "get_size", "get_dtype"):
            try:
                parts.append(f"{key[4:]}={getattr(arg, key)()}")
            except Exception:  # noqa: BLE001 - a node without that property
                pass
        return f"{type(arg).__name__}({', '.join(parts)})"
    text = repr(arg)
    return text if len(text) <= 200 else text[:200] + "..."


def _bounded_operator_str(target, args, kwargs) -> str:
    lines = [f"target: {target}"] + [f"args[{i}]: {_shallow(a)}" for i, a in enumerate(args)]
    if kwargs:
        lines.append(f"kwargs: {{{', '.join(f'{k}: {_shallow(v)}' for k, v in kwargs.items())}}}")
    return "\n".join("  " + line for line in lines)


def patch_inductor_operator_str() -> None:
    """Bound the text inductor builds for each custom-op ("implicit fallback") node.

    Inductor describes every such node with ``OperatorIssue.operator_str``, which prints each argument's IR
    *with all of its inputs, recursively*. In a decoder the fused norm's inputs reach the previous norm along two
    paths (the residual stream and the branch through attention or the MLP), so that text doubles per layer:
    torch 2.11 builds it eagerly for its info log on every fallback and compiling the 12-layer gpu-full model
    hung in it (H200, 2026-11-26); later versions build it lazily, but still when inductor logs at INFO
    (reproduced on CPU: 6 layers 4.5 s, 7 layers > 100 s). The replacement prints one line per argument (class,
    buffer name, size, dtype). Only message text changes. Called from the ops' fake implementations, which run
    whenever torch.compile traces them, i.e. before inductor lowers them; idempotent."""
    global _INDUCTOR_PATCHED
    if _INDUCTOR_PATCHED:
        return
    import sys

    exc = sys.modules.get("torch._inductor.exc")
    if exc is None:  # inductor not in use (yet): aot_eager / eager tracing; try again on the next trace
        return
    issue = getattr(exc, "OperatorIssue", None)
    if issue is not None and hasattr(issue, "operator_str"):
        issue.operator_str = staticmethod(_bounded_operator_str)
    _INDUCTOR_PATCHED = True
