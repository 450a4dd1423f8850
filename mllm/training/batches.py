"""Batch sources for the Trainer: per-rank micro-batches, a checkpointable position, the same optimizer-step
batch for any world size.

Contract the Trainer relies on (any stage may bring its own source that keeps it)::

    source.next_batch() -> dict[str, Tensor]   # this rank's next micro-batch (CPU tensors; the Trainer moves them)
    source.state_dict() -> dict                # position, so a resumed run reads exactly the batches it would have
    source.load_state_dict(state)

``RowBatchSource`` implements it over any indexable dataset of examples. For optimizer step ``s`` of epoch ``e``
the global batch is ``perm_e[c : c + batch_size]`` (``perm_e`` a permutation seeded by (seed, e), ``c`` the
cursor); rank ``r`` takes the slice ``[r·batch_size/world, (r+1)·batch_size/world)`` of it and hands it out in
``micro_batch_size`` chunks. So the set of examples in a step does not depend on the number of ranks, ranks never
share an example, and the position is just (epoch, cursor, micro) — identical on all ranks.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

Batch = Dict[str, torch.Tensor]


class DataPositionMismatch(ValueError):
    """A checkpoint's data position was taken with another ``seed``, ``batch_size`` or dataset size ``n``: the
    position means nothing in this run's order, so an exact resume is impossible. Args: (key, saved, current)."""

    def __init__(self, key: str, saved, current):
        super().__init__(f"the checkpoint's data position has {key}={saved} but this run has {key}={current}: "
                         "the data or the batch changed, so an exact resume is impossible")
        self.key, self.saved, self.current = key, saved, current


class TokenWindows(Sequence):
    """Next-token-prediction windows over one 1-D token stream (documents joined by the end-of-text token).

    Row ``i`` is ``tokens[i·T : i·T + T + 1]`` with ``T = seq_len``: ``input_ids = row[:-1]``, ``labels = row[1:]``
    (labels aligned to positions: ``labels[t]`` is the token predicted at position ``t``). Consecutive windows
    share one token, so every token but the first is a target exactly once. ``len = (len(tokens) - 1) // T``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self._n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} out of range [0, {self._n})")
        row = np.asarray(self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1], dtype=np.int64)
        return {"input_ids": row[:-1], "labels": row[1:]}


def collate_rows(rows: List[Mapping[str, Any]]) -> Batch:
    """Stack equal-length per-example arrays into [B, T] tensors.

    ``cu_seqlens`` is special: each row carries its own cumulative document lengths ``[0, l1, l1+l2, ..., T]``;
    the batch gets FlashAttention-varlen offsets over the flattened ``B·T`` tokens, i.e. row ``b``'s entries shifted
    by ``b·T`` and joined (shared boundaries once), as an int32 1-D tensor.
    """
    if not rows:
        raise ValueError("collate_rows got no rows")
    out: Batch = {}
    for key in rows[0]:
        if key == "cu_seqlens":
            continue
        try:
            out[key] = torch.as_tensor(np.stack([np.asarray(r[key]) for r in rows]))
        except ValueError as e:
            shapes = sorted({np.asarray(r[key]).shape for r in rows})
            raise ValueError(f"collate_rows: key '{key}' has rows of different shapes {shapes}; pad or pack "
                             "them to one length first") from e
    if "cu_seqlens" in rows[0]:
        T = int(np.asarray(rows[0]["input_ids"]).shape[-1])
        parts = [np.zeros(1, dtype=np.int64)]
        for b, r in enumerate(rows):
            cu = np.asarray(r["cu_seqlens"], dtype=np.int64)
            if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) <= 0):
                raise ValueError(f"collate_rows: row {b} cu_seqlens must rise strictly from 0 to {T}, got {cu.tolist()}")
            parts.append(cu[1:] + b * T)
        out["cu_seqlens"] = torch.as_tensor(np.concatenate(parts), dtype=torch.int32)
    return out


def pad_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``cu_seqlens`` extended to ``length`` values by repeating its last one (the end B·T): zero-length documents
    at the end, which attention ignores. A CUDA graph replays fixed shapes, and packed batches hold different numbers
    of documents; padded to one length (B·T + 1, the most a batch of B rows of T tokens can have), every micro-batch
    replays the same graph instead of recording one per document count."""
    n = cu_seqlens.numel()
    if cu_seqlens.dim() != 1 or n < 1:
        raise ValueError(f"cu_seqlens must be a non-empty 1-D tensor, got shape {tuple(cu_seqlens.shape)}")
    if n > length:
        raise ValueError(f"cu_seqlens has {n} values, more than the padded length {length}")
    if n == length:
        return cu_seqlens
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(length - n)])


def batch_to_device(batch: Mapping[str, Any], device, fixed_cu_seqlens: bool = False) -> Batch:
    """Every tensor of ``batch`` on ``device``; for a CUDA device host tensors are pinned first, so that the copies
    are asynchronous. ``fixed_cu_seqlens``: pad ``cu_seqlens`` to B·T + 1 values (``pad_cu_seqlens``; B, T from
    ``input_ids``), so that its shape does not change from batch to batch (CUDA graphs).

    ``cu_seqlens`` goes through ``mllm_kernels.attention.cu_seqlens_to_device`` when it leaves the CPU for a GPU: its
    values are checked on the host, where reading them costs nothing, and the attention kernels trust the device copy
    instead of reading it back (a device-to-host sync per micro-batch that stalls a host-bound training step)."""
    device = torch.device(device)
    ids = batch.get("input_ids")
    if fixed_cu_seqlens and isinstance(batch.get("cu_seqlens"), torch.Tensor) and isinstance(ids, torch.Tensor):
        batch = {**batch, "cu_seqlens": pad_cu_seqlens(batch["cu_seqlens"], ids.numel() + 1)}
    # A copy from pageable memory may wait for the stream to drain before it is staged (CUDA's "API synchronization
    # behavior"), which is the same stall as a read-back; pinned first, the copies queue behind the step's kernels.
    pin = device.type == "cuda"
    batch = {k: (v.pin_memory() if pin and isinstance(v, torch.Tensor) and v.device.type == "cpu"
                 and not v.is_pinned() else v) for k, v in batch.items()}
    check_on_host = None
    if device.type != "cpu" and isinstance(ids, torch.Tensor) and ids.dim() == 2:
        try:
            from mllm_kernels.attention import cu_seqlens_to_device as check_on_host
        except ImportError:  # no triton (eager backend only): a plain copy
            pass

    def move(key, v):
        if not isinstance(v, torch.Tensor):
            return v
        if key == "cu_seqlens" and check_on_host is not None:
            return check_on_host(v, ids.shape[0], ids.shape[1], device)
        return v.to(device, non_blocking=True)

    return {k: move(k, v) for k, v in batch.items()}


class RowBatchSource:
    """Shuffled, rank-disjoint micro-batches over ``dataset`` (see the module docstring for the exact order).

    Args:
        dataset: ``len()`` + ``dataset[i] -> dict of arrays`` (e.g. ``TokenWindows``).
        batch_size: examples per optimizer step over all ranks and accumulation steps.
        micro_batch_size: examples per forward on one rank.
        rank, world_size: this process's place in the job.
        seed: permutation seed; epoch ``e`` uses ``np.random.default_rng([seed, e])``.
        shuffle: False keeps dataset order (epoch after epoch).
        collate: list of examples -> dict of tensors.
    """

    def __init__(self, dataset: Sequence, *, batch_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 collate: Callable[[List[Any]], Batch] = collate_rows):
        if micro_batch_size <= 0 or batch_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) and micro_batch_size ({micro_batch_size}) must be positive")
        if batch_size % (micro_batch_size * world_size) != 0:
            raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch_size={micro_batch_size} x "
                             f"world_size={world_size}: the effective batch could not be the same on every rank")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one batch of batch_size="
                             f"{batch_size}: use more data or a smaller batch")
        self.dataset = dataset
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.collate = collate
        self.per_rank = batch_size // world_size
        self.accum_steps = self.per_rank // micro_batch_size
        self.epoch = 0
        self.cursor = 0  # first example of the current optimizer step within the epoch's order
        self.micro = 0  # next micro-batch within the step on this rank
        self._order_epoch = -1
        self._order: Optional[np.ndarray] = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> Batch:
        if self.micro == 0 and self.cursor + self.batch_size > len(self.dataset):
            self.epoch += 1  # drop the tail: a step never mixes two epochs
            self.cursor = 0
        order = self._epoch_order()
        start = self.cursor + self.rank * self.per_rank + self.micro * self.micro_batch_size
        idx = order[start: start + self.micro_batch_size]
        self.micro += 1
        if self.micro == self.accum_steps:
            self.micro = 0
            self.cursor += self.batch_size
        return self.collate([self.dataset[int(i)] for i in idx])

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "micro": self.micro, "seed": self.seed,
                "batch_size": self.batch_size, "n": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        mine = {"seed": self.seed, "batch_size": self.batch_size, "n": len(self.dataset)}
        for k, v in mine.items():
            if k in state and state[k] != v:
                raise DataPositionMismatch(k, state[k], v)
        self.epoch, self.cursor, self.micro = int(state["epoch"]), int(state["cursor"]), int(state["micro"])


class EvalBatches:
    """A fixed, re-iterable set of validation micro-batches, the same examples for any world size.

    The examples are the first ``N = min(len(dataset), max_examples)`` in dataset order, cut into micro-batches
    ``j = 0, 1, ...`` of ``micro_batch_size`` (the last one may be short); rank ``r`` reads batches
    ``j ≡ r (mod world_size)``. A token-weighted mean over all ranks therefore covers exactly these N examples.
    """

    def __init__(self, dataset: Sequence, *, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 max_examples: Optional[int] = None, collate: Callable[[List[Any]], Batch] = collate_rows):
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.dataset = dataset
        self.mb = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.n_examples = len(dataset) if max_examples is None else min(len(dataset), max_examples)
        self.collate = collate

    def _batch_ids(self) -> range:
        n_batches = -(-self.n_examples // self.mb)
        return range(self.rank, n_batches, self.world_size)

    def __len__(self) -> int:
        return len(self._batch_ids())

    def __iter__(self) -> Iterator[Batch]:
        for j in self._batch_ids():
            start = j * self.mb
            yield self.collate([self.dataset[i] for i in range(start, min(start + self.mb, self.n_examples))])
