"""Low-precision copies of the matrix weights, cast once per optimizer step (``model.weight_cache``).

Under a bf16 autocast every ``F.linear`` casts its fp32 master weight to bf16 in every forward: with gradient
accumulation that is one cast per micro-batch of weights that change only once per optimizer step. For gpu-full
(252.8M parameters) the cast reads 4 and writes 2 bytes per parameter, ≈ 1.5 GB of traffic per micro-batch; a
compiled step keeps it as separate pointwise kernels, since cuBLAS cannot fuse it into the GEMM.

With the cache, each use site (a Linear, the concatenated q/k/v weight of ``model.fused_qkv``, the LM head) owns
a ``WeightCache`` holding ``W_lp = cast(W)`` (for several weights ``cast(cat(W_1, …, W_n))``). The forward reads
W_lp through ``WeightCache.weight()``, an autograd function that is the identity on W_lp in the forward and, in the
backward, sends dW_lp to the master weights as ``dW_i = slice_i(dW_lp).to(W_i.dtype)`` — the same values
autocast's ``ToCopyBackward`` produces, so the model's losses and gradients are bitwise those of the plain
autocast path (tested). Memory: the copies stay allocated between steps (2 bytes per parameter), where autocast's
copies live only from a micro-batch's forward to its backward.

When a copy is refreshed:
- after every ``optimizer.step()`` of any optimizer (a global step post-hook), the copies of that optimizer's
  parameters are recast (always: fused AdamW updates parameters without bumping their version counters);
- in eager code, every use also checks its master weights' version counters (in-place updates such as
  ``load_state_dict`` or ``copy_`` under ``no_grad`` bump them) and its device, and recasts when stale;
- inside ``torch.compile`` no check can run: there the copies rely on the step hook, on ``load_state_dict``
  (a post-hook) and on ``Transformer.sync_weight_cache()``, which the Trainer and ``bench_train`` call before each
  step. Writes that bypass version counters (through ``.data``, or fused in-place ops other than the optimizer
  step) need ``sync_weight_cache(force=True)`` before the next forward.

The copies are plain tensor attributes, not buffers: no state_dict entry and no DDP broadcast; ``Transformer._apply``
moves them with the parameters (``.to()``, ``.cuda()``, ``.half()``). On
CUDA they are marked static addresses, so that CUDA-graph trees read them in place instead of copying them into
the graph before every replay.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence

import torch

# every live cache, refreshed after any optimizer step (see module docstring)
_LIVE: "weakref.WeakSet[WeightCache]" = weakref.WeakSet()
_HOOKS = {}


class _CachedWeight(torch.autograd.Function):
    """forward(w_lp, *ws) = w_lp; backward: dws[i] = rows i of dw_lp, in ws[i]'s dtype."""

    @staticmethod
    def forward(ctx, w_lp, *ws):
        ctx.rows = [w.shape[0] for w in ws]
        ctx.dtypes = [w.dtype for w in ws]
        return w_lp.view_as(w_lp)

    @staticmethod
    def backward(ctx, g):
        parts = g.split(ctx.rows, dim=0) if len(ctx.rows) > 1 else (g,)
        return (None, *[p.to(dt) for p, dt in zip(parts, ctx.dtypes)])


class WeightCache:
    """The low-precision copy of one use site's weights (rows of ``params`` concatenated along dim 0)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        if not params or any(p.dim() != 2 for p in params) or len({p.shape[1] for p in params}) != 1:
            raise ValueError(f"WeightCache needs 2-D weights with one column count, got "
                             f"{[tuple(p.shape) for p in params]}")
        self.params: List[torch.nn.Parameter] = list(params)
        self.lp: Optional[torch.Tensor] = None
        self._stamp = None
        _LIVE.add(self)
        _install_optimizer_hook()

    # a copy (deepcopy, pickle) is registered like a new cache and casts its own parameters (same copy dtype)
    def __getstate__(self):
        return {"params": self.params, "dtype": None if self.lp is None else self.lp.dtype}

    def __setstate__(self, state):
        self.params, self.lp, self._stamp = state["params"], None, None
        _LIVE.add(self)
        _install_optimizer_hook()
        if state["dtype"] is not None:
            self.refresh(state["dtype"])

    def _current_stamp(self):
        return tuple((p.data_ptr(), p._version) for p in self.params)

    def is_fresh(self, dtype: torch.dtype) -> bool:
        lp, p0 = self.lp, self.params[0]
        return lp is not None and lp.dtype == dtype and lp.device == p0.device and self._stamp == self._current_stamp()

    @torch.no_grad()
    def refresh(self, dtype: Optional[torch.dtype] = None, force: bool = False) -> bool:
        """Recast when stale (or ``force``); ``dtype`` None keeps the copy's dtype (nothing to do without one).
        Returns True when it cast."""
        dtype = dtype if dtype is not None else (self.lp.dtype if self.lp is not None else None)
        if dtype is None or (not force and self.is_fresh(dtype)):
            return False
        p0 = self.params[0]
        rows = sum(p.shape[0] for p in self.params)
        if self.lp is None or self.lp.dtype != dtype or self.lp.device != p0.device or self.lp.shape[0] != rows:
            self.lp = torch.empty(rows, p0.shape[1], dtype=dtype, device=p0.device)
            if self.lp.is_cuda:  # read in place by CUDA-graph replays (see module docstring)
                torch._dynamo.mark_static_address(self.lp)
        r = 0
        for p in self.params:
            self.lp[r: r + p.shape[0]].copy_(p)
            r += p.shape[0]
        self._stamp = self._current_stamp()
        return True

    def weight(self) -> torch.Tensor:
        """The weight a forward should use: the cached copy under an autocast of its dtype (recast first when
        stale, outside torch.compile), else the master weight(s) as they are."""
        p0 = self.params[0]
        dev = p0.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            if p0.dtype != dt and p0.dtype.is_floating_point:
                if not torch.compiler.is_compiling():
                    self.refresh(dt)
                lp = self.lp
                if lp is not None and lp.dtype == dt and lp.device == p0.device:
                    return _CachedWeight.apply(lp, *self.params)
        return self.params[0] if len(self.params) == 1 else torch.cat(self.params)


def _after_optimizer_step(optimizer, _args, _kwargs) -> None:
    # forced for the optimizer's own parameters: fused AdamW (torch._fused_adamw_) updates them in place without
    # bumping their version counters (measured on CPU, torch 2.13), so a version check would call them fresh
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for c in list(_LIVE):
        if c.lp is not None:
            c.refresh(force=any(id(p) in owned for p in c.params))


def _install_optimizer_hook() -> None:
    if "step" not in _HOOKS:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOKS["step"] = register_optimizer_step_post_hook(_after_optimizer_step)


def cached_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """``linear(x)``, through the module's ``wcache`` (``model.weight_cache``) when it has one."""
    cache = getattr(linear, "wcache", None)
    if cache is None:
        return linear(x)
    return torch.nn.functional.linear(x, cache.weight(), linear.bias)
