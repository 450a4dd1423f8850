"""Batched autoregressive generation with a KV cache: greedy, temperature, top-k, top-p; seeded.

    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7, top_p=0.9,
                          eos_id=tok.eot_id, seed=0)

Layout: prompts of different lengths are left-padded to the longest, P. Row b holds
``[pad × (P − L_b), prompt_b, generated...]``; the padding is its own document (cu_seqlens / doc_start), so
prompt tokens never see it, their RoPE positions start at 0, and ``n_sink_tokens`` count from the prompt's
first token — i.e. every row computes exactly what it would alone. Each step feeds one token per row.

A row stops after emitting ``eos_id`` (the eos token is the last element of its list); the batch stops when
every row has stopped or ``max_new_tokens`` were produced. ``use_cache=False`` recomputes the whole sequence
each step through ``model.hidden_states`` (the reference the cached path is tested against).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

PAD_ID = 0  # the value in padding slots; irrelevant, they are masked out


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, batch_size):
    V = model.cfg.vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        try:  # a 0-d tensor or array has __len__ but len() raises TypeError
            n = None if isinstance(p, (str, bytes)) else len(p)
        except TypeError:
            n = None
        if n is None:
            shape = f" of shape {tuple(p.shape)}" if isinstance(p, (torch.Tensor, np.ndarray)) else ""
            raise ValueError(f"prompts[{i}] must be a sequence of token ids, got {type(p).__name__}{shape}")
        if n == 0:
            raise ValueError(f"prompts[{i}] is empty: generation needs at least one prompt token")
        try:
            ids = np.asarray(p.tolist() if isinstance(p, torch.Tensor) else p)
        except ValueError:  # ragged nesting
            raise ValueError(f"prompts[{i}] must be a flat sequence of token ids") from None
        if ids.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a flat (1-D) sequence of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":  # int() would truncate 1.9 to 1 without a word
            raise ValueError(f"prompts[{i}] holds non-integer token ids")
        bad = ids[(ids < 0) | (ids >= V)].tolist()
        if bad:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {V}): {bad[:5]}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating))
                              or not (0.0 < top_p <= 1.0)):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < V):
        raise ValueError(f"eos_id must be an int in [0, {V}), got {eos_id!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}; truncate the prompts or generate fewer tokens")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Mask (to −inf) every token outside the top-k and outside the nucleus; logits [N, V] -> [N, V].

    top-k keeps the k largest logits (ties at the k-th value all kept). top-p keeps the smallest prefix of
    tokens sorted by probability whose mass reaches p: token r (in sorted order) is kept iff the mass of the
    tokens before it is < p, so the most likely token is always kept.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from logits [N, V] -> [N] int64. temperature 0: argmax (top-k/top-p irrelevant);
    else sample from softmax(filter_logits(logits / temperature)) with ``generator``. The row maximum is
    subtracted before dividing (the same softmax): a tiny temperature then sends the other logits to -inf
    instead of every logit to inf (NaN probabilities). The temperature is clamped to float32's normal range: a
    Python float below it (1e-46) would become 0 (0/0 = NaN at the maximum), one above it inf (-inf/inf = NaN)."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    fi = torch.finfo(torch.float32)
    temperature = min(max(float(temperature), fi.tiny), fi.max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _layout(prompts: Sequence[Sequence[int]], total_len: int, device):
    """Left-padded ids [B, P], position_ids [B, total_len], doc_start [B, total_len] (pad doc, then prompt)."""
    lens = torch.tensor([len(p) for p in prompts], device=device)
    P = int(lens.max())
    pad = P - lens  # [B]
    ids = torch.full((len(prompts), P), PAD_ID, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
    t = torch.arange(total_len, device=device)[None]
    in_prompt = t >= pad[:, None]
    doc_start = torch.where(in_prompt, pad[:, None], torch.zeros_like(t))
    position_ids = t - doc_start
    return ids, position_ids, doc_start


def _cu_seqlens_from_doc_start(doc_start: torch.Tensor) -> torch.Tensor:
    """cu_seqlens over the flattened rows: every row start plus each row's prompt start (if padded)."""
    B, T = doc_start.shape
    starts = torch.arange(T, device=doc_start.device)[None] == doc_start  # first token of each document
    flat = torch.nonzero(starts.reshape(-1)).squeeze(-1)
    return torch.cat([flat, flat.new_tensor([B * T])]).to(torch.int32)


@torch.no_grad()
def _generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache):
    device = model.device
    B = len(prompts)
    P = max(len(p) for p in prompts)
    total = P + max_new_tokens
    ids, position_ids, doc_start = _layout(prompts, total, device)
    gen = torch.full((B, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    n_gen = torch.zeros(B, dtype=torch.long, device=device)  # tokens each row produced before stopping
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if use_cache:
        cache = model.new_kv_cache(doc_start)
        logits = model.forward_with_cache(ids, position_ids[:, :P], cache)[:, -1]
    seq = ids
    for step in range(max_new_tokens):
        if not use_cache:
            cur = seq.shape[1]
            h = model.hidden_states(seq, position_ids[:, :cur], _cu_seqlens_from_doc_start(doc_start[:, :cur]))
            logits = model.head_logits(h[:, -1])
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)  # finished rows feed padding
        gen[:, step] = nxt
        n_gen += (~done).long()
        if eos_id is not None:
            done = done | (nxt == eos_id)
            if bool(done.all()):  # a host sync, so only when a row can stop early
                break
        if step == max_new_tokens - 1:
            break
        if use_cache:
            pos = position_ids[:, P + step:P + step + 1]
            logits = model.forward_with_cache(nxt[:, None], pos, cache)[:, -1]
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return [row[:n].tolist() for row, n in zip(gen.cpu(), n_gen.tolist())]


def generate(
    model,
    prompts: List[List[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    *,
    use_cache: bool = True,
    batch_size: Optional[int] = None,
    progress: bool = False,
) -> List[List[int]]:
    """Continue each prompt; returns the new tokens only, one list per prompt (in order).

    temperature 0 = greedy (deterministic); else softmax(logits / temperature) restricted by top_k / top_p
    (``filter_logits``) and sampled with a generator seeded by ``seed`` (None: torch's global RNG), so a seed
    reproduces the output for the same model, prompts and batch_size. ``batch_size`` splits the prompts
    into chunks run one after another (bounded memory; the KV cache is [L, B, P + max_new_tokens, Hkv, D]).
    The model is put in eval mode for the call and restored afterwards.
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, batch_size)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed)
    chunk = batch_size or len(prompts)
    starts = range(0, len(prompts), chunk)
    was_training = model.training
    model.eval()
    try:
        results: List[List[int]] = []
        for s in tqdm(starts, desc="generate", disable=not progress or len(starts) == 1):
            results += _generate_batch(model, prompts[s:s + chunk], max_new_tokens, temperature, top_k, top_p,
                                       eos_id, generator, use_cache)
    finally:
        model.train(was_training)
    return results
