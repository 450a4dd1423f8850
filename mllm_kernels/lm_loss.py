"""Fused LM head + cross-entropy for training (the pretraining/SFT loss), gradient taken in the forward.

    loss = Σ_{i: y_i ≠ ignore} ( logsumexp_{v < V}(z_iv) − z_{i, y_i} ),    z = h Wᵀ

hidden h: [..., d] (M rows), weight W: [V_rows, d] (the tied head; a table padded to V_rows ≥ V rows for aligned
GEMMs, whose extra rows never enter the softmax), labels y: [...] int -> scalar fp32 (the sum: callers divide by
their own token count). ``reference.linear_cross_entropy`` is the specification.

Forward, in chunks of C rows (C · V_rows logits at a time; never the [M, V] fp32 logits and their softmax):

1. z = h_c Wᵀ on cuBLAS (fp32 accumulation, stored in the input dtype: the rounding an autocast linear does);
2. ``_ce_rows_kernel``, one program per row: pass 1 runs a per-lane max/sum over the row in BLOCK_V tiles
   (logsumexp in fp32) and picks the label's logit -> loss_i; pass 2, when a gradient is wanted, overwrites z in
   place with dz = softmax(z) − onehot(y) (0 on ignored rows and on padding columns v ≥ V);
3. dh_c = dz W and dW (+)= dzᵀ h_c on cuBLAS.

Because the loss is a scalar, its gradient can be taken in the forward and only scaled by the upstream gradient
in the backward (Liger-Kernel's fused linear cross-entropy does the same). That is three GEMMs of 2·M·d·V_rows
FLOPs in all, all on cuBLAS; ``dpo_logprobs``, whose per-sequence outputs get different upstream gradients,
must recompute z in its backward (four). Memory between forward and backward: dh [M, d] and dW [V_rows, d].

Layers: ``_ce_rows_kernel`` (``@triton.jit``) -> ``lce_forward`` (launcher, chunk loop) -> ``mllm::linear_cross_entropy``
(torch.library op with fake and autograd) -> ``linear_cross_entropy`` (functional API with validation and dispatch).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._cast import to_out
from ._common import (call_op, check_same_device, check_tensor, eager_function, interpreting, kernel_path,
                      patch_inductor_operator_str, record_path)

IGNORE_INDEX = reference.IGNORE_INDEX
# default size of the chunk's logits buffer: one chunk for a micro-batch of 8 x 1,024 tokens at V = 50,304 in bf16
CHUNK_BUDGET_BYTES = 1 << 30


@triton.jit
def _ce_rows_kernel(Z, Y, LOSS, V, V_ROWS, stride_z, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row i of the chunk: LOSS[i] = lse_i − z_{i,y_i} (0 if ignored); with WRITE_GRAD, z_i := softmax − onehot."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    y = tl.load(Y + row)
    valid = (y != ignore_index) & (y >= 0) & (y < V)
    offs = tl.arange(0, BLOCK_V)
    # per-lane running max / sum from −inf, with a 0 stand-in while a lane has seen only −inf (no (−inf) − (−inf)).
    # A finite floor such as −1e30 would be wrong for rows whose logits all lie below it (fp32 reaches −3.4e38):
    # every exp underflowed to 0, lse = −inf and the gradient exp(z − lse) = inf
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    lse = m_row_safe + tl.log(tl.sum(s * tl.exp(m - m_row_safe), axis=0))
    z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_y, 0.0))
    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for v0 in range(0, V_ROWS, BLOCK_V):
            cols = v0 + offs
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            dz = (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)) * keep
            tl.store(z_row + cols, to_out(dz, Z.dtype.element_ty), mask=cols < V_ROWS)


def _block_v(v_rows: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps): 4K-column tiles on the GPU (8 warps: 16 fp32 values per thread); under the
    interpreter one tile per row where it fits, since each loop step costs a Python round trip."""
    if interpreting():
        return min(triton.next_power_of_2(max(v_rows, 1)), 32768), 4
    return 4096, 8


def _chunk_rows(M: int, v_rows: int, elem: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    return max(1, min(M, budget_bytes // max(1, v_rows * elem)))


def lce_forward(h2: torch.Tensor, w: torch.Tensor, y1: torch.Tensor, vocab_size: int, ignore_index: int,
                need_grad: bool, chunk_rows: Optional[int] = None):
    """h2 [M, d], w [V_rows, d] (same dtype), y1 [M] int64 -> (loss_sum [] fp32, dh [M, d], dW [V_rows, d]) with
    dh, dW the gradients of loss_sum (empty [0] tensors when ``need_grad`` is False)."""
    M, D = h2.shape
    VR = w.shape[0]
    loss_rows = torch.empty(M, device=h2.device, dtype=torch.float32)
    dh = torch.empty_like(h2) if need_grad else h2.new_empty(0)
    if M == 0:
        return loss_rows.sum(), dh, (torch.zeros_like(w) if need_grad else w.new_empty(0))
    C = chunk_rows or _chunk_rows(M, VR, h2.element_size())
    z = torch.empty(min(C, M), VR, device=h2.device, dtype=h2.dtype)
    block_v, num_warps = _block_v(VR)
    wt = w.t()
    dw = dw_acc = None
    for r0 in range(0, M, C):
        r1 = min(M, r0 + C)
        zc, hc = z[: r1 - r0], h2[r0:r1]
        torch.mm(hc, wt, out=zc)
        _ce_rows_kernel[(r1 - r0,)](zc, y1[r0:r1], loss_rows[r0:r1], vocab_size, VR, zc.stride(0), ignore_index,
                                    WRITE_GRAD=need_grad, BLOCK_V=block_v, num_warps=num_warps)
        if need_grad:
            torch.mm(zc, w, out=dh[r0:r1])
            # a plain matmul, which an enclosing autocast would run in bf16 for fp32 inputs (the GEMMs above write
            # into preallocated outputs, which autocast leaves alone): every output keeps the inputs' dtype
            with torch.autocast(h2.device.type, enabled=False):
                part = zc.t() @ hc  # [V_rows, d]
            if r1 - r0 == M:
                dw = part
            elif dw_acc is None:
                dw_acc = part.float()
            else:
                dw_acc += part
    if need_grad and dw is None:
        dw = dw_acc.to(w.dtype)
    return loss_rows.sum(), dh, (dw if need_grad else w.new_empty(0))


# ----------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------
def _lce_impl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, ignore_index: int,
              need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [M, d], weight [V_rows, d], labels [M] int64 -> (loss_sum, dh, dW); arguments validated upstream."""
    if kernel_path(hidden) == "eager":
        raise RuntimeError(f"mllm::linear_cross_entropy runs a Triton kernel: hidden is on {hidden.device}, which "
                           "needs CUDA (or TRITON_INTERPRET=1 for CPU); use mllm_kernels.lm_loss.linear_cross_entropy, "
                           "which takes the eager reference there")
    record_path("linear_cross_entropy", kernel_path(hidden))
    return lce_forward(hidden.contiguous(), weight.contiguous(), labels.contiguous(), vocab_size, ignore_index,
                       need_grad)


_lce_op = torch.library.custom_op("mllm::linear_cross_entropy", _lce_impl, mutates_args=())


@_lce_op.register_fake
def _(hidden, weight, labels, vocab_size, ignore_index, need_grad):
    patch_inductor_operator_str()
    loss = hidden.new_empty((), dtype=torch.float32)
    if need_grad:
        # contiguous whatever the inputs' strides: the implementation makes its inputs contiguous first
        return (loss, torch.empty_like(hidden, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format))
    return loss, hidden.new_empty(0), weight.new_empty(0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.need_grad = inputs[5]
    # dh and dW are outputs only to be saved here: without this, every backward would first fill two
    # zero tensors of their size (the whole [V, d] table) as their unused incoming gradients
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, _g_dh, _g_dw):
    if g_loss is None:  # only dh / dW were used downstream, and they are not differentiated through
        return None, None, None, None, None, None
    if not ctx.need_grad:
        raise RuntimeError("mllm::linear_cross_entropy was called with need_grad=False, so it has no gradient to give")
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: dh and dW were computed in the forward as constants, so a second derivative through
        # them would silently miss the Hessian term
        raise RuntimeError("mllm::linear_cross_entropy does not support double backward (create_graph=True): its "
                           "gradients are computed in the forward; use the eager reference for higher derivatives")
    dh, dw = ctx.saved_tensors
    return dh * g_loss, dw * g_loss, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup_context)
_LinearCrossEntropyFunction = eager_function("linear_cross_entropy", _lce_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------------
def _validate(hidden, weight, labels, vocab_size, ignore_index) -> int:
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., d], got a scalar")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}: they must match")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight is [V, d] = {tuple(weight.shape)} but hidden's last dim is {hidden.shape[-1]}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    V = weight.shape[0] if vocab_size is None else vocab_size
    if not isinstance(V, int) or not 0 < V <= weight.shape[0]:
        raise ValueError(f"vocab_size must be an int in [1, {weight.shape[0]}] (the weight's rows), got {vocab_size!r}")
    if not isinstance(ignore_index, int) or 0 <= ignore_index < V:
        raise ValueError(f"ignore_index must be an int outside [0, {V}), got {ignore_index!r}")
    return V


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         vocab_size: Optional[int] = None, ignore_index: int = IGNORE_INDEX,
                         check_labels: bool = True) -> torch.Tensor:
    """Σ over non-ignored rows of the cross-entropy of softmax(h Wᵀ)[:V] at the label -> scalar fp32.

    hidden [..., d] and weight [V_rows, d] of one dtype, labels [...] int (ignore_index rows count 0),
    vocab_size V ≤ V_rows (default V_rows). Differentiable in hidden and weight (the gradient is computed in the
    forward when either requires grad). Labels outside [0, V) other than ``ignore_index`` raise ValueError; the
    check costs a host sync, so it is skipped with ``check_labels=False`` and inside a ``torch.compile`` graph,
    where the caller guarantees the range (an out-of-range label's loss is then undefined: currently 0).
    Dispatch: CUDA -> cuBLAS + Triton, CPU with TRITON_INTERPRET=1 -> the same under the interpreter, CPU
    otherwise -> ``reference.linear_cross_entropy``."""
    V = _validate(hidden, weight, labels, vocab_size, ignore_index)
    if check_labels and labels.numel() and not torch.compiler.is_compiling():  # a host sync: not in a traced graph
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels hold ids outside [0, {V}) other than ignore_index={ignore_index}")
    if kernel_path(hidden) == "eager":
        record_path("linear_cross_entropy", "eager")
        return reference.linear_cross_entropy(hidden, weight, labels, V, ignore_index)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])  # not reshape(-1, d): d may be 0
    return call_op(_lce_op, _LinearCrossEntropyFunction, h2, weight, labels.reshape(-1).to(torch.int64), V,
                   ignore_index, need_grad)[0]


class LinearCrossEntropy(torch.nn.Module):
    """Module form: ``forward(hidden, weight, labels)`` -> summed loss (see ``linear_cross_entropy``)."""

    def __init__(self, vocab_size: Optional[int] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.vocab_size, self.ignore_index = vocab_size, ignore_index

    def forward(self, hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, self.vocab_size, self.ignore_index)
