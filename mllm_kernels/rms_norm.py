"""RMSNorm and the fused pre-norm residual add, forward and backward, as Triton kernels and torch ops.

    rms_norm:            y = x · r · w,            r = rsqrt(mean(x², -1) + eps)
    fused_add_rms_norm:  h = x + residual  (rounded to residual.dtype);  y = h · rsqrt(mean(h², -1) + eps) · w
                         returns (y, h): one pass reads x, residual and writes y, h (the eager path needs
                         an add kernel plus the norm's three to five).

Shapes: x, residual, y, h: [..., C] (flattened to [N, C] rows); w: [C]. Statistics and products are fp32
whatever the input dtype (loads are converted to fp32 at once, results cast back just before the store: this
also keeps the Triton interpreter, whose bf16 arithmetic is wrong, exact). y has the normalised tensor's dtype
unless ``out_dtype`` says otherwise; dw has w's. x and residual may differ in dtype (bf16 branch output, fp32
stream under autocast), which costs nothing: every load converts anyway.

Backward, with n = x · r (the normalised row) and g = dy · w:
    dx = r · (g − n · mean(g · n, -1))            (+ dh, the gradient reaching the new residual, when fused)
    dw = Σ_rows dy · n
The fused op's two inputs get the same gradient dx; when x and residual differ in dtype (autocast) the kernel
stores it in both (``mllm::fused_add_rms_norm_backward_cast``), which saves a cast kernel re-reading the fp32 copy.
r is recomputed in the backward from the row the kernel loads anyway (no [N] buffer is saved between the
passes). dw is reduced without atomics: each of P programs owns a fixed, contiguous range of rows and writes its
fp32 partial sum to row p of a [P, C] buffer; ``torch.sum`` over P finishes it. Same inputs, same bits.

Rows of width C ≤ ``MAX_SINGLE_PASS`` are processed as one register tile (``SINGLE_PASS``); wider rows loop over
column chunks (a statistics pass, then a normalise pass), so any width works.

Layers: ``_rms_norm_fwd_kernel`` / ``_rms_norm_bwd_kernel`` (``@triton.jit``) → ``rms_norm_fwd`` /
``rms_norm_bwd`` (launchers) → ``torch.ops.mllm.rms_norm`` / ``mllm::fused_add_rms_norm`` (+ their backward ops,
``register_fake``, ``register_autograd``; outside torch.compile the same implementations run as an
``autograd.Function``, without the dispatcher: ``_common.eager_function``) → ``rms_norm`` / ``fused_add_rms_norm``
(functional API, with dispatch and validation) → ``RMSNorm`` (nn.Module).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (SUPPORTED_DTYPES, call_op, check_same_device, check_tensor, eager_function, interpreting,
                      kernel_path, patch_inductor_operator_str, record_path)

# Widest row kept whole in registers (fp32: 32K x 4 B over up to 32 warps = 32 values per thread).
MAX_SINGLE_PASS = 32768
# Column chunk of the looped (wide-row) path.
WIDE_BLOCK_COLS = 4096


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H,
    n_rows, n_cols,
    stride_x, stride_r, stride_y, stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """One program normalises BLOCK_ROWS rows. With HAS_RESIDUAL, h = x + r is written to H and normalised."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_COLS)
    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = to_out(x + r, H.dtype.element_ty)
            tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)  # normalise the rounded residual, exactly as the reference does
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], to_out(y, Y.dtype.element_ty), mask=mask)
    else:
        # wide rows: pass 1 accumulates sum(x²) chunk by chunk (and writes h), pass 2 normalises
        sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_COLS):
            c = c0 + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(X + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + rows[:, None] * stride_r + c[None, :], mask=mask, other=0.0).to(tl.float32)
                h = to_out(x + r, H.dtype.element_ty)
                tl.store(H + rows[:, None] * stride_h + c[None, :], h, mask=mask)
                x = h.to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sq / n_cols + eps)
        for c0 in range(0, n_cols, BLOCK_COLS):
            c = c0 + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            if HAS_RESIDUAL:
                # each program re-reads only the h values it wrote itself, so no cross-program ordering is needed
                x = tl.load(H + rows[:, None] * stride_h + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=c < n_cols, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
            tl.store(Y + rows[:, None] * stride_y + c[None, :], to_out(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, DH, DX, DX2, DW_PART,
    n_rows, n_cols, rows_per_program,
    stride_dy, stride_x, stride_dh, stride_dx, stride_dx2,
    eps,
    HAS_DH: tl.constexpr, HAS_DX2: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    """Program p handles rows [p·rows_per_program, (p+1)·rows_per_program) in BLOCK_ROWS tiles and writes its
    partial dw to DW_PART[p, :]. X is the normalised input (h for the fused op); DH is added to dx when present.
    With HAS_DX2, dx is also stored in DX2's dtype (the fused op's branch gradient: same values, x's dtype)."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_COLS)
    dw_row = DW_PART + pid.to(tl.int64) * n_cols
    if SINGLE_PASS:
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_ROWS):
            rows = (r0 + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
            n = x * rstd[:, None]
            g = dy * w[None, :]
            c = tl.sum(g * n, axis=1) / n_cols
            dx = rstd[:, None] * (g - n * c[:, None])
            if HAS_DH:
                dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], to_out(dx, DX.dtype.element_ty), mask=mask)
            if HAS_DX2:
                tl.store(DX2 + rows[:, None] * stride_dx2 + cols[None, :], to_out(dx, DX2.dtype.element_ty),
                         mask=mask)
            dw_acc += tl.sum(dy * n, axis=0)
        tl.store(dw_row + cols, dw_acc, mask=col_mask)
    else:
        # wide rows: pass 1 gets sum(x²) and sum(g·x) together; pass 2 writes dx and folds dy·n into this
        # program's own row of DW_PART (zero-initialised on the host; no other program touches it)
        for r0 in range(row_start, row_end, BLOCK_ROWS):
            rows = (r0 + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
            row_mask = rows < row_end
            sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            gx = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK_COLS):
                c = c0 + cols
                mask = row_mask[:, None] & (c[None, :] < n_cols)
                x = tl.load(X + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=c < n_cols, other=0.0).to(tl.float32)
                sq += tl.sum(x * x, axis=1)
                gx += tl.sum(dy * w[None, :] * x, axis=1)
            rstd = tl.rsqrt(sq / n_cols + eps)
            c_mean = gx * rstd / n_cols  # mean(g · n)
            for c0 in range(0, n_cols, BLOCK_COLS):
                c = c0 + cols
                col_mask = c < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(X + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                n = x * rstd[:, None]
                dx = rstd[:, None] * (dy * w[None, :] - n * c_mean[:, None])
                if HAS_DH:
                    dx += tl.load(DH + rows[:, None] * stride_dh + c[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + rows[:, None] * stride_dx + c[None, :], to_out(dx, DX.dtype.element_ty), mask=mask)
                if HAS_DX2:
                    tl.store(DX2 + rows[:, None] * stride_dx2 + c[None, :], to_out(dx, DX2.dtype.element_ty),
                             mask=mask)
                part = tl.load(dw_row + c, mask=col_mask, other=0.0)
                tl.store(dw_row + c, part + tl.sum(dy * n, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------
def _config(n_cols: int, block_cols: Optional[int] = None, tune: Optional[dict] = None, backward: bool = False,
            copy: bool = False):
    """(BLOCK_ROWS, BLOCK_COLS, SINGLE_PASS, num_warps) for rows of width n_cols.

    Measured on an H100 (bf16, CUDA-graph timing; experiments in the benchmark notes): the forward wants tiles of
    ~4K elements (narrow rows stacked several per tile) and is at ~97% of copy bandwidth from 4K-wide rows on;
    the backward, which streams dy and x through a persistent grid, wants ~8K-element tiles with 4 warps
    (8 rows x 1,024: 42 -> 29 us at 8,192 x 1,024; 2 rows x 4,096: 349 -> 316 us at 32,768 x 4,096). Under the
    interpreter tiles hold ~64K elements, since its cost is mostly a Python overhead per program and per op.
    ``block_cols`` forces the column chunk (tests use it to drive the wide-row path at small widths); ``tune``
    overrides block_rows / num_warps (benchmark sweeps). ``copy`` (the backward that also stores dx in a second
    dtype) halves the GPU tile: at 8 rows x 1,024 with 4 warps ptxas (triton 3.6, sm_90) gives it 255 registers and
    spills 148 B per thread; at 4 rows, 187 registers and no spill, still 2 CTAs per SM (8 warps with 8 rows is also
    spill-free, at 226 registers, but fits 1 CTA per SM where the persistent grid launches 2 programs per SM)."""
    full = triton.next_power_of_2(max(n_cols, 1))
    if block_cols is None:
        block_cols = full if full <= MAX_SINGLE_PASS else WIDE_BLOCK_COLS
    block_cols = min(triton.next_power_of_2(block_cols), full)
    single = block_cols >= n_cols
    if interpreting():
        target, max_rows = 65536, 512
    else:
        target, max_rows = (4096 if copy else 8192) if backward else 4096, 64
    block_rows = max(1, min(max_rows, target // block_cols))
    if tune and "block_rows" in tune:
        block_rows = tune["block_rows"]
    tile = block_rows * block_cols
    if backward:
        num_warps = max(4, min(32, tile // 2048))
    else:
        num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16 if tile <= 16384 else 32
    if tune and "num_warps" in tune:
        num_warps = tune["num_warps"]
    return block_rows, block_cols, single, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(n_rows: int, block_rows: int, device: torch.device, per_sm: Optional[int] = None) -> Tuple[int, int]:
    """(programs, rows_per_program): a persistent grid, each program owning a contiguous row range (a multiple of
    BLOCK_ROWS) so that the dw partial sums have a fixed order. On the GPU, 2 to 8 programs per SM: more when
    there are many row tiles (8 per SM measured best at 32,768 x 4,096; 2 at 8,192 x 1,024), which keeps
    ~16 tiles per program so the [P, C] partial-sum buffer stays a few percent of the traffic."""
    n_tiles = triton.cdiv(max(n_rows, 1), block_rows)
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if per_sm is None:
            per_sm = max(2, min(8, n_tiles // (16 * sms)))
        target = per_sm * sms
    else:
        target = 4
    tiles_per_program = triton.cdiv(n_tiles, min(n_tiles, target))
    rows_per_program = tiles_per_program * block_rows
    return triton.cdiv(max(n_rows, 1), rows_per_program), rows_per_program


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [N, C] with unit column stride (a view when the layout allows, e.g. a column slice)."""
    # N spelled out: reshape(-1, 0) cannot infer N when C = 0
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
                 block_cols: Optional[int] = None, tune: Optional[dict] = None,
                 out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the forward kernel. x, residual: [..., C]; weight: [C] -> (y [..., C], h [..., C] or None).
    h has residual's dtype; y has ``out_dtype``, default the dtype of the normalised tensor (h, else x)."""
    shape = x.shape
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    norm_dtype = residual.dtype if residual is not None else x.dtype
    y = torch.empty(shape, dtype=out_dtype or norm_dtype, device=x.device)
    y2 = y.view(n_rows, n_cols)
    if residual is not None:
        r2 = _as_rows(residual)
        h = torch.empty(shape, dtype=residual.dtype, device=x.device)
        h2 = h.view(n_rows, n_cols)
    else:
        r2, h, h2 = x2, None, y2  # unused pointers (HAS_RESIDUAL=False)
    if n_rows == 0 or n_cols == 0:
        return y, h
    w = weight.contiguous()
    block_rows, bc, single, num_warps = _config(n_cols, block_cols, tune)
    grid = (triton.cdiv(n_rows, block_rows),)
    _rms_norm_fwd_kernel[grid](
        x2, r2, w, y2, h2, n_rows, n_cols,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=bc, SINGLE_PASS=single,
        num_warps=num_warps,
    )
    return y, h


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 dh: Optional[torch.Tensor] = None, block_cols: Optional[int] = None,
                 tune: Optional[dict] = None, copy_dtype: Optional[torch.dtype] = None):
    """Launch the backward kernel. dy, x (the normalised input: h for the fused op), dh: [..., C]; weight: [C]
    -> (dx [..., C] in x.dtype (dy + dh folded in), dw [C] in weight.dtype). With ``copy_dtype`` it returns
    (dx, dw, dx_copy): dx_copy = dx.to(copy_dtype), written by the same pass (bitwise equal to the cast)."""
    shape = x.shape
    x2 = _as_rows(x)
    dy2 = _as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty(shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(n_rows, n_cols)
    dxc = torch.empty(shape, dtype=copy_dtype, device=x.device) if copy_dtype is not None else None
    dxc2 = dxc.view(n_rows, n_cols) if dxc is not None else dx2
    dh2 = _as_rows(dh) if dh is not None else dy2
    if n_rows == 0 or n_cols == 0:
        return (dx, torch.zeros_like(weight)) + ((dxc,) if dxc is not None else ())
    block_rows, bc, single, num_warps = _config(n_cols, block_cols, tune, backward=True, copy=copy_dtype is not None)
    n_prog, rows_per_program = _bwd_programs(n_rows, block_rows, x.device, (tune or {}).get("per_sm"))
    alloc = torch.empty if single else torch.zeros  # the looped path accumulates into its row in place
    dw_part = alloc(n_prog, n_cols, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_prog,)](
        dy2, x2, weight.contiguous(), dh2, dx2, dxc2, dw_part, n_rows, n_cols, rows_per_program,
        dy2.stride(0), x2.stride(0), dh2.stride(0), dx2.stride(0), dxc2.stride(0), eps,
        HAS_DH=dh is not None, HAS_DX2=dxc is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=bc, SINGLE_PASS=single,
        num_warps=num_warps,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    return (dx, dw) + ((dxc,) if dxc is not None else ())


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------
def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    record_path("rms_norm", kernel_path(x))
    return rms_norm_fwd(x, weight, eps, out_dtype=out_dtype)[0]


_rms_norm_op = torch.library.custom_op("mllm::rms_norm", _rms_norm_impl, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, eps, out_dtype=None):
    patch_inductor_operator_str()
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


def _rms_norm_backward_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, weight, eps)


_rms_norm_backward_op = torch.library.custom_op("mllm::rms_norm_backward", _rms_norm_backward_impl, mutates_args=())


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, eps):
    patch_inductor_operator_str()
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(bwd):
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = bwd(dy.contiguous(), x, weight, ctx.eps)
        return dx, dw, None, None
    return backward


# the registered backward calls the backward *op*, so that AOT tracing sees an opaque call, not a Triton launch
_rms_norm_op.register_autograd(_rms_norm_backward(_rms_norm_backward_op), setup_context=_rms_norm_setup_context)
_RMSNormFunction = eager_function("rms_norm", _rms_norm_impl, _rms_norm_setup_context,
                                  _rms_norm_backward(_rms_norm_backward_impl))


def _fused_add_rms_norm_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    record_path("fused_add_rms_norm", kernel_path(x))
    return rms_norm_fwd(x, weight, eps, residual=residual, out_dtype=out_dtype)


_fused_add_rms_norm_op = torch.library.custom_op("mllm::fused_add_rms_norm", _fused_add_rms_norm_impl,
                                                 mutates_args=())


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, out_dtype=None):
    patch_inductor_operator_str()
    return (torch.empty_like(residual, dtype=out_dtype or residual.dtype, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format))


def _fused_add_rms_norm_backward_impl(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor,
                                      weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, h, weight, eps, dh=dh)


_fused_add_rms_norm_backward_op = torch.library.custom_op(
    "mllm::fused_add_rms_norm_backward", _fused_add_rms_norm_backward_impl, mutates_args=())


@_fused_add_rms_norm_backward_op.register_fake
def _(dy, dh, h, weight, eps):
    patch_inductor_operator_str()
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _fused_add_rms_norm_backward_cast_impl(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor,
                                           weight: torch.Tensor, eps: float,
                                           x_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dsum, dw, dx = rms_norm_bwd(dy, h, weight, eps, dh=dh, copy_dtype=x_dtype)
    return dsum, dx, dw


# x and residual of different dtypes (the autocast layout: bf16 branch output, fp32 stream): both get the same
# gradient, so one pass writes it in both dtypes instead of a cast kernel re-reading the fp32 one (6 B/element)
_fused_add_rms_norm_backward_cast_op = torch.library.custom_op(
    "mllm::fused_add_rms_norm_backward_cast", _fused_add_rms_norm_backward_cast_impl, mutates_args=())


@_fused_add_rms_norm_backward_cast_op.register_fake
def _(dy, dh, h, weight, eps, x_dtype):
    patch_inductor_operator_str()
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(h, dtype=x_dtype, memory_format=torch.contiguous_format), torch.empty_like(weight))


def _fused_add_setup_context(ctx, inputs, output):
    x, _, weight, eps, _ = inputs
    ctx.save_for_backward(output[1], weight)  # only h is needed: x and residual are not kept alive
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros to read
    ctx.eps = eps
    ctx.x_dtype = x.dtype
    ctx.y_meta = (output[0].shape, output[0].dtype)


def _fused_add_backward(bwd, bwd_cast):
    def backward(ctx, dy, dh):
        h, weight = ctx.saved_tensors
        # h unused downstream (the model's final norm): dh is None and the kernel runs without it (HAS_DH=False)
        # rather than reading a zero-filled [N, C] tensor
        dh = dh.contiguous() if dh is not None else None
        if dy is None:  # only h was used downstream
            dy = torch.zeros(ctx.y_meta[0], dtype=ctx.y_meta[1], device=h.device)
        # h = x + residual, so both inputs receive the same gradient (autograd copies before accumulating into a
        # leaf); dsum has h's (the residual's) dtype, x's share is rounded to x's dtype as x.to(residual.dtype) would
        if ctx.x_dtype == h.dtype:
            dsum, dw = bwd(dy.contiguous(), dh, h, weight, ctx.eps)
            return dsum, dsum, dw, None, None
        dsum, dx, dw = bwd_cast(dy.contiguous(), dh, h, weight, ctx.eps, ctx.x_dtype)
        return dx, dsum, dw, None, None
    return backward


_fused_add_rms_norm_op.register_autograd(
    _fused_add_backward(_fused_add_rms_norm_backward_op, _fused_add_rms_norm_backward_cast_op),
    setup_context=_fused_add_setup_context)
_FusedAddRMSNormFunction = eager_function(
    "fused_add_rms_norm", _fused_add_rms_norm_impl, _fused_add_setup_context,
    _fused_add_backward(_fused_add_rms_norm_backward_impl, _fused_add_rms_norm_backward_cast_impl))


# ----------------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------------
def _validate(x: torch.Tensor, weight: torch.Tensor, eps, residual: Optional[torch.Tensor] = None,
              out_dtype: Optional[torch.dtype] = None) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=1)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., C], got a scalar")
    if residual is not None:
        check_tensor("residual", residual)
    check_same_device(x=x, weight=weight, residual=residual)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x's last dimension is {x.shape[-1]}: "
                         f"weight must be [C] = [{x.shape[-1]}]")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}: they must match")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise ValueError(f"out_dtype must be None or one of {names}, got {out_dtype!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x · rsqrt(mean(x², -1) + eps) · weight. x: [..., C], weight: [C] -> [..., C] (out_dtype, default x.dtype).

    ``out_dtype`` rounds the fp32 result straight to e.g. bf16 (what a following autocast linear would cast it
    to anyway, minus a cast kernel and an fp32 round trip through HBM).
    Differentiable in x and weight. Dispatch: CUDA -> compiled kernel, CPU with TRITON_INTERPRET=1 -> the kernel
    under the interpreter, CPU otherwise -> ``reference.rms_norm`` (``last_path("rms_norm")`` tells which ran)."""
    _validate(x, weight, eps, out_dtype=out_dtype)
    if kernel_path(x) == "eager":  # the kernel paths are recorded by the op's implementation, where they run
        record_path("rms_norm", "eager")
        return reference.rms_norm(x, weight, eps, out_dtype)
    return call_op(_rms_norm_op, _RMSNormFunction, x, weight, float(eps), out_dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm block entry in one pass: h = x + residual; returns (rms_norm(h, weight, eps, out_dtype), h).

    x, residual: [..., C], weight: [C]. The dtypes may differ (a bf16 branch output added into an fp32 residual
    stream under autocast: the kernel converts on load, no cast kernel). h is rounded to residual.dtype before it
    is normalised (as in ``reference.fused_add_rms_norm``); y has out_dtype (default residual.dtype).
    Differentiable in x, residual and weight; dispatch as ``rms_norm``."""
    _validate(x, weight, eps, residual, out_dtype)
    if kernel_path(x) == "eager":  # the kernel paths are recorded by the op's implementation, where they run
        record_path("fused_add_rms_norm", "eager")
        return reference.fused_add_rms_norm(x, residual, weight, eps, out_dtype)
    return call_op(_fused_add_rms_norm_op, _FusedAddRMSNormFunction, x, residual, weight, float(eps), out_dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm with a learned scale (initialised to 1). ``forward(x)`` -> y; ``forward(x, residual)`` ->
    (y, x + residual) through the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
