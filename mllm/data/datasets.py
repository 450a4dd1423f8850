"""One loader per dataset, with the datasets' real schemas, from local files or the Hugging Face hub.

    load_gsm8k(split="train", max_rows=100)        # [{"question": str, "answer": str}, ...]
    load_sst2("/data/sst2/train.tsv")              # [{"sentence": str, "label": int}, ...]
    load_wikitext2(split="validation")             # [{"text": article}, ...]  (granularity="lines" for lines)

Every loader is ``load_<name>(source=None, split=..., max_rows=None, ...)`` and returns a list of dict records:

=============  ===================================================  ==============================
name           record                                               hub (id, config)
=============  ===================================================  ==============================
wikitext2      {"text"}: an article (or a line)                     Salesforce/wikitext, wikitext-2-v1 / -raw-v1
wikitext103    {"text"}: an article (or a line)                     Salesforce/wikitext, wikitext-103-v1 / -raw-v1
tinystories    {"text"}: a story                                    roneneldan/TinyStories
alpaca         {"instruction", "input", "output"}                   tatsu-lab/alpaca
hh_rlhf        {"chosen", "rejected"}: whole dialogues              Anthropic/hh-rlhf (4 subsets)
gsm8k          {"question", "answer"}: answer ends "#### N"         openai/gsm8k, main
sst2           {"sentence", "label"}: 1 positive, 0 negative,       stanfordnlp/sst2
               -1 unlabelled (GLUE test)
=============  ===================================================  ==============================

``source``:
  * a file -> read that file (format from its name: .jsonl, .json, .tsv, .txt/.tokens/.raw, each optionally .gz);
  * a folder -> the split's file inside it, either the ``../shared/data`` layout (``<folder>/<dataset dir>/<file>``,
    used when the folder has any dataset's subfolder or ``gpt2-tokenizer/``) or the dataset's own folder
    (``<folder>/<file>``); no hub fallback;
  * ``"hub"`` -> the Hugging Face hub only;
  * ``None`` -> ``$MLLM_DATA_DIR`` (same layout) when the split's file is there, else the hub.
The hub is reached through ``datasets`` (imported lazily); with ``max_rows`` it streams, so a small slice never
downloads the whole dataset. With ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``/``MLLM_OFFLINE`` set, or no network,
a split that is not on disk is a :class:`DatasetError` naming the files looked for.

Errors (all :class:`DatasetError`, a ``ValueError``): missing dataset (lists the paths looked for), malformed line
(``file:line``), wrong schema (names the missing or mistyped fields and where).

Splits: names are ``train``, ``validation``, ``test`` (``valid``/``dev``/``val`` are accepted for validation).
The shared data folder holds only some splits (its README): carve held-out sets with :func:`split_holdout`, which is
deterministic per record, so any slice of a dataset agrees with the full dataset about which records are held out.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

ENDOFTEXT = "<|endoftext|>"
HH_RLHF_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
Record = Dict[str, Any]
PathLike = Union[str, os.PathLike]


class DatasetError(ValueError):
    """A dataset is missing, has a malformed line, or does not have the expected schema."""


# ----------------------------------------------------------------------------------------------------
# Dataset specifications
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and what its records look like.

    ``files[split]`` lists candidate file names (first existing wins) inside any of ``dirs`` (relative to a
    data folder); ``formats`` are the accepted file formats; ``fields`` the record schema (name -> type).
    """
    name: str
    fields: Dict[str, type]
    hub_id: str
    hub_config: Optional[str]
    splits: Tuple[str, ...]
    dirs: Tuple[str, ...]
    files: Dict[str, Tuple[str, ...]]
    formats: Tuple[str, ...]
    text_like: bool = False  # .txt/.tokens/.raw hold the dataset as plain text


_JSON_FORMATS = ("jsonl", "json")
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def _generic_files(split: str, exts: Sequence[str]) -> Tuple[str, ...]:
    out = []
    for alias in _SPLIT_ALIASES[split]:
        for ext in exts:
            out += [f"{alias}.{ext}", f"{alias}.{ext}.gz"]
    return tuple(out)


def _wikitext_spec(name: str, size: str, raw: bool) -> DatasetSpec:
    ext = "raw" if raw else "tokens"
    short = {"train": "train", "validation": "valid", "test": "test"}
    files = {s: (f"wiki.{short[s]}.{ext}",) + _generic_files(s, ("txt", "jsonl", "json")) for s in short}
    # the raw release unpacks to wikitext-2-raw/; accept raw files dropped next to the tokenized ones too
    dirs = (f"wikitext-{size}-raw", f"wikitext-{size}") if raw else (f"wikitext-{size}",)
    return DatasetSpec(name, {"text": str}, "Salesforce/wikitext", f"wikitext-{size}{'-raw' if raw else ''}-v1",
                       ("train", "validation", "test"), dirs, files, ("txt",) + _JSON_FORMATS, text_like=True)


def _spec(name: str, raw: bool = False) -> DatasetSpec:
    if name == "wikitext2":
        return _wikitext_spec(name, "2", raw)
    if name == "wikitext103":
        return _wikitext_spec(name, "103", raw)
    if name == "tinystories":
        files = {
            "train": ("TinyStoriesV2-GPT4-train.txt", "TinyStories-train.txt") + _generic_files("train", ("txt", "jsonl", "json")),
            "validation": ("TinyStoriesV2-GPT4-valid.txt", "TinyStories-valid.txt", "validation-head.txt")
            + _generic_files("validation", ("txt", "jsonl", "json")),
        }
        return DatasetSpec(name, {"text": str}, "roneneldan/TinyStories", None, ("train", "validation"),
                           ("tinystories", "TinyStories"), files, ("txt",) + _JSON_FORMATS, text_like=True)
    if name == "alpaca":
        return DatasetSpec(name, {"instruction": str, "input": str, "output": str}, "tatsu-lab/alpaca", None,
                           ("train",), ("alpaca",),
                           {"train": ("alpaca_data.json", "alpaca_data.json.gz") + _generic_files("train", _JSON_FORMATS)},
                           _JSON_FORMATS)
    if name == "hh_rlhf":
        # one file per subset; see _hh_rlhf_files
        return DatasetSpec(name, {"chosen": str, "rejected": str}, "Anthropic/hh-rlhf", None, ("train", "test"),
                           ("hh-rlhf",), {}, _JSON_FORMATS)
    if name == "gsm8k":
        return DatasetSpec(name, {"question": str, "answer": str}, "openai/gsm8k", "main", ("train", "test"),
                           ("gsm8k",), {s: _generic_files(s, _JSON_FORMATS) for s in ("train", "test")}, _JSON_FORMATS)
    if name == "sst2":
        return DatasetSpec(name, {"sentence": str, "label": int}, "stanfordnlp/sst2", None,
                           ("train", "validation", "test"), ("sst2", "SST-2"),
                           {s: _generic_files(s, ("tsv",) + _JSON_FORMATS) for s in ("train", "validation", "test")},
                           ("tsv",) + _JSON_FORMATS)
    raise DatasetError(f"unknown dataset {name!r}: known datasets are {', '.join(DATASET_NAMES)}")


DATASET_NAMES = ("wikitext2", "wikitext103", "tinystories", "alpaca", "hh_rlhf", "gsm8k", "sst2")


def _is_data_folder(folder: Path) -> bool:
    """True when ``folder`` has the ``../shared/data`` layout (a subfolder named after any dataset, or the tokenizer's):
    then only ``<folder>/<dataset dir>/<file>`` is a dataset's file, and a generic name at its root such as
    ``train.txt`` belongs to no dataset (it was read as TinyStories when ``tinystories/`` was missing)."""
    dirs = {"gpt2-tokenizer"}
    for name in DATASET_NAMES:
        for raw in (False, True):
            dirs.update(_spec(name, raw).dirs)
    return any((folder / d).is_dir() for d in dirs)


def normalize_split(split: str) -> str:
    """'train' | 'validation' | 'test' (accepts valid/dev/val for validation)."""
    for canon, aliases in _SPLIT_ALIASES.items():
        if split in aliases:
            return canon
    raise DatasetError(f"unknown split {split!r}: expected train, validation (valid/dev/val) or test")


# ----------------------------------------------------------------------------------------------------
# Resolution: where a dataset split comes from
# ----------------------------------------------------------------------------------------------------
@dataclass
class Resolution:
    """Where ``name``/``split`` resolves: ``kind`` is "local" (``paths``), "hub" (``hub``) or "missing"."""
    name: str
    split: str
    kind: str
    paths: List[Path] = field(default_factory=list)
    hub: Optional[str] = None
    looked: List[str] = field(default_factory=list)
    reason: str = ""

    @property
    def location(self) -> str:
        if self.kind == "local":
            return ", ".join(str(p) for p in self.paths)
        if self.kind == "hub":
            return f"hub:{self.hub}"
        return "missing"


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "MLLM_OFFLINE"))


def _hub_label(spec: DatasetSpec, split: str, subset: Optional[str] = None) -> str:
    cfg = f" ({spec.hub_config})" if spec.hub_config else ""
    sub = f" data_dir={subset}" if subset else ""
    return f"{spec.hub_id}{cfg}{sub} split={split}"


def _find_in_folder(folder: Path, dirs: Sequence[str], names: Sequence[str], looked: List[str],
                    layout_only: bool = False) -> Optional[Path]:
    """``folder/<dir>/<name>`` when ``folder`` has one of the dataset's ``dirs`` (the shared-data layout), else
    ``folder/<name>`` (``folder`` is the dataset's own folder) unless ``layout_only`` (a data folder such as
    ``$MLLM_DATA_DIR``, whose root may hold generic names like ``train.jsonl`` of no particular dataset)."""
    bases = [folder / d for d in dirs if (folder / d).is_dir()] or ([folder / dirs[0]] if layout_only else [folder])
    names = list(names) + [f"{n}.gz" for n in names if not n.endswith(".gz") and f"{n}.gz" not in names]
    for base in bases:
        for n in names:
            p = base / n
            if p.is_file():
                return p
    others = f" (or {len(names) - 1} other names: {', '.join(names[1:4])}{', ...' if len(names) > 4 else ''})" \
        if len(names) > 1 else ""
    looked.append(f"{bases[0] / names[0]}{others}")
    return None


def _hh_rlhf_files(folder: Path, split: str, subsets: Sequence[str], looked: List[str],
                   layout_only: bool = False) -> Optional[List[Path]]:
    """One file per subset: the shared layout ``hh-rlhf/<subset>-<split>.jsonl.gz`` or the official repository's
    ``<subset>/<split>.jsonl.gz``; None when any subset is missing (``looked`` then names the missing ones)."""
    found, ok = [], True
    for sub in subsets:
        names = [f"{sub}-{split}.jsonl.gz", f"{sub}-{split}.jsonl", f"{sub}/{split}.jsonl.gz", f"{sub}/{split}.jsonl"]
        p = _find_in_folder(folder, ("hh-rlhf",), names, looked, layout_only)
        if p is None:
            ok = False
        else:
            found.append(p)
    return found if ok else None


def _local_paths(spec: DatasetSpec, folder: Path, split: str, looked: List[str],
                 subsets: Sequence[str] = HH_RLHF_SUBSETS, layout_only: bool = False) -> Optional[List[Path]]:
    if spec.name == "hh_rlhf":
        return _hh_rlhf_files(folder, split, subsets, looked, layout_only)
    names = spec.files.get(split)
    if not names:
        looked.append(f"{folder}: {spec.name} has no {split} split (splits: {', '.join(spec.splits)})")
        return None
    p = _find_in_folder(folder, spec.dirs, names, looked, layout_only)
    return [p] if p else None


def resolve_source(name: str, data_dir: Optional[PathLike] = None, split: str = "train", *,
                   source: Optional[PathLike] = None, raw: bool = False,
                   subsets: Sequence[str] = HH_RLHF_SUBSETS) -> Resolution:
    """Where ``name``/``split`` would be loaded from, without reading it.

    ``source`` follows the loaders' rules (module docstring); ``data_dir`` (default ``$MLLM_DATA_DIR``) is the
    folder used when ``source`` is None. A hub resolution is only a promise: reachability is tested by loading.
    """
    spec = _spec(name, raw)
    split = normalize_split(split)
    looked: List[str] = []
    if source is not None and str(source) != "hub":
        p = Path(source).expanduser()
        if p.is_file():
            return Resolution(name, split, "local", [p])
        if p.is_dir():
            paths = _local_paths(spec, p, split, looked, subsets, layout_only=_is_data_folder(p))
            if paths:
                return Resolution(name, split, "local", paths, looked=looked)
            return Resolution(name, split, "missing", looked=looked,
                              reason=f"{name} {split}: no file in {p} (looked for {'; '.join(looked)})")
        return Resolution(name, split, "missing", looked=[str(p)], reason=f"{name}: source {p} does not exist")
    if source is None:
        d = data_dir if data_dir is not None else os.environ.get("MLLM_DATA_DIR")
        if d:
            folder = Path(d).expanduser()
            if folder.is_dir():
                paths = _local_paths(spec, folder, split, looked, subsets, layout_only=True)
                if paths:
                    return Resolution(name, split, "local", paths, looked=looked)
            else:
                looked.append(f"{folder} (data folder " + ("is a file, not a folder)" if folder.exists() else
                                                          "does not exist)"))
        else:
            looked.append("no local folder (MLLM_DATA_DIR / data.data_dir unset)")
    if split not in spec.splits:
        return Resolution(name, split, "missing", looked=looked,
                          reason=f"{name} has no {split} split on the hub (splits: {', '.join(spec.splits)})")
    hub = _hub_label(spec, split)
    if _offline():
        return Resolution(name, split, "missing", hub=hub, looked=looked,
                          reason=f"{name} {split}: not on disk (looked for {'; '.join(looked)}) and the Hugging Face "
                                 f"hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set), so {hub} cannot be "
                                 "fetched. Fix: set MLLM_DATA_DIR (or data.data_dir) to a folder holding the file, "
                                 "pass source=<file>, or unset the offline variables on a machine with internet.")
    return Resolution(name, split, "hub", hub=hub, looked=looked)


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------
def file_format(path: PathLike) -> str:
    """'jsonl' | 'json' | 'tsv' | 'txt' from the file name (a trailing .gz is allowed; .tokens/.raw are txt)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    fmt = {"jsonl": "jsonl", "json": "json", "tsv": "tsv", "txt": "txt", "tokens": "txt", "raw": "txt"}.get(ext)
    if fmt is None:
        raise DatasetError(f"{path}: unsupported file type '.{ext}' (supported: .jsonl, .json, .tsv, .txt, "
                           ".tokens, .raw, each optionally .gz)")
    return fmt


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_lines(path: PathLike) -> Iterator[Tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 text file, gzip-compressed or not.

    Lines are split at ``\n`` only and decoded one by one, so undecodable bytes raise :class:`DatasetError`
    with the exact line number (as does a corrupt gzip stream). ``\r\n`` is normalised to ``\n``."""
    path = Path(path)
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                yield lineno, line
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}:{lineno + 1}: cannot read ({type(e).__name__}: {e})") from e


def iter_jsonl(path: PathLike) -> Iterator[Tuple[str, Any]]:
    """(location ``file:line``, object) per non-blank line; a line that is not JSON raises with its number."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from e


def iter_json_array(path: PathLike) -> Iterator[Tuple[str, Any]]:
    """(location ``file record #i``, object) for a file holding one JSON array (or {"data": [...]})."""
    text = "".join(line for _, line in iter_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
    for i, obj in enumerate(data):
        yield f"{path} record #{i}", obj


def iter_tsv(path: PathLike) -> Iterator[Tuple[str, Dict[str, str]]]:
    """(location ``file:line``, {column: value}) per row of a tab-separated file with a header line.

    Values are kept verbatim (SST-2 sentences end with a space); a row with the wrong number of columns raises."""
    lines = iter_lines(path)
    header_line = next(lines, None)
    if header_line is None:
        raise DatasetError(f"{path}:1: empty file (expected a header line)")
    header = header_line[1].rstrip("\n").split("\t")
    for lineno, line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != len(header):
            raise DatasetError(f"{path}:{lineno}: malformed TSV row: {len(cols)} columns, the header "
                               f"({' | '.join(header)}) has {len(header)}")
        yield f"{path}:{lineno}", dict(zip(header, cols))


def iter_records(path: PathLike) -> Iterator[Tuple[str, Any]]:
    """(location, raw record) for a json/jsonl/tsv file."""
    fmt = file_format(path)
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "json":
        return iter_json_array(path)
    if fmt == "tsv":
        return iter_tsv(path)
    raise DatasetError(f"{path}: a .txt file holds plain text, not records")


def check_schema(obj: Any, fields: Dict[str, type], where: str) -> Record:
    """``{f: obj[f]}`` for the schema's fields; raises naming missing or mistyped fields and ``where``."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object with fields {', '.join(fields)}, "
                           f"got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DatasetError(f"{where}: wrong schema, missing field(s) {', '.join(repr(m) for m in missing)} "
                           f"(expected {', '.join(fields)}; found {', '.join(map(str, obj)) or 'none'})")
    out = {}
    for f, tp in fields.items():
        v = obj[f]
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise DatasetError(f"{where}: wrong schema, field {f!r} should be {tp.__name__}, "
                               f"got {type(v).__name__} {str(v)[:40]!r}")
        out[f] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Text datasets: documents from lines
# ----------------------------------------------------------------------------------------------------
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def is_wikitext_title(line: str) -> bool:
    """True for an article heading `` = Title = `` (not a section `` = = Section = = ``)."""
    return bool(_WIKI_TITLE.match(line.rstrip("\n")))


def wikitext_documents(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines (with their newlines) into articles: a new article starts at each `` = Title = `` line.

    Each article is the exact concatenation of its lines, so ``"".join(documents) == "".join(lines)`` as long as
    the input is not all whitespace (lines before the first title belong to the first article; whitespace-only
    articles are dropped)."""
    cur: List[str] = []
    for line in lines:
        if is_wikitext_title(line) and any(c.strip() for c in cur):
            yield "".join(cur)
            cur = []
        cur.append(line)
    if any(c.strip() for c in cur):
        yield "".join(cur)


STORY_OPENERS = ("Once upon a time", "Once there was", "Once there were", "Once there lived")


def tinystories_stories(lines: Iterable[str], mode: str = "auto", first_chunk: str = "") -> Iterator[str]:
    """Stories (stripped, non-empty) from TinyStories text lines.

    ``mode``:
      * ``"eot"``: stories are separated by ``<|endoftext|>`` (the official ``TinyStories*-valid/train.txt``);
      * ``"openers"``: blank-line-separated blocks; since paragraphs inside a story are also blank-line-separated,
        a block starting with one of :data:`STORY_OPENERS` starts a new story and any other block continues the
        current one. On ``validation-head.txt`` this gives 785 stories for the ~1,000 in the file: stories that open
        otherwise ("One day, ...") stay attached to the previous story, so a document is one or more whole stories
        and never half a story (except the file's first, which starts mid-story);
      * ``"paragraphs"``: every blank-line-separated block is its own document;
      * ``"auto"``: ``"eot"`` when ``first_chunk`` (the file's beginning) contains ``<|endoftext|>``, else ``"openers"``.
    """
    if mode == "auto":
        mode = "eot" if ENDOFTEXT in first_chunk else "openers"
    if mode == "eot":
        buf = ""
        for line in lines:
            buf += line
            if ENDOFTEXT in line:  # the marker has no newline, so it never spans two lines
                *done, buf = buf.split(ENDOFTEXT)
                for s in done:
                    if s.strip():
                        yield s.strip()
        if buf.strip():
            yield buf.strip()
        return
    if mode not in ("openers", "paragraphs"):
        raise DatasetError(f"unknown TinyStories split mode {mode!r}: expected auto, eot, openers or paragraphs")

    def blocks() -> Iterator[str]:
        cur: List[str] = []
        for line in lines:
            if line.strip():
                cur.append(line)
            elif cur:
                yield "".join(cur).strip()
                cur = []
        if cur:
            yield "".join(cur).strip()

    if mode == "paragraphs":
        yield from blocks()
        return
    story: List[str] = []
    for block in blocks():
        if story and block.startswith(STORY_OPENERS):
            yield "\n\n".join(story)
            story = []
        story.append(block)
    if story:
        yield "\n\n".join(story)


def _peek(path: Path, n_chars: int = 1 << 16) -> str:
    out, size = [], 0
    for _, line in iter_lines(path):
        out.append(line)
        size += len(line)
        if size >= n_chars:
            break
    return "".join(out)


def _text_lines_from_file(path: Path, where_fields: Dict[str, type]) -> Iterator[str]:
    """Lines of a text file, or the "text" field of each json/jsonl record (HF exports of WikiText are lines)."""
    if file_format(path) == "txt":
        for _, line in iter_lines(path):
            yield line
    else:
        for where, obj in iter_records(path):
            yield check_schema(obj, where_fields, where)["text"]


# ----------------------------------------------------------------------------------------------------
# Record converters per dataset
# ----------------------------------------------------------------------------------------------------
_GSM8K_FINAL = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)\s*$")


def gsm8k_final_answer(answer_text: str, strict: bool = True) -> Optional[str]:
    """The final answer N of a GSM8K solution ending ``#### N``, normalised: commas and a leading ``+``
    removed, a trailing ``.0...`` dropped (``"#### 1,000"`` -> ``"1000"``, ``"#### -3"`` -> ``"-3"``).

    Missing or non-numeric ``####`` line: :class:`DatasetError` when ``strict``, else None (for model outputs)."""
    m = _GSM8K_FINAL.search(answer_text.strip())
    if m is None:
        if strict:
            tail = answer_text.strip().splitlines()[-1:] or [""]
            raise DatasetError(f"GSM8K answer has no final '#### <number>' line (last line: {tail[0][:60]!r})")
        return None
    num = m.group(1).replace(",", "").lstrip("+")
    if "." in num:
        num = num.rstrip("0").rstrip(".") or "0"
    if num in ("-0", ""):
        num = "0"
    return num


def _convert_gsm8k(obj: Any, where: str) -> Record:
    rec = check_schema(obj, {"question": str, "answer": str}, where)
    try:
        gsm8k_final_answer(rec["answer"])
    except DatasetError as e:
        raise DatasetError(f"{where}: wrong schema, field 'answer': {e}") from e
    return rec


def _convert_sst2(obj: Any, where: str, split: str) -> Record:
    if isinstance(obj, dict) and "label" not in obj and split == "test" and "sentence" in obj:
        obj = {**obj, "label": -1}  # the GLUE test split is unlabelled (HF uses -1 too)
    if isinstance(obj, dict) and isinstance(obj.get("label"), str):
        s = obj["label"].strip()
        if not re.fullmatch(r"-?\d+", s):
            raise DatasetError(f"{where}: wrong schema, field 'label' should be 0 or 1, got {s[:20]!r}")
        obj = {**obj, "label": int(s)}
    rec = check_schema(obj, {"sentence": str, "label": int}, where)
    allowed = (0, 1, -1) if split == "test" else (0, 1)  # only GLUE's test split is unlabelled
    if rec["label"] not in allowed:
        what = "0, 1 (or -1 unlabelled)" if split == "test" else f"0 or 1 in the {split} split"
        raise DatasetError(f"{where}: wrong schema, field 'label' should be {what}, got {rec['label']}")
    return rec


def _converter(name: str, split: str) -> Callable[[Any, str], Record]:
    if name == "gsm8k":
        return _convert_gsm8k
    if name == "sst2":
        return lambda obj, where: _convert_sst2(obj, where, split)
    fields = _spec(name).fields
    return lambda obj, where: check_schema(obj, fields, where)


# ----------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------
def _hub_rows(spec: DatasetSpec, split: str, max_rows: Optional[int], subset: Optional[str] = None,
              looked: Sequence[str] = ()) -> Iterator[Tuple[str, Any]]:
    """(location, row) from the hub; streams when ``max_rows`` is set (the caller stops early)."""
    label = _hub_label(spec, split, subset)
    where_local = f" (looked on disk for {'; '.join(looked)})" if looked else ""
    if _offline():
        raise DatasetError(f"{spec.name} {split}: not on disk{where_local} and the Hugging Face hub is offline "
                           f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set), so {label} cannot be fetched. Fix: set "
                           "MLLM_DATA_DIR (or data.data_dir) to a folder holding the file, or pass source=<file>.")
    try:
        import datasets as hf_datasets  # lazily: heavy, and absent on the GPU image
    except ImportError as e:
        raise DatasetError(f"{spec.name} {split}: not on disk{where_local}, and loading {label} from the hub needs "
                           "the 'datasets' package (pip install datasets)") from e
    kwargs: Dict[str, Any] = {"split": split}
    if spec.hub_config:
        kwargs["name"] = spec.hub_config
    if subset:
        kwargs["data_dir"] = subset
    if max_rows is not None:
        kwargs["streaming"] = True
    try:
        ds = hf_datasets.load_dataset(spec.hub_id, **kwargs)
        for i, row in enumerate(ds):
            yield f"hub {label} row {i}", row
    except DatasetError:
        raise
    except Exception as e:  # connection errors, missing splits, auth: all mean "not loadable from the hub"
        raise DatasetError(f"{spec.name} {split}: not on disk{where_local}, and the hub load of {label} failed "
                           f"({type(e).__name__}: {str(e)[:300]}). Fix: check the network, or set MLLM_DATA_DIR "
                           "to a folder holding the file.") from e


# ----------------------------------------------------------------------------------------------------
# The generic loader
# ----------------------------------------------------------------------------------------------------
def _check_max_rows(max_rows: Optional[int]) -> None:
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows <= 0):
        raise DatasetError(f"max_rows must be a positive integer or None, got {max_rows!r}")


def _raw_rows(name: str, spec: DatasetSpec, res: Resolution, split: str, max_rows: Optional[int],
              subsets: Sequence[str]) -> Iterator[Tuple[str, Any]]:
    if res.kind == "local":
        for p in res.paths:
            fmt = file_format(p)
            if fmt not in spec.formats:
                raise DatasetError(f"{p}: {name} cannot be read from a .{fmt} file "
                                   f"(supported: {', '.join(spec.formats)}, optionally .gz)")
            n = 0
            for row in iter_records(p):
                n += 1
                yield row
            if n == 0:  # one empty hh-rlhf subset file silently contributed no pairs
                raise DatasetError(f"{p}: no {name} records in the file (is it empty?)")
    elif name == "hh_rlhf":
        for sub in subsets:
            yield from _hub_rows(spec, split, max_rows, sub, res.looked)
    else:
        yield from _hub_rows(spec, split, max_rows, None, res.looked)


def _resolve_or_raise(name: str, source, split: str, raw: bool = False,
                      subsets: Sequence[str] = HH_RLHF_SUBSETS) -> Resolution:
    res = resolve_source(name, None, split, source=source, raw=raw, subsets=subsets)
    if res.kind == "missing":
        raise DatasetError(res.reason or f"{name} {split}: not found (looked for {'; '.join(res.looked)})")
    return res


def _load_records(name: str, source, split: str, max_rows: Optional[int],
                  subsets: Sequence[str] = HH_RLHF_SUBSETS) -> List[Record]:
    _check_max_rows(max_rows)
    split = normalize_split(split)
    spec = _spec(name)
    res = _resolve_or_raise(name, source, split, subsets=subsets)
    convert = _converter(name, split)
    rows = (convert(obj, where) for where, obj in _raw_rows(name, spec, res, split, max_rows, subsets))
    out = list(itertools.islice(rows, max_rows))
    if not out and res.kind == "local":  # an empty file would only fail later, far from its name
        raise DatasetError(f"{', '.join(map(str, res.paths))}: no {name} records in the {split} split's file(s)")
    return out


def _load_text(name: str, source, split: str, max_rows: Optional[int], raw: bool, granularity: str,
               story_split: str = "auto") -> List[Record]:
    _check_max_rows(max_rows)
    split = normalize_split(split)
    spec = _spec(name, raw)
    res = _resolve_or_raise(name, source, split, raw=raw)
    is_wiki = name.startswith("wikitext")
    if is_wiki and granularity not in ("documents", "lines"):
        raise DatasetError(f"granularity must be 'documents' or 'lines', got {granularity!r}")
    # A hub row of WikiText is a line; with max_rows documents we stream lines until enough articles have started.
    if res.kind == "local":
        p = res.paths[0]
        fmt = file_format(p)
        if fmt not in spec.formats:
            raise DatasetError(f"{p}: {name} cannot be read from a .{fmt} file "
                               f"(supported: .txt/.tokens/.raw, .jsonl, .json, optionally .gz)")
        if not is_wiki and fmt != "txt":  # one record per story
            texts: Iterable[str] = (check_schema(o, {"text": str}, w)["text"].strip() for w, o in iter_records(p))
        elif not is_wiki:
            texts = tinystories_stories((line for _, line in iter_lines(p)), story_split, _peek(p))
        else:
            texts = _text_lines_from_file(p, {"text": str})
    else:
        rows = _hub_rows(spec, split, max_rows, None, res.looked)
        texts = (check_schema(o, {"text": str}, w)["text"] for w, o in rows)
        if not is_wiki:
            texts = (t.strip() for t in texts)
    if is_wiki and granularity == "documents":
        texts = wikitext_documents(texts)
    elif not is_wiki:
        texts = (t for t in texts if t)  # an empty story is not a document
    out = [{"text": t} for t in itertools.islice(texts, max_rows)]
    if not out and res.kind == "local":  # an empty file used to load as 0 documents without a word
        what = "lines" if granularity == "lines" and is_wiki else "documents"
        raise DatasetError(f"{res.paths[0]}: no {name} {what} in the {split} split's file (is it empty?)")
    return out


# ----------------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------------
def load_wikitext2(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None,
                   raw: bool = False, granularity: str = "documents") -> List[Record]:
    """WikiText-2 (v1). ``raw=False``: the tokenized release (``<unk>``, `` @-@ ``), files ``wiki.<split>.tokens``;
    ``raw=True``: ``wiki.<split>.raw``. ``granularity="documents"``: one record per article (its lines joined,
    newlines kept); ``"lines"``: one record per line, blank lines included (the hub's row schema).
    ``max_rows`` counts records of the chosen granularity. Local file: ``wikitext-2/wiki.valid.tokens``."""
    return _load_text("wikitext2", source, split, max_rows, raw, granularity)


def load_wikitext103(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None,
                     raw: bool = False, granularity: str = "documents") -> List[Record]:
    """WikiText-103 (v1); same conventions as :func:`load_wikitext2` (folder ``wikitext-103/``)."""
    return _load_text("wikitext103", source, split, max_rows, raw, granularity)


def load_tinystories(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None,
                     story_split: str = "auto") -> List[Record]:
    """TinyStories: one ``{"text": story}`` per story (stripped). Text files: see :func:`tinystories_stories` for
    ``story_split`` (``<|endoftext|>``-separated files are split exactly; blank-line-separated files such as
    ``validation-head.txt`` by story openers). json/jsonl files and the hub: one story per record."""
    return _load_text("tinystories", source, split, max_rows, False, "documents", story_split)


def load_alpaca(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None) -> List[Record]:
    """tatsu-lab/alpaca (52,002 records): ``{"instruction", "input", "output"}``; ``input`` may be ""."""
    return _load_records("alpaca", source, split, max_rows)


def load_hh_rlhf(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None,
                 subsets: Sequence[str] = HH_RLHF_SUBSETS) -> List[Record]:
    """Anthropic/hh-rlhf preference pairs ``{"chosen", "rejected"}`` (whole ``\\n\\nHuman: ``/``\\n\\nAssistant: ``
    dialogues), the ``subsets`` concatenated in order (default: all four, as the hub's default config does).
    Locally ``hh-rlhf/<subset>-<split>.jsonl.gz`` (shared layout) or ``<subset>/<split>.jsonl.gz``; every requested
    subset must be present. A file ``source`` is read alone."""
    for s in subsets:
        if s not in HH_RLHF_SUBSETS:
            raise DatasetError(f"unknown hh-rlhf subset {s!r}: expected some of {', '.join(HH_RLHF_SUBSETS)}")
    return _load_records("hh_rlhf", source, split, max_rows, subsets)


def load_gsm8k(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None) -> List[Record]:
    """GSM8K (main): ``{"question", "answer"}``; every answer must end with ``#### N`` (see :func:`gsm8k_final_answer`)."""
    return _load_records("gsm8k", source, split, max_rows)


def load_sst2(source: Optional[PathLike] = None, split: str = "train", max_rows: Optional[int] = None) -> List[Record]:
    """SST-2 (GLUE): ``{"sentence", "label"}``, label 1 positive / 0 negative; the unlabelled GLUE test split
    (``index<TAB>sentence``) gets label -1 like the hub. Sentences are kept verbatim (trailing space included)."""
    return _load_records("sst2", source, split, max_rows)


DATASETS: Dict[str, Callable[..., List[Record]]] = {
    "wikitext2": load_wikitext2,
    "wikitext103": load_wikitext103,
    "tinystories": load_tinystories,
    "alpaca": load_alpaca,
    "hh_rlhf": load_hh_rlhf,
    "gsm8k": load_gsm8k,
    "sst2": load_sst2,
}


def load_dataset(name: str, **kwargs) -> List[Record]:
    """``DATASETS[name](**kwargs)`` with a clear error for an unknown name."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)


def dataset_fields(name: str) -> Tuple[str, ...]:
    """The record schema's field names for ``name``."""
    return tuple(_spec(name).fields)


def local_splits(name: str, data_dir: Optional[PathLike] = None, raw: bool = False) -> List[str]:
    """Splits of ``name`` present on disk under ``data_dir`` (default ``$MLLM_DATA_DIR``)."""
    d = data_dir if data_dir is not None else os.environ.get("MLLM_DATA_DIR")
    if not d or not Path(d).is_dir():
        return []
    spec = _spec(name, raw)
    return [s for s in spec.splits if _local_paths(spec, Path(d), s, [], layout_only=True) is not None]


# ----------------------------------------------------------------------------------------------------
# Held-out carving
# ----------------------------------------------------------------------------------------------------
def holdout_score(record: Record, seed: int = 0, key: Optional[Union[str, Sequence[str]]] = None) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and the record's content (``key``: the fields hashed;
    default all): the first 8 bytes of SHA-256(``seed`` + canonical JSON) / 2^64."""
    if key is not None:
        keys = [key] if isinstance(key, str) else list(key)
        missing = [k for k in keys if k not in record]
        if missing:
            raise DatasetError(f"split_holdout: key field(s) {missing} not in record (fields: {', '.join(record)})")
        record = {k: record[k] for k in keys}
    blob = f"{seed}\x00".encode() + json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") / 2.0 ** 64


def split_holdout(records: Sequence[Record], fraction: float, seed: int = 0,
                  key: Optional[Union[str, Sequence[str]]] = None) -> Tuple[List[Record], List[Record]]:
    """(kept, held_out): a record is held out iff ``holdout_score(record, seed, key) < fraction``.

    Deterministic per record, not per list: any slice (``max_rows``) or reordering of a dataset holds out exactly
    the records the full dataset holds out, and duplicate records always land on the same side, so a development
    split carved here never leaks into training data carved elsewhere with the same seed. The held-out size is
    therefore ``fraction * len(records)`` only in expectation (binomial); order is preserved within each part.
    Use ``key`` to hold out by a field (e.g. ``"question"``) so that records sharing it stay together."""
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise DatasetError(f"split_holdout: fraction must be in [0, 1), got {fraction!r}")
    kept, held = [], []
    for r in records:
        (held if holdout_score(r, seed, key) < fraction else kept).append(r)
    return kept, held


# ----------------------------------------------------------------------------------------------------
# verify_datasets
# ----------------------------------------------------------------------------------------------------
QUICK_FULL_READ_BYTES = 64 << 20  # quick mode reads a local file whole below this size, else a bounded slice
QUICK_ROWS = 200


@dataclass
class VerifyRow:
    dataset: str
    split: str
    status: str  # "ok" | "error" | "unavailable"
    location: str
    rows: str = ""
    schema: str = ""
    sample: str = ""
    message: str = ""


def datasets_for_config(cfg) -> List[str]:
    """Datasets a :class:`~mllm.config.pipeline_config.PipelineConfig` uses: its ``data.pretrain_datasets``; alpaca
    and (when ``sft.gsm8k_weight`` > 0) gsm8k for SFT; hh_rlhf for DPO; gsm8k for the verifier and evaluation;
    sst2 for evaluation; and a WikiText for perplexity (the pretraining one, else wikitext2)."""
    names = list(cfg.data.pretrain_datasets)
    names += ["alpaca"] + (["gsm8k"] if cfg.sft.gsm8k_weight > 0 else []) + ["hh_rlhf", "gsm8k", "sst2"]
    if not any(n.startswith("wikitext") for n in names):
        names.append("wikitext2")
    out = []
    for n in names:
        if n not in DATASETS:
            raise DatasetError(f"config key 'data.pretrain_datasets': unknown dataset {n!r} "
                               f"(known: {', '.join(DATASETS)})")
        if n not in out:
            out.append(n)
    return out


def _shorten(text: str, n: int = 70) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _verify_split(name: str, split: str, data_dir: Optional[PathLike], quick: bool) -> VerifyRow:
    res = resolve_source(name, data_dir, split)
    if res.kind == "missing":
        return VerifyRow(name, split, "unavailable", "missing" if not res.hub else f"hub:{res.hub} (offline)",
                         message=res.reason)
    bounded = None
    if quick:
        if res.kind == "hub" or sum(p.stat().st_size for p in res.paths) > QUICK_FULL_READ_BYTES:
            bounded = QUICK_ROWS
    # the loader re-resolves from the same folder, so it reads exactly the files reported here
    source = "hub" if res.kind == "hub" else Path(data_dir or os.environ["MLLM_DATA_DIR"])
    try:
        records = DATASETS[name](source=source, split=split, max_rows=bounded)
    except DatasetError as e:
        return VerifyRow(name, split, "error", res.location, message=str(e))
    if not records:
        return VerifyRow(name, split, "error", res.location, message="no records")
    fields = dataset_fields(name)
    first = records[0]
    rows = f"{len(records):,}" + (f" (first {bounded})" if bounded and len(records) == bounded else "")
    sample = "; ".join(f"{f}={_shorten(first[f], 40)!s}" if not isinstance(first[f], str)
                       else f"{f}={_shorten(first[f], 40)!r}" for f in fields)
    return VerifyRow(name, split, "ok", res.location, rows, ",".join(fields) + " ok", sample)


def verify_datasets(names: Optional[Sequence[str]] = None, data_dir: Optional[PathLike] = None,
                    quick: bool = True) -> Tuple[List[VerifyRow], bool]:
    """One :class:`VerifyRow` per (dataset, split); ``ok`` is False when a dataset has no usable split or a
    split that resolves fails to load (missing file, malformed line, wrong schema).

    Every record read is schema-checked by the loaders. Quick mode reads local files below 64 MiB whole and
    otherwise (and on the hub) the first 200 records."""
    names = list(names) if names is not None else list(DATASETS)
    rows: List[VerifyRow] = []
    ok = True
    for name in names:
        if name not in DATASETS:
            rows.append(VerifyRow(name, "-", "error", "-", message=f"unknown dataset (known: {', '.join(DATASETS)})"))
            ok = False
            continue
        these = [_verify_split(name, s, data_dir, quick) for s in _spec(name).splits]
        if any(r.status == "error" for r in these) or not any(r.status == "ok" for r in these):
            ok = False
        else:  # usable: an absent extra split is expected (the shared folder has only some), not worth a note
            for r in these:
                if r.status == "unavailable":
                    r.message = ""
        rows += these
    return rows, ok


def format_verify_table(rows: Sequence[VerifyRow]) -> str:
    """A fixed-width table (dataset, split, status, source, rows, schema, sample), messages underneath."""
    head = ("dataset", "split", "status", "source", "rows", "schema", "sample")
    body = [(r.dataset, r.split, r.status.upper() if r.status != "ok" else "ok", _shorten(r.location, 60),
             r.rows, r.schema, r.sample) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    notes = [f"  {r.dataset}/{r.split}: {r.message}" for r in rows if r.message]
    if notes:
        lines += ["", "notes:"] + notes
    return "\n".join(lines)
