"""Rotary position embedding (half-split / GPT-NeoX / Llama-HF layout) of q and k, forward and backward.

For x: [B, T, H, D] with halves x1 = x[..., :D/2], x2 = x[..., D/2:] and, per token, angle_i = pos · θ^(−2i/D)
(i < D/2, pos = position_ids[b, t]):
    forward   out = [x1·cos − x2·sin,  x2·cos + x1·sin]
    backward  dx  = [d1·cos + d2·sin,  d2·cos − d1·sin]          (the inverse rotation: sin -> −sin)
q: [B, T, Hq, D] and k: [B, T, Hkv, D] may have different head counts (GQA); both are rotated by the same angles
in one launch, one program per BLOCK_T tokens. Positions are explicit, so packed documents restart at 0.

cos/sin are computed in the kernel (no [B, T, D/2] table is read from memory). A naive fp32 angle pos·inv_freq has
an absolute error ~|angle|·2⁻²⁴, 1e-4 rad at position 2,048, which is well above fp32 rounding. Instead the
angle is formed in *turns* (angle / 2π) in 64-bit fixed point: on the host, F_i = round(2⁶⁴ · θ^(−2i/D) / 2π) (an
int64, computed exactly from the fp64 inverse frequency the reference uses); in the kernel the int64 product
pos · F_i wraps modulo 2⁶⁴, which drops exactly the whole turns, and read as a signed number it is the angle's
fraction of a turn in [−½, ½) scaled by 2⁶⁴. Its top 32 bits go to fp32 and are scaled by 2π. Error: |pos| · 2⁻⁶⁵
turns from the rounding of F (≤ 2e-7 rad for |pos| < 2⁴⁰), 2⁻³² turns from the dropped bits, and the fp32
roundings of the angle (≤ 3 · 2⁻²⁴ relative, i.e. ≤ 6e-7 rad near ±π): below 1e-6 rad for every |pos| <
2⁴⁰ = ``MAX_POSITION`` (about 1.1e12; every int32 position is far inside), positive or negative. One integer
multiply per (token, frequency), shared by all heads. Beyond ``MAX_POSITION`` the first term grows linearly, so
those positions are refused: ``apply_rope`` raises ValueError when it can see them without a
device-to-host sync (int64 positions on the CPU; int32 positions cannot exceed it), and the kernel writes NaN
for such tokens (CUDA int64 positions, or the launchers called directly) rather than a wrong rotation.
Maths in fp32; outputs have the inputs' dtypes. Inputs may be strided views (unit stride along D), e.g. q and k
sliced from a fused qkv projection: they are read in place.

Layers: ``_rope_kernel`` (``@triton.jit``, forward and backward through a constexpr) → ``rope_fwd`` / ``rope_bwd``
→ ``torch.ops.mllm.apply_rope`` (+ ``mllm::apply_rope_backward``, ``register_fake``, ``register_autograd``) →
``apply_rope`` (functional API: dispatch + validation) → ``RotaryEmbedding`` (nn.Module).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (call_op, check_same_device, check_same_dtype, check_tensor, eager_function, interpreting,
                      kernel_path, patch_inductor_operator_str, record_path, warm_rope_table)

# |position| must stay below this for the kernel's angle error bound (module docstring); 2^40 = 1,099,511,627,776
MAX_POSITION = 1 << 40
# π to 50 digits, so that the host's turn rates are exact to far below their 2^-64 quantum
_PI = Fraction("3.14159265358979323846264338327950288419716939937510")


# ----------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_cos_sin(POS, FREQ, tok, tok_mask, stride_pb, stride_pt, T, HALF, BLOCK_HALF: tl.constexpr,
                  MAX_POS: tl.constexpr):
    """cos, sin [BLOCK_T, BLOCK_HALF] fp32 for the tokens ``tok`` (flat b·T + t), from the fixed-point turn rates;
    NaN for positions with |pos| >= MAX_POS (see the module docstring)."""
    b = tok // T
    t = tok % T
    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tok_mask, other=0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    rate = tl.load(FREQ + i, mask=i < HALF, other=0)
    # two's-complement int64 multiplication wraps modulo 2^64 (Triton sanitizes overflow only below 64 bits): the
    # whole turns fall off the top, and the signed result is the fraction of a turn in [-1/2, 1/2) times 2^64
    frac = pos[:, None] * rate[None, :]
    # the top 32 bits as fp32 (rounded to 24 significant bits, so finer near 0, where sin is most sensitive)
    turns = (frac >> 32).to(tl.int32).to(tl.float32) * 2.3283064365386963e-10
    angle = turns * 6.283185307179586
    # the error bound fails beyond MAX_POS: NaN makes such a token visible downstream instead of silently wrong
    outside = (pos >= MAX_POS) | (pos <= -MAX_POS)
    angle = tl.where(outside[:, None], float("nan"), angle)
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
    BACKWARD: tl.constexpr, MAX_POS: tl.constexpr = MAX_POSITION,
):
    """Rotates q and k of BLOCK_T tokens by the same angles (inverse rotation when BACKWARD)."""
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tok_mask = tok < n_tokens
    cos, sin = _rope_cos_sin(POS, FREQ, tok, tok_mask, stride_pb, stride_pt, T, HALF, BLOCK_HALF, MAX_POS)
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


def rope_turn_table(head_dim: int, theta: float, device) -> torch.Tensor:
    """[D/2] int64: F_i = round(2^64 · inv_freq_i / 2π), turns per position in 64-bit fixed point, with inv_freq the
    fp64 θ^(−2i/D) of ``reference.rope_cos_sin`` (the same expression, so both rotate by the same angles); exact
    rational arithmetic, so |F_i − 2^64 · inv_freq_i / 2π| <= 1/2. For θ >= 1 every F_i < 2^62 (inv_freq <= 1);
    a larger one (θ < 1) is stored modulo 2^64 as a signed int64, which changes no product modulo 2^64. Cached per
    (D, θ, device)."""
    key = (head_dim, float(theta), str(device))
    table = _FREQ_CACHE.get(key)
    if table is None:
        inv = float(theta) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        rates = [(round(Fraction(f) / (2 * _PI) * 2**64) + 2**63) % 2**64 - 2**63 for f in inv.tolist()]
        table = torch.tensor(rates, dtype=torch.int64).to(device)
        _FREQ_CACHE[key] = table
    return table


def _config(n_tokens: int, hq: int, hkv: int, half: int, tune: Optional[dict] = None):
    """(BLOCK_T, BLOCK_HQ, BLOCK_HKV, BLOCK_HALF, num_warps): all heads of a token in one tile where they fit;
    tokens are stacked to reach ~4K q elements per program on the GPU (~64K under the interpreter)."""
    block_half = triton.next_power_of_2(max(half, 1))
    cap = 64 if not interpreting() else 256
    # max(.., 1): one tensor may have no heads (its head loop then runs zero times), and a zero block would
    # divide by zero below and make that loop's step 0
    block_hq = min(triton.next_power_of_2(max(hq, 1)), max(1, cap * 32 // block_half))
    block_hkv = min(triton.next_power_of_2(max(hkv, 1)), block_hq)
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
    if n_tokens == 0 or D == 0 or HQ + HKV == 0:
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
    _check_position_range(position_ids)


def _check_position_range(position_ids: torch.Tensor) -> None:
    """ValueError for |position| >= MAX_POSITION, where that costs no device-to-host sync.

    int32 positions cannot reach 2^40, so they are never read. int64 positions on the CPU are read (one pass
    over [B, T], next to a kernel that reads [B, T, H, D]). CUDA positions are not: reading them here would stall
    the host on the GPU on every call, so the kernel itself writes NaN for such tokens. Skipped while
    torch.compile traces (the values are not known then; the kernel's NaN still applies)."""
    if (position_ids.dtype != torch.int64 or position_ids.device.type != "cpu" or not position_ids.numel()
            or torch.compiler.is_compiling()):
        return
    outside = (position_ids >= MAX_POSITION) | (position_ids <= -MAX_POSITION)
    if bool(outside.any()):
        bad = int(position_ids[outside][0])
        raise ValueError(f"position_ids hold {bad}, outside the supported range |position| < 2**40 = {MAX_POSITION} "
                         "(beyond it the kernel's angle error bound no longer holds)")


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
               theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q: [B, T, Hq, D] and k: [B, T, Hkv, D] (same dtype) at position_ids: [B, T] (int32/int64)
    -> (q_rot, k_rot) in the inputs' dtype. Differentiable in q and k.

    Positions must satisfy |p| < ``MAX_POSITION`` = 2^40: int64 CPU positions beyond it raise ValueError; CUDA
    positions are not read back (no sync), and the kernel gives NaN for those tokens instead.

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
