"""Tokenizers: GPT-2 byte-level BPE (through ``tiktoken``) and a file-free byte tokenizer for tests.

    tok = get_tokenizer("gpt2")                 # local files first, then tiktoken's own download
    tok = get_tokenizer("gpt2", "/path/to/gpt2-tokenizer")   # folder with encoder.json + vocab.bpe
    tok = get_tokenizer("byte")                 # 256 byte ids + <|endoftext|> = 256, needs no files
    ids = tok.encode("Hello world")             # [15496, 995]
    tok.decode(ids) == "Hello world"

Both tokenizers expose ``encode(text) -> list[int]``, ``encode_batch(texts) -> list[list[int]]``,
``decode(ids) -> str``, ``eot_id``, ``vocab_size`` and ``name`` (``name`` identifies the id mapping and is
part of token-shard cache keys, so two tokenizers with the same name must give identical ids).

Special tokens: ``encode``/``encode_batch`` map the literal text ``<|endoftext|>`` to ``eot_id`` by default
(what HF's GPT-2 tokenizer does, and what prompt templates want). Corpus text should go through
``encode_ordinary``/``encode_batch(..., allow_special=False)`` instead, so that a document that happens to
contain that string cannot inject a document boundary; :mod:`mllm.data.shards` does this.

Where the GPT-2 files come from (first hit wins):
  1. ``path`` when given (a folder holding ``encoder.json`` + ``vocab.bpe``, or HF's ``vocab.json`` +
     ``merges.txt``; or the path of one of those files). Never falls back to the network.
  2. ``$MLLM_DATA_DIR/gpt2-tokenizer`` when that folder exists.
  3. ``tiktoken.get_encoding("gpt2")`` (downloads once into tiktoken's cache), skipped when
     ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``/``MLLM_OFFLINE`` is set.
Every miss raises :class:`TokenizerError` saying where it looked and how to fix it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import tiktoken

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
# SHA-256 of OpenAI's original files, the same hashes tiktoken pins for its "gpt2" encoding.
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's pre-tokenisation regex (tiktoken's r50k_pat_str); copied so that no tiktoken_ext import is needed.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

_ENCODER_NAMES = ("encoder.json", "vocab.json")  # OpenAI's name, HF's name for the same mapping
_MERGES_NAMES = ("vocab.bpe", "merges.txt")
_FIX_HINT = ("Fix: point data.tokenizer_path (or get_tokenizer(path=...)) at a folder holding encoder.json + "
             "vocab.bpe, or set MLLM_DATA_DIR to a data folder that has gpt2-tokenizer/ (e.g. ../shared/data), "
             "or allow network access so tiktoken can download 'gpt2'; data.tokenizer=byte needs no files.")


class TokenizerError(ValueError):
    """A tokenizer could not be built: missing/invalid files, unknown kind, or no network."""


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MLLM_OFFLINE"))


# ----------------------------------------------------------------------------------------------------
# GPT-2 BPE files -> tiktoken ranks
# ----------------------------------------------------------------------------------------------------
def _gpt2_byte_decoder() -> Dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes (``Ġ`` is the space): printable, non-space bytes stand for
    themselves, the other 68 bytes are mapped in order to chr(256), chr(257), ... This is the table of
    OpenAI's encoder.py ``bytes_to_unicode`` (and of tiktoken's data-gym loader), inverted."""
    keep = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + n)] = b
            n += 1
    return table


def _find_gpt2_files(path: Path) -> Tuple[Path, Path]:
    """(encoder.json, vocab.bpe) inside folder ``path`` (or next to the file ``path``)."""
    folder = path.parent if path.is_file() else path
    enc = next((folder / n for n in _ENCODER_NAMES if (folder / n).is_file()), None)
    merges = next((folder / n for n in _MERGES_NAMES if (folder / n).is_file()), None)
    if enc is None or merges is None:
        missing = [" or ".join(names) for names, f in ((_ENCODER_NAMES, enc), (_MERGES_NAMES, merges)) if f is None]
        where = f"folder {folder}" if folder.is_dir() else f"{folder} (no such folder)"
        raise TokenizerError(f"GPT-2 tokenizer files not found: looked for {', '.join(missing)} in {where}. "
                             + _FIX_HINT)
    return enc, merges


def gpt2_ranks_from_files(encoder_json: Union[str, Path], vocab_bpe: Union[str, Path]) -> Dict[bytes, int]:
    """tiktoken ``mergeable_ranks`` from GPT-2's ``encoder.json`` + ``vocab.bpe``.

    Rank of a single byte = its position in GPT-2's byte table; rank of the k-th merge ``a b`` = 256 + k.
    Equivalent to ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` (tested), but reads the files directly
    so that nothing is written to tiktoken's download cache (which is keyed by path, not content, and would go
    stale if the file at that path changed). Raises :class:`TokenizerError` if the two files disagree
    (the ranks implied by the merges must equal the ids in encoder.json) or are malformed.
    """
    encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
    byte_decoder = _gpt2_byte_decoder()

    def to_bytes(tok: str, where: str) -> bytes:
        try:
            return bytes(byte_decoder[ch] for ch in tok)
        except KeyError as e:
            raise TokenizerError(f"{where}: token {tok!r} has a character outside GPT-2's byte table") from e

    ranks: Dict[bytes, int] = {bytes([b]): i for i, b in enumerate(byte_decoder.values())}
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    if not lines or not lines[0].startswith("#version"):
        raise TokenizerError(f"{vocab_bpe}:1: expected a '#version: ...' header line, got {lines[0][:40]!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{vocab_bpe}:{lineno}: expected a merge rule 'a b', got {line[:60]!r}")
        ranks[to_bytes(parts[0], f"{vocab_bpe}:{lineno}") + to_bytes(parts[1], f"{vocab_bpe}:{lineno}")] = len(ranks)
    try:
        encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{encoder_json}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(encoder, dict):
        raise TokenizerError(f"{encoder_json}: expected a JSON object mapping token strings to ids")
    eot = encoder.pop(ENDOFTEXT, None)
    if eot != len(ranks):
        raise TokenizerError(f"{encoder_json}: '{ENDOFTEXT}' has id {eot}, expected {len(ranks)} "
                             f"(= 256 bytes + {len(ranks) - 256} merges in {vocab_bpe.name})")
    from_json = {to_bytes(k, str(encoder_json)): v for k, v in encoder.items()}
    if from_json != ranks:
        bad = next((k for k in ranks if from_json.get(k) != ranks[k]), None)
        raise TokenizerError(f"{encoder_json} and {vocab_bpe} disagree (e.g. token {bad!r}: id "
                             f"{from_json.get(bad)} in the json, rank {ranks.get(bad)} from the merges); "
                             "they must come from the same GPT-2 release")
    return ranks


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=8)
def _gpt2_encoding_from_folder(folder: str) -> tiktoken.Encoding:
    enc_path, merges_path = _find_gpt2_files(Path(folder))
    ranks = gpt2_ranks_from_files(enc_path, merges_path)
    if len(ranks) != GPT2_VOCAB_SIZE - 1:
        raise TokenizerError(f"{enc_path}: {len(ranks) + 1} tokens, GPT-2 has {GPT2_VOCAB_SIZE}")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def gpt2_files_are_official(folder: Union[str, Path]) -> bool:
    """True when the folder's files are byte-identical to OpenAI's (the hashes tiktoken pins for 'gpt2')."""
    enc, merges = _find_gpt2_files(Path(folder))
    return _sha256(enc) == GPT2_ENCODER_JSON_SHA256 and _sha256(merges) == GPT2_VOCAB_BPE_SHA256


# ----------------------------------------------------------------------------------------------------
# Tokenizer objects
# ----------------------------------------------------------------------------------------------------
def _num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class GPT2Tokenizer:
    """GPT-2 BPE: 50,257 ids, ``<|endoftext|>`` = 50256. ``source`` says where the ranks came from."""

    name = "gpt2"

    def __init__(self, encoding: tiktoken.Encoding, source: str):
        if encoding.n_vocab != GPT2_VOCAB_SIZE or encoding.eot_token != GPT2_EOT_ID:
            raise TokenizerError(f"{source}: not the GPT-2 encoding (n_vocab={encoding.n_vocab}, "
                                 f"eot={encoding.eot_token})")
        self._enc = encoding
        self.source = source
        self.eot_id = GPT2_EOT_ID
        self.vocab_size = GPT2_VOCAB_SIZE

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 over every id's bytes, in id order: equal iff the two vocabularies encode alike (any
        self-consistent encoder.json + vocab.bpe pair loads as "gpt2"; caches of token ids key on this)."""
        h = hashlib.sha256()
        for i in range(self.vocab_size - 1):  # the last id is <|endoftext|>, fixed
            b = self._enc.decode_single_token_bytes(i)
            h.update(len(b).to_bytes(2, "little"))
            h.update(b)
        return h.hexdigest()

    def encode(self, text: str, allow_special: bool = True) -> List[int]:
        """Token ids of ``text``; ``<|endoftext|>`` -> ``eot_id`` unless ``allow_special=False``."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> List[int]:
        """Token ids with every character treated as text (no special tokens)."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True,
                     num_threads: Optional[int] = None) -> List[List[int]]:
        """``[encode(t) for t in texts]``, computed by tiktoken's Rust BPE on a thread pool."""
        texts = list(texts)
        threads = num_threads or _num_threads()
        if allow_special:
            return self._enc.encode_batch(texts, num_threads=threads, allowed_special="all")
        return self._enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 from a cut multi-byte character becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:  # tiktoken raises a KeyError or an OverflowError that names neither
            raise ValueError(f"GPT2Tokenizer.decode: id {bad} is outside [0, {self.vocab_size})")
        return self._enc.decode(ids)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, ``<|endoftext|>`` = 256; ``vocab_size`` = 257. Needs no files.

    ``decode`` turns id 256 back into the text ``<|endoftext|>`` and invalid UTF-8 into U+FFFD, so
    ``decode(encode(s)) == s`` for every string ``s``.
    """

    name = "byte"
    fingerprint = "byte-256+eot"  # fixed: the ids are the bytes
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str, allow_special: bool = True) -> List[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        out: List[int] = []
        for i, piece in enumerate(text.split(ENDOFTEXT)):
            if i:
                out.append(self.eot_id)
            out.extend(piece.encode("utf-8"))
        return out

    def encode_ordinary(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True,
                     num_threads: Optional[int] = None) -> List[List[int]]:
        return [self.encode(t, allow_special) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        parts: List[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                parts.append(buf.decode("utf-8", errors="replace"))
                parts.append(ENDOFTEXT)
                buf = bytearray()
            elif 0 <= i < 256:
                buf.append(i)
            else:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside [0, {self.vocab_size})")
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


Tokenizer = Union[GPT2Tokenizer, ByteTokenizer]


def _gpt2_from_tiktoken(looked: List[str]) -> GPT2Tokenizer:
    if _offline():
        raise TokenizerError("GPT-2 tokenizer not found offline: looked in " + "; ".join(looked)
                             + " (and tiktoken's download was skipped because HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/"
                               "MLLM_OFFLINE is set). " + _FIX_HINT)
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError, blob errors, hash mismatch: all mean "no files"
        raise TokenizerError("GPT-2 tokenizer not found: looked in " + "; ".join(looked)
                             + f", and tiktoken.get_encoding('gpt2') failed ({type(e).__name__}: "
                             + f"{str(e)[:200]}). " + _FIX_HINT) from e
    return GPT2Tokenizer(enc, "tiktoken:gpt2")


def get_tokenizer(kind: str = "gpt2", path: Optional[Union[str, Path]] = None) -> Tokenizer:
    """Build the tokenizer named ``kind`` ("gpt2" | "byte"); see the module docstring for the lookup order."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "gpt2":
        raise TokenizerError(f"unknown tokenizer kind {kind!r}: expected 'gpt2' or 'byte' (config key data.tokenizer)")
    if path is not None:
        p = Path(path).expanduser().resolve()
        return GPT2Tokenizer(_gpt2_encoding_from_folder(str(p.parent if p.is_file() else p)), str(p))
    looked = []
    data_dir = os.environ.get("MLLM_DATA_DIR")
    if data_dir:
        folder = (Path(data_dir).expanduser() / "gpt2-tokenizer").resolve()
        if folder.is_dir():
            return GPT2Tokenizer(_gpt2_encoding_from_folder(str(folder)), str(folder))
        looked.append(f"{folder} (MLLM_DATA_DIR/gpt2-tokenizer: no such folder)")
    else:
        looked.append("$MLLM_DATA_DIR/gpt2-tokenizer (MLLM_DATA_DIR is not set)")
    return _gpt2_from_tiktoken(looked)


def tokenizer_from_config(data_cfg) -> Tokenizer:
    """``get_tokenizer(data.tokenizer, path)`` where path = data.tokenizer_path, else <data.data_dir>/gpt2-tokenizer
    when data.data_dir is set (MLLM_DATA_DIR is consulted by get_tokenizer itself)."""
    path = data_cfg.tokenizer_path
    if path is None and data_cfg.tokenizer == "gpt2" and data_cfg.data_dir:
        path = Path(data_cfg.data_dir) / "gpt2-tokenizer"
    return get_tokenizer(data_cfg.tokenizer, path)
