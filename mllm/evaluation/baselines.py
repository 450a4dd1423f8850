"""Hugging Face baselines (GPT-2, DistilGPT-2, or any causal LM folder) through the same evaluation functions.

    model, tok = load_baseline("gpt2")                 # hub name (cached, or downloaded when online)
    model, tok = load_baseline("/path/to/hf_folder")   # a local folder (config.json + weights)

``model`` is an :class:`HFCausalLM` adapter: ``model(input_ids) -> logits [B, T, V]`` like our Transformer,
plus ``generate_tokens(prompts, max_new_tokens, ...)`` (left-padded batched ``hf.generate``), which
:func:`mllm.evaluation.gsm8k.default_generate_fn` picks up. ``tok`` follows our tokenizer interface
(``encode``, ``decode``, ``eot_id``, ``vocab_size``, ``name``).

Offline without weights, :func:`load_baseline` raises :class:`BaselineUnavailable` whose message starts
with "skipped:"; :func:`skip_record` turns it into the record the report prints.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn


class BaselineUnavailable(RuntimeError):
    """The baseline's weights (or transformers itself) are not available; str(e) starts with "skipped:" and
    ``detail`` holds the underlying error, if any."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class HFTokenizer:
    """Our tokenizer interface over a ``transformers`` tokenizer (no special tokens added by ``encode``)."""

    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        self.eot_id = tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


class HFCausalLM(nn.Module):
    """``forward(input_ids [B, T]) -> logits [B, T, V]`` fp32 over a transformers causal LM, and batched
    generation in our ``generate`` signature. ``max_seq_len`` is the model's context length."""

    def __init__(self, hf_model, name: str):
        super().__init__()
        self.hf = hf_model.eval()
        self.name = name
        c = hf_model.config
        self.max_seq_len = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
        self.vocab_size = c.vocab_size

    def forward(self, input_ids: torch.Tensor, position_ids=None, cu_seqlens=None) -> torch.Tensor:
        if cu_seqlens is not None:
            raise ValueError("HFCausalLM does not support packed documents (cu_seqlens)")
        return self.hf(input_ids=input_ids, position_ids=position_ids).logits.float()

    @torch.no_grad()
    def generate_tokens(self, prompts: List[List[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                        seed: Optional[int] = None) -> List[List[int]]:
        """New tokens per prompt (through the first ``eos_id``, which is kept, like our ``generate``).

        Prompts are left-padded with an attention mask; sampling seeds torch's global RNG with ``seed``.
        HF's default top-k of 50 is switched off unless ``top_k`` is given.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        dev = next(self.hf.parameters()).device
        P = max(len(p) for p in prompts)
        pad = eos_id if eos_id is not None else 0
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos_id)
        if temperature > 0:
            if seed is not None:
                torch.manual_seed(seed)
            kw.update(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
        else:
            kw.update(do_sample=False, top_k=None, top_p=None, temperature=None)
        out = self.hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)[:, P:].tolist()
        res = []
        for row in out:
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            res.append(row)
        return res


def load_baseline(name_or_path: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                  tokenizer=None):
    """(HFCausalLM, tokenizer) for a hub name or a local folder; :class:`BaselineUnavailable` when it cannot be
    had (offline and not cached, no network, transformers missing).

    ``tokenizer``: use this one instead of the folder's (e.g. our GPT-2 tokenizer for a folder with weights
    only). Without one and without tokenizer files, GPT-2-vocabulary models (50257) get our GPT-2 tokenizer.
    """
    try:
        import transformers
    except ImportError as e:
        raise BaselineUnavailable(f"skipped: {name_or_path}: the transformers package is not installed "
                                  "(pip install transformers)") from e
    local = Path(name_or_path).expanduser()
    is_dir = local.is_dir()
    if not is_dir and name_or_path.startswith(("/", "./", "../", "~")):  # a path, not a hub name ("org/model")
        raise BaselineUnavailable(f"skipped: {name_or_path}: no such local folder")
    src = str(local) if is_dir else name_or_path
    only_local = is_dir or _offline()
    try:
        # transformers >= 4.56 takes ``dtype``; older versions call it ``torch_dtype``
        dkey = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        hf = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=only_local,
                                                               **{dkey: dtype or torch.float32})
    except (OSError, ValueError) as e:
        where = (f"local folder {local} has no loadable weights" if is_dir else
                 "not available offline (no local weights in the Hugging Face cache; HF_HUB_OFFLINE=1)"
                 if _offline() else "could not be downloaded from the Hugging Face hub")
        raise BaselineUnavailable(f"skipped: {name_or_path} {where}", f"{type(e).__name__}: {str(e)[:300]}") from e
    model = HFCausalLM(hf.to(device), name=Path(name_or_path).name if is_dir else name_or_path)
    if tokenizer is None:
        try:
            tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(src, local_files_only=only_local),
                                    name=f"hf:{name_or_path}")
        except (OSError, ValueError, TypeError):
            if hf.config.vocab_size != 50257:
                raise BaselineUnavailable(f"skipped: {name_or_path} has no tokenizer files and a non-GPT-2 "
                                          f"vocabulary ({hf.config.vocab_size}); pass a tokenizer") from None
            from mllm.data.tokenizer import get_tokenizer
            tokenizer = get_tokenizer("gpt2")
    return model, tokenizer


def skip_record(name: str, reason: str, detail: str = "") -> dict:
    """The results-JSON record of a baseline that did not run; the report prints ``reason`` (and ``detail``, the
    underlying error, in its baselines section)."""
    rec = {"name": name, "status": "skipped", "reason": reason if reason.startswith("skipped") else f"skipped: {reason}"}
    if detail:
        rec["detail"] = detail
    return rec
