"""Decoder-only Transformer (Llama-style): token embedding -> L × [pre-norm GQA attention, pre-norm SwiGLU]
-> final RMSNorm -> LM head tied to the embedding.

    model = Transformer(cfg.model)
    logits = model(input_ids)                                   # [B, T, V]
    logits = model(input_ids, position_ids, cu_seqlens)         # packed documents
    loss = causal_lm_loss(logits, labels)                       # labels aligned to positions

Residual stream (per layer l, with x_0 = embedding):
    h = x + attn(rms_norm(x));  x' = h + mlp(rms_norm(h))
written with ``fused_add_rms_norm`` (add the previous branch output into the residual and normalise in one
op), so the triton backend runs one kernel per add+norm: the "residual" variable carries the stream and the
"x" variable carries the pending branch output. The stream keeps the embedding's dtype: fp32 under autocast by
default, bf16 with ``model.residual_dtype="autocast"`` (``Transformer._embed``).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm_kernels import reference

from .attention import Attention, KVCache
from .layers import RMSNorm, SwiGLUMLP, init_weights
from .ops import BACKENDS, KernelOps, get_ops
from .weight_cache import WeightCache


def _check_model_config(cfg) -> None:
    """The structural constraints the model needs; errors name the config key (``ConfigError``)."""
    from mllm.config import ConfigError
    from mllm.config.pipeline_config import RESIDUAL_DTYPES

    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                "vocab_pad_multiple"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key 'model.{key}': must be positive, got {getattr(cfg, key)}")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"config key 'model.d_model': d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"config key 'model.n_heads': n_heads={cfg.n_heads} is not divisible by "
                          f"n_kv_heads={cfg.n_kv_heads}")
    if (cfg.d_model // cfg.n_heads) % 2:
        raise ConfigError(f"config key 'model.d_model': head_dim={cfg.d_model // cfg.n_heads} must be even for RoPE")
    if cfg.window is not None and cfg.window <= 0:
        raise ConfigError(f"config key 'model.window': must be positive or None, got {cfg.window}")
    if cfg.n_sink_tokens < 0:
        raise ConfigError(f"config key 'model.n_sink_tokens': must be >= 0, got {cfg.n_sink_tokens}")
    if cfg.kernel_backend not in BACKENDS:
        raise ConfigError(f"config key 'model.kernel_backend': must be one of {BACKENDS}, got {cfg.kernel_backend!r}")
    if not isinstance(cfg.weight_cache, bool):
        raise ConfigError(f"config key 'model.weight_cache': must be true or false, got {cfg.weight_cache!r}")
    if cfg.residual_dtype not in RESIDUAL_DTYPES:
        raise ConfigError(f"config key 'model.residual_dtype': must be one of {RESIDUAL_DTYPES}, "
                          f"got {cfg.residual_dtype!r}")


class Block(nn.Module):
    """One pre-norm layer. ``forward(x, residual, ...)`` -> (branch output, residual stream), see module doc."""

    def __init__(self, cfg, ops: KernelOps):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.attn = Attention(cfg, ops)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.mlp = SwiGLUMLP(cfg.d_model, cfg.ffn_dim, ops)

    def forward(self, x, residual, position_ids, cu_seqlens=None, cache=None, layer_idx=0, probs_out=None):
        if residual is None:  # first layer: x is the embedding, nothing pending to add
            residual, h = x, self.attn_norm(x)
        else:
            h, residual = self.attn_norm(x, residual)
        a = self.attn(h, position_ids, cu_seqlens, cache, layer_idx, probs_out)
        h, residual = self.mlp_norm(a, residual)
        return self.mlp(h), residual


def _sync_after_load(module, _incompatible_keys) -> None:
    module.sync_weight_cache()


class Transformer(nn.Module):
    """Decoder-only LM over ``ModelConfig`` (``mllm.config.ModelConfig``).

    Parameters: tok_emb [V, d]; per layer attn_norm [d], q_proj [Hq·D, d], k_proj/v_proj [Hkv·D, d],
    o_proj [d, Hq·D], (sinks [Hq]), mlp_norm [d], gate_proj/up_proj [F, d], down_proj [d, F]; final norm [d];
    lm_head [V, d] only when ``tie_embeddings`` is False (else the head is tok_emb.weight).
    Init: N(0, init_std²), residual-writing projections N(0, (init_std/√(2L))²) (GPT-2), norms 1, sinks 0.
    Building it under ``torch.device("meta")`` allocates nothing (used to count gpu-full's parameters).
    """

    def __init__(self, cfg):
        super().__init__()
        _check_model_config(cfg)
        self.cfg = dataclasses.replace(cfg)  # own copy: set_kernel_backend must not mutate the caller's config
        ops = get_ops(cfg.kernel_backend)
        # the tables hold padded_vocab rows (vocab_size rounded up to vocab_pad_multiple) so that the head GEMM's
        # output width is aligned for tensor cores; rows >= vocab_size are never an input, and their logits are
        # cut off before any softmax, so every output has exactly vocab_size entries
        self.padded_vocab = -(-cfg.vocab_size // cfg.vocab_pad_multiple) * cfg.vocab_pad_multiple
        self.tok_emb = nn.Embedding(self.padded_vocab, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, ops) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, self.padded_vocab, bias=False)
        self.ops = ops
        self.apply(partial(init_weights, init_std=cfg.init_std, n_layers=cfg.n_layers))
        self._head_wcache: Optional[WeightCache] = None
        if cfg.weight_cache:
            self._install_weight_caches()

    def _install_weight_caches(self) -> None:
        """``model.weight_cache``: one cached low-precision copy per GEMM weight (mllm/models/weight_cache.py);
        the q/k/v weights of ``fused_qkv`` share one (their concatenation), the head reads the (tied) table's."""
        for layer in self.layers:
            attn = layer.attn
            if attn.fused_qkv:
                attn.qkv_wcache = WeightCache([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            else:
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                    lin.wcache = WeightCache([lin.weight])
            for lin in (attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.wcache = WeightCache([lin.weight])
        self._head_wcache = WeightCache([self._head_table])
        # made now, in the project's autocast dtype: a forward compiled before any sync must already find them
        # (a graph traced without a copy keeps the plain path); another autocast dtype is picked up by
        # sync_weight_cache() and by eager forwards
        for c in self.weight_caches():
            c.refresh(torch.bfloat16)
        # loaded weights reach a compiled forward's copies without a sync call (eager forwards check by themselves)
        self.register_load_state_dict_post_hook(_sync_after_load)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half(): the copies follow the parameters to their new device (same copy dtype)
        out = super()._apply(fn, recurse)
        for c in self.weight_caches():
            c.refresh(force=True)
        return out

    def weight_caches(self) -> List[WeightCache]:
        """The model's ``model.weight_cache`` copies (empty when the option is off)."""
        return [c for m in self.modules() for c in (getattr(m, "wcache", None), getattr(m, "qkv_wcache", None),
                                                    getattr(m, "_head_wcache", None)) if c is not None]

    def sync_weight_cache(self, dtype: Optional[torch.dtype] = None, force: bool = False) -> int:
        """Recast the stale ``model.weight_cache`` copies (all with ``force``) to ``dtype`` (default: the autocast
        dtype when autocast is on for the model's device, else the copies' own). Call it before a compiled forward
        after changing weights other than by ``optimizer.step()`` / ``load_state_dict`` (the Trainer and bench_train
        call it before every step); eager forwards check by themselves. Returns the number of copies recast."""
        dev = self.device.type
        if dtype is None and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        return sum(c.refresh(dtype, force) for c in self.weight_caches())

    # ------------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------------
    def set_kernel_backend(self, backend: str) -> None:
        """Switch every norm / SwiGLU / RoPE / attention call to ``backend`` ("eager" | "triton")."""
        ops = get_ops(backend)
        for m in self.modules():
            if hasattr(m, "ops"):
                m.ops = ops
        self.cfg.kernel_backend = backend

    @property
    def _head_table(self) -> torch.Tensor:
        """The whole (possibly padded) output table [padded_vocab, d]."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def _head_weight(self) -> torch.Tensor:
        """The head table for a GEMM: its cached low-precision copy under ``model.weight_cache``."""
        return self._head_wcache.weight() if self._head_wcache is not None else self._head_table

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection [V, d] (V = cfg.vocab_size; a view of the first V rows when the table is
        padded): logits = hidden @ lm_head_weight.T."""
        w = self._head_table
        return w if self.padded_vocab == self.cfg.vocab_size else w[: self.cfg.vocab_size]

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] for hidden states [..., d]. With a padded table the GEMM runs over all padded_vocab
        rows (aligned width: a 50,304-token vocabulary made the eager training step 21% faster than 50,257 on
        an H100, benchmarks/NOTES.md; this sliced variant is not yet measured) and the padding columns are
        sliced off."""
        logits = F.linear(h, self._head_weight())
        return logits if self.padded_vocab == self.cfg.vocab_size else logits[..., : self.cfg.vocab_size]

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once). ``exclude_embeddings`` drops the token
        embedding table — with tied weights that is also the LM head; an untied head is kept."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), nanoGPT/PaLM convention:
        6·N + 12·L·H·Q·T, N = parameters that take part in matmuls (everything but an untied input
        embedding; the tied head counts), L layers, H heads, Q head dim, T = seq_len. The attention term is
        dense causal without halving and ignores windows, as in PaLM's appendix B."""
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        c = self.cfg
        n = self.num_params(exclude_embeddings=True)
        if self.lm_head is not None:  # counted over its V real rows below, like the tied head, not its padded ones
            n -= self.lm_head.weight.numel()
        n += c.vocab_size * c.d_model  # the head's matmul
        return 6 * n + 12 * c.n_layers * c.n_heads * (c.d_model // c.n_heads) * seq_len

    # ------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, position_ids, cu_seqlens, cache=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has no tokens (T = 0)")
        total = T if cache is None else cache.length + T
        if total > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {total} exceeds model max_seq_len={self.cfg.max_seq_len}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.shape != input_ids.shape:
                got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
                raise ValueError(f"position_ids must have input_ids' shape {(B, T)}, got {got}")
            if position_ids.is_floating_point() or position_ids.device != input_ids.device:
                raise ValueError(f"position_ids must be an integer tensor on {input_ids.device}, "
                                 f"got {position_ids.dtype} on {position_ids.device}")
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens cannot be combined with a KV cache (documents are in the cache's mask)")
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
                raise ValueError("cu_seqlens must be a 1-D integer tensor of cumulative document lengths")
            if cu_seqlens.device != input_ids.device:
                raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {input_ids.device}")
        # value checks read the data; on CUDA that is a host sync per step, so they run on CPU only (and not
        # while torch.compile traces, where reading a value would break the graph)
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
                raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size}), got range "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            if cu_seqlens is not None:
                reference.check_cu_seqlens_values(cu_seqlens, B, T)

    @staticmethod
    def default_position_ids(input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T] positions: t − start(t) where start is the token's document start (0 without cu_seqlens)."""
        B, T = input_ids.shape
        t = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        if cu_seqlens is None:
            return t.contiguous()  # made once per forward; the kernels read [B, T] rows in place
        return t - reference.doc_start_from_cu_seqlens(cu_seqlens, B, T, input_ids.device).long()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [B, T, d]: the first residual. Its dtype is the stream's (see ``model.residual_dtype``):
        every fused add+norm keeps the residual's dtype, so one cast here moves the whole stream, and its
        gradient, to bf16 under a bf16 autocast."""
        x = self.tok_emb(input_ids)
        dev = x.device.type
        if self.cfg.residual_dtype == "autocast" and torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        return x

    def _run(self, input_ids, position_ids=None, cu_seqlens=None, cache=None, probs_out=None) -> torch.Tensor:
        self._check_inputs(input_ids, position_ids, cu_seqlens, cache)
        if position_ids is None:
            if cache is not None:
                raise ValueError("position_ids are required with a KV cache")
            position_ids = self.default_position_ids(input_ids, cu_seqlens)
        x, residual = self._embed(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, position_ids, cu_seqlens, cache, i, probs_out)
        h, _ = self.norm(x, residual)
        return h

    def hidden_states(self, input_ids, position_ids=None, cu_seqlens=None) -> torch.Tensor:
        """Final-norm outputs [B, T, d] (what the LM head reads)."""
        return self._run(input_ids, position_ids, cu_seqlens)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, labels=None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. position_ids [B, T] default to positions within each document
        (so they restart at every ``cu_seqlens`` boundary); cu_seqlens: FlashAttention-varlen cumulative
        lengths over the flattened B·T tokens, containing every row start (see
        ``reference.doc_start_from_cu_seqlens``); tokens never attend across documents.

        With ``labels`` [B, T] (aligned: labels[b, t] is the token to predict at t, -100 = ignored) it returns the
        mean next-token cross-entropy instead (a scalar, as ``causal_lm_loss``; 0 when every label is ignored).
        Passing labels through ``forward`` keeps DDP's hooks and ``torch.compile`` on the loss path; with
        ``kernel_backend='triton'`` and ``fused_lm_loss`` the head and the loss run fused (``fused_lm_loss``)."""
        h = self.hidden_states(input_ids, position_ids, cu_seqlens)
        if labels is None:
            return self.head_logits(h)
        if self.cfg.kernel_backend == "triton" and self.cfg.fused_lm_loss:
            return fused_lm_loss(h, self._head_weight(), labels, vocab_size=self.cfg.vocab_size)
        return causal_lm_loss(self.head_logits(h), labels)

    @torch.no_grad()
    def attention_maps(self, input_ids, position_ids=None, cu_seqlens=None) -> List[torch.Tensor]:
        """Per-layer attention probabilities, a list of L tensors [B, Hq, T, T] fp32 (query × key), computed
        by the eager reference. Rows sum to 1, or to 1 − P(sink) with learned sinks."""
        probs: List[torch.Tensor] = []
        self._run(input_ids, position_ids, cu_seqlens, probs_out=probs)
        return probs

    # ------------------------------------------------------------------------------------------------
    # incremental decoding
    # ------------------------------------------------------------------------------------------------
    def new_kv_cache(self, doc_start: torch.Tensor) -> KVCache:
        """An empty cache for sequences of doc_start.shape[1] positions; doc_start [B, max_len] is each
        position's document start (left padding = a padding document [0, pad) before the prompt)."""
        c = self.cfg
        return KVCache(c.n_layers, doc_start.to(self.device), c.n_kv_heads, c.d_model // c.n_heads,
                       c.window, c.n_sink_tokens, self.tok_emb.weight.dtype)

    def forward_with_cache(self, input_ids, position_ids, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """Run the next Tn tokens of every row (input_ids, position_ids: [B, Tn]) at cache positions
        [cache.length, cache.length + Tn), store their keys/values, advance the cache.
        Returns logits [B, 1, V] for the last position (``last_only``) or [B, Tn, V]."""
        if input_ids.dim() == 2 and cache.k.shape[1] != input_ids.shape[0]:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]} but the cache was built for {cache.k.shape[1]}")
        h = self._run(input_ids, position_ids, cache=cache)
        cache.advance(input_ids.shape[1])
        if last_only:
            h = h[:, -1:]
        return self.head_logits(h)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = reference.IGNORE_INDEX,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy with labels aligned to positions (labels[b, t] = the token to predict at t,
    i.e. input_ids shifted left by the data pipeline; ``ignore_index`` entries skipped).

    logits [B, T, V] (any float dtype; the softmax runs in fp32), labels [B, T] int.
    reduction "mean": Σ_t CE / #non-ignored (0 when every label is ignored, instead of NaN);
    "sum": Σ_t CE (for token-weighted gradient accumulation).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (aligned to logits), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    V = logits.shape[-1]
    # upcast before flattening: with a padded head (sliced, non-contiguous logits) that is one copy, not two
    total = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1).long(), ignore_index=ignore_index,
                            reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = reference.IGNORE_INDEX, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy through the LM head without the [B, T, V] fp32 logits:

        loss = −Σ_{b,t: y ≠ ignore} log softmax(h_bt · Wᵀ)_{y_bt} / #non-ignored   (0 when all are ignored)

    hidden [B, T, d], weight [V_rows, d] (the tied head, possibly padded: only its first ``vocab_size`` rows, default
    all, enter the softmax), labels [B, T] int. The sum comes from ``mllm_kernels.lm_loss.linear_cross_entropy``
    (chunked cuBLAS logits + a Triton softmax-gradient pass; the gradient is taken in the forward), which falls
    back to the eager reference on CPU tensors without TRITON_INTERPRET=1. Under autocast both operands are cast
    to the autocast dtype, as ``F.linear`` would be (the gradient reaches the fp32 master weight)."""
    from mllm_kernels.lm_loss import linear_cross_entropy

    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])} (aligned to hidden [B, T, d]), "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    h, w = hidden.to(dt), weight.to(dt)
    # label range is checked on CPU only: on the GPU it would cost a host sync per step (the data pipeline
    # produces labels from the same ids the embedding already bounds-checks)
    total = linear_cross_entropy(h, w, labels, vocab_size=vocab_size, ignore_index=ignore_index,
                                 check_labels=dev == "cpu" and not torch.compiler.is_compiling())
    return total / (labels != ignore_index).sum().clamp(min=1)


def build_model(cfg, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> Transformer:
    """Transformer(cfg) moved to ``device`` / ``dtype`` (convenience for stages and scripts)."""
    model = Transformer(cfg)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


__all__: Tuple[str, ...] = ("Transformer", "Block", "causal_lm_loss", "fused_lm_loss", "build_model", "KVCache")
