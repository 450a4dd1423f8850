"""Pre-tokenised, memory-mapped token shards with a content-keyed cache.

    key = ShardKey("tinystories", "validation", {"max_rows": 400})
    shard = build_shard(texts, tokenizer, ".cache/mllm", key)   # tokenises once, then reads the cache
    shard.tokens            # np.memmap [n_tokens], uint16 when vocab < 65,536 else uint32
    shard.doc_offsets       # np.int64 [n_docs + 1]; document i is tokens[doc_offsets[i]:doc_offsets[i + 1]]
    shard.doc_lengths       # np.int64 [n_docs] = diff(doc_offsets), what packing needs

Layout: document i is ``encode_ordinary(texts[i]) + [eot_id]`` (every document, the last one too, ends with the
end-of-text id, GPT-2/nanoGPT style), so ``tokens = concat_i(doc_i)`` and ``doc_offsets[i] = sum_{j<i} len(doc_j)``.
Documents map 1:1 to ``texts`` (an empty text is the single token ``eot_id``). Text is encoded without special
tokens, so a literal ``<|endoftext|>`` inside a document cannot fake a document boundary.

A shard is a folder ``<cache_dir>/<dataset>-<split>-<tokenizer>-<digest>/`` holding ``tokens.bin`` (raw array),
``doc_offsets.npy`` and ``meta.json``. ``digest`` hashes the key's params, the tokenizer (name, vocab size, eot id,
and its ``fingerprint``: two GPT-2-shaped vocabularies both load as "gpt2"),
the texts' content and the format version, so any change gives a new folder rather than a stale hit. The folder is
written under a temporary name and renamed into place, so readers never see a half-written shard and concurrent
builders (e.g. several ranks) are safe: the first rename wins and the others use its result.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

FORMAT_VERSION = 1
_TOKENS, _OFFSETS, _META = "tokens.bin", "doc_offsets.npy", "meta.json"


def shard_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id fits (vocab_size <= 65,536), else np.uint32."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


@dataclass(frozen=True)
class ShardKey:
    """What a shard is made of: ``dataset`` and ``split`` (readable parts of the folder name) and ``params``
    (anything else that changes the texts, e.g. ``{"max_rows": 400, "raw": False}``; must be JSON-serialisable)."""
    dataset: str
    split: str = "all"
    params: Mapping[str, Any] = field(default_factory=dict)


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts, each length-prefixed so that ["ab", "c"] and ["a", "bc"] differ."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(part))[:64] or "_"


def shard_dirname(key: ShardKey, tokenizer, texts_sha256: str) -> str:
    """``<dataset>-<split>-<tokenizer>-<16 hex digits>``; the digest covers everything that changes the tokens."""
    try:
        params = json.dumps(dict(key.params), sort_keys=True)
    except TypeError as e:
        raise ValueError(f"ShardKey.params must be JSON-serialisable: {e}") from e
    blob = json.dumps({"v": FORMAT_VERSION, "dataset": key.dataset, "split": key.split, "params": params,
                       "tokenizer": [tokenizer.name, int(tokenizer.vocab_size), int(tokenizer.eot_id),
                                     getattr(tokenizer, "fingerprint", None)],
                       "texts": texts_sha256}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{_safe(key.dataset)}-{_safe(key.split)}-{_safe(tokenizer.name)}-{digest}"


@dataclass
class TokenShard:
    """A built shard: ``tokens`` (read-only np.memmap [n_tokens]), ``doc_offsets`` (int64 [n_docs + 1]), ``meta``."""
    path: Path
    tokens: np.ndarray
    doc_offsets: np.ndarray
    meta: Dict[str, Any]
    cache_hit: bool = False

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 [n_docs]: tokens per document, its trailing eot included."""
        return np.diff(self.doc_offsets)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a view into the memmap), ending with ``eot_id``."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document index {i} out of range for a shard of {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens[self.doc_offsets[i]: self.doc_offsets[i + 1]]

    def __len__(self) -> int:
        return self.n_tokens


def load_shard(path: Union[str, os.PathLike]) -> TokenShard:
    """Open a shard folder read-only; a missing, corrupt or inconsistent file raises ValueError naming it.

    Checked on every open (one pass over the tokens, ~0.3 s per GB): offsets increase, every document ends with
    ``eot_id``, every id is below ``vocab_size`` (on a GPU an out-of-range id would index past the embedding with
    no error), and the dtype is the one ``shard_dtype`` gives for the vocabulary."""
    path = Path(path)
    meta_path = path / _META
    if not meta_path.is_file():
        raise ValueError(f"{path}: not a token shard (no {_META})")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
        vocab_size, eot_id = int(meta["vocab_size"]), int(meta["eot_id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: corrupt shard metadata ({e}); delete {path} to rebuild") from e
    if not 0 < vocab_size <= 1 << 32 or dtype != shard_dtype(vocab_size):
        raise ValueError(f"{meta_path}: dtype {dtype} does not hold a vocabulary of {vocab_size} ids; delete {path} "
                         "to rebuild")
    try:
        offsets = np.load(path / _OFFSETS)
    except (OSError, ValueError, EOFError) as e:  # missing, empty or truncated .npy
        raise ValueError(f"{path / _OFFSETS}: unreadable ({type(e).__name__}: {e}); delete {path} to rebuild") from e
    size = (path / _TOKENS).stat().st_size if (path / _TOKENS).is_file() else -1
    if (offsets.dtype != np.int64 or offsets.shape != (n_docs + 1,) or offsets[0] != 0
            or offsets[-1] != n_tokens or size != n_tokens * dtype.itemsize):
        raise ValueError(f"{path}: shard files disagree with {_META} (n_tokens={n_tokens}, n_docs={n_docs}, "
                         f"{_TOKENS} has {size} bytes, offsets shape {offsets.shape}); delete it to rebuild")
    if n_docs and not (np.diff(offsets) >= 1).all():
        raise ValueError(f"{path / _OFFSETS}: offsets do not increase (every document holds at least its eot); "
                         f"delete {path} to rebuild")
    tokens = np.memmap(path / _TOKENS, dtype=dtype, mode="r", shape=(n_tokens,))
    if n_docs and not (tokens[offsets[1:] - 1] == eot_id).all():
        raise ValueError(f"{path}: a document does not end with eot_id={eot_id} (corrupt {_TOKENS} or {_OFFSETS}); "
                         f"delete it to rebuild")
    if n_tokens and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path / _TOKENS}: id {int(tokens.max())} outside the vocabulary [0, {vocab_size}); "
                         f"delete {path} to rebuild")
    return TokenShard(path, tokens, offsets, meta)


def build_shard(texts: Sequence[str], tokenizer, cache_dir: Union[str, os.PathLike], key: Union[ShardKey, str],
                batch_size: int = 1024, progress: bool = True, rebuild: bool = False) -> TokenShard:
    """Tokenise ``texts`` into a cached shard (see the module docstring), or open the cached one.

    ``tokenizer``: an :mod:`mllm.data.tokenizer` object (``encode_batch``, ``eot_id``, ``vocab_size``, ``name``).
    ``key``: a :class:`ShardKey` or a dataset name. ``rebuild=True`` re-tokenises even when cached.
    Returns a :class:`TokenShard` with ``cache_hit`` telling whether it came from the cache.
    """
    if isinstance(key, str):
        key = ShardKey(key)
    if not isinstance(key, ShardKey):
        raise ValueError(f"key must be a ShardKey or a dataset name, got {type(key).__name__}")
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of documents, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"build_shard({key.dataset}/{key.split}): no texts to tokenise")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"build_shard: texts[{bad}] is {type(texts[bad]).__name__}, expected str")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    cache_dir = Path(cache_dir)
    digest = texts_digest(texts)
    final = cache_dir / shard_dirname(key, tokenizer, digest)
    if final.is_dir() and not rebuild:
        try:
            shard = load_shard(final)
        except ValueError as e:  # a cache is derived data: rebuild it rather than stop the run with a traceback
            warnings.warn(f"the token cache is damaged, rebuilding it: {e}")
            rebuild = True
        else:
            shard.cache_hit = True
            return shard

    dtype = shard_dtype(int(tokenizer.vocab_size))
    eot = int(tokenizer.eot_id)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        lengths = np.empty(len(texts), dtype=np.int64)
        with open(tmp / _TOKENS, "wb") as f, tqdm(total=len(texts), unit="doc", disable=not progress,
                                                 desc=f"tokenising {key.dataset}/{key.split}") as bar:
            for start in range(0, len(texts), batch_size):
                batch = tokenizer.encode_batch(texts[start: start + batch_size], allow_special=False)
                for j, ids in enumerate(batch):
                    ids.append(eot)  # the lists are fresh from the tokenizer, so appending in place is safe
                    lengths[start + j] = len(ids)
                flat = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64,
                                   count=int(lengths[start: start + len(batch)].sum()))
                if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
                    raise ValueError(f"tokenizer {tokenizer.name} produced id {int(flat.max())} outside "
                                     f"[0, {tokenizer.vocab_size})")
                f.write(flat.astype(dtype).tobytes())
                bar.update(len(batch))
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / _OFFSETS, offsets)
        meta = {"format_version": FORMAT_VERSION, "dataset": key.dataset, "split": key.split,
                "params": dict(key.params), "tokenizer": tokenizer.name, "vocab_size": int(tokenizer.vocab_size),
                "eot_id": eot, "dtype": dtype.name, "n_docs": len(texts), "n_tokens": int(offsets[-1]),
                "texts_sha256": digest}
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        if final.is_dir() and rebuild:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its (identical) shard into place first: use that one
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_shard(final)
