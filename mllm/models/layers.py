"""Small building blocks of the decoder: RMSNorm (plain and fused with the residual add), the SwiGLU MLP,
and the weight-initialisation helpers.

Each module holds ``self.ops`` (a ``mllm.models.ops.KernelOps``) and calls only those functions for the
element-wise maths, so ``kernel_backend`` switches every norm and activation at once.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .ops import KernelOps
from .weight_cache import cached_linear


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x², -1) + eps) · w, with w: [d] initialised to ones.

    ``forward(x)`` -> y: [..., d].
    ``forward(x, residual)`` is the pre-norm residual step: h = x + residual; returns (rms_norm(h), h), one
    fused kernel on the triton backend. h has residual's dtype, so under autocast (bf16 branch outputs, fp32
    embeddings) the residual stream stays in fp32, as it does in an unfused ``h = h + f(h)``; y is emitted in the
    autocast dtype (bf16) when autocast is on.
    """

    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        # Under autocast the output goes straight to the autocast dtype: every consumer is an autocast linear,
        # which would cast it anyway (same rounding of the same fp32 value), so this saves one cast kernel per
        # consumer (5 per layer) and their fp32 gradient sums in the backward.
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps, out_dtype)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps, out_dtype)


class SwiGLUMLP(nn.Module):
    """FFN(x) = W_down · (silu(W_gate · x) ⊙ (W_up · x)); x: [..., d] -> [..., d], hidden width ffn_dim.

    Three bias-free matrices (gate, up: [F, d]; down: [d, F]) as in Llama. ``down_proj`` writes into the
    residual stream, so it gets the scaled initialisation (see ``init_weights``).
    """

    def __init__(self, d_model: int, ffn_dim: int, ops: KernelOps):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=False)
        self.down_proj.is_residual_proj = True
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cached_linear(self.ops.swiglu(cached_linear(x, self.gate_proj), cached_linear(x, self.up_proj)),
                             self.down_proj)


def residual_init_std(init_std: float, n_layers: int) -> float:
    """GPT-2's scaled init for projections that add into the residual stream: std / sqrt(2 · n_layers)
    (two such additions per layer), which keeps the residual variance O(1) at init regardless of depth."""
    return init_std / math.sqrt(2 * n_layers)


def init_weights(module: nn.Module, init_std: float, n_layers: int) -> None:
    """Initialise one module in place (use with ``model.apply``):

    Linear / Embedding weights ~ N(0, init_std²), except Linears flagged ``is_residual_proj`` (attention
    output, MLP down) ~ N(0, residual_init_std²); biases and learned sinks 0; norm weights 1.
    """
    if isinstance(module, nn.Linear):
        std = residual_init_std(init_std, n_layers) if getattr(module, "is_residual_proj", False) else init_std
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=init_std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
