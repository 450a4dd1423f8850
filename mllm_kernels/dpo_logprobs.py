"""Per-sequence label log-probabilities through the (tied) LM head, without materialising [N, T, V] logits.

    logp[n] = Σ_t [y_nt ≠ ignore] ( h_nt · w_{y_nt} − logsumexp_v(h_nt · w_v) )

hidden h: [N, T, d] (final-norm outputs), weight W: [V, d], labels y: [N, T] (aligned with h) -> logp: [N] fp32.
This is the quantity DPO needs four times (policy/reference × chosen/rejected); ``dpo_loss`` turns it into the loss.

Forward (``_dpo_logprobs_fwd_kernel``): a matmul tile z = h·Wᵀ [BLOCK_M, BLOCK_V] with an fp32 accumulator, folded
straight into an online logsumexp (FlashAttention-style running max / sum) and a gather of the label's logit; the
vocabulary is split over a second grid axis (``n_split`` partial (max, sum, target) triples, combined on the host),
so the only memory beyond the inputs is O(N·T·n_split) floats.

Backward: the log-prob's own derivative is ∂logp_n/∂z_ntv = [y_nt ≠ ignore] (1[v = y_nt] − softmax(z_nt)_v) (zero
for every v at an ignored label), so with upstream gradients g [N] the logit gradient is dz_ntv = g_n · ∂logp_n/∂z_ntv.
Rows are processed in chunks of C tokens: ``_dpo_logprobs_bwd_kernel`` recomputes z for the chunk (fp32 accumulation)
and writes dz [C, V] in the input dtype (rounded to nearest even); then dh = dz·W and dW += dzᵀ·h run on cuBLAS
(or the CPU BLAS). Peak extra memory is C·V elements instead of
the N·T·V fp32 logits (+ their log-softmax and gradient) of the eager path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (
    call_op,
    check_same_device,
    check_tensor,
    dot_dtype_for,
    eager_function,
    interpreting,
    kernel_path,
    patch_inductor_operator_str,
    record_path,
)

IGNORE_INDEX = reference.IGNORE_INDEX


@triton.jit
def _z_tile(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, D, stride_hm, stride_wv,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """z = h[offs_m]·W[offs_v]ᵀ: [BLOCK_M, BLOCK_V] fp32, accumulated over d in BLOCK_K steps; masked rows and
    columns (and d ≥ D) load as 0, so their z is 0. Inlined into both kernels."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :],
                    mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _dpo_logprobs_fwd_kernel(
    h_ptr, w_ptr, y_ptr, m_out_ptr, s_out_ptr, tgt_out_ptr,
    M, V, D, v_per_split,
    stride_hm, stride_wv,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    tgt = tl.zeros([BLOCK_M], tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        acc = _z_tile(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, D, stride_hm, stride_wv,
                      BLOCK_M, BLOCK_V, BLOCK_K, DOT_DTYPE, DOT_PREC)
        z = tl.where(mask_v[None, :], acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        # a split with no valid column keeps m = -inf; guard the rescale against (-inf) - (-inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
        m_i = m_new
        tgt += tl.sum(tl.where(offs_v[None, :] == y[:, None], acc, 0.0), 1)
    out = pid_s * M + offs_m
    tl.store(m_out_ptr + out, m_i, mask=mask_m)
    tl.store(s_out_ptr + out, s_i, mask=mask_m)
    tl.store(tgt_out_ptr + out, tgt, mask=mask_m)


@triton.jit
def _dpo_logprobs_bwd_kernel(
    h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr,
    M, V, V_PAD, D,
    stride_hm, stride_wv, stride_dzm,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    acc = _z_tile(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, D, stride_hm, stride_wv,
                  BLOCK_M, BLOCK_V, BLOCK_K, DOT_DTYPE, DOT_PREC)
    y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)  # per-token upstream grad; 0 on ignored labels
    p = tl.exp(acc - lse[:, None])
    dz = g[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - p)
    dz = tl.where(mask_v[None, :], dz, 0.0)  # the padding columns V..V_PAD hold zeros
    tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_v[None, :], to_out(dz, dz_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_v < V_PAD)[None, :])


# GPU launch configs (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) per kernel and operand width; fp32
# operands take a shorter K step to stay within shared memory. ``benchmarks/bench_dpo.py --sweep`` times the
# alternatives through the ``tune`` argument of the launchers (results in benchmarks/NOTES.md).
_GPU_CONFIGS = {
    ("fwd", 2): dict(BLOCK_M=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),  # H200: 456 vs 397 TFLOP/s
    ("fwd", 4): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, num_warps=4, num_stages=3),
    ("bwd", 2): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=4, num_stages=3),
    ("bwd", 4): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, num_warps=4, num_stages=3),
}
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=1)


def _dot_args(dtype: torch.dtype) -> dict:
    # fp32 inputs get true fp32 products: Triton's default for fp32 dots on the GPU is tf32 (~1e-3 relative),
    # while the eager reference's fp32 matmul is full precision
    dot = dot_dtype_for(dtype)
    return dict(DOT_DTYPE=dot, DOT_PREC="ieee" if dot == tl.float32 else "tf32")


def _config(kind: str, dtype: torch.dtype, tune: Optional[dict] = None) -> dict:
    """Launch parameters of kernel ``kind`` ('fwd' | 'bwd'); ``tune`` overrides any of them (benchmark sweeps)."""
    if interpreting():
        cfg = dict(_INTERPRETER_CONFIG)
    else:
        cfg = dict(_GPU_CONFIGS[(kind, 4 if dtype == torch.float32 else 2)])
    if tune:
        unknown = set(tune) - set(cfg)
        if unknown:
            raise ValueError(f"dpo_logprobs: unknown tune keys {sorted(unknown)}; valid: {sorted(cfg)}")
        cfg.update(tune)
    return cfg


def _fwd_launch(h2: torch.Tensor, w: torch.Tensor, y1: torch.Tensor, tune: Optional[dict] = None):
    """h2 [M, d], w [V, d], y1 [M] int64 -> (token_logp [M] fp32, lse [M] fp32)."""
    M, D = h2.shape
    V = w.shape[0]
    if M == 0:  # no tokens: nothing to launch (a grid with a zero axis)
        empty = torch.empty(0, device=h2.device, dtype=torch.float32)
        return empty, empty.clone()
    cfg = _config("fwd", h2.dtype, tune)
    BM, BV = cfg["BLOCK_M"], cfg["BLOCK_V"]
    n_m = triton.cdiv(M, BM)
    if h2.is_cuda:
        sms = torch.cuda.get_device_properties(h2.device).multi_processor_count
        n_split = max(1, min(triton.cdiv(V, BV), triton.cdiv(2 * sms, n_m)))
    else:
        n_split = max(1, min(triton.cdiv(V, BV), 2))
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), BV) * BV
    n_split = triton.cdiv(V, v_per_split)
    part = torch.empty(3, n_split, M, device=h2.device, dtype=torch.float32)
    _dpo_logprobs_fwd_kernel[(n_m, n_split)](
        h2, w, y1, part[0], part[1], part[2], M, V, D, v_per_split, h2.stride(0), w.stride(0),
        **_dot_args(h2.dtype), **cfg,
    )
    m, s, tgt = part[0], part[1], part[2]
    m_all = m.max(0).values
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(0))
    tgt = tgt.sum(0)  # the label's logit lies in exactly one split; the others contributed 0
    valid = y1 != IGNORE_INDEX
    return torch.where(valid, tgt - lse, torch.zeros_like(lse)), lse


def _chunk_rows(M: int, V: int, elem: int, budget_bytes: int = 256 * 2**20) -> int:
    return max(16, min(M, budget_bytes // max(1, V * elem)))


def _bwd_launch(h2, w, y1, lse, g_tok, tune: Optional[dict] = None):
    """dh [M, d] (h dtype), dW [V, d] (w dtype) for per-token upstream grads g_tok [M] fp32.

    The vocabulary axis of dz and W is zero-padded to a multiple of 64: with V = 50,257 the row
    stride of dz would be odd, which rules out cuBLAS's aligned tensor-core kernels for both matmuls."""
    M, D = h2.shape
    V = w.shape[0]
    if M == 0:  # no tokens, no gradient (and the chunk loop below would step by C = M = 0)
        return torch.empty_like(h2), torch.zeros_like(w)
    cfg = _config("bwd", h2.dtype, tune)
    BM, BV = cfg["BLOCK_M"], cfg["BLOCK_V"]
    VP = triton.cdiv(V, 64) * 64
    C = M if interpreting() else _chunk_rows(M, VP, h2.element_size())
    w_p = w if VP == V else torch.nn.functional.pad(w, (0, 0, 0, VP - V))
    dh = torch.empty_like(h2)
    dw = torch.zeros(VP, D, device=w.device, dtype=torch.float32)
    dz = torch.empty(min(C, M), VP, device=h2.device, dtype=h2.dtype)
    for r0 in range(0, M, C):
        r1 = min(M, r0 + C)
        n = r1 - r0
        dzc = dz[:n]
        _dpo_logprobs_bwd_kernel[(triton.cdiv(n, BM), triton.cdiv(VP, BV))](
            h2[r0:r1], w, y1[r0:r1], lse[r0:r1], g_tok[r0:r1], dzc, n, V, VP, D,
            h2.stride(0), w.stride(0), dzc.stride(0),
            **_dot_args(h2.dtype), **cfg,
        )
        dh[r0:r1] = dzc @ w_p
        dw += (dzc.t() @ h2[r0:r1]).float()
    return dh, dw[:V].to(w.dtype)


# ----------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------
def _sequence_logprobs_impl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel_path(hidden) == "eager":  # the raw op is kernel-only; the functional API falls back to eager
        raise RuntimeError(f"mllm::sequence_logprobs runs Triton kernels: hidden is on {hidden.device}, which needs "
                           "CUDA (or TRITON_INTERPRET=1 for CPU); use mllm_kernels.dpo_logprobs.sequence_logprobs, "
                           "which takes the eager reference there")
    record_path("sequence_logprobs", kernel_path(hidden))
    N, T, D = hidden.shape
    h2 = hidden.reshape(N * T, D).contiguous()
    y1 = labels.reshape(N * T).to(torch.int64).contiguous()
    if ignore_index != IGNORE_INDEX:
        y1 = torch.where(y1 == ignore_index, torch.full_like(y1, IGNORE_INDEX), y1)
    tok, lse = _fwd_launch(h2, weight.contiguous(), y1)
    return tok.view(N, T).sum(1), lse.view(N, T)


_sequence_logprobs_op = torch.library.custom_op("mllm::sequence_logprobs", _sequence_logprobs_impl, mutates_args=())


@_sequence_logprobs_op.register_fake
def _(hidden, weight, labels, ignore_index):
    patch_inductor_operator_str()
    N, T, _ = hidden.shape
    return hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N, T, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.ignore_index = ignore_index
    ctx.set_materialize_grads(False)  # the lse output is for the backward; its gradient is never used


def _sequence_logprobs_bwd_impl(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                labels: torch.Tensor, lse: torch.Tensor,
                                ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, T, D = hidden.shape
    y1 = labels.reshape(N * T).to(torch.int64)
    valid = y1 != ignore_index
    y1 = torch.where(valid, y1, torch.full_like(y1, -1))
    g_tok = (grad_logp.float()[:, None].expand(N, T).reshape(N * T) * valid).contiguous()
    dh, dw = _bwd_launch(hidden.reshape(N * T, D).contiguous(), weight.contiguous(), y1.contiguous(),
                         lse.reshape(N * T).contiguous(), g_tok)
    return dh.view(N, T, D), dw


_sequence_logprobs_bwd_op = torch.library.custom_op("mllm::sequence_logprobs_bwd", _sequence_logprobs_bwd_impl,
                                                    mutates_args=())


@_sequence_logprobs_bwd_op.register_fake
def _(grad_logp, hidden, weight, labels, lse, ignore_index):
    patch_inductor_operator_str()
    # contiguous whatever the inputs' strides: the implementation makes its inputs contiguous first
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _backward(bwd):
    def backward(ctx, grad_logp, grad_lse):
        if grad_logp is None:  # only lse was used downstream, and it is not differentiated through
            return None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        dh, dw = bwd(grad_logp.contiguous(), hidden, weight, labels, lse, ctx.ignore_index)
        return dh, dw, None, None
    return backward


# the registered backward calls the backward *op*, so that AOT tracing sees an opaque call, not a Triton launch
_sequence_logprobs_op.register_autograd(_backward(_sequence_logprobs_bwd_op), setup_context=_setup_context)
_SequenceLogprobsFunction = eager_function("sequence_logprobs", _sequence_logprobs_impl, _setup_context,
                                           _backward(_sequence_logprobs_bwd_impl))


# ----------------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------------
def _validate(hidden, weight, labels):
    check_tensor("hidden", hidden, ndim=3)
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, ndim=2, dtypes=(torch.int64, torch.int32))
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}: they must match")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight is [V, d] = {tuple(weight.shape)} but hidden's last dim is {hidden.shape[2]}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's [N, T] = {tuple(hidden.shape[:2])}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight is [V, d] = {tuple(weight.shape)}: the vocabulary is empty")


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, check_labels: bool = True) -> torch.Tensor:
    """Chunked, fused version of ``reference.sequence_logprobs``: [N, T, d], [V, d], [N, T] -> [N] fp32.

    Labels outside [0, V) other than ``ignore_index`` raise ValueError. The check costs a host sync, so it is
    skipped with ``check_labels=False`` and inside a ``torch.compile`` graph (where a sync would break the graph);
    there the caller guarantees the range, and an out-of-range label's log-prob is undefined (currently −lse)."""
    _validate(hidden, weight, labels)
    if check_labels and labels.numel() and not torch.compiler.is_compiling():  # a host sync: not in a traced graph
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels hold ids outside [0, {weight.shape[0]}) other than ignore_index={ignore_index}")
    if kernel_path(hidden) == "eager":
        record_path("sequence_logprobs", "eager")
        return reference.sequence_logprobs(hidden, weight, labels, ignore_index)
    return call_op(_sequence_logprobs_op, _SequenceLogprobsFunction, hidden, weight, labels, ignore_index)[0]


def _validate_dpo(**logps):
    for name, t in logps.items():
        check_tensor(name, t, ndim=1, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    check_same_device(**logps)
    (n0, t0), *rest = logps.items()
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {n0} has {tuple(t0.shape)}: the four log-prob "
                             "vectors must be [N] each")
    if t0.numel() == 0:
        raise ValueError("the log-prob vectors are empty (N = 0): the DPO loss needs at least one pair")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Sigmoid DPO loss from the four [N] log-prob vectors (see ``reference.dpo_loss``; tiny, so eager).

    The four inputs must be floating 1-D tensors of one shape [N], N ≥ 1, on one device, and ``beta`` a finite
    number: an [N, 1] input (a ``keepdim=True`` sum) would otherwise broadcast into an [N, N] loss without error."""
    _validate_dpo(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                  ref_rejected=ref_rejected)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    return reference.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


class SequenceLogprobs(torch.nn.Module):
    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, hidden, weight, labels, ignore_index: Optional[int] = None):
        return sequence_logprobs(hidden, weight, labels, self.ignore_index if ignore_index is None else ignore_index)
