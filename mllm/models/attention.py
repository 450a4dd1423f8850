"""Grouped-query causal self-attention with RoPE, packed documents and the two attention-sink knobs.

Semantics (the spec is ``mllm_kernels.reference.attention`` / ``attention_mask``; summarised here):

* s_ij = <rope(q_i, p_i), rope(k_j, p_j)> / sqrt(D), with explicit positions p = ``position_ids`` (RoPE
  restarts at 0 in every packed document).
* Query i may attend key j iff j is in i's document (``cu_seqlens``), j ≤ i, and — when ``window`` is set —
  i − j < window or j is one of the first ``n_sink_tokens`` tokens of the document (StreamingLLM).
  Without a window, ``n_sink_tokens`` changes nothing (every earlier token is visible anyway).
* With ``learned_sinks`` each head h has a learned logit σ_h that joins the softmax as one extra column
  without a value (gpt-oss):  P_ij = exp(s_ij) / (exp(σ_h) + Σ_j' exp(s_ij')),  out_i = Σ_j P_ij v_j.
  So a head can put mass on "nothing" instead of being forced to attend somewhere.
* GQA: query head h reads kv head h // (n_heads / n_kv_heads).

Paths (all compute the same function; tests check each against the reference):

* triton backend: ``mllm_kernels.attention.attention`` (RoPE fused in; with ``model.rope_in_attention=False``
  the separate RoPE kernel rotates q, k first and the attention kernel runs with ``rope_theta=None``).
* eager backend: ``reference.attention``; when there are no sinks, no window and no packed documents it is
  plain causal attention, so reference RoPE + ``F.scaled_dot_product_attention(is_causal=True)`` is used
  instead (same maths, without materialising the [B, H, T, T] scores).
* incremental decoding with a ``KVCache`` (any backend): queries are fewer than keys, which the full-sequence
  ops do not cover. The mask rows come from ``reference.attention_mask`` over the whole cached sequence, the
  sink is one extra key with a zero vector and zero value whose logit is added as a bias (so its score is
  exactly σ_h), and ``F.scaled_dot_product_attention`` does the softmax in fp32.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm_kernels import reference

from .ops import KernelOps
from .weight_cache import cached_linear


class KVCache:
    """Rotated keys and values of every layer for incremental decoding, plus the attention mask.

    k, v: [n_layers, B, max_len, n_kv_heads, D] (keys stored *after* RoPE, so a cached key never needs its
    position again). ``allowed``: [B, max_len, max_len] bool, ``reference.attention_mask`` of the whole
    sequence given each token's document start ``doc_start`` [B, max_len] — the same mask a full recompute
    uses, so windows, sink tokens and left padding (a padding "document" before each prompt) behave
    identically. ``length``: how many positions are filled (the same for every row; rows are left-padded).
    The full cache is kept (masking, not eviction, enforces the window): exact, at O(max_len) memory.
    """

    def __init__(self, n_layers: int, doc_start: torch.Tensor, n_kv_heads: int, head_dim: int,
                 window: Optional[int], n_sink_tokens: int, dtype: torch.dtype):
        if doc_start.dim() != 2:
            raise ValueError(f"doc_start must be [B, max_len], got shape {tuple(doc_start.shape)}")
        B, max_len = doc_start.shape
        dev = doc_start.device
        self.k = torch.zeros(n_layers, B, max_len, n_kv_heads, head_dim, device=dev, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.allowed = reference.attention_mask(doc_start, causal=True, window=window, n_sink_tokens=n_sink_tokens)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v: [B, Tn, Hkv, D] at [length, length + Tn) of ``layer``; return that layer's keys and
        values so far, [B, length + Tn, Hkv, D] each. ``advance`` moves ``length`` once all layers ran."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def mask_rows(self, n_new: int) -> torch.Tensor:
        """allowed[b, i, j] for the n_new query positions being added: [B, n_new, length + n_new]."""
        end = self.length + n_new
        return self.allowed[:, self.length:end, :end]

    def advance(self, n_new: int) -> None:
        self.length += n_new


def sdpa_causal_attention(q, k, v, position_ids, rope_theta: float, apply_rope) -> torch.Tensor:
    """Plain causal GQA attention: RoPE via ``apply_rope``, then fused SDPA.

    q: [B, T, Hq, D], k, v: [B, T, Hkv, D], position_ids: [B, T] -> out [B, T, Hq, D]. Equal to
    ``reference.attention`` with no cu_seqlens, window or sinks (softmax scale 1/sqrt(D) in both).
    """
    q, k = apply_rope(q, k, position_ids, rope_theta)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


def masked_attention(q, k, v, allowed: torch.Tensor, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of already-rotated queries over already-rotated keys with an explicit mask.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D]; allowed: [B, Tq, Tk] bool (every row needs a True or a sink);
    sinks: [Hq] learned logits or None. out_i = Σ_j P_ij v_j with
    P_ij = [allowed_ij] exp(s_ij) / (exp(σ_h) + Σ_j' [allowed_ij'] exp(s_ij')), s_ij = <q_i, k_j> / sqrt(D).
    Maths in fp32 (as in the reference); returns q.dtype.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    bias = torch.zeros(allowed.shape, device=q.device, dtype=torch.float32)
    bias = bias.masked_fill(~allowed, float("-inf"))[:, None]  # [B, 1, Tq, Tk]
    if sinks is not None:
        # the sink is a key whose score is exactly σ_h: zero vector (q·0 = 0) plus bias σ_h, zero value
        zeros = kt.new_zeros(B, Hkv, 1, D)
        kt, vt = torch.cat([kt, zeros], dim=2), torch.cat([vt, zeros], dim=2)
        sink_col = sinks.float().view(1, Hq, 1, 1).expand(B, Hq, Tq, 1)
        bias = torch.cat([bias.expand(B, Hq, Tq, bias.shape[-1]), sink_col], dim=-1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2).to(q.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention block: x [B, T, d] -> [B, T, d].

    q = x W_q: [B, T, Hq, D], k = x W_k, v = x W_v: [B, T, Hkv, D] (bias-free); out = attn(q, k, v) W_o.
    ``sinks`` ([Hq], initialised to 0, i.e. the sink starts like one extra key of score 0) exists only when
    ``cfg.learned_sinks``. ``o_proj`` writes into the residual stream (scaled init).
    """

    def __init__(self, cfg, ops: KernelOps):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.window = cfg.window
        self.n_sink_tokens = cfg.n_sink_tokens
        self.rope_in_attention = cfg.rope_in_attention
        self.fused_qkv = cfg.fused_qkv
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.o_proj.is_residual_proj = True
        if cfg.learned_sinks:
            self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        else:
            self.register_parameter("sinks", None)
        self.ops = ops

    def project_qkv(self, x: torch.Tensor):
        """x [B, T, d] -> q [B, T, Hq, D], k, v [B, T, Hkv, D]. With ``fused_qkv`` one GEMM over the concatenated
        weights (the same products; q, k, v are then strided views of its output, which every attention path
        reads through its strides)."""
        B, T, _ = x.shape
        D = self.head_dim
        if self.fused_qkv:
            cache = getattr(self, "qkv_wcache", None)  # model.weight_cache: the cast concatenation, kept per step
            w = cache.weight() if cache is not None else \
                torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            q, k, v = F.linear(x, w).split([self.n_heads * D, self.n_kv_heads * D, self.n_kv_heads * D], dim=-1)
        else:
            q, k, v = (cached_linear(x, m) for m in (self.q_proj, self.k_proj, self.v_proj))
        return q.view(B, T, self.n_heads, D), k.view(B, T, self.n_kv_heads, D), v.view(B, T, self.n_kv_heads, D)

    def uses_sdpa_fast_path(self, cu_seqlens: Optional[torch.Tensor]) -> bool:
        """True when the eager path may use SDPA(is_causal): no learned sinks, no window, one document per row."""
        return self.ops.backend == "eager" and self.sinks is None and self.window is None and cu_seqlens is None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        layer_idx: int = 0,
        probs_out: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x: [B, T, d], position_ids: [B, T]. With ``cache``, x holds only the new tokens (their mask rows come
        from the cache). With ``probs_out`` (a list), the reference's probabilities [B, Hq, T, T] fp32 are
        appended to it (debug/visualisation; always the eager reference, whatever the backend)."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        if cache is not None:
            q, k = self.ops.apply_rope(q, k, position_ids, self.rope_theta)
            k_all, v_all = cache.update(layer_idx, k, v)
            out = masked_attention(q, k_all, v_all, cache.mask_rows(T), self.sinks)
        elif probs_out is not None:
            out, probs = reference.attention(
                q, k, v, position_ids, causal=True, cu_seqlens=cu_seqlens, window=self.window,
                n_sink_tokens=self.n_sink_tokens, sinks=self.sinks, rope_theta=self.rope_theta, return_probs=True,
            )
            probs_out.append(probs)
        elif self.uses_sdpa_fast_path(cu_seqlens):
            out = sdpa_causal_attention(q, k, v, position_ids, self.rope_theta, self.ops.apply_rope)
        else:
            theta = self.rope_theta
            if not self.rope_in_attention:  # rotate once here; the attention kernel then runs without RoPE
                q, k = self.ops.apply_rope(q, k, position_ids, theta)
                theta = None
            out = self.ops.attention(
                q, k, v, position_ids, causal=True, cu_seqlens=cu_seqlens, window=self.window,
                n_sink_tokens=self.n_sink_tokens, sinks=self.sinks, rope_theta=theta,
            )
        return cached_linear(out.reshape(B, T, self.n_heads * self.head_dim), self.o_proj)
