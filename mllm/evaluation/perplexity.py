"""Perplexity, in the two conventions that published numbers use.

1. Token-level sliding-window perplexity (the Hugging Face perplexity guide). The corpus is one token
   stream s[0..N). Windows start at 0, stride, 2·stride, …; window w feeds s[begin:end] with
   end = min(begin + context, N) and scores only the tokens not scored by an earlier window
   (t ∈ [max(prev_end, begin + 1), end)); s[0] has no context and is never scored. The loop stops at the
   first window that reaches N. With stride = context (the default) windows are disjoint and the first
   token of every window is not scored; a smaller stride gives each scored token more context.

       token_ppl = exp( Σ_scored −log p(s_t | s[begin:t]) / #scored )

2. lm-eval-harness rolling log-likelihood per document (its ``wikitext`` task). Each document d is
   encoded alone and prefixed with the end-of-text token; every token of d is scored, in chunks of
   ``context`` targets whose input is the ``context`` tokens just before each chunk's end (maximal
   context, ``get_rolling_token_windows`` with context_len=1). Over all documents:

       word_ppl      = exp( Σ NLL / Σ words(d) ),   words(d) = len(re.split(r"\\s+", d))
       byte_ppl      = exp( Σ NLL / Σ bytes(d) ),   bytes(d) = len(d.encode("utf-8"))
       bits_per_byte = Σ NLL / (ln 2 · Σ bytes(d))

   These are tokenizer-independent, which is why lm-eval reports them (GPT-2 small: 37.37 word
   perplexity on wikitext-2-raw there, vs the 29.41 token-ish number of the GPT-2 paper, which used
   its own detokenised setup).

Every result dict carries a ``convention`` string saying which of these it is.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .common import model_device, model_logits, token_logprobs

# A window: feed s[a : e-1] to the model and score the targets s[t] for t in [c, e); target t is predicted
# by the logits at input position t-1-a. Needs 0 <= a < c <= e.
Window = Tuple[int, int, int]

TOKEN_PPL_CONVENTION = ("token-level perplexity, sliding window (HF perplexity guide): context={context}, "
                        "stride={stride}; exp(mean NLL over {n} scored tokens of one concatenated stream; the "
                        "first token of the stream{first} is not scored)")
ROLLING_CONVENTION = ("lm-eval-harness rolling loglikelihood per document (EOT prefix, every token scored, "
                      "max-context windows of {context}); word_perplexity = exp(NLL / words), "
                      "byte_perplexity = exp(NLL / bytes), bits_per_byte = NLL / (ln 2 * bytes)")


def sliding_windows(n_tokens: int, context: int, stride: Optional[int] = None) -> List[Window]:
    """HF-guide windows over a stream of ``n_tokens`` (see module docstring), as (a, e, c) triples."""
    stride = context if stride is None else stride
    if context < 2:
        raise ValueError(f"context must be >= 2 (one token of context and one target), got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score anything, got {n_tokens}")
    windows: List[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        c = max(prev_end, begin + 1)
        if c < end:
            windows.append((begin, end, c))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def rolling_windows(n_tokens: int, context: int) -> List[Window]:
    """lm-eval rolling windows over s = [prefix] + document (``n_tokens`` = 1 + len(document)).

    Targets 1..n_tokens-1 are split into consecutive chunks of at most ``context``; the chunk ending at e
    (exclusive) is fed s[max(0, e-1-context) : e-1], i.e. up to ``context`` tokens.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if n_tokens < 2:
        raise ValueError(f"need the prefix token and at least one document token, got {n_tokens} tokens")
    windows: List[Window] = []
    c = 1
    while c < n_tokens:
        e = min(c + context, n_tokens)
        windows.append((max(0, e - 1 - context), e, c))
        c = e
    return windows


@torch.no_grad()
def score_windows(model, tokens: Sequence[int] | torch.Tensor, windows: Sequence[Window], batch_size: int = 8,
                  progress: bool = False, desc: str = "perplexity") -> Tuple[float, int]:
    """Σ −log p over every window's targets, and the number of targets: (nll_sum, n_scored).

    Windows with the same input length are batched (``batch_size`` per forward). Sums are in float64.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seq = torch.as_tensor(tokens, dtype=torch.long)
    if seq.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(seq.shape)}")
    for a, e, c in windows:
        if not (0 <= a < c <= e <= seq.numel()):
            raise ValueError(f"bad window (a={a}, e={e}, c={c}) for {seq.numel()} tokens: need 0 <= a < c <= e <= N")
    dev = model_device(model)
    groups: Dict[int, List[Window]] = {}
    for w in windows:
        groups.setdefault(w[1] - 1 - w[0], []).append(w)
    nll = 0.0
    n_scored = 0
    bar = tqdm(total=len(windows), desc=desc, disable=not progress, leave=False)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            inp = torch.stack([seq[a:e - 1] for a, e, _ in chunk]).to(dev)
            logits = model_logits(model, inp)  # [b, length, V]
            for row, (a, e, c) in enumerate(chunk):
                pos = torch.arange(c - 1 - a, e - 1 - a, device=dev)
                tgt = seq[c:e].to(dev)
                lp = token_logprobs(logits[row, pos], tgt)
                nll -= float(lp.double().sum())
                n_scored += e - c
            bar.update(len(chunk))
    bar.close()
    return nll, n_scored


def token_perplexity(model, tokens: Sequence[int] | torch.Tensor, context: int, stride: Optional[int] = None,
                     batch_size: int = 8, progress: bool = False) -> Dict:
    """Token-level sliding-window perplexity of one token stream (convention 1 of the module docstring).

    Returns {"perplexity", "nll_sum", "mean_nll", "n_tokens" (scored), "n_stream_tokens", "n_windows",
    "context", "stride", "convention"}.
    """
    n = len(tokens)
    stride = context if stride is None else stride
    windows = sliding_windows(n, context, stride)
    nll, k = score_windows(model, tokens, windows, batch_size, progress, desc=f"token ppl (ctx {context})")
    first = " and of every window" if stride == context else ""
    return {
        "perplexity": math.exp(nll / k),
        "nll_sum": nll,
        "mean_nll": nll / k,
        "n_tokens": k,
        "n_stream_tokens": n,
        "n_windows": len(windows),
        "context": context,
        "stride": stride,
        "convention": TOKEN_PPL_CONVENTION.format(context=context, stride=stride, n=k, first=first),
    }


def count_words(doc: str) -> int:
    """lm-eval's word count: ``len(re.split(r"\\s+", doc))`` (so leading/trailing space counts a word)."""
    return len(re.split(r"\s+", doc))


def rolling_perplexity(model, tokenizer, documents: Iterable[str], context: int, batch_size: int = 8,
                       progress: bool = False, count_texts: Optional[Sequence[str]] = None) -> Dict:
    """lm-eval-harness word perplexity, byte perplexity and bits-per-byte over ``documents``
    (convention 2 of the module docstring). ``tokenizer`` needs ``encode`` and ``eot_id``.
    ``count_texts`` (one per document) are the texts whose words and bytes are counted; lm-eval scores the
    detokenised page but counts the original page, so pass the originals here. Default: ``documents``.

    Returns {"word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity" (NLL per document
    token incl. the first), "nll_sum", "n_words", "n_bytes", "n_tokens", "n_documents", "context",
    "convention"}.
    """
    docs = [d for d in documents]
    if not docs:
        raise ValueError("documents is empty: nothing to score")
    counted = docs if count_texts is None else list(count_texts)
    if len(counted) != len(docs):
        raise ValueError(f"count_texts has {len(counted)} entries for {len(docs)} documents")
    nll = 0.0
    n_tok = n_words = n_bytes = 0
    for d, raw in tqdm(list(zip(docs, counted)), desc=f"rolling ppl (ctx {context})", disable=not progress,
                       leave=False):
        ids = tokenizer.encode(d)
        if not ids:
            raise ValueError(f"document {d[:40]!r} encodes to no tokens")
        seq = [tokenizer.eot_id] + list(ids)
        s, k = score_windows(model, seq, rolling_windows(len(seq), context), batch_size)
        nll += s
        n_tok += k
        n_words += count_words(raw)
        n_bytes += len(raw.encode("utf-8"))
    return {
        "word_perplexity": math.exp(nll / n_words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / (math.log(2) * n_bytes),
        "token_perplexity": math.exp(nll / n_tok),
        "nll_sum": nll,
        "n_words": n_words,
        "n_bytes": n_bytes,
        "n_tokens": n_tok,
        "n_documents": len(docs),
        "context": context,
        "convention": ROLLING_CONVENTION.format(context=context),
    }


# ----------------------------------------------------------------------------------------------------
# WikiText documents
# ----------------------------------------------------------------------------------------------------
_ARTICLE_TITLE = re.compile(r"^ ?= [^=].* = ?$")


def wikitext_documents(lines: Iterable[str]) -> List[str]:
    """Group WikiText lines (one paragraph or heading per line, as in ``wiki.*.tokens``) into articles.

    An article starts at a top-level title line `` = Title = `` (section headings have ``= =``). Lines are
    joined with "\\n" (each keeps its leading space, as in the file) and outer whitespace is stripped.
    Lines before the first title form their own document.
    """
    docs: List[List[str]] = []
    cur: List[str] = []
    # records may be single lines or multi-line chunks: split so every title is seen
    for line in (ln for rec in lines for ln in rec.rstrip("\n").split("\n")):
        if _ARTICLE_TITLE.match(line) and cur:
            docs.append(cur)
            cur = []
        cur.append(line)
    if cur:
        docs.append(cur)
    out = ["\n".join(d).strip() for d in docs]
    return [d for d in out if d]


def wikitext_detokenize(text: str) -> str:
    """lm-eval-harness's ``wikitext_detokenizer``: undo WikiText's tokenisation (`` @-@ `` → ``-``,
    spaces around punctuation, brackets and quotes, `` = = `` headings)."""
    s = text
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = s.replace(" : ", ": ").replace(" ; ", "; ").replace(" . ", ". ").replace(" ! ", "! ")
    s = s.replace(" ? ", "? ").replace(" , ", ", ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def evaluate_perplexity(model, tokenizer, lines: Sequence[str], context: int, stride: Optional[int] = None,
                        detokenize: bool = True, batch_size: int = 8, max_documents: Optional[int] = None,
                        progress: bool = True) -> Dict:
    """Both conventions on WikiText lines (records' ``text``): returns {"token": token_perplexity(...),
    "rolling": rolling_perplexity(...), "detokenized": bool, "n_lines": int}.

    Documents are :func:`wikitext_documents` (WikiText articles). The token stream is the HF guide's
    ``"\\n\\n".join(...)`` of the documents as they are in the file; the rolling convention scores the
    :func:`wikitext_detokenize`-d documents (when ``detokenize``, as lm-eval does) and counts words and
    bytes in the originals. ``max_documents`` keeps the first articles only, for both conventions.
    """
    lines = list(lines)
    if not lines:
        raise ValueError("no WikiText lines to evaluate")
    docs = wikitext_documents(lines)
    if max_documents is not None:
        docs = docs[:max_documents]
    scored = [wikitext_detokenize(d) for d in docs] if detokenize else docs
    stream = tokenizer.encode("\n\n".join(docs))
    tok = token_perplexity(model, stream, context, stride, batch_size, progress)
    roll = rolling_perplexity(model, tokenizer, scored, context, batch_size, progress, count_texts=docs)
    return {"token": tok, "rolling": roll, "detokenized": detokenize, "n_lines": len(lines),
            "n_documents": len(docs)}
