"""SwiGLU gate, forward and backward, as Triton kernels and torch ops.

    out = silu(g) · u = g · σ(g) · u                                  g (gate), u (up), out: [..., F]
    backward, with s = σ(g):
    du = dout · g · s
    dg = dout · u · s · (1 + g · (1 − s))                            (d silu/dg = s + g·s·(1 − s))

Maths in fp32 (loads converted at once, results cast back just before the store); out has gate's dtype.

Memory: only g and u are saved for the backward, in their own dtype, and σ(g) / silu(g) are recomputed there (one
extra sigmoid per element, free in a memory-bound kernel). Per element of the activation, for bf16 inputs:
  * this op keeps g and u: 4 bytes;
  * the eager ``reference.swiglu`` under autograd keeps fp32 copies of g and u plus σ(g) and g·σ(g) in fp32:
    16 bytes, so the fused op saves 12 bytes per element (384 MiB per layer at 8,192 tokens x 4,096 units);
  * a bf16 eager ``F.silu(g) * u`` keeps g, silu(g) and u: 6 bytes; recomputing silu saves its 2 bytes
    (64 MiB per layer at that shape).

Inputs may be strided views with unit stride along the last dimension (e.g. the two halves of a fused
gate/up projection, ``gu[..., :F]`` and ``gu[..., F:]``): rows are addressed through their own stride, so such
views are read in place without a copy.

Layers: ``_swiglu_fwd_kernel`` / ``_swiglu_bwd_kernel`` → ``swiglu_fwd`` / ``swiglu_bwd`` →
``torch.ops.mllm.swiglu`` (+ ``mllm::swiglu_backward``, ``register_fake``, ``register_autograd``) → ``swiglu``
(functional API: dispatch + validation) → ``SwiGLU`` (nn.Module).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (call_op, check_same_device, check_same_dtype, check_tensor, eager_function, interpreting,
                      kernel_path, patch_inductor_operator_str, record_path)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(
    G, U, OUT, n_rows, n_cols, stride_g, stride_u, stride_o,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """2-D grid of [BLOCK_ROWS, BLOCK_COLS] tiles over the [N, F] view."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], to_out(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT, G, U, DG, DU, n_rows, n_cols, stride_do, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Recomputes σ(g) and silu(g) from g instead of reading a saved activation."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dout = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    du = dout * silu
    dg = dout * u * (s + silu * (1.0 - s))
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], to_out(dg, DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], to_out(du, DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launch configuration and launchers
# ----------------------------------------------------------------------------------------------------
def _config(n_rows: int, n_cols: int, tune: Optional[dict] = None):
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): tiles of ~4K elements on the GPU (8 warps: 16 values per
    thread, so 16-byte vector loads and several in flight), ~32K under the interpreter, where each program costs a fixed
    Python overhead. Narrow rows are stacked into one tile so that width-1 inputs do not launch one program per row."""
    elems = 32768 if interpreting() else 4096
    block_cols = min(triton.next_power_of_2(max(n_cols, 1)), 2048 if not interpreting() else 32768)
    block_rows = max(1, min(triton.next_power_of_2(max(n_rows, 1)), elems // block_cols))
    num_warps = 4 if block_rows * block_cols <= 2048 else 8
    if tune:
        block_cols = tune.get("block_cols", block_cols)
        block_rows = tune.get("block_rows", block_rows)
        num_warps = tune.get("num_warps", num_warps)
    return block_rows, block_cols, num_warps


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [N, F] with unit column stride (a view when the layout allows)."""
    # N spelled out: reshape(-1, 0) cannot infer N when F = 0
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, tune: Optional[dict] = None) -> torch.Tensor:
    """Launch the forward kernel: gate, up [..., F] -> out [..., F] (gate.dtype, contiguous)."""
    g2, u2 = _as_rows(gate), _as_rows(up)
    n_rows, n_cols = g2.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    o2 = out.view(n_rows, n_cols)
    br, bc, nw = _config(n_rows, n_cols, tune)
    grid = (triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))
    _swiglu_fwd_kernel[grid](g2, u2, o2, n_rows, n_cols, g2.stride(0), u2.stride(0), o2.stride(0),
                             BLOCK_ROWS=br, BLOCK_COLS=bc, num_warps=nw)
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               tune: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: dout, gate, up [..., F] -> (dgate, dup) [..., F] in gate's / up's dtype."""
    d2, g2, u2 = _as_rows(dout), _as_rows(gate), _as_rows(up)
    n_rows, n_cols = g2.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel() == 0:
        return dg, du
    dg2, du2 = dg.view(n_rows, n_cols), du.view(n_rows, n_cols)
    br, bc, nw = _config(n_rows, n_cols, tune)
    grid = (triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))
    _swiglu_bwd_kernel[grid](d2, g2, u2, dg2, du2, n_rows, n_cols,
                             d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
                             BLOCK_ROWS=br, BLOCK_COLS=bc, num_warps=nw)
    return dg, du


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------
def _swiglu_impl(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    record_path("swiglu", kernel_path(gate))
    return swiglu_fwd(gate, up)


_swiglu_op = torch.library.custom_op("mllm::swiglu", _swiglu_impl, mutates_args=())


@_swiglu_op.register_fake
def _(gate, up):
    patch_inductor_operator_str()
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_backward_impl(dout: torch.Tensor, gate: torch.Tensor,
                          up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dout, gate, up)


_swiglu_backward_op = torch.library.custom_op("mllm::swiglu_backward", _swiglu_backward_impl, mutates_args=())


@_swiglu_backward_op.register_fake
def _(dout, gate, up):
    patch_inductor_operator_str()
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)  # not silu(gate): the backward recomputes it


def _backward(bwd):
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return bwd(dout.contiguous(), gate, up)
    return backward


# the registered backward calls the backward *op*, so that AOT tracing sees an opaque call, not a Triton launch
_swiglu_op.register_autograd(_backward(_swiglu_backward_op), setup_context=_setup_context)
_SwiGLUFunction = eager_function("swiglu", _swiglu_impl, _setup_context, _backward(_swiglu_backward_impl))


# ----------------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------------
def _validate(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.dim() < 1:
        raise ValueError("gate must have at least 1 dimension [..., F], got a scalar")
    check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}: they must match")
    check_same_dtype(gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """out = silu(gate) · up. gate, up: [..., F] (same shape and dtype) -> [..., F] (gate.dtype).

    Differentiable in both inputs; saves only gate and up for the backward. Dispatch: CUDA -> compiled kernel, CPU
    with TRITON_INTERPRET=1 -> the kernel under the interpreter, CPU otherwise -> ``reference.swiglu``
    (``last_path("swiglu")`` tells which ran)."""
    _validate(gate, up)
    if kernel_path(gate) == "eager":  # the kernel paths are recorded by the op's implementation, where they run
        record_path("swiglu", "eager")
        return reference.swiglu(gate, up)
    return call_op(_swiglu_op, _SwiGLUFunction, gate, up)


class SwiGLU(torch.nn.Module):
    """Parameter-free activation: ``forward(gate, up)`` = silu(gate) · up; ``forward(gu)`` splits the last
    dimension of a fused gate/up projection in two halves (gate first) and reads them in place."""

    def forward(self, gate: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
        if up is None:
            if gate.shape[-1] % 2:
                raise ValueError(f"a fused gate/up input needs an even last dimension, got shape {tuple(gate.shape)}")
            gate, up = gate.chunk(2, dim=-1)
        return swiglu(gate, up)
