"""Small stand-in models and a word tokenizer for the evaluation tests (tests/test_eval_*.py).

Each model maps input_ids [B, T] -> logits [B, T, V] and is causal (position t sees tokens <= t only), which
is all the evaluation functions assume.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch
import torch.nn as nn


class UniformLM(nn.Module):
    """All logits zero: p(token) = 1/V everywhere, so every token costs ln V nats."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("anchor", torch.zeros(1))  # gives the module a device

    def forward(self, input_ids):
        B, T = input_ids.shape
        return torch.zeros(B, T, self.vocab_size, device=input_ids.device)


class PrefixMeanLM(nn.Module):
    """logits_t = W · mean(E[s_0..s_t]) + b: random, causal, and every logit depends on the whole prefix,
    so a wrong context window changes the scores (what the window tests need)."""

    def __init__(self, vocab_size: int, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab_size, dim, generator=g))
        self.out = nn.Parameter(torch.randn(vocab_size, dim, generator=g))
        self.bias = nn.Parameter(torch.randn(vocab_size, generator=g))

    def forward(self, input_ids):
        e = self.emb[input_ids]  # [B, T, d]
        n = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device, dtype=e.dtype)[None, :, None]
        return (e.cumsum(1) / n) @ self.out.t() + self.bias


class KeywordLM(nn.Module):
    """A causal sentiment 'model': the logit of token ``pos_id`` (``neg_id``) is ``bias_pos`` (``bias_neg``) plus
    ``strength`` per positive (negative) keyword seen so far; every other logit is 0."""

    def __init__(self, vocab_size: int, pos_id: int, neg_id: int, pos_words: Sequence[int], neg_words: Sequence[int],
                 strength: float = 2.0, bias_pos: float = 0.0, bias_neg: float = 0.0):
        super().__init__()
        self.vocab_size, self.pos_id, self.neg_id = vocab_size, pos_id, neg_id
        sign = torch.zeros(vocab_size)
        sign[list(pos_words)] = 1.0
        sign[list(neg_words)] = -1.0
        self.register_buffer("sign", sign)
        self.strength, self.bias_pos, self.bias_neg = strength, bias_pos, bias_neg

    def forward(self, input_ids):
        B, T = input_ids.shape
        s = self.sign[input_ids].cumsum(1)  # [B, T] running (#positive − #negative) keywords
        logits = torch.zeros(B, T, self.vocab_size, device=input_ids.device)
        logits[..., self.pos_id] = self.bias_pos + self.strength * s.clamp(min=0)
        logits[..., self.neg_id] = self.bias_neg + self.strength * (-s).clamp(min=0)
        return logits


class WordTokenizer:
    """Words with their leading space as tokens (GPT-2-like: " positive" is one token); decode(encode(s)) == s
    for text made of known words. Unknown words map to ``<unk>``."""

    name = "test-words"

    def __init__(self, words: Sequence[str]):
        pieces = ["<|endoftext|>", "<unk>", "\n", "\n\n", ":", " :"]
        for w in words:
            pieces += [w, " " + w]
        self.itos: List[str] = list(dict.fromkeys(pieces))
        self.stoi: Dict[str, int] = {p: i for i, p in enumerate(self.itos)}
        self.eot_id = 0
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(p, 1) for p in re.findall(r"\n+| ?[^\s:]+| ?:", text)]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)
