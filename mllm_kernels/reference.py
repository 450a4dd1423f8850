"""Eager PyTorch definitions of every op in ``mllm_kernels``.

This module is *the* specification: the Triton kernels are tested against these functions, and the
model's ``kernel_backend="eager"`` path calls them directly (there is no second copy anywhere).

All statistics are computed in fp32 for fp32/fp16/bf16 inputs, and results are cast back to the input
dtype at the end, which is what the kernels do too. fp64 inputs are computed in fp64 throughout (the compute dtype
is ``torch.promote_types(dtype, torch.float32)``, see ``compute_dtype``): the tests evaluate these same functions on
fp64 copies of their inputs as the accuracy oracle, which an fp32 upcast would silently turn into an fp32 oracle.
For fp32/fp16/bf16 inputs that is exactly ``.float()``, so the model's eager path is unchanged. Shapes use
``B`` batch, ``T`` sequence length, ``H``/``Hq``/``Hkv`` heads, ``D`` head dim, ``N`` rows, ``V`` vocab.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: fp32 for 16-bit and fp32 inputs, fp64 when any input is fp64."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x · rsqrt(mean(x², -1) + eps) · w.

    x: [..., C], weight: [C] -> y: [..., C] in out_dtype (default x.dtype). Statistics and the product are
    computed in ``compute_dtype(x.dtype)`` (fp32; fp64 for fp64 x) and rounded once to the output dtype.
    """
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(ct)).to(out_dtype or x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm block entry: h = x + residual; returns (rms_norm(h, w, eps, out_dtype), h).

    x, residual: [..., C], weight: [C]. x may have another dtype than residual (a bf16 branch output added
    into an fp32 stream under autocast). The new residual h is rounded to residual.dtype *before* it is
    normalised, so the normed output is exactly rms_norm(new_residual) — the same thing a model that stores the
    residual stream in residual.dtype computes. y: out_dtype (default residual.dtype).
    """
    ct = compute_dtype(x.dtype, residual.dtype)
    h = (x.to(ct) + residual.to(ct)).to(residual.dtype)
    return rms_norm(h, weight, eps, out_dtype), h


# ----------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """out = silu(gate) · up = gate · sigmoid(gate) · up, in fp32 (fp64 for fp64 inputs), cast to gate.dtype.
    Shapes [..., F]."""
    ct = compute_dtype(gate.dtype, up.dtype)
    g = gate.to(ct)
    return (g * torch.sigmoid(g) * up.to(ct)).to(gate.dtype)


# ----------------------------------------------------------------------------------------------------
# RoPE (half-split / GPT-NeoX / Llama-HF layout)
# ----------------------------------------------------------------------------------------------------
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32):
    """cos, sin of angle[b, t, i] = position_ids[b, t] · theta^(-2i / D), i in [0, D/2).

    position_ids: [B, T] integer -> cos, sin: [B, T, D/2] in ``dtype`` (fp32; fp64 for an fp64 evaluation).
    The angle is formed in fp64: its absolute error |angle| · 2^-53 stays below 2^-29 rad for positions < 2^24.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float64) / head_dim)
    ang = position_ids.to(torch.float64)[..., None] * inv_freq  # float64 so large positions stay exact
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, T, H, D] by cos/sin: [B, T, D/2]; halves x1 = x[..., :D/2], x2 = x[..., D/2:]:
    out = [x1·cos − x2·sin, x2·cos + x1·sin] (fp32 maths, fp64 for fp64 x; cast to x.dtype)."""
    d2 = x.shape[-1] // 2
    xf = x.to(compute_dtype(x.dtype))
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q: [B, T, Hq, D] and k: [B, T, Hkv, D] at position_ids: [B, T].

    Positions are explicit so packed documents restart at 0. Returns (q_rot, k_rot) in the inputs' dtypes.
    """
    cos, sin = rope_cos_sin(position_ids, q.shape[-1], theta, compute_dtype(q.dtype, k.dtype))
    return rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)


# ----------------------------------------------------------------------------------------------------
# Attention: RoPE + causal + GQA + packed documents + sliding window with sink tokens + learned sinks
# ----------------------------------------------------------------------------------------------------
def doc_start_from_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, seqlen: int, device) -> torch.Tensor:
    """Index (within its row) of the first token of each token's document: [B, T] int32.

    ``cu_seqlens`` are FlashAttention-varlen style cumulative document lengths over the row-major flattened
    B·T tokens: int32/int64, 1-D, starting at 0, ending at B·T, strictly increasing, and containing every
    row start (b·T) so that no document crosses a row. Trailing repeats of B·T (padding to a fixed length) hold
    no tokens: ``searchsorted(right=True)`` maps every token to the last bound at or before it, so they change
    nothing. None means one document per row.
    """
    if cu_seqlens is None:
        return torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    total = batch * seqlen
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    idx = torch.arange(total, device=device)
    doc = torch.searchsorted(cu, idx, right=True) - 1  # document index of each flat token
    start_flat = cu[doc]
    return (start_flat - (idx // seqlen) * seqlen).view(batch, seqlen).to(torch.int32)


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> None:
    """Raise ValueError unless ``cu_seqlens`` is valid for ``batch`` rows of ``seqlen`` tokens (see
    ``doc_start_from_cu_seqlens``). Reads the values: on a GPU that is a device-to-host sync (callers skip it while
    torch.compile traces). The checks run in NumPy on a host copy: it runs once per packed micro-batch on the host
    side of the training loop (``cu_seqlens_to_device``), where ~15 torch op dispatches took 0.15-0.4 ms on a 2-core
    CPU (0.45-0.9 ms padded to B*T + 1 values) against tens of µs."""
    B, T = batch, seqlen
    cu = cu_seqlens.detach().cpu().numpy().astype(np.int64, copy=False)
    if cu.size < 2:
        raise ValueError(f"cu_seqlens must hold at least [0, B*T] = [0, {B * T}], got {cu.size} value(s)")
    total = B * T
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at B*T = {B}*{T} = {total}, got {int(cu[-1])}")
    # a bound may repeat only once the end B·T is reached: the trailing padding that gives cu_seqlens a fixed length
    # (one CUDA graph for every batch); an empty document anywhere else is a data bug
    prev, nxt = cu[:-1], cu[1:]
    if not bool(np.all((nxt > prev) | ((nxt == prev) & (prev == total)))):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents; only trailing padding may "
                         f"repeat the end B*T = {total})")
    rows = np.arange(B + 1, dtype=np.int64) * T
    # cu is non-decreasing here, so membership is a binary search
    at = np.minimum(np.searchsorted(cu, rows), cu.size - 1)
    ok = cu[at] == rows
    if not bool(ok.all()):
        missing = rows[~ok].tolist()
        raise ValueError(f"cu_seqlens must contain every row start b*T (documents cannot cross rows); missing {missing}")


def attention_mask(
    doc_start: torch.Tensor,
    causal: bool = True,
    window: Optional[int] = None,
    n_sink_tokens: int = 0,
) -> torch.Tensor:
    """Boolean mask [B, T(q), T(k)], True where query i may attend key j.

    allowed(i, j) = j ≥ start(i)                                  (same document; documents are contiguous)
                  ∧ (not causal ∨ j ≤ i)
                  ∧ (window is None ∨ i − j < window ∨ j − start(i) < n_sink_tokens)
    i.e. with a window each query sees the last ``window`` positions (itself included) plus the first
    ``n_sink_tokens`` positions of its own document (StreamingLLM). Without ``causal`` the document's later
    tokens are visible too (j < start of the next document).
    """
    B, T = doc_start.shape
    dev = doc_start.device
    i = torch.arange(T, device=dev)[:, None]
    j = torch.arange(T, device=dev)[None, :]
    start = doc_start.long()[:, :, None]  # [B, T, 1]
    allowed = j[None] >= start
    if causal:
        allowed = allowed & (j <= i)[None]
    else:
        # the key must belong to the query's document: its own document start equals the query's
        allowed = allowed & (doc_start.long()[:, None, :] == start)
    if window is not None:
        allowed = allowed & (((i - j) < window)[None] | ((j[None] - start) < n_sink_tokens))
    return allowed


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
    """Reference attention, the definition the fused kernel must match.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq % Hkv == 0 (GQA: query head h reads kv head h // (Hq/Hkv));
    position_ids: [B, T] (default arange(T) per row); cu_seqlens: see ``doc_start_from_cu_seqlens``;
    sinks: [Hq] learned per-head logits (gpt-oss): one extra softmax column with no value, so
        P_ij = exp(s_ij − m) / (exp(sink_h − m) + Σ_j' exp(s_ij' − m)),  out_i = Σ_j P_ij v_j,
    where s_ij = scale · <rope(q_i), rope(k_j)> over allowed keys (``attention_mask``).
    rope_theta=None disables RoPE. softmax_scale defaults to 1/sqrt(D).

    Returns out [B, T, Hq, D] (q.dtype); with return_lse also lse [B, Hq, T] fp32
    (lse_i = log(exp(sink_h) + Σ_j exp(s_ij)), the sink included); with return_probs also
    probs [B, Hq, T, T] fp32 (the sink's column dropped, so rows sum to 1 − P_sink).
    Maths in fp32 (fp64, and fp64 lse/probs, for fp64 inputs); a query with no allowed key and no sink
    (impossible with causal masks) gives 0.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if position_ids is None:
        position_ids = torch.arange(T, device=q.device)[None].expand(B, T)
    if rope_theta is not None:
        q, k = apply_rope(q, k, position_ids, rope_theta)
    ct = compute_dtype(q.dtype, k.dtype, v.dtype)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    group = Hq // Hkv
    kf = kf.repeat_interleave(group, dim=2)
    vf = vf.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale  # [B, H, T, T]
    doc_start = doc_start_from_cu_seqlens(cu_seqlens, B, T, q.device)
    allowed = attention_mask(doc_start, causal, window, n_sink_tokens)[:, None]  # [B, 1, T, T]
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(ct).view(1, Hq, 1, 1).expand(B, Hq, T, 1)
        s_all = torch.cat([s, sink_col], dim=-1)
    else:
        s_all = s
    lse = torch.logsumexp(s_all, dim=-1)  # [B, H, T]
    # a row with no allowed key and no sink has lse = -inf: 0 in its place keeps p = exp(-inf) = 0, not NaN
    safe_lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe_lse[..., None])  # masked entries: exp(-inf) = 0
    out = torch.einsum("bhij,bjhd->bihd", p, vf).to(q.dtype)
    res = (out,)
    if return_lse:
        res = res + (lse,)
    if return_probs:
        res = res + (p,)
    return res[0] if len(res) == 1 else res


# ----------------------------------------------------------------------------------------------------
# DPO: per-sequence label log-probs through the tied LM head, and the sigmoid DPO loss
# ----------------------------------------------------------------------------------------------------
def sequence_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Summed log-probability of the labels per sequence.

    hidden: [N, T, d] (final-norm outputs), weight: [V, d] (LM head), labels: [N, T] int64 aligned with
    hidden (labels[n, t] is the token predicted *at* position t; ``ignore_index`` positions are skipped).
    logp[n] = Σ_t [labels ≠ ignore] (h_nt · w_y − logsumexp_v(h_nt · w_v)), maths in fp32 -> [N] fp32
    (fp64 maths and result for fp64 inputs). Materialises the [N, T, V] logits: this is what the chunked kernel
    avoids.
    """
    ct = compute_dtype(hidden.dtype, weight.dtype)
    logits = hidden.to(ct) @ weight.to(ct).t()
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    tok = logits.gather(-1, safe[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (tok * mask).sum(-1)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed next-token cross-entropy through the LM head:

        loss = Σ_{i: y_i ≠ ignore} ( logsumexp_{v < V}(h_i · w_v) − h_i · w_{y_i} )

    hidden: [..., d], weight: [V_rows, d] (a padded table may have more rows than the vocabulary), labels: [...]
    int, vocab_size V ≤ V_rows (default V_rows: rows ≥ V never enter the softmax). Logits are h·Wᵀ in the
    inputs' dtype (as an autocast linear computes them), the softmax in fp32 (fp64 for fp64 inputs) -> scalar
    fp32 (the sum, not the mean: the caller divides by its own count).
    """
    V = weight.shape[0] if vocab_size is None else vocab_size
    rows = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])  # not reshape(-1, d): d may be 0
    logits = (rows @ weight[:V].t()).to(compute_dtype(hidden.dtype))
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1).long(), ignore_index=ignore_index,
                                             reduction="sum")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
):
    """Sigmoid DPO (Rafailov et al. 2023) from four [N] log-prob vectors.

    r_c = β (π_c − ref_c), r_r = β (π_r − ref_r); loss = mean(−logsigmoid(r_c − r_r)).
    Returns (loss scalar, rewards_chosen [N], rewards_rejected [N]) — rewards detached; fp32 (fp64 when an input
    is fp64).
    """
    ct = compute_dtype(policy_chosen.dtype, policy_rejected.dtype, ref_chosen.dtype, ref_rejected.dtype)
    rc = beta * (policy_chosen.to(ct) - ref_chosen.to(ct))
    rr = beta * (policy_rejected.to(ct) - ref_rejected.to(ct))
    loss = -F.logsigmoid(rc - rr).mean()
    return loss, rc.detach(), rr.detach()
