"""Rotary position embedding (half-split / GPT-NeoX / Llama-HF layout) of q and k, forward and backward.

For x: [B, T, H, D] with halves x1 = x[..., :D/2], x2 = x[..., D/2:] and, per token, angle_i = pos · θ^(−2i/D)
(i < D/2, pos = position_ids[b, t]):
    forward   out = [x1·cos − x2·sin,  x2·cos + x1·sin]
    backward  dx  = [d1·cos + d2·sin,  d2·cos − d1·sin]          (the inverse rotation: sin -> −sin)
q: [B, T, Hq, D] and k: [B, T, Hkv, D] may have different head counts (GQA); both are rotated by the same angles
in one launch, one program per BLOCK_T tokens. Positions are explicit, so packed documents restart at 0.

cos/sin are computed in the kernel (no [B, T, D/2] table is read from memory). A naive fp32 angle pos·inv_freq has
an absolute error ~|angle|·2⁻²⁴, 1e-4 rad at position 2,048, which is well above fp32 rounding. Instead the
angle is formed in *turns* (angle / 2π) with exact products: on the host, in fp64, f_i = θ^(−2i/D) / 2π is split
into f = t0 + t1 + t2 (t0, t1: 12 significant bits each, t2: the fp32-rounded rest); in the kernel
pos = p_hi·4096 + p_lo (each < 4096 for pos < 2²⁴), every product p_x·t_y (x ∈ {hi, lo}, y ∈ {0, 1}) has ≤ 24
significant bits and is therefore exact in fp32, and so is its fractional part. The sum of the five fractional
parts, reduced to [−½, ½) turns and scaled by 2π, is accurate to ~1e-6 rad for every position below 2²⁴.
Maths in fp32; outputs have the inputs' dtypes. Inputs may be strided views (unit stride along D), e.g. q and k
sliced from a fused qkv projection: they are read in place.

Layers: ``_rope_kernel`` (``@triton.jit``, forward and backward through a constexpr) → ``rope_fwd`` / ``rope_bwd``
→ ``torch.ops.mllm.apply_rope`` (+ ``mllm::apply_rope_backward``, ``register_fake``, ``register_autograd``) →
``apply_rope`` (functional API: dispatch + validation) → ``RotaryEmbedding`` (nn.Module).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (call_op, check_same_device, check_same_dtype, check_tensor, eager_function, interpreting,
                      kernel_path, patch_inductor_operator_str, record_path, warm_rope_table)

TWO_PI = 2.0 * math.pi


# ----------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_cos_sin(POS, FREQ, tok, tok_mask, stride_pb, stride_pt, T, HALF, BLOCK_HALF: tl.constexpr):
    """cos, sin [BLOCK_T, BLOCK_HALF] fp32 for the tokens ``tok`` (flat b·T + t), from the split turn rates."""
    b = tok // T
    t = tok % T
    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tok_mask, other=0).to(tl.int64)
    p_hi = ((pos >> 12) * 4096).to(tl.float32)[:, None]
    p_lo = (pos & 4095).to(tl.float32)[:, None]
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    t0 = tl.load(FREQ + i, mask=imask, other=0.0)[None, :]
    t1 = tl.load(FREQ + HALF + i, mask=imask, other=0.0)[None, :]
    t2 = tl.load(FREQ + 2 * HALF + i, mask=imask, other=0.0)[None, :]
    a = p_hi * t0
    turns = a - tl.floor(a)
    a = p_lo * t0
    turns += a - tl.floor(a)
    a = p_hi * t1
    turns += a - tl.floor(a)
    a = p_lo * t1
    turns += a - tl.floor(a)
    a = (p_hi + p_lo) * t2
    turns += a - tl.floor(a)
    turns = turns - tl.floor(turns + 0.5)  # [-1/2, 1/2): cos/sin are most accurate near 0
    angle = turns * 6.283185307179586
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _rope_rotate_heads(X, O, b, t, tok_mask, cos, sin, n_heads, stride_xb, stride_xt, stride_xh, T, HALF,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate all heads of the tokens (b, t) [BLOCK_T]; O is contiguous [B, T, n_heads, 2·HALF]."""
    i = tl.arange(0, BLOCK_HALF)
    c = cos[:, None, :]
    s = sin[:, None, :]
    if BACKWARD:
        s = -s
    base_x = b * stride_xb + t * stride_xt
    base_o = (b * T + t) * n_heads * (2 * HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None] & (i < HALF)[None, None, :]
        off_x = base_x[:, None, None] + h[None, :, None] * stride_xh + i[None, None, :]
        off_o = base_o[:, None, None] + h[None, :, None] * (2 * HALF) + i[None, None, :]
        x1 = tl.load(X + off_x, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + off_x + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(O + off_o, to_out(o1, O.dtype.element_ty), mask=mask)
        tl.store(O + off_o + HALF, to_out(o2, O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, POS, FREQ, QO, KO,
    n_tokens, T, HQ, HKV, HALF,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_pb, stride_pt,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotates q and k of BLOCK_T tokens by the same angles (inverse rotation when BACKWARD)."""
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tok_mask = tok < n_tokens
    cos, sin = _rope_cos_sin(POS, FREQ, tok, tok_mask, stride_pb, stride_pt, T, HALF, BLOCK_HALF)
    b = tok // T
    t = tok % T
    _rope_rotate_heads(Q, QO, b, t, tok_mask, cos, sin, HQ, stride_qb, stride_qt, stride_qh, T, HALF,
                       BLOCK_HQ, BLOCK_HALF, BACKWARD)
    _rope_rotate_heads(K, KO, b, t, tok_mask, cos, sin, HKV, stride_kb, stride_kt, stride_kh, T, HALF,
                       BLOCK_HKV, BLOCK_HALF, BACKWARD)


# ----------------------------------------------------------------------------------------------------
# host side: frequency table, configuration, launchers
# ----------------------------------------------------------------------------------------------------
_FREQ_CACHE: Dict[Tuple[int, float, str], torch.Tensor] = {}


def _split_bits(v: float, bits: int) -> float:
    """v truncated to its leading ``bits`` significant bits (exact in fp32, and so is v − result in fp64)."""
    if v == 0.0:
        return 0.0
    m, e = math.frexp(v)  # v = m · 2^e, 0.5 <= |m| < 1
    return math.ldexp(math.floor(m * 2.0**bits), e - bits)


def rope_turn_table(head_dim: int, theta: float, device) -> torch.Tensor:
    """[3, D/2] fp32: t0 + t1 + t2 = θ^(−2i/D) / 2π (turns per position), t0 and t1 holding 12 significant bits
    each so that products with 12-bit position pieces are exact. Cached per (D, θ, device)."""
    key = (head_dim, float(theta), str(device))
    table = _FREQ_CACHE.get(key)
    if table is None:
        rows = ([], [], [])
        for i in range(0, head_dim, 2):
            f = float(theta) ** (-i / head_dim) / TWO_PI
            t0 = _split_bits(f, 12)
            t1 = _split_bits(f - t0, 12)
            rows[0].append(t0)
            rows[1].append(t1)
            rows[2].append(f - t0 - t1)
        table = torch.tensor(rows, dtype=torch.float64).to(dtype=torch.float32, device=device)
        _FREQ_CACHE[key] = table
    return table


def _config(n_tokens: int, hq: int, hkv: int, half: int, tune: Optional[dict] = None):
    """(BLOCK_T, BLOCK_HQ, BLOCK_HKV, BLOCK_HALF, num_warps): all heads of a token in one tile where they fit;
    tokens are stacked to reach ~4K q elements per program on the GPU (~64K under the interpreter)."""
    block_half = triton.next_power_of_2(max(half, 1))
    cap = 64 if not interpreting() else 256
    block_hq = min(triton.next_power_of_2(hq), max(1, cap * 32 // block_half))
    block_hkv = min(triton.next_power_of_2(hkv), block_hq)
    target = 65536 if interpreting() else 4096
    per_token = 2 * block_hq * block_half
    block_t = max(1, min(triton.next_power_of_2(max(n_tokens, 1)), target // per_token))
    num_warps = 4 if block_t * per_token <= 4096 else 8
    if tune:
        block_t = tune.get("block_t", block_t)
        num_warps = tune.get("num_warps", num_warps)
    return block_t, block_hq, block_hkv, block_half, num_warps


def _prep(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, position_ids, theta, backward: bool, tune: Optional[dict] = None):
    q, k = _prep(q), _prep(k)
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_tokens = B * T
    if n_tokens == 0 or D == 0:
        return qo, ko
    half = D // 2
    table = rope_turn_table(D, theta, q.device)
    bt, bhq, bhkv, bhalf, nw = _config(n_tokens, HQ, HKV, half, tune)
    _rope_kernel[(triton.cdiv(n_tokens, bt),)](
        q, k, position_ids, table, qo, ko, n_tokens, T, HQ, HKV, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        position_ids.stride(0), position_ids.stride(1),
        BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HKV=bhkv, BLOCK_HALF=bhalf, BACKWARD=backward, num_warps=nw,
    )
    return qo, ko


def rope_fwd(q, k, position_ids, theta: float, tune: Optional[dict] = None):
    """q [B, T, Hq, D], k [B, T, Hkv, D], position_ids [B, T] int -> (q_rot, k_rot), contiguous."""
    return _launch(q, k, position_ids, theta, backward=False, tune=tune)


def rope_bwd(dq, dk, position_ids, theta: float, tune: Optional[dict] = None):
    """Gradients of the rotated q, k -> gradients of q, k (the inverse rotation)."""
    return _launch(dq, dk, position_ids, theta, backward=True, tune=tune)


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------
def _apply_rope_impl(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                     theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    record_path("apply_rope", kernel_path(q))
    return rope_fwd(q, k, position_ids, theta)


_apply_rope_op = torch.library.custom_op("mllm::apply_rope", _apply_rope_impl, mutates_args=())


@_apply_rope_op.register_fake
def _(q, k, position_ids, theta):
    patch_inductor_operator_str()
    warm_rope_table(rope_turn_table, q.shape[-1], theta, q.device)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _apply_rope_backward_impl(dq: torch.Tensor, dk: torch.Tensor, position_ids: torch.Tensor,
                              theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return rope_bwd(dq, dk, position_ids, theta)


_apply_rope_backward_op = torch.library.custom_op("mllm::apply_rope_backward", _apply_rope_backward_impl,
                                                  mutates_args=())


@_apply_rope_backward_op.register_fake
def _(dq, dk, position_ids, theta):
    patch_inductor_operator_str()
    return (torch.empty_like(dq, memory_format=torch.contiguous_format),
            torch.empty_like(dk, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, position_ids, theta = inputs
    ctx.save_for_backward(position_ids)  # the rotation is linear: q and k themselves are not needed
    ctx.theta = theta
    ctx.q_meta = (q.shape, q.dtype, q.device)
    ctx.k_meta = (k.shape, k.dtype, k.device)


def _backward(bwd):
    def backward(ctx, dq, dk):
        (position_ids,) = ctx.saved_tensors
        if dq is None:
            dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=ctx.q_meta[2])
        if dk is None:
            dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=ctx.k_meta[2])
        gq, gk = bwd(dq.contiguous(), dk.contiguous(), position_ids, ctx.theta)
        return gq, gk, None, None
    return backward


# the registered backward calls the backward *op*, so that AOT tracing sees an opaque call, not a Triton launch
_apply_rope_op.register_autograd(_backward(_apply_rope_backward_op), setup_context=_setup_context)
_ApplyRopeFunction = eager_function("apply_rope", _apply_rope_impl, _setup_context,
                                    _backward(_apply_rope_backward_impl))


# ----------------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------------
def _validate(q, k, position_ids, theta) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("position_ids", position_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    check_same_device(q=q, k=k, position_ids=position_ids)
    check_same_dtype(q=q, k=k)
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}: "
                         f"k must be [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}]")
    if D % 2:
        raise ValueError(f"q's head dim D={D} must be even for the half-split rotary layout")
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} but q is [B, T, Hq, D] with "
                         f"[B, T] = [{B}, {T}]: they must match")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"theta must be a positive float, got {theta!r}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
               theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q: [B, T, Hq, D] and k: [B, T, Hkv, D] (same dtype) at position_ids: [B, T] (int32/int64)
    -> (q_rot, k_rot) in the inputs' dtype. Differentiable in q and k.

    Dispatch: CUDA -> compiled kernel, CPU with TRITON_INTERPRET=1 -> the kernel under the interpreter, CPU
    otherwise -> ``reference.apply_rope`` (``last_path("apply_rope")`` tells which ran)."""
    _validate(q, k, position_ids, theta)
    if kernel_path(q) == "eager":  # the kernel paths are recorded by the op's implementation, where they run
        record_path("apply_rope", "eager")
        return reference.apply_rope(q, k, position_ids, theta)
    return call_op(_apply_rope_op, _ApplyRopeFunction, q, k, position_ids, float(theta))


class RotaryEmbedding(torch.nn.Module):
    """Parameter-free RoPE: ``forward(q, k, position_ids)`` -> (q_rot, k_rot); position_ids default to
    arange(T) per row."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2 or head_dim < 2:
            raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        if q.dim() == 4 and q.shape[-1] != self.head_dim:
            raise ValueError(f"q's head dim is {q.shape[-1]} but this RotaryEmbedding has head_dim={self.head_dim}")
        if position_ids is None:
            B, T = q.shape[:2]
            position_ids = torch.arange(T, device=q.device)[None].expand(B, T)
        return apply_rope(q, k, position_ids, self.theta)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
