"""Perplexity conventions: a uniform model's perplexity is the vocabulary size; the HF sliding-window and the
lm-eval rolling windows match transcriptions of those two algorithms; WikiText documents and detokenising."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from eval_stubs import PrefixMeanLM, UniformLM
from mllm.evaluation.perplexity import (
    evaluate_perplexity, rolling_perplexity, rolling_windows, score_windows, sliding_windows, token_perplexity,
    wikitext_detokenize, wikitext_documents,
)


class CharTok:
    """bytes as ids + an end-of-text id, enough for rolling_perplexity."""
    eot_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_uniform_model_token_perplexity_is_vocab_size():
    V = 50
    tokens = torch.randint(0, V, (97,), generator=torch.Generator().manual_seed(0)).tolist()
    for stride in (None, 7, 16):
        res = token_perplexity(UniformLM(V), tokens, context=16, stride=stride)
        assert res["perplexity"] == pytest.approx(V, rel=1e-6)
        assert "sliding window" in res["convention"] and f"stride={stride or 16}" in res["convention"]


def test_uniform_model_rolling_metrics():
    V = 257
    docs = ["hello world  foo", "a b c d e f g h i j k"]
    res = rolling_perplexity(UniformLM(V), CharTok(), docs, context=5)
    n_tok = sum(len(d.encode()) for d in docs)  # every byte scored (the EOT prefix is not)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert res["n_tokens"] == n_tok and res["n_words"] == words and res["n_bytes"] == n_bytes
    assert res["token_perplexity"] == pytest.approx(V)
    assert res["word_perplexity"] == pytest.approx(math.exp(n_tok * math.log(V) / words))
    assert res["bits_per_byte"] == pytest.approx(n_tok * math.log2(V) / n_bytes)
    assert res["byte_perplexity"] == pytest.approx(math.exp(n_tok * math.log(V) / n_bytes))
    assert "lm-eval" in res["convention"]


def test_sliding_windows_stride_logic():
    # stride = context: disjoint windows, the first token of every window unscored
    assert sliding_windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # stride < context: every token but the first scored exactly once, with overlapping context
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, ctx, stride in [(37, 8, 3), (37, 8, 8), (9, 9, 1), (5, 16, 4)]:
        targets = [t for a, e, c in sliding_windows(n, ctx, stride) for t in range(c, e)]
        assert len(targets) == len(set(targets))
        if stride < ctx:
            assert sorted(targets) == list(range(1, n))
        for a, e, c in sliding_windows(n, ctx, stride):
            assert e - a <= ctx and a < c
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


@torch.no_grad()
def _hf_guide_nll(model, ids, max_length, stride):
    """The HF perplexity guide's loop, summing exact token NLLs instead of mean·trg_len."""
    seq_len = ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        inp = ids[begin:end][None]
        tgt = inp.clone()
        tgt[:, :-trg_len] = -100
        logits = model(inp)
        loss = F.cross_entropy(logits[0, :-1], tgt[0, 1:], ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((tgt[0, 1:] != -100).sum())
        prev_end = end
        if end == seq_len:
            break
    return nll, count


@pytest.mark.parametrize("ctx,stride", [(8, 8), (8, 3), (16, 1), (5, 4)])
def test_token_perplexity_matches_hf_guide(ctx, stride):
    V = 31
    model = PrefixMeanLM(V)
    ids = torch.randint(0, V, (41,), generator=torch.Generator().manual_seed(1))
    nll, count = _hf_guide_nll(model, ids, ctx, stride)
    res = token_perplexity(model, ids.tolist(), context=ctx, stride=stride, batch_size=3)
    assert res["n_tokens"] == count
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def _lm_eval_rolling(tokens, prefix, max_seq_len):
    """lm-eval-harness get_rolling_token_windows(context_len=1) + make_disjoint_window: (context, continuation)."""
    out = []
    pred_len = max_seq_len
    first = min(max_seq_len, len(tokens))
    out.append(([prefix] + tokens[:first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        wlen = min(len(tokens) - predicted, pred_len)
        end = predicted + wlen
        out.append((tokens[end - max_seq_len - 1:end - 1], tokens[end - wlen:end]))
        predicted += wlen
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in out]


@pytest.mark.parametrize("n,ctx", [(1, 4), (4, 4), (5, 4), (23, 6), (30, 1)])
def test_rolling_windows_match_lm_eval(n, ctx):
    doc = list(range(100, 100 + n))
    seq = [7] + doc
    mine = [(seq[a:c], seq[c:e]) for a, e, c in rolling_windows(len(seq), ctx)]
    # lm-eval's context + continuation[:-1] is the model input; mine feeds seq[a:e-1] and scores seq[c:e]
    assert mine == _lm_eval_rolling(doc, 7, ctx)
    model = PrefixMeanLM(200)
    nll, k = score_windows(model, seq, rolling_windows(len(seq), ctx))
    ref = 0.0
    for context, cont in _lm_eval_rolling(doc, 7, ctx):
        inp = torch.tensor(context + cont[:-1])[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(inp)[0], -1)[-len(cont):]
        ref -= float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())
    assert k == n and nll == pytest.approx(ref, rel=1e-5)


def test_score_windows_rejects_bad_input():
    with pytest.raises(ValueError, match="bad window"):
        score_windows(UniformLM(5), [1, 2, 3], [(0, 3, 0)])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_perplexity(UniformLM(5), [1], context=4)


def test_model_must_return_logits():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        token_perplexity(Bad(), [1, 2, 3], context=4)


WIKI = [" = Alpha = \n", " \n", " Alpha is a letter @-@ like thing , with ( brackets ) . \n", " \n",
        " = = History = = \n", " It 's old . \n", " = Beta = \n", " Beta follows 1 @,@ 000 times . \n"]


def test_wikitext_documents_and_detokenizer():
    docs = wikitext_documents(WIKI)
    assert len(docs) == 2 and docs[0].startswith("= Alpha =") and "= = History = =" in docs[0]
    assert docs[1].startswith("= Beta =")
    d = wikitext_detokenize(docs[0])
    assert "letter-like thing, with (brackets)." in d and "== History ==" in d and "It's old" in d
    assert "1,000" in wikitext_detokenize(docs[1])


def test_evaluate_perplexity_on_lines():
    res = evaluate_perplexity(UniformLM(257), CharTok(), WIKI, context=16, progress=False)
    assert res["n_documents"] == 2 and res["token"]["perplexity"] == pytest.approx(257)
    # words/bytes are counted on the original (tokenised) pages, as lm-eval does
    docs = wikitext_documents(WIKI)
    assert res["rolling"]["n_bytes"] == sum(len(d.encode()) for d in docs)
    assert res["rolling"]["n_tokens"] == sum(len(wikitext_detokenize(d).encode()) for d in docs)


def test_real_transformer_uniform_when_weights_zero():
    """Our Transformer with a zero LM head is a uniform model: token perplexity == vocab size exactly."""
    from mllm.config import ModelConfig
    from mllm.models import Transformer
    cfg = ModelConfig(vocab_size=97, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32)
    model = Transformer(cfg)
    with torch.no_grad():
        model.tok_emb.weight.zero_()
    tokens = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    assert token_perplexity(model, tokens, context=32, stride=16)["perplexity"] == pytest.approx(97, rel=1e-5)
