"""Sequence packing: documents of very different lengths into fixed-length training rows.

Two layers:

1. **Planning** on lengths only: ``pack(lengths, row_len, algorithm, overflow, seed) -> PackResult`` says, for
   every piece of every document, which row it goes to and at which offset. ``pack`` runs the C++ extension
   ``mllm._C`` (csrc/packing.h) and falls back, with a one-time warning, to ``pack_reference``, the pure-Python
   implementation here that gives IDENTICAL results (same order, same tie-breaking; tests/test_packing.py
   checks it). ``plan_unpacked`` is the one-piece-per-row counterpart.
2. **Materialising** rows of tokens from a plan: ``materialize_rows(plan, docs, rows, ...)`` builds
   ``input_ids``, ``labels``, ``position_ids`` [R, row_len] and ``cu_seqlens`` for any subset of rows (a loader
   can plan once and build each batch on demand: ``iter_batches``). ``build_packed_rows`` /
   ``build_unpacked_rows`` plan and build all rows at once; ``build_rows(..., packing=True|False)`` switches
   between them.

The planning specification (csrc/packing.h says the same):

1. Items. A document of length n becomes chunks: ``overflow="split"``: floor(n/L) chunks of L tokens, then one
   of n mod L tokens if that is > 0 (starts 0, L, 2L, ...); ``overflow="truncate"``: one chunk (0, min(n, L)),
   the other max(n - L, 0) tokens are dropped. Items are generated in document order, chunks in start order.
2. Order: by length, longest first; ties keep generation order (stable sort).
3. Placement into bins numbered in order of opening. ``"bfd"`` (best-fit decreasing): the open bin with the
   smallest remaining capacity >= len, ties to the lowest bin number. ``"ffd"`` (first-fit decreasing): the
   lowest-numbered open bin with remaining capacity >= len. No bin fits: open a new one. The piece's offset is
   the bin's fill before it.
4. Rows: ``seed=None``: row r = bin r. Otherwise a Fisher-Yates shuffle of bins driven by splitmix64(seed):
   ``row_bin = [0..B-1]; for i = B-1 .. 1: j = next() % (i + 1); swap(row_bin[i], row_bin[j])``; row r holds
   bin ``row_bin[r]``. (BFD opens bins longest-documents-first, so unshuffled rows are ordered by length.)
5. Output: segments sorted by (row, offset); efficiency = tokens placed / (n_rows * L) (0.0 with no rows).

Token-level conventions of the materialised rows (row length L, one segment = one piece of one document):

* ``eot_id``: when given, it is appended to every document BEFORE planning (the document's last text token
  then learns to predict end-of-text); the documents passed in never carry it themselves.
* ``labels`` are aligned to positions: ``labels[r, t]`` is the target predicted at ``(r, t)``: for a token at
  document position p, ``labels = doc[p + 1]`` if p + 1 < len(doc), else ``ignore_index``. So a document's last
  token never predicts the next document's first token. At the end of a non-final chunk (``"split"``), or at
  the cut of a truncated document, the target is the document's own next token, which is not a boundary
  crossing: every token of a document except its first is a target exactly once, packed or not.
* ``loss_masks[i][p] == False`` (e.g. an SFT prompt token) means token p of document i is never a target:
  the label predicting it becomes ``ignore_index``. The appended ``eot_id`` is always a target.
* ``position_ids`` restart at 0 at every segment start and count up within it. The padding at a row's end is a
  segment of its own (``input_ids = pad_id``, ``labels = ignore_index``, positions 0, 1, ...), so
  ``position_ids == 0`` exactly at segment starts, and ``cu_seqlens`` can be recomputed from ``position_ids``
  after slicing rows (``cu_seqlens_from_position_ids``).
* ``cu_seqlens`` (int32): FlashAttention-varlen cumulative segment lengths over the row-major flattened
  R·L tokens: starts at 0, ends at R·L, strictly increasing, contains every row start r·L
  (see ``mllm_kernels.reference.doc_start_from_cu_seqlens``).
"""
from __future__ import annotations

import bisect
import heapq
import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

ALGORITHMS = ("bfd", "ffd")
OVERFLOWS = ("split", "truncate")
MAX_ROW_LEN = 1 << 20  # as csrc/packing.h kMaxRowLen: BFD keeps one heap per capacity value 0..L
_MASK64 = (1 << 64) - 1

try:  # the extension is optional: without it the pure-Python reference is used (one warning)
    from mllm import _C
    _C_IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    # "No module named" is the usual unbuilt tree; anything else (a .so for another Python, a truncated file) is
    # a broken build, and the warning must say which
    _C_IMPORT_ERROR = f"{type(e).__name__}: {e}"
_warned_fallback = False


@dataclass(eq=False)
class PackResult:
    """A packing plan. S segments (pieces of documents), R rows of ``row_len`` slots.

    ``doc, start, length, row, offset``: int64 [S], segment k holds tokens ``start .. start+length`` of document
    ``doc[k]`` at slots ``offset .. offset+length`` of row ``row[k]``; sorted by (row, offset).
    ``row_ptr``: int64 [R + 1], the segments of row r are ``row_ptr[r] .. row_ptr[r+1]``.
    ``doc_lengths``: int64 [D], the lengths that were planned (documents must match them when materialised).
    """

    row_len: int
    algorithm: str  # "bfd" | "ffd" | "none" (unpacked)
    overflow: str
    seed: Optional[int]
    doc_lengths: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    row_ptr: np.ndarray
    n_rows: int
    n_tokens: int  # tokens placed
    n_dropped: int  # tokens dropped by overflow="truncate"

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots = n_tokens / (n_rows · row_len); 0.0 when there are no rows."""
        return self.n_tokens / (self.n_rows * self.row_len) if self.n_rows else 0.0

    @property
    def n_segments(self) -> int:
        return int(self.doc.shape[0])


# ----------------------------------------------------------------------------------------------- validation
def _check_lengths(lengths) -> np.ndarray:
    """Any 1-D integer array (or list) of lengths >= 1 -> int64 ndarray; anything else -> ValueError."""
    arr = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
    if arr.size == 0 and arr.ndim == 1:  # `[]` and np.array([]) are float64 in numpy: a valid (empty) length list
        arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got {arr.ndim} dimensions (shape {arr.shape})")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must have an integer dtype, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("lengths must fit in int64")
    # a canonical int64 dtype object: the C++ extension is strict about it, and np.longlong is equal but not it
    arr = arr.view(np.int64) if arr.dtype == np.int64 else arr.astype(np.int64)
    if arr.size:
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"lengths[{i}] = {int(arr[i])}: every document length must be >= 1")
        # token counts (n_tokens, n_dropped) are int64 in the C++ extension: keep every sum far from overflow
        # (the float sum's rounding cannot cross from 2**62 to 2**63)
        if float(arr.sum(dtype=np.float64)) > 2.0**62:
            raise ValueError(f"lengths sum to {float(arr.sum(dtype=np.float64)):.3g} tokens, more than 2**62")
    return arr


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def _check_args(row_len, algorithm, overflow, seed) -> tuple[int, Optional[int]]:
    row_len = _check_int("row_len", row_len, 1, MAX_ROW_LEN)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'bfd' or 'ffd', got {algorithm!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be 'split' or 'truncate', got {overflow!r}")
    if seed is not None:
        seed = _check_int("seed", seed, 0, _MASK64)
    return row_len, seed


# ----------------------------------------------------------------------------------------------- reference
def _items(lengths: list[int], L: int, overflow: str):
    """Spec steps 1-2: (doc, start, len) per item, longest first, stable; and the dropped-token count."""
    items, dropped = [], 0
    for d, n in enumerate(lengths):
        if overflow == "split":
            items.extend((d, s, L) for s in range(0, n - n % L, L))
            if n % L:
                items.append((d, n - n % L, n % L))
        else:
            items.append((d, 0, min(n, L)))
            dropped += max(n - L, 0)
    items.sort(key=lambda it: -it[2])  # list.sort is stable: ties stay in generation order
    return items, dropped


def _place_bfd(lens: list[int], L: int):
    """Best fit: smallest remaining capacity >= len, lowest bin among equals (a min-heap per capacity value).

    ``caps`` is the sorted list of capacity values some open, non-full bin has; bisect finds the best one."""
    caps: list[int] = []
    by_cap: dict[int, list[int]] = {}
    bins, offsets, n_bins = [], [], 0
    for ln in lens:
        i = bisect.bisect_left(caps, ln)
        if i == len(caps):
            b, cap = n_bins, L
            n_bins += 1
        else:
            cap = caps[i]
            heap = by_cap[cap]
            b = heapq.heappop(heap)
            if not heap:
                del caps[i], by_cap[cap]
        bins.append(b)
        offsets.append(L - cap)
        left = cap - ln
        if left > 0:  # a full bin never takes another item (lengths are >= 1)
            heap = by_cap.get(left)
            if heap is None:
                heap = by_cap[left] = []
                bisect.insort(caps, left)
            heapq.heappush(heap, b)
    return bins, offsets, n_bins


def _place_ffd(lens: list[int], L: int):
    """First fit: leftmost bin with room, by descending a max segment tree over bin numbers in which bins not
    opened yet have capacity L (so the descent always ends at an open bin or at the next one to open)."""
    # bins <= 2·tokens/L + 1 (no two bins end at most half full), and <= items: as in csrc/packing.h
    bound = min(len(lens), 2 * sum(lens) // L + 1)
    P = 1
    while P < bound:
        P *= 2
    tree = [L] * (2 * P)
    bins, offsets, n_bins = [], [], 0
    for ln in lens:
        node = 1
        while node < P:
            node = 2 * node if tree[2 * node] >= ln else 2 * node + 1
        b = node - P
        bins.append(b)
        offsets.append(L - tree[node])
        if b == n_bins:
            n_bins += 1
        tree[node] -= ln
        node //= 2
        while node >= 1:
            m = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == m:
                break
            tree[node] = m
            node //= 2
    return bins, offsets, n_bins


def _splitmix64(seed: int):
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


def _row_of_bin(n_bins: int, seed: Optional[int]) -> list[int]:
    """Spec step 4: row of each bin (identity without a seed, else a splitmix64 Fisher-Yates shuffle)."""
    if seed is None or n_bins < 2:
        return list(range(n_bins))
    row_bin = list(range(n_bins))
    rng = _splitmix64(seed)
    for i in range(n_bins - 1, 0, -1):
        j = next(rng) % (i + 1)
        row_bin[i], row_bin[j] = row_bin[j], row_bin[i]
    row_of_bin = [0] * n_bins
    for r, b in enumerate(row_bin):
        row_of_bin[b] = r
    return row_of_bin


def _result(lengths, L, algorithm, overflow, seed, doc, start, length, row, offset, n_rows, n_dropped):
    """Sorts segments by (row, offset) (stable) and wraps them in a PackResult."""
    row = np.asarray(row, dtype=np.int64)
    offset = np.asarray(offset, dtype=np.int64)
    order = np.lexsort((offset, row)) if row.size else np.zeros(0, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)[order]
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_rows), out=row_ptr[1:])
    return PackResult(
        row_len=L, algorithm=algorithm, overflow=overflow, seed=seed, doc_lengths=lengths,
        doc=np.asarray(doc, dtype=np.int64)[order], start=np.asarray(start, dtype=np.int64)[order],
        length=length, row=row[order], offset=offset[order], row_ptr=row_ptr, n_rows=int(n_rows),
        n_tokens=int(length.sum()), n_dropped=int(n_dropped),
    )


def pack_reference(lengths, row_len: int, algorithm: str = "bfd", overflow: str = "split",
                   seed: Optional[int] = 0) -> PackResult:
    """Pure-Python packing, the executable form of the specification in this module's docstring.

    O(N log B) heap/tree steps plus O(L) list moves per BFD step, all in Python: ~µs per document. Same
    arguments and results as ``pack``."""
    lengths = _check_lengths(lengths)
    L, seed = _check_args(row_len, algorithm, overflow, seed)
    n_pieces = int(((lengths + L - 1) // L).sum()) if overflow == "split" else lengths.size
    if n_pieces > 2**31 - 1:  # the C++ extension's int32 indices: same limit, same error
        raise ValueError(f"too many pieces to pack: {n_pieces} > 2**31 - 1 (row_len {L})")
    items, dropped = _items(lengths.tolist(), L, overflow)
    lens = [it[2] for it in items]
    bins, offsets, n_bins = (_place_bfd if algorithm == "bfd" else _place_ffd)(lens, L)
    row_of_bin = _row_of_bin(n_bins, seed)
    rows = [row_of_bin[b] for b in bins]
    return _result(lengths, L, algorithm, overflow, seed, [it[0] for it in items], [it[1] for it in items],
                   lens, rows, offsets, n_bins, dropped)


def pack(lengths, row_len: int, algorithm: str = "bfd", overflow: str = "split",
         seed: Optional[int] = 0) -> PackResult:
    """Plan the packing of documents with token counts ``lengths`` ([D], integers >= 1) into rows of
    ``row_len`` tokens. See the module docstring for the exact rules; ``seed`` only shuffles the rows
    (None: rows in the order the algorithm opened them). Uses the C++ extension when built (O(N log B),
    ~60 ns per document at 1M documents), else ``pack_reference`` (same results, ~2 µs per document) with a
    one-time warning.

    Raises ValueError on bad input: non-1-D or non-integer lengths, a length <= 0, row_len outside
    [1, 2**20], an unknown algorithm/overflow, a seed outside [0, 2**64)."""
    global _warned_fallback
    lengths = _check_lengths(lengths)
    L, seed = _check_args(row_len, algorithm, overflow, seed)
    if _C is None:
        if not _warned_fallback:
            warnings.warn("mllm._C (the C++ packing extension) could not be imported "
                          f"({_C_IMPORT_ERROR}): using the pure-Python reference, ~30-70x slower. Build it with "
                          "`python setup.py build_ext --inplace`.", RuntimeWarning, stacklevel=2)
            _warned_fallback = True
        return pack_reference(lengths, L, algorithm, overflow, seed)
    out = _C.pack(np.ascontiguousarray(lengths), L, algorithm, overflow, seed)
    return PackResult(
        row_len=L, algorithm=algorithm, overflow=overflow, seed=seed, doc_lengths=lengths, doc=out["doc"],
        start=out["start"], length=out["length"], row=out["row"], offset=out["offset"], row_ptr=out["row_ptr"],
        n_rows=int(out["n_rows"]), n_tokens=int(out["n_tokens"]), n_dropped=int(out["n_dropped"]),
    )


def plan_unpacked(lengths, row_len: int, overflow: str = "truncate", seed: Optional[int] = None) -> PackResult:
    """One piece per row, in document order (then shuffled as in ``pack`` when ``seed`` is given): the
    no-packing baseline, with the same item rules (``split``: one row per chunk; ``truncate``: one per document)."""
    lengths = _check_lengths(lengths)
    L, seed = _check_args(row_len, "bfd", overflow, seed)
    if overflow == "split":
        n_chunks = -(-lengths // L)
        doc = np.repeat(np.arange(lengths.size, dtype=np.int64), n_chunks)
        first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        start = (np.arange(doc.size, dtype=np.int64) - first) * L
        length = np.minimum(lengths[doc] - start, L)
        dropped = 0
    else:
        doc = np.arange(lengths.size, dtype=np.int64)
        start = np.zeros_like(doc)
        length = np.minimum(lengths, L)
        dropped = int((lengths - length).sum())
    row = np.asarray(_row_of_bin(doc.size, seed), dtype=np.int64)
    return _result(lengths, L, "none", overflow, seed, doc, start, length, row, np.zeros_like(doc), doc.size,
                   dropped)


# ----------------------------------------------------------------------------------------------- rows
def cu_seqlens_from_position_ids(position_ids) -> np.ndarray:
    """cu_seqlens (int32) of rows whose positions restart at 0 at every segment (as built here): the flat
    indices where ``position_ids == 0``, then R·L. Use it after slicing rows into a batch."""
    pos = np.asarray(position_ids)
    if pos.ndim != 2:
        raise ValueError(f"position_ids must be 2-D [rows, row_len], got shape {pos.shape}")
    flat = pos.reshape(-1)
    if pos.shape[1] == 0 or np.any(pos[:, 0] != 0):
        raise ValueError("position_ids must have columns and be 0 at every row start "
                         "(rows built by mllm.data.packing are)")
    return np.append(np.flatnonzero(flat == 0), flat.size).astype(np.int32)


def _check_ids(i: int, a: np.ndarray) -> None:
    """A negative id would become a label equal to ignore_index (-100: silently unlearned) or index the embedding
    from its end; a uint64 id past int64 wraps negative in the int64 rows."""
    if a.size and a.dtype.kind == "i" and int(a.min()) < 0:
        raise ValueError(f"docs[{i}] holds a negative token id ({int(a.min())}); token ids are >= 0")
    if a.size and a.dtype.kind == "u" and a.dtype.itemsize == 8 and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"docs[{i}] holds token id {int(a.max())}, beyond int64")


def _check_eot(eot_id) -> Optional[int]:
    """eot_id is appended as a token and is always a target: -100 would equal ignore_index (never learned), a
    float would be truncated, 2**63 would wrap negative in the int64 rows."""
    return None if eot_id is None else _check_int("eot_id", eot_id, 0, np.iinfo(np.int64).max)


def _check_docs(docs, loss_masks, eot_id) -> None:
    _check_eot(eot_id)
    for i, d in enumerate(docs):
        a = np.asarray(d)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"docs[{i}] must be a 1-D integer array of token ids, got dtype {a.dtype}, "
                             f"shape {a.shape}")
        if a.size == 0 and eot_id is None:
            raise ValueError(f"docs[{i}] is empty (drop empty documents, or pass eot_id)")
        _check_ids(i, a)
    if loss_masks is not None:
        if len(loss_masks) != len(docs):
            raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(docs)} docs")
        for i, (d, m) in enumerate(zip(docs, loss_masks)):
            m = np.asarray(m)
            if m.dtype != np.bool_ or m.shape != (len(d),):
                raise ValueError(f"loss_masks[{i}] must be a bool array of shape ({len(d)},) like docs[{i}], "
                                 f"got dtype {m.dtype}, shape {m.shape}")


def doc_lengths(docs, eot_id: Optional[int] = None) -> np.ndarray:
    """Token count of each document as planned: len(doc) (+1 when eot_id is appended). int64 [D]."""
    extra = 0 if eot_id is None else 1
    return np.fromiter((len(d) + extra for d in docs), dtype=np.int64, count=len(docs))


def materialize_rows(plan: PackResult, docs: Sequence, rows=None, *, pad_id: int, ignore_index: int = -100,
                     loss_masks: Optional[Sequence] = None, eot_id: Optional[int] = None) -> dict:
    """Token rows of a plan. ``docs[i]``: 1-D int token ids of document i (no eot; ``eot_id`` appends one, and
    the plan must have been made for ``doc_lengths(docs, eot_id)``); ``rows``: row indices (default all).

    Returns int64 ``input_ids``, ``labels``, ``position_ids`` [R, L], int64 ``doc_index`` [R, L] (-1 on padding),
    int32 ``cu_seqlens`` [S+1] over the R·L flat tokens, and floats ``efficiency`` (of the whole plan) and
    ``batch_efficiency`` (of these rows). Conventions: see the module docstring."""
    pad_id = _check_int("pad_id", pad_id, np.iinfo(np.int64).min)
    eot_id = _check_eot(eot_id)
    ignore_index = _check_int("ignore_index", ignore_index, np.iinfo(np.int64).min)
    if len(docs) != plan.doc_lengths.size:
        raise ValueError(f"the plan is for {plan.doc_lengths.size} documents, got {len(docs)} docs")
    if loss_masks is not None and len(loss_masks) != len(docs):
        raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(docs)} docs")
    rows = np.arange(plan.n_rows) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= plan.n_rows):
        raise ValueError(f"rows must be in [0, {plan.n_rows}), got min {rows.min()}, max {rows.max()}")
    L, R = plan.row_len, rows.size
    ids = np.full((R, L), pad_id, dtype=np.int64)
    labels = np.full((R, L), ignore_index, dtype=np.int64)
    pos = np.zeros((R, L), dtype=np.int64)
    doc_index = np.full((R, L), -1, dtype=np.int64)
    arange = np.arange(L + 1, dtype=np.int64)
    n_real = 0
    for i, r in enumerate(rows):
        used = 0
        for k in range(plan.row_ptr[r], plan.row_ptr[r + 1]):
            d, s, n, o = int(plan.doc[k]), int(plan.start[k]), int(plan.length[k]), int(plan.offset[k])
            tok = np.asarray(docs[d])
            # checked here, for the documents of these rows only: iter_batches stays O(batch) per call, and a
            # float id or a short mask cannot be cast or broadcast silently
            if tok.ndim != 1 or (tok.size and tok.dtype.kind not in "iu"):
                raise ValueError(f"docs[{d}] must be a 1-D integer array of token ids, got dtype {tok.dtype}, "
                                 f"shape {tok.shape}")
            _check_ids(d, tok[s:s + n + 1])  # the ids and targets this piece uses: O(piece), not O(doc) per piece
            if loss_masks is not None:
                m = np.asarray(loss_masks[d])
                if m.dtype != np.bool_ or m.shape != tok.shape:
                    raise ValueError(f"loss_masks[{d}] must be a bool array of shape {tok.shape} like docs[{d}], "
                                     f"got dtype {m.dtype}, shape {m.shape}")
            tok = tok.astype(np.int64, copy=False)
            if eot_id is not None:
                tok = np.append(tok, eot_id)
            if tok.size != plan.doc_lengths[d]:
                raise ValueError(f"docs[{d}] has {tok.size} tokens (eot included) but the plan was made for "
                                 f"{plan.doc_lengths[d]}")
            ids[i, o:o + n] = tok[s:s + n]
            nxt = tok[s + 1:s + n + 1]  # the targets: n of them, or n - 1 at the document's end
            if loss_masks is not None:
                keep = np.asarray(loss_masks[d], dtype=bool)
                if eot_id is not None:
                    keep = np.append(keep, True)
                nxt = np.where(keep[s + 1:s + n + 1], nxt, ignore_index)
            labels[i, o:o + nxt.size] = nxt
            pos[i, o:o + n] = arange[:n]
            doc_index[i, o:o + n] = d
            used = o + n
        pos[i, used:] = arange[:L - used]  # padding: a segment of its own, positions from 0
        n_real += int(plan.length[plan.row_ptr[r]:plan.row_ptr[r + 1]].sum())
    cu = cu_seqlens_from_position_ids(pos) if R else np.zeros(1, dtype=np.int32)
    return {
        "input_ids": ids, "labels": labels, "position_ids": pos, "doc_index": doc_index, "cu_seqlens": cu,
        "efficiency": plan.efficiency, "batch_efficiency": n_real / (R * L) if R else 0.0,
    }


def iter_batches(plan: PackResult, docs: Sequence, batch_rows: int, *, pad_id: int, ignore_index: int = -100,
                 loss_masks: Optional[Sequence] = None, eot_id: Optional[int] = None, drop_last: bool = False,
                 start_row: int = 0):
    """Yield ``materialize_rows`` dicts of ``batch_rows`` consecutive rows of a plan (rows are already shuffled
    when the plan was made with a seed), from ``start_row`` on (to resume). The last, smaller batch is
    dropped with ``drop_last``. Builds only the batch being yielded, so memory stays O(batch_rows · L)."""
    batch_rows = _check_int("batch_rows", batch_rows, 1)
    start_row = _check_int("start_row", start_row, 0)
    for lo in range(start_row, plan.n_rows, batch_rows):
        hi = min(lo + batch_rows, plan.n_rows)
        if drop_last and hi - lo < batch_rows:
            return
        yield materialize_rows(plan, docs, np.arange(lo, hi), pad_id=pad_id, ignore_index=ignore_index,
                               loss_masks=loss_masks, eot_id=eot_id)


def build_packed_rows(docs: Sequence, row_len: int, pad_id: int, ignore_index: int = -100,
                      loss_masks: Optional[Sequence] = None, algorithm: str = "bfd", overflow: str = "split",
                      seed: Optional[int] = 0, eot_id: Optional[int] = None) -> dict:
    """Pack ``docs`` (1-D int token arrays, no trailing eot) into [R, row_len] rows: ``pack`` then
    ``materialize_rows`` for every row. Returns the dict of ``materialize_rows`` plus ``plan``."""
    _check_docs(docs, loss_masks, eot_id)
    plan = pack(doc_lengths(docs, eot_id), row_len, algorithm, overflow, seed)
    out = materialize_rows(plan, docs, pad_id=pad_id, ignore_index=ignore_index, loss_masks=loss_masks,
                           eot_id=eot_id)
    out["plan"] = plan
    log.info("packed %d documents into %d rows of %d (%s, %s): efficiency %.2f%%", len(docs), plan.n_rows,
             plan.row_len, algorithm, overflow, 100 * plan.efficiency)
    return out


def build_unpacked_rows(docs: Sequence, row_len: int, pad_id: int, ignore_index: int = -100,
                        loss_masks: Optional[Sequence] = None, overflow: str = "truncate",
                        seed: Optional[int] = None, eot_id: Optional[int] = None) -> dict:
    """One document (``truncate``) or one chunk (``split``) per row, padded; same output as
    ``build_packed_rows``, so a loader can switch with ``packing: true|false``."""
    _check_docs(docs, loss_masks, eot_id)
    plan = plan_unpacked(doc_lengths(docs, eot_id), row_len, overflow, seed)
    out = materialize_rows(plan, docs, pad_id=pad_id, ignore_index=ignore_index, loss_masks=loss_masks,
                           eot_id=eot_id)
    out["plan"] = plan
    log.info("laid %d documents into %d unpacked rows of %d: efficiency %.2f%%", len(docs), plan.n_rows,
             plan.row_len, 100 * plan.efficiency)
    return out


def build_rows(docs: Sequence, row_len: int, pad_id: int, *, packing: bool = True, ignore_index: int = -100,
               loss_masks: Optional[Sequence] = None, algorithm: str = "bfd", overflow: str = "split",
               seed: Optional[int] = 0, eot_id: Optional[int] = None) -> dict:
    """``build_packed_rows`` when ``packing`` (config ``data.packing``), else ``build_unpacked_rows``, with the
    same arguments (``algorithm`` is ignored without packing)."""
    if packing:
        return build_packed_rows(docs, row_len, pad_id, ignore_index, loss_masks, algorithm, overflow, seed,
                                 eot_id)
    return build_unpacked_rows(docs, row_len, pad_id, ignore_index, loss_masks, overflow, seed, eot_id)
