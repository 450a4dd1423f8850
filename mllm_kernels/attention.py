"""Fused attention: RoPE + causal/non-causal + GQA + packed documents + sliding window with sink tokens +
learned per-head sinks, forward and backward, FlashAttention-2 style (online softmax, O(T) memory).

Semantics are those of ``mllm_kernels.reference.attention`` (the spec). Shapes: q [B, T, Hq, D], k/v
[B, T, Hkv, D] with Hq % Hkv == 0 (query head h reads kv head h // (Hq/Hkv); K/V are never repeated in
memory), position_ids [B, T], sinks [Hq]; out [B, T, Hq, D] (q.dtype) and lse [B, Hq, T] fp32.

For query i with document start st(i) (and end en(i), exclusive) key j is allowed iff
    j ≥ st(i)  ∧  (causal ? j ≤ i : j < en(i))  ∧  (window is None ∨ i − j < window ∨ j − st(i) < n_sink_tokens)
and with s_ij = scale · <rope(q_i), rope(k_j)>, sink logit σ_h (−∞ when no sinks):
    lse_i = log(exp(σ_h) + Σ_j exp(s_ij)),   P_ij = exp(s_ij − lse_i),   out_i = Σ_j P_ij v_j.

Kernels (all statistics in fp32; exponentials in base 2 with log2(e) folded into the scale; every 16-bit output is
rounded to nearest even by ``_cast.to_out``, also under the interpreter, whose plain ``.to(bf16)`` truncates):
  * ``_attn_fwd_kernel``   grid (q-blocks, B·Hq): online softmax over the KV blocks that can hold an allowed
    key. The running max/sum start at (σ_h, 1) when there are sinks, which adds the value-less column.
  * ``_attn_bwd_preprocess_kernel`` grid (q-blocks, B·Hq): Δ_i = Σ_d dO_id O_id − dlse_i, and per-block
    partial sums of dσ_h = −Σ_i exp(σ_h − lse_i) Δ_i  (the sink column has no value, so dP_sink = 0).
  * ``_attn_bwd_dkdv_kernel`` grid (kv-blocks, B·Hkv): for each query head of the GQA group and each needed
    q block, Pᵀ = exp(s − lse), dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (V dOᵀ − Δ), dK += dSᵀ Q · scale.
  * ``_attn_bwd_dq_kernel`` grid (q-blocks, B·Hq): dQ = Σ_blocks dS K · scale (recomputes S and dP).
  * ``BWD_DQ = "atomic"`` instead: the dkdv kernel also forms dS K for each (q block, kv block) pair it visits and
    adds it into an fp32 [B, Hq, T, D] buffer with relaxed atomics, and ``_attn_bwd_dq_finish_kernel`` scales,
    un-rotates and casts it: 5 block products per pair instead of 7 (S and dP are not recomputed), for atomics,
    a memset and one element-wise pass. The order of the atomic adds varies, so dq is not bitwise reproducible;
    the default stays ``"separate"`` until a GPU measurement says otherwise (benchmarks/NOTES.md, tuning step 17).
Block skipping: a KV block is visited only if it intersects [st(i_first), i_last] (causal) and, with a window,
the band [i_first − window + 1, i_last] or the sink range [st, st + n_sink_tokens). Blocks where every
(i, j) pair is allowed run without building the mask.

RoPE (half-split layout, positions explicit): the block a program owns ("outer" tile: q in the forward and
dq kernels, k in the dkdv kernel) is rotated in registers right after loading, and its gradient is rotated
back (the inverse rotation, Rᵀ) before it is stored, so dq/dk come out w.r.t. the un-rotated inputs. The
operand streamed through the inner loop is re-read T/BLOCK times; rotating it in the loop would recompute
cos/sin that often, so by default it is rotated once by ``_rope_rows_kernel`` into a temporary
(``STREAM_ROPE = "prerotate"``); ``STREAM_ROPE = "fused"`` rotates it in the loop instead (no temporary).
Angles: pos · θ^(−2i/D) evaluated as fp64 turns reduced to [−½, ½) before fp32 cos/sin, so long positions
keep the reference's (fp64-angle) accuracy.

Dispatch (``mllm_kernels._common.kernel_path``): CUDA -> compiled Triton; CPU with TRITON_INTERPRET=1 ->
the same kernels interpreted; otherwise the eager reference. ``return_probs=True`` is the eager debug path.
"""
from __future__ import annotations

import math
import numbers
import os
import weakref
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (call_op, check_same_device, check_tensor, dot_dtype_for, eager_function, interpreting,
                      kernel_path, patch_inductor_operator_str, record_path, warm_rope_table)

SUPPORTED_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634
# "prerotate": rotate the inner-loop operand once into a temporary; "fused": rotate it inside the loop.
STREAM_ROPE = "prerotate"
# "separate": the dq kernel (deterministic); "atomic": dq accumulated by the dkdv kernel (see the module docstring).
# Read when a backward launches, or when torch.compile records it (a CUDA graph keeps the variant it was recorded
# with): set it before the first step. torch.use_deterministic_algorithms(True) selects "separate".
BWD_DQ = os.environ.get("MLLM_ATTN_DQ", "separate")


# ----------------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _cos_sin(pos, freq_ptr, HALF: tl.constexpr):
    """cos, sin [R, HALF] fp32 of angle = pos[r] · θ^(−2i/D). freq_ptr holds θ^(−2i/D)/(2π) in fp64: the
    product is taken in fp64 turns and reduced to [−½, ½) turns before going to fp32, so large positions
    lose nothing to fp32 rounding of the angle. Then a quadrant split leaves r ∈ [−π/4, π/4], where
    degree-9/10 Taylor polynomials are accurate to ~1e-9 (below fp32 rounding); unlike libdevice sin/cos
    this needs no slow-path local memory, which would spill registers in the attention kernels."""
    f = tl.load(freq_ptr + tl.arange(0, HALF))
    turns = pos.to(tl.float64)[:, None] * f[None, :]
    frac = (turns - tl.floor(turns + 0.5)).to(tl.float32)
    quad = tl.floor(frac * 4.0 + 0.5)
    r = (frac - quad * 0.25) * 6.283185307179586
    r2 = r * r
    sin_r = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880)))))
    cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    q = quad.to(tl.int32) & 3  # angle = r + q·π/2
    c = tl.where(q == 0, cos_r, tl.where(q == 1, -sin_r, tl.where(q == 2, -cos_r, sin_r)))
    s = tl.where(q == 0, sin_r, tl.where(q == 1, cos_r, tl.where(q == 2, -sin_r, -cos_r)))
    return c, s


@triton.jit
def _load_rows(base, offs, stride, ok, pos_ptr, freq_ptr, ROT: tl.constexpr, HALF: tl.constexpr):
    """Load rows ``offs`` of a [T, D] head slice as two halves [R, HALF]; if ROT, RoPE-rotated in fp32:
    (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin). Without ROT the halves keep the input dtype (the caller
    casts them to the dot dtype: no fp32 round trip on the GPU)."""
    offs_h = tl.arange(0, HALF)
    ptrs = base + offs[:, None] * stride + offs_h[None, :]
    x1 = tl.load(ptrs, mask=ok[:, None], other=0.0)
    x2 = tl.load(ptrs + HALF, mask=ok[:, None], other=0.0)
    if ROT:
        pos = tl.load(pos_ptr + offs, mask=ok, other=0)
        c, s = _cos_sin(pos, freq_ptr, HALF)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        x1 = x1f * c - x2f * s
        x2 = x2f * c + x1f * s
    return x1, x2


@triton.jit
def _store_grad_rows(base, offs, stride, ok, g1, g2, pos_ptr, freq_ptr, UNROT: tl.constexpr, HALF: tl.constexpr):
    """Store a gradient w.r.t. rotated rows as the gradient w.r.t. the raw rows: the transpose of the
    rotation, (g1, g2) -> (g1·cos + g2·sin, g2·cos − g1·sin)."""
    if UNROT:
        pos = tl.load(pos_ptr + offs, mask=ok, other=0)
        c, s = _cos_sin(pos, freq_ptr, HALF)
        r1 = g1 * c + g2 * s
        r2 = g2 * c - g1 * s
        g1 = r1
        g2 = r2
    offs_h = tl.arange(0, HALF)
    ptrs = base + offs[:, None] * stride + offs_h[None, :]
    tl.store(ptrs, to_out(g1, base.dtype.element_ty), mask=ok[:, None])
    tl.store(ptrs + HALF, to_out(g2, base.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _allowed(i, j, st, en, T, window, n_sink, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
             HAS_WINDOW: tl.constexpr):
    """Mask of allowed (query i, key j) pairs; i/st/en and j are broadcastable 2-D index tiles."""
    ok = j < T
    if HAS_DOCS:
        ok = ok & (j >= st)
        if not CAUSAL:
            ok = ok & (j < en)
    if CAUSAL:
        ok = ok & (j <= i)
    if HAS_WINDOW:
        if HAS_DOCS:
            ok = ok & (((i - j) < window) | ((j - st) < n_sink))
        else:
            ok = ok & (((i - j) < window) | (j < n_sink))
    return ok


@triton.jit
def _kv_ranges(ds_ptr, de_ptr, m0, T, window, n_sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """KV-block boundaries (multiples of BLOCK_N) for the query block [m0, m0 + BLOCK_M):
    [first, sink_end) sink blocks (masked), [band_start, u0) masked, [u0, u1) fully allowed, [u1, n_end) masked."""
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    zero = m0 * 0
    if HAS_DOCS:
        lo = tl.load(ds_ptr + m0)  # doc starts are non-decreasing along a row: the block's minimum
        start_last = tl.load(ds_ptr + m_last)
        end_first = tl.load(de_ptr + m0)
        end_last = tl.load(de_ptr + m_last)
    else:
        lo = zero
        start_last = zero
        end_first = zero + T
        end_last = zero + T
    if CAUSAL:
        hi = m_last + 1
    else:
        hi = end_last
    first = (lo // BLOCK_N) * BLOCK_N
    n_end = ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = start_last
    if HAS_WINDOW:
        band_lo = tl.maximum(lo, m0 - window + 1)
        # sinks of documents that start inside the block lie inside the band; only lo's document needs this
        sink_hi = tl.minimum(lo + n_sink, band_lo)
        sink_end = tl.where(sink_hi > lo, ((sink_hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, first)
        band_start = tl.maximum((band_lo // BLOCK_N) * BLOCK_N, sink_end)
        full_lo = tl.maximum(full_lo, m_last - window + 1)
    else:
        sink_end = first
        band_start = first
    full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_hi = zero + T
    if CAUSAL:
        full_hi = tl.minimum(full_hi, m0 + 1)
    elif HAS_DOCS:
        full_hi = tl.minimum(full_hi, end_first)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    u0 = tl.minimum(tl.maximum(full_lo, band_start), n_end)
    u1 = tl.minimum(tl.maximum(full_hi, u0), n_end)
    return first, sink_end, band_start, u0, u1, n_end


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, pos_ptr, freq_ptr,
               offs_m, st_i, en_i, n_lo, n_hi, T, qk_scale, window, n_sink,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
               ROT_STREAM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < T
        k1, k2 = _load_rows(k_base, offs_n, stride_kt, kv_ok, pos_ptr, freq_ptr, ROT_STREAM, HALF)
        s = tl.dot(q1, tl.trans(k1.to(DOT_DTYPE)), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2.to(DOT_DTYPE)), s, input_precision=DOT_PREC)
        s = s * qk_scale
        if MASK:
            ok = _allowed(offs_m[:, None], offs_n[None, :], st_i[:, None], en_i[:, None], T, window, n_sink,
                          CAUSAL, HAS_DOCS, HAS_WINDOW)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing allowed yet keeps m = -inf: guard (-inf) - (-inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, POS, DSTART, DEND, SINKS, FREQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, HQ, GROUP, qk_scale, window, n_sink,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
    ROPE: tl.constexpr, ROT_STREAM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) query blocks first
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    pos_ptr = POS + b * T
    q1, q2 = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, row_ok, pos_ptr, FREQ, ROPE, HALF)
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)
    ds_ptr = DSTART + b * T
    de_ptr = DEND + b * T
    if HAS_DOCS:
        st_i = tl.load(ds_ptr + offs_m, mask=row_ok, other=0)
        en_i = tl.load(de_ptr + offs_m, mask=row_ok, other=0)
    else:
        st_i = offs_m * 0
        en_i = st_i + T
    if HAS_SINKS:
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, sink_end, band_start, u0, u1, n_end = _kv_ranges(ds_ptr, de_ptr, m0, T, window, n_sink, BLOCK_M, BLOCK_N,
                                                            CAUSAL, HAS_DOCS, HAS_WINDOW)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if HAS_WINDOW:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                                   offs_m, st_i, en_i, first, sink_end, T, qk_scale, window, n_sink,
                                   True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                               offs_m, st_i, en_i, band_start, u0, T, qk_scale, window, n_sink,
                               True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                               offs_m, st_i, en_i, u0, u1, T, qk_scale, window, n_sink,
                               False, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                               offs_m, st_i, en_i, u1, n_end, T, qk_scale, window, n_sink,
                               True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    empty = l_i == 0.0  # no allowed key and no sink: out = 0, lse = -inf (as the reference)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, to_out(out, O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (b * HQ + h) * T + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, LSE, SINKS, DELTA, DSINK_PART,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    T, HQ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = (b * HQ + h) * T + offs_m
    if HAS_DLSE:  # ∂lse_i/∂s_ij = P_ij: an upstream lse gradient enters as dS += P·dlse, i.e. Δ -= dlse
        delta -= tl.load(DLSE + row, mask=row_ok, other=0.0)
    tl.store(DELTA + row, delta, mask=row_ok)
    if HAS_SINKS:
        lse = tl.load(LSE + row, mask=row_ok, other=0.0)
        p_sink = tl.where(row_ok, tl.exp(tl.load(SINKS + h).to(tl.float32) - lse), 0.0)
        tl.store(DSINK_PART + pid_bh * tl.num_programs(0) + pid_m, -tl.sum(p_sink * delta, 0))


@triton.jit
def _dkdv_tiles(dk1, dk2, dv, k1, k2, v, Q_b, DO_b, LSE, DELTA, DQA, b, hk, GROUP, HQ, stride_qh, stride_qt,
                stride_doh, stride_dot, pos_ptr, freq_ptr, ds_ptr, de_ptr, offs_n, m_lo, m_hi, T, qk_scale,
                window, n_sink, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_WINDOW: tl.constexpr, ROT_STREAM: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one kv block over q blocks [m_lo, m_hi) of every query head in the GQA group
    (and, with ATOMIC_DQ, add each pair's dS K — w.r.t. the rotated q, unscaled — into the fp32 buffer DQA).
    (group head, q block) pairs run as one flat loop: a nested head loop around the block loop keeps the
    operands live across both and makes the compiler spill registers."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, HALF)
    n_blk = (m_hi - m_lo) // BLOCK_M
    for it in range(0, GROUP * n_blk):
        g = it // n_blk
        m0 = m_lo + (it - g * n_blk) * BLOCK_M
        h = hk * GROUP + g
        row0 = (b * HQ + h) * T
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q1, q2 = _load_rows(Q_b + h * stride_qh, offs_m, stride_qt, row_ok, pos_ptr, freq_ptr, ROT_STREAM, HALF)
        q1 = q1.to(DOT_DTYPE)
        q2 = q2.to(DOT_DTYPE)
        # padded rows get lse = +inf so that their P is exactly 0
        lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        s_t = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=DOT_PREC)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASK:
            if HAS_DOCS:
                st_i = tl.load(ds_ptr + offs_m, mask=row_ok, other=0)
                en_i = tl.load(de_ptr + offs_m, mask=row_ok, other=0)
            else:
                st_i = offs_m * 0
                en_i = st_i + T
            ok = _allowed(offs_m[None, :], offs_n[:, None], st_i[None, :], en_i[None, :], T, window, n_sink,
                          CAUSAL, HAS_DOCS, HAS_WINDOW)
            p_t = tl.where(ok, p_t, 0.0)
        do = tl.load(DO_b + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0).to(DOT_DTYPE)
        dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        delta = tl.load(DELTA + row0 + offs_m, mask=row_ok, other=0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(DOT_DTYPE)
        dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(ds_t, q2, dk2, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            ds = tl.trans(ds_t)
            dqa = DQA + (row0 + offs_m)[:, None] * HEAD_DIM + offs_h[None, :]
            tl.atomic_add(dqa, tl.dot(ds, k1, input_precision=DOT_PREC), mask=row_ok[:, None], sem="relaxed")
            tl.atomic_add(dqa + HALF, tl.dot(ds, k2, input_precision=DOT_PREC), mask=row_ok[:, None], sem="relaxed")
    return dk1, dk2, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, POS, DSTART, DEND, FREQ, DK, DV, DQA,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    T, HQ, HKV, GROUP, qk_scale, sm_scale, window, n_sink,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ROPE: tl.constexpr, ROT_STREAM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr = False,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < T
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    pos_ptr = POS + b * T
    ds_ptr = DSTART + b * T
    de_ptr = DEND + b * T
    k_base = K + b * stride_kb + hk * stride_kh
    k1, k2 = _load_rows(k_base, offs_n, stride_kt, col_ok, pos_ptr, FREQ, ROPE, HALF)
    k1 = k1.to(DOT_DTYPE)
    k2 = k2.to(DOT_DTYPE)
    offs_d = tl.arange(0, HEAD_DIM)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)

    # query blocks that can see a key of this block, and the sub-range where every pair is allowed
    zero = n0 * 0
    if HAS_DOCS:
        start_first = tl.load(ds_ptr + n0)
        start_last = tl.load(ds_ptr + n_last)
        end_first = tl.load(de_ptr + n0)
        q_hi = tl.load(de_ptr + n_last)
    else:
        start_first = zero
        start_last = zero
        end_first = zero + T
        q_hi = zero + T
    if CAUSAL:
        q_lo = n0
        full_lo = n_last
    else:
        q_lo = start_first
        full_lo = start_last
    if HAS_WINDOW:
        if HAS_DOCS:
            st_j = tl.load(ds_ptr + offs_n, mask=col_ok, other=0)
            is_sink = col_ok & ((offs_n - st_j) < n_sink)
        else:
            is_sink = col_ok & (offs_n < n_sink)
        has_sink = tl.sum(is_sink.to(tl.int32), 0) > 0
        # a sink token is seen by the rest of its document, other keys only within the window
        q_hi = tl.where(has_sink, q_hi, tl.minimum(q_hi, n_last + window))
    full_hi = zero + T
    if HAS_DOCS:
        full_hi = tl.minimum(full_hi, end_first)
    if HAS_WINDOW:
        full_hi = tl.minimum(full_hi, n0 + window)
    full_hi = tl.where(n0 + BLOCK_N <= T, (full_hi // BLOCK_M) * BLOCK_M, zero)
    full_lo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    m_first = (q_lo // BLOCK_M) * BLOCK_M
    m_end = ((q_hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    u0 = tl.minimum(tl.maximum(full_lo, m_first), m_end)
    u1 = tl.minimum(tl.maximum(full_hi, u0), m_end)

    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # dK/dV accumulate over the query heads of the GQA group (K/V are read once, never repeated)
    Q_b = Q + b * stride_qb
    DO_b = DO + b * stride_dob
    dk1, dk2, dv = _dkdv_tiles(dk1, dk2, dv, k1, k2, v, Q_b, DO_b, LSE, DELTA, DQA, b, hk, GROUP, HQ, stride_qh,
                               stride_qt, stride_doh, stride_dot, pos_ptr, FREQ, ds_ptr, de_ptr, offs_n, m_first, u0, T,
                               qk_scale, window, n_sink, True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM,
                               BLOCK_M, DOT_DTYPE, DOT_PREC, ATOMIC_DQ)
    dk1, dk2, dv = _dkdv_tiles(dk1, dk2, dv, k1, k2, v, Q_b, DO_b, LSE, DELTA, DQA, b, hk, GROUP, HQ, stride_qh,
                               stride_qt, stride_doh, stride_dot, pos_ptr, FREQ, ds_ptr, de_ptr, offs_n, u0, u1, T,
                               qk_scale, window, n_sink, False, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM,
                               BLOCK_M, DOT_DTYPE, DOT_PREC, ATOMIC_DQ)
    dk1, dk2, dv = _dkdv_tiles(dk1, dk2, dv, k1, k2, v, Q_b, DO_b, LSE, DELTA, DQA, b, hk, GROUP, HQ, stride_qh,
                               stride_qt, stride_doh, stride_dot, pos_ptr, FREQ, ds_ptr, de_ptr, offs_n, u1, m_end, T,
                               qk_scale, window, n_sink, True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM,
                               BLOCK_M, DOT_DTYPE, DOT_PREC, ATOMIC_DQ)
    _store_grad_rows(DK + b * stride_dkb + hk * stride_dkh, offs_n, stride_dkt, col_ok, dk1 * sm_scale, dk2 * sm_scale,
                     pos_ptr, FREQ, ROPE, HALF)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             to_out(dv, DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos_ptr, freq_ptr,
              offs_m, st_i, en_i, n_lo, n_hi, T, qk_scale, window, n_sink,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
              ROT_STREAM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < T
        k1, k2 = _load_rows(k_base, offs_n, stride_kt, kv_ok, pos_ptr, freq_ptr, ROT_STREAM, HALF)
        k1 = k1.to(DOT_DTYPE)
        k2 = k2.to(DOT_DTYPE)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK:
            ok = _allowed(offs_m[:, None], offs_n[None, :], st_i[:, None], en_i[:, None], T, window, n_sink,
                          CAUSAL, HAS_DOCS, HAS_WINDOW)
            p = tl.where(ok, p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        dp = tl.dot(do, tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(DOT_DTYPE)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, POS, DSTART, DEND, FREQ, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    T, HQ, GROUP, qk_scale, sm_scale, window, n_sink,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ROPE: tl.constexpr, ROT_STREAM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    pos_ptr = POS + b * T
    q1, q2 = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, row_ok, pos_ptr, FREQ, ROPE, HALF)
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)
    offs_d = tl.arange(0, HEAD_DIM)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    row = (b * HQ + h) * T + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    ds_ptr = DSTART + b * T
    de_ptr = DEND + b * T
    if HAS_DOCS:
        st_i = tl.load(ds_ptr + offs_m, mask=row_ok, other=0)
        en_i = tl.load(de_ptr + offs_m, mask=row_ok, other=0)
    else:
        st_i = offs_m * 0
        en_i = st_i + T
    first, sink_end, band_start, u0, u1, n_end = _kv_ranges(ds_ptr, de_ptr, m0, T, window, n_sink, BLOCK_M, BLOCK_N,
                                                            CAUSAL, HAS_DOCS, HAS_WINDOW)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    if HAS_WINDOW:
        dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                             offs_m, st_i, en_i, first, sink_end, T, qk_scale, window, n_sink,
                             True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                         offs_m, st_i, en_i, band_start, u0, T, qk_scale, window, n_sink,
                         True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                         offs_m, st_i, en_i, u0, u1, T, qk_scale, window, n_sink,
                         False, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos_ptr, FREQ,
                         offs_m, st_i, en_i, u1, n_end, T, qk_scale, window, n_sink,
                         True, CAUSAL, HAS_DOCS, HAS_WINDOW, ROT_STREAM, HEAD_DIM, BLOCK_N, DOT_DTYPE, DOT_PREC)
    _store_grad_rows(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqt, row_ok, dq1 * sm_scale, dq2 * sm_scale,
                     pos_ptr, FREQ, ROPE, HALF)


@triton.jit
def _token_block(T, H, BLOCK_T: tl.constexpr):
    """Grid (token blocks, B·H): this program's batch b (int64), head h, token offsets and their in-range mask."""
    pid_bh = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    return (pid_bh // H).to(tl.int64), pid_bh % H, offs_t, offs_t < T


@triton.jit
def _attn_bwd_dq_finish_kernel(DQA, DQ, POS, FREQ, stride_dqb, stride_dqt, stride_dqh, T, HQ, sm_scale,
                               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, ROPE: tl.constexpr):
    """dq = Rᵀ(DQA · scale) in dq's dtype: the atomic buffer [B, Hq, T, D] fp32 (gradient w.r.t. the rotated q)
    as the gradient w.r.t. the raw q [B, T, Hq, D]. Grid (token blocks, B·Hq)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h, offs_t, ok = _token_block(T, HQ, BLOCK_T)
    offs_h = tl.arange(0, HALF)
    src = DQA + ((b * HQ + h) * T + offs_t)[:, None] * HEAD_DIM + offs_h[None, :]
    g1 = tl.load(src, mask=ok[:, None], other=0.0) * sm_scale
    g2 = tl.load(src + HALF, mask=ok[:, None], other=0.0) * sm_scale
    _store_grad_rows(DQ + b * stride_dqb + h * stride_dqh, offs_t, stride_dqt, ok, g1, g2, POS + b * T, FREQ, ROPE,
                     HALF)


@triton.jit
def _rope_rows_kernel(X, Y, POS, FREQ, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
                      T, H, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """y = rope(x) for x [B, T, H, D], one [BLOCK_T, D] tile per program (grid: token blocks × B·H). cos/sin
    are recomputed per head: a few FMAs per element, cheaper than serialising the heads of a block."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h, offs_t, ok = _token_block(T, H, BLOCK_T)
    x1, x2 = _load_rows(X + b * stride_xb + h * stride_xh, offs_t, stride_xt, ok, POS + b * T, FREQ, True, HALF)
    offs_h = tl.arange(0, HALF)
    yp = Y + b * stride_yb + h * stride_yh + offs_t[:, None] * stride_yt + offs_h[None, :]
    tl.store(yp, to_out(x1, Y.dtype.element_ty), mask=ok[:, None])
    tl.store(yp + HALF, to_out(x2, Y.dtype.element_ty), mask=ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------
# GPU tiles, chosen per (kernel, head dim, 16-bit or fp32): BLOCK_M × BLOCK_N, warps, pipeline stages. The 16-bit
# ones are the register-spill-free candidates of ``benchmarks/bench_attention.py --tune`` (sm_90 resource usage).
# fp32 operands (ieee products on the FMA units, no tensor cores) hold every product tile in registers: the half-size
# tiles used before spilled 1.2-46 KB per thread on sm_90 (``python -m benchmarks.aot_check``, triton 3.6 and 3.9);
# these are the largest tiles of that check's sweep (16-64 rows, 4/8 warps, 1/2 stages) that ptxas fits in
# registers on both versions (<= 32 B spilled), chosen without a GPU timing (benchmarks/NOTES.md, tuning step 12).
GPU_CONFIGS = {
    ("fwd", 64, 2): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("fwd", 128, 2): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dkdv", 64, 2): dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    ("dkdv", 128, 2): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dq", 64, 2): dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
    ("dq", 128, 2): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    ("fwd", 64, 4): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("fwd", 128, 4): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dkdv", 64, 4): dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
    ("dkdv", 128, 4): dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
    ("dq", 64, 4): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    ("dq", 128, 4): dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
}
# the interpreter is fastest with few, large numpy tiles; 64 keeps "T not a multiple of the block" testable
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# where GPU_CONFIGS came from: "shipped", or the tile table loaded over it (``load_tiles`` / MLLM_ATTN_TILES)
TILES_SOURCE = "shipped"


def read_tiles(path) -> list:
    """Parse a tile table: JSON ``{"tiles": [{"kernel": "fwd" | "dkdv" | "dq", "head_dim": 64 | 128,
    "dtype": "bf16" | "fp16" | "fp32", "BLOCK_M": .., "BLOCK_N": .., "num_warps": .., "num_stages": ..}, ...]}``
    (``benchmarks/bench_attention.py --tune --write-tiles`` writes one from a GPU sweep; other keys are ignored)
    -> [(GPU_CONFIGS key, config)]. bf16 and fp16 share the 16-bit entry. Errors name the file and the entry."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"attention tile table {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"attention tile table {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    tiles = data.get("tiles") if isinstance(data, dict) else None
    if not isinstance(tiles, list):
        raise ValueError(f"attention tile table {path}: expected an object with a 'tiles' list")
    out = []
    for i, t in enumerate(tiles):
        where = f"attention tile table {path}: tiles[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: expected an object, got {t!r}")
        missing = [k for k in ("kernel", "head_dim", "dtype") + TILE_FIELDS if k not in t]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if t["kernel"] not in ("fwd", "dkdv", "dq"):
            raise ValueError(f"{where}: kernel must be 'fwd', 'dkdv' or 'dq', got {t['kernel']!r}")
        if t["head_dim"] not in (64, 128):
            raise ValueError(f"{where}: head_dim must be 64 or 128, got {t['head_dim']!r}")
        if t["dtype"] not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"{where}: dtype must be 'bf16', 'fp16' or 'fp32', got {t['dtype']!r}")
        for k, lo, hi in (("BLOCK_M", 16, 256), ("BLOCK_N", 16, 256), ("num_warps", 1, 16)):
            v = t[k]
            if not (isinstance(v, int) and lo <= v <= hi and v & (v - 1) == 0):
                raise ValueError(f"{where}: {k} must be a power of two in [{lo}, {hi}], got {v!r}")
        if not (isinstance(t["num_stages"], int) and 1 <= t["num_stages"] <= 8):
            raise ValueError(f"{where}: num_stages must be an integer in [1, 8], got {t['num_stages']!r}")
        key = (t["kernel"], t["head_dim"], 4 if t["dtype"] == "fp32" else 2)
        out.append((key, {k: t[k] for k in TILE_FIELDS}))
    return out


def load_tiles(path) -> int:
    """Replace the ``GPU_CONFIGS`` entries a tile table names (``read_tiles``; the others stay shipped) and return
    how many. What it is for: a GPU session's tile sweep applied to the training step without a code edit
    (``MLLM_ATTN_TILES=<table> scripts/bench_train.py ...``; gpu_check section ``train_tuned_tiles``). A tile that
    does not fit the card fails at its first launch (``python -m benchmarks.aot_check`` checks a table's tiles
    without a GPU). The interpreter keeps its own tile."""
    global TILES_SOURCE
    entries = read_tiles(path)
    for key, cfg in entries:
        GPU_CONFIGS[key] = cfg
    TILES_SOURCE = str(path)
    return len(entries)


if os.environ.get("MLLM_ATTN_TILES"):  # a bad table fails at import, not at the first launch
    load_tiles(os.environ["MLLM_ATTN_TILES"])


def _config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    return dict(GPU_CONFIGS[(kernel, head_dim, 4 if dtype == torch.float32 else 2)])


def _bwd_dq_mode() -> str:
    if BWD_DQ not in ("separate", "atomic"):
        raise ValueError(f"mllm_kernels.attention.BWD_DQ (environment variable MLLM_ATTN_DQ) must be 'separate' or "
                         f"'atomic', got {BWD_DQ!r}")
    if BWD_DQ == "atomic" and torch.are_deterministic_algorithms_enabled():
        return "separate"  # the atomic adds land in a run-dependent order; the dq kernel is reproducible
    return BWD_DQ


_bwd_dq_mode()  # a bad MLLM_ATTN_DQ fails at import, not at the first backward


def _dot_args(dtype: torch.dtype) -> dict:
    dot = dot_dtype_for(dtype)
    # fp32 inputs: true fp32 products (Triton's default for fp32 dots on GPU is tf32, ~1e-3 relative)
    return dict(DOT_DTYPE=dot, DOT_PREC="ieee" if dot == tl.float32 else "tf32")


# ----------------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------------
_FREQ_CACHE: dict = {}


class _PerTensorCache:
    """The last result computed from one CUDA tensor (cu_seqlens: document bounds, validation), reused while the
    *same tensor object* comes back unmodified (same version counter) with the same key. A model hands the same
    tensor to every layer and to the backward, so host syncs (validation) and index bookkeeping happen
    once per step instead of once per layer. Used by eager calls only: the document bounds it holds are device
    tensors, and one made inside a CUDA graph's memory pool (torch.compile mode="reduce-overhead") without being a
    graph output is refused by CUDA-graph trees; under torch.compile the bounds are traced instead (``_doc_bounds``).
    Positions are not cached at all. CPU tensors are never cached (numpy views can change them without touching the
    version counter); neither are writes that bypass autograd's counter (``.data``)."""

    def __init__(self, cuda_only: bool = True):
        self.cuda_only = cuda_only
        self.ref, self.version, self.key, self.value = None, None, None, None

    def get(self, t: torch.Tensor, key, compute):
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter
            return compute()
        if self.cuda_only and not t.is_cuda:
            return compute()
        if self.ref is not None and self.ref() is t and self.version == version and self.key == key:
            return self.value
        value = compute()
        self.ref, self.version, self.key, self.value = weakref.ref(t), version, key, value
        return value

    def put(self, t: torch.Tensor, key, value) -> None:
        """Store ``value`` for ``t`` as ``get`` would have after computing it (same caching rules)."""
        if self.cuda_only and not t.is_cuda:
            return
        self.ref, self.version, self.key, self.value = weakref.ref(t), t._version, key, value


_DOC_CACHE = _PerTensorCache()
_CU_VALID_CACHE = _PerTensorCache()


def _rope_turns(head_dim: int, theta: float, device) -> torch.Tensor:
    """θ^(−2i/D)/(2π), i < D/2, fp64 on ``device`` (the reference's inverse frequencies, in turns)."""
    key = (head_dim, float(theta), str(device))
    f = _FREQ_CACHE.get(key)
    if f is None:
        inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        f = (inv / (2 * math.pi)).to(device)
        _FREQ_CACHE[key] = f
    return f


def _doc_bounds(cu_seqlens: Optional[torch.Tensor], B: int, T: int, device):
    """(start, end) [B, T] int32: first and one-past-last index, within its row, of each token's document.

    Computed outside the op and handed to it (saved for the backward, so it never recomputes them). Eagerly they
    are cached per ``cu_seqlens`` tensor (every layer gets the same one). While torch.compile traces, they are
    plain traced ops: AOTAutograd's common-subexpression pass merges the layers' identical copies into one, and no
    tensor outlives the graph (a cached one made during a CUDA-graph capture would sit in the graph's pool)."""
    if cu_seqlens is None:
        return None, None
    if torch.compiler.is_compiling():
        return _compute_doc_bounds(cu_seqlens, B, T, device)
    return _DOC_CACHE.get(cu_seqlens, (B, T, str(device)), lambda: _compute_doc_bounds(cu_seqlens, B, T, device))


def _compute_doc_bounds(cu_seqlens: torch.Tensor, B: int, T: int, device):
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    idx = torch.arange(B * T, device=device)
    doc = torch.searchsorted(cu, idx, right=True) - 1
    row0 = (idx // T) * T
    start = (cu[doc] - row0).view(B, T).to(torch.int32).contiguous()
    end = (cu[doc + 1] - row0).view(B, T).to(torch.int32).contiguous()
    return start, end


def _positions(position_ids: Optional[torch.Tensor], B: int, T: int, device) -> torch.Tensor:
    """[B, T] contiguous int32/int64 positions: the kernels read either width, so a contiguous tensor is used as
    it is. Nothing derived from a per-step tensor is cached: a cached device tensor would outlive the call, which
    CUDA graphs (torch.compile mode="reduce-overhead") reject for memory allocated inside the graph's pool."""
    if position_ids is None:
        return torch.arange(T, device=device, dtype=torch.int32).expand(B, T).contiguous()
    return position_ids if position_ids.is_contiguous() else position_ids.contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_rows(x: torch.Tensor, pos: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """rope(x) for x [B, T, H, D] into a new contiguous tensor of x.dtype (the reference's rounding)."""
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    BLOCK_T = 64
    _rope_rows_kernel[(triton.cdiv(T, BLOCK_T), B * H)](
        x, y, pos, freq, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        T, H, HEAD_DIM=D, BLOCK_T=BLOCK_T, num_warps=4 if D <= 64 else 8,
    )
    return y


class _Prep:
    """Everything the kernels need besides q/k/v: int32 positions, document bounds, RoPE turns, flags."""

    def __init__(self, q, position_ids, doc_start, doc_end, sinks, window, rope_theta):
        B, T, _, D = q.shape
        dev = q.device
        self.rope = rope_theta is not None
        self.stream_fused = STREAM_ROPE == "fused"
        self.pos = _positions(position_ids, B, T, dev) if self.rope else None
        self.freq = _rope_turns(D, rope_theta, dev) if self.rope else None
        self.doc_start, self.doc_end = doc_start, doc_end
        self.sinks = sinks.to(torch.float32).contiguous() if sinks is not None else None
        self.has_window = window is not None
        self.window = int(window) if window is not None else 0
        dummy = q  # never dereferenced: the matching constexpr flag is off
        self.ptrs = dict(
            POS=self.pos if self.pos is not None else dummy,
            FREQ=self.freq if self.freq is not None else dummy,
            DSTART=self.doc_start if self.doc_start is not None else dummy,
            DEND=self.doc_end if self.doc_end is not None else dummy,
        )

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """The inner-loop operand: pre-rotated once, unless rotation happens in the loop (or no RoPE)."""
        if self.rope and not self.stream_fused:
            return _rope_rows(x, self.pos, self.freq)
        return x

    @property
    def rot_stream(self) -> bool:
        return self.rope and self.stream_fused


def _flags(causal, prep: _Prep) -> dict:
    return dict(CAUSAL=bool(causal), HAS_DOCS=prep.doc_start is not None, HAS_WINDOW=prep.has_window,
                ROPE=prep.rope, ROT_STREAM=prep.rot_stream)


def _forward(q, k, v, position_ids, doc_start, doc_end, sinks, causal, window, n_sink_tokens, rope_theta,
             softmax_scale):
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    out = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    prep = _Prep(q, position_ids, doc_start, doc_end, sinks, window, rope_theta)
    ks = prep.stream(k)
    cfg = _config("fwd", D, q.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * HQ)
    _attn_fwd_kernel[grid](
        q, ks, v, out, lse, prep.ptrs["POS"], prep.ptrs["DSTART"], prep.ptrs["DEND"],
        prep.sinks if prep.sinks is not None else q, prep.ptrs["FREQ"],
        q.stride(0), q.stride(1), q.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        T, HQ, HQ // HKV, softmax_scale * LOG2E, prep.window, int(n_sink_tokens),
        HEAD_DIM=D, HAS_SINKS=prep.sinks is not None, **_flags(causal, prep), **_dot_args(q.dtype), **cfg,
    )
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, position_ids, doc_start, doc_end, sinks, causal, window,
              n_sink_tokens, rope_theta, softmax_scale):
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    dq = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, HKV, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, T, HKV, D), dtype=v.dtype, device=v.device)
    dsinks = torch.zeros(sinks.shape if sinks is not None else (0,), dtype=torch.float32, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv, dsinks.to(sinks.dtype if sinks is not None else q.dtype)
    q, k, v, out = (_last_dim_contiguous(x) for x in (q, k, v, out))
    dout = dout.contiguous()  # autograd can hand in stride-0 (expanded) gradients
    prep = _Prep(q, position_ids, doc_start, doc_end, sinks, window, rope_theta)
    flags = _flags(causal, prep)
    dots = _dot_args(q.dtype)

    pre_bm = 64
    n_pre = triton.cdiv(T, pre_bm)
    delta = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
    part = torch.empty((B * HQ, n_pre), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    _attn_bwd_preprocess_kernel[(n_pre, B * HQ)](
        out, dout, dlse.contiguous() if has_dlse else lse, lse, prep.sinks if prep.sinks is not None else lse,
        delta, part, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        T, HQ, HEAD_DIM=D, BLOCK_M=pre_bm, HAS_DLSE=has_dlse, HAS_SINKS=prep.sinks is not None, num_warps=4,
    )
    if sinks is not None:
        dsinks = part.view(B, HQ, n_pre).sum(dim=(0, 2))

    common = (T, HQ)
    atomic_dq = _bwd_dq_mode() == "atomic"
    # the atomic buffer: fp32 [B, Hq, T, D], zeroed (a memset) and then only added to
    dqa = torch.zeros((B, HQ, T, D), dtype=torch.float32, device=q.device) if atomic_dq else dk
    qs = prep.stream(q)  # dkdv streams q; dq streams k
    cfg = _config("dkdv", D, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * HKV)](
        qs, k, v, dout, lse, delta, prep.ptrs["POS"], prep.ptrs["DSTART"], prep.ptrs["DEND"], prep.ptrs["FREQ"], dk, dv,
        dqa,
        qs.stride(0), qs.stride(1), qs.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *common, HKV, HQ // HKV, softmax_scale * LOG2E, softmax_scale, prep.window, int(n_sink_tokens),
        HEAD_DIM=D, **flags, **dots, **cfg, ATOMIC_DQ=atomic_dq,
    )
    del qs
    if atomic_dq:
        block_t = 64
        _attn_bwd_dq_finish_kernel[(triton.cdiv(T, block_t), B * HQ)](
            dqa, dq, prep.ptrs["POS"], prep.ptrs["FREQ"], dq.stride(0), dq.stride(1), dq.stride(2), T, HQ,
            softmax_scale, HEAD_DIM=D, BLOCK_T=block_t, ROPE=prep.rope, num_warps=4,
        )
        return dq, dk, dv, dsinks.to(sinks.dtype if sinks is not None else q.dtype)
    ks = prep.stream(k)
    cfg = _config("dq", D, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * HQ)](
        q, ks, v, dout, lse, delta, prep.ptrs["POS"], prep.ptrs["DSTART"], prep.ptrs["DEND"], prep.ptrs["FREQ"], dq,
        q.stride(0), q.stride(1), q.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *common, HQ // HKV, softmax_scale * LOG2E, softmax_scale, prep.window, int(n_sink_tokens),
        HEAD_DIM=D, **flags, **dots, **cfg,
    )
    return dq, dk, dv, dsinks.to(sinks.dtype if sinks is not None else q.dtype)


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------
def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: Optional[torch.Tensor],
    doc_start: Optional[torch.Tensor], doc_end: Optional[torch.Tensor], sinks: Optional[torch.Tensor], causal: bool,
    window: Optional[int], n_sink_tokens: int, rope_theta: Optional[float], softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, T, Hq, D], lse [B, Hq, T] fp32); arguments already validated by ``attention``; doc_start/doc_end
    [B, T] int32 (``_doc_bounds``) or None."""
    record_path("attention", kernel_path(q))
    return _forward(q, k, v, position_ids, doc_start, doc_end, sinks, causal, window, n_sink_tokens, rope_theta,
                    softmax_scale)


_attention_op = torch.library.custom_op("mllm::attention", _attention_impl, mutates_args=())


@_attention_op.register_fake
def _(q, k, v, position_ids, doc_start, doc_end, sinks, causal, window, n_sink_tokens, rope_theta, softmax_scale):
    patch_inductor_operator_str()
    B, T, HQ, D = q.shape
    if rope_theta is not None:
        warm_rope_table(_rope_turns, D, rope_theta, q.device)
    return q.new_empty((B, T, HQ, D)), q.new_empty((B, HQ, T), dtype=torch.float32)


def _attention_backward_impl(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, position_ids: Optional[torch.Tensor], doc_start: Optional[torch.Tensor],
    doc_end: Optional[torch.Tensor], sinks: Optional[torch.Tensor], causal: bool, window: Optional[int],
    n_sink_tokens: int, rope_theta: Optional[float], softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty when there are no sinks."""
    return _backward(dout, dlse, q, k, v, out, lse, position_ids, doc_start, doc_end, sinks, causal, window,
                     n_sink_tokens, rope_theta, softmax_scale)


_attention_backward_op = torch.library.custom_op("mllm::attention_backward", _attention_backward_impl,
                                                 mutates_args=())


@_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, position_ids, doc_start, doc_end, sinks, causal, window, n_sink_tokens,
      rope_theta, softmax_scale):
    patch_inductor_operator_str()
    ds = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


def _setup_context(ctx, inputs, output):
    q, k, v, position_ids, doc_start, doc_end, sinks, causal, window, n_sink_tokens, rope_theta, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, position_ids, doc_start, doc_end, sinks)
    ctx.args = (causal, window, n_sink_tokens, rope_theta, softmax_scale)
    # an unused lse arrives as None (the kernel's HAS_DLSE=False path), not as a materialised [B, Hq, T] of zeros
    ctx.set_materialize_grads(False)


def _autograd_backward(bwd):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, position_ids, doc_start, doc_end, sinks = ctx.saved_tensors
        if dout is None:  # only lse was used downstream
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks = bwd(dout, dlse, q, k, v, out, lse, position_ids, doc_start, doc_end, sinks, *ctx.args)
        return dq, dk, dv, None, None, None, (dsinks if sinks is not None else None), None, None, None, None, None
    return backward


# the registered backward calls the backward *op*, so that AOT tracing sees an opaque call, not a Triton launch
_attention_op.register_autograd(_autograd_backward(_attention_backward_op), setup_context=_setup_context)
_AttentionFunction = eager_function("attention", _attention_impl, _setup_context,
                                    _autograd_backward(_attention_backward_impl))


# ----------------------------------------------------------------------------------------------------
# Validation and the functional API
# ----------------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> None:
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least [0, B*T] = [0, {B * T}], got {cu_seqlens.numel()} value(s)")
    if torch.compiler.is_compiling():  # value checks need a host sync; the eager call validated them
        return
    # the sync runs once per cu_seqlens tensor, not once per layer
    _CU_VALID_CACHE.get(cu_seqlens, (B, T), lambda: _check_cu_values(cu_seqlens, B, T))


def cu_seqlens_to_device(cu_seqlens: torch.Tensor, B: int, T: int, device, non_blocking: bool = True) -> torch.Tensor:
    """Validate host-side document bounds and copy them to ``device``; ``attention`` then trusts that copy.

    cu_seqlens: 1-D int32/int64 on the CPU (FlashAttention-varlen offsets over the flattened B·T tokens), checked as
    ``attention`` checks it (starts at 0, ends at B·T, strictly increasing up to trailing padding, holds every row
    start), raising the same ValueError. Why: ``attention`` validates a CUDA ``cu_seqlens`` by reading its values
    back, a device-to-host sync once per batch; in a host-bound training step that sync stalls the host until the
    previous micro-batch's backward has drained (the likely cause of the H100's ≈ 64 ms forward with 4 documents per
    row against 52 ms without documents, benchmarks/NOTES.md tuning step 13). Validating the host copy costs no
    sync. Pinned host memory (what a DataLoader with ``pin_memory=True`` gives) keeps the copy asynchronous. A tensor
    already on a GPU is only moved (``attention`` validates it as before)."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.is_cuda:
        return cu_seqlens.to(device)
    _check_cu_values(cu_seqlens, B, T)
    out = cu_seqlens.to(device, non_blocking=non_blocking)
    _CU_VALID_CACHE.put(out, (B, T), True)
    return out


def _check_cu_values(cu_seqlens: torch.Tensor, B: int, T: int) -> bool:
    reference.check_cu_seqlens_values(cu_seqlens, B, T)  # the one definition, shared with the model's input check
    return True


def _validate(q, k, v, position_ids, cu_seqlens, window, n_sink_tokens, sinks, rope_theta, softmax_scale,
              kernel: bool, causal: bool = True) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_device(q=q, k=k, v=v, position_ids=position_ids, cu_seqlens=cu_seqlens, sinks=sinks)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, T, HQ, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape [B, T, Hkv, D], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)} must be [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}] to match q {tuple(q.shape)}")
    HKV = k.shape[2]
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"the number of query heads Hq={HQ} must be a multiple of the kv heads Hkv={HKV} (GQA)")
    if kernel and D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the attention kernel; supported: {SUPPORTED_HEAD_DIMS}")
    if rope_theta is not None and D % 2:
        raise ValueError(f"RoPE needs an even head dim, got D={D}")
    if position_ids is not None:
        check_tensor("position_ids", position_ids, ndim=2, dtypes=(torch.int32, torch.int64))
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must be [B, T] = [{B}, {T}]")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, B, T)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if window is not None and (not _is_int(window) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not _is_int(n_sink_tokens) or n_sink_tokens < 0:
        raise ValueError(f"n_sink_tokens must be an int >= 0, got {n_sink_tokens!r}")
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1)
        if sinks.shape[0] != HQ:
            raise ValueError(f"sinks must have shape [Hq] = [{HQ}], got {tuple(sinks.shape)}")
    if rope_theta is not None and (not isinstance(rope_theta, numbers.Real) or not rope_theta > 0):
        raise ValueError(f"rope_theta must be a positive number or None, got {rope_theta!r}")
    if softmax_scale is not None and (not isinstance(softmax_scale, numbers.Real) or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    *,
    causal: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    n_sink_tokens: int = 0,
    sinks: Optional[torch.Tensor] = None,
    rope_theta: Optional[float] = 10000.0,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    return_probs: bool = False,
):
    """Fused attention with the signature and semantics of ``reference.attention``.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq % Hkv == 0); position_ids: [B, T] int (default arange(T) per
    row); cu_seqlens: 1-D FlashAttention-varlen document boundaries over the flattened B·T tokens (trailing
    repeats of B·T are padding: they keep the length fixed across batches, as CUDA graphs need; its values are
    checked with one host sync per tensor in eager calls, but not inside a ``torch.compile`` graph, where the
    caller guarantees them: ``cu_seqlens_to_device`` checks a CPU copy before the upload);
    window/n_sink_tokens: sliding window with StreamingLLM sink tokens; sinks: [Hq] learned sink logits, finite
    (not value-checked, which would cost a host sync per call: a +inf or NaN sink makes its head's rows NaN);
    rope_theta=None disables RoPE; softmax_scale defaults to 1/sqrt(D).
    Returns out [B, T, Hq, D] (q.dtype), plus lse [B, Hq, T] fp32 if return_lse. Differentiable in q, k, v
    and sinks (and through lse). ``return_probs=True`` runs the eager reference (debug/visualisation path)
    and also returns probs [B, Hq, T, T] fp32. Kernel paths support head dims 64 and 128.
    """
    path = "eager" if return_probs else kernel_path(q)
    _validate(q, k, v, position_ids, cu_seqlens, window, n_sink_tokens, sinks, rope_theta, softmax_scale,
              kernel=path != "eager", causal=causal)
    if path == "eager":
        record_path("attention", "eager")
        return reference.attention(q, k, v, position_ids, causal=causal, cu_seqlens=cu_seqlens, window=window,
                                   n_sink_tokens=n_sink_tokens, sinks=sinks, rope_theta=rope_theta,
                                   softmax_scale=softmax_scale, return_lse=return_lse, return_probs=return_probs)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    doc_start, doc_end = _doc_bounds(cu_seqlens, q.shape[0], q.shape[1], q.device)
    out, lse = call_op(_attention_op, _AttentionFunction, q, k, v, position_ids, doc_start, doc_end, sinks,
                       bool(causal), None if window is None else int(window), int(n_sink_tokens),
                       None if rope_theta is None else float(rope_theta), scale)
    return (out, lse) if return_lse else out


class Attention(torch.nn.Module):
    """Module wrapper holding the static options (causal, window, n_sink_tokens, rope_theta, softmax_scale)
    and, if ``learned_sinks``, the [n_heads] sink logits (initialised to 0)."""

    def __init__(self, n_heads: int, *, causal: bool = True, window: Optional[int] = None, n_sink_tokens: int = 0,
                 learned_sinks: bool = False, rope_theta: Optional[float] = 10000.0,
                 softmax_scale: Optional[float] = None):
        super().__init__()
        self.causal, self.window, self.n_sink_tokens = causal, window, n_sink_tokens
        self.rope_theta, self.softmax_scale = rope_theta, softmax_scale
        self.sinks = torch.nn.Parameter(torch.zeros(n_heads)) if learned_sinks else None

    def forward(self, q, k, v, position_ids=None, cu_seqlens=None):
        return attention(q, k, v, position_ids, causal=self.causal, cu_seqlens=cu_seqlens, window=self.window,
                         n_sink_tokens=self.n_sink_tokens, sinks=self.sinks, rope_theta=self.rope_theta,
                         softmax_scale=self.softmax_scale)
