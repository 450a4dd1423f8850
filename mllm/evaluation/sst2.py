"""SST-2 accuracy by prompting: label-word scoring, zero/k-shot, contextual calibration.

Each example becomes a prompt (k demonstrations, then the test sentence)::

    Review: <demo sentence>\\nSentiment: positive\\n\\nReview: <sentence>\\nSentiment:

and is classified by the log-probability of each label word after it, summed over the label word's
tokens when it has several:  score_l(x) = log p(word_l | prompt(x)),  pred = argmax_l score_l.
Label index = SST-2 label (0 negative, 1 positive). Ties go to the lower index (argmax's first maximum).

Shots: ``k`` rows drawn once with ``random.Random(seed)`` from a training pool that shares no row and no
sentence with the evaluation rows (balanced: ⌈k/2⌉ of one class and ⌊k/2⌋ of the other, the majority class
alternating with the seed, then shuffled). All test examples share the same demonstrations, which is what
contextual calibration assumes.

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): with p(x) the label probabilities
renormalised over the label set, and p_cf the mean of p over content-free inputs (default "N/A") put in the
same prompt, the calibrated probabilities are ∝ p(x) / p_cf, i.e. in log space

    calibrated_l(x) = log p_l(x) − log p_cf,l     (the W = diag(p_cf)^-1, b = 0 of the paper)

and the calibrated prediction is the argmax of that.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .common import model_device, model_logits

LABEL_NAMES = ("negative", "positive")
LABEL_WORDS = (" negative", " positive")
TEMPLATE = "Review: {sentence}\nSentiment:"
DEMO_SEPARATOR = "\n\n"
CONTENT_FREE = ("N/A",)


def _check_rows(rows: Sequence[dict], what: str) -> None:
    for i, r in enumerate(rows):
        if "sentence" not in r or "label" not in r:
            raise ValueError(f"{what}[{i}] needs keys 'sentence' and 'label', got {sorted(r)}")
        if r["label"] not in (0, 1):
            raise ValueError(f"{what}[{i}]: label must be 0 or 1, got {r['label']!r}")


def split_pool_and_eval(rows: Sequence[dict], n_eval: int, seed: int = 0) -> Tuple[List[dict], List[dict]]:
    """Carve ``n_eval`` evaluation rows out of ``rows`` (seeded shuffle); the rest is the shot pool, minus
    any row whose sentence also occurs among the evaluation rows (SST-2 train repeats sentences)."""
    if not 0 < n_eval < len(rows):
        raise ValueError(f"n_eval must be in (0, {len(rows)}), got {n_eval}")
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    eval_rows = [rows[i] for i in idx[:n_eval]]
    return disjoint_pool([rows[i] for i in idx[n_eval:]], eval_rows), eval_rows


def disjoint_pool(pool: Sequence[dict], eval_rows: Sequence[dict]) -> List[dict]:
    """``pool`` without the rows whose (stripped) sentence occurs in ``eval_rows``."""
    seen = {r["sentence"].strip() for r in eval_rows}
    return [r for r in pool if r["sentence"].strip() not in seen]


def draw_shots(pool: Sequence[dict], k: int, seed: int = 0, balanced: bool = True) -> List[dict]:
    """``k`` demonstrations from ``pool`` with ``random.Random(seed)`` (see module docstring)."""
    if k < 0:
        raise ValueError(f"k (shots) must be >= 0, got {k}")
    if k == 0:
        return []
    _check_rows(pool, "pool")
    rng = random.Random(seed)
    if not balanced:
        if k > len(pool):
            raise ValueError(f"cannot draw {k} shots from a pool of {len(pool)}")
        return rng.sample(list(pool), k)
    by_label = {0: [r for r in pool if r["label"] == 0], 1: [r for r in pool if r["label"] == 1]}
    major = rng.randrange(2)
    need = {major: (k + 1) // 2, 1 - major: k // 2}
    for lab, n in need.items():
        if n > len(by_label[lab]):
            raise ValueError(f"pool has {len(by_label[lab])} rows of label {lab}, need {n} for k={k} balanced shots")
    shots = rng.sample(by_label[0], need[0]) + rng.sample(by_label[1], need[1])
    rng.shuffle(shots)
    return shots


def build_prompt(sentence: str, shots: Sequence[dict] = (), template: str = TEMPLATE,
                 label_words: Sequence[str] = LABEL_WORDS) -> str:
    """Demonstrations (template + their label word) then the query template, joined by a blank line."""
    demos = [template.format(sentence=s["sentence"].strip()) + label_words[s["label"]] for s in shots]
    return DEMO_SEPARATOR.join(demos + [template.format(sentence=sentence.strip())])


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str] = LABEL_WORDS,
                   batch_size: int = 16, max_len: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """log p(label_word_l | prompt_i) summed over the label word's tokens: [N, L] float64.

    Sequences are ``encode(prompt) + encode(word)``; prompts longer than ``max_len`` (minus the label)
    keep their last tokens. Batches are right-padded with ``eot_id``: the model is causal, so padding after
    a sequence cannot change the logits inside it.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    word_ids = [tokenizer.encode(w) for w in label_words]
    for w, ids in zip(label_words, word_ids):
        if not ids:
            raise ValueError(f"label word {w!r} encodes to no tokens")
    single = all(len(ids) == 1 for ids in word_ids)
    # one sequence per (prompt, label); with single-token label words the prompt alone suffices
    seqs: List[Tuple[int, int, List[int], List[int]]] = []  # (prompt idx, label idx, ids, target ids)
    for i, p in enumerate(prompts):
        pids = tokenizer.encode(p)
        for l, wids in enumerate(word_ids):
            keep = None if max_len is None else max_len - len(wids) + 1
            if keep is not None and keep < 1:
                raise ValueError(f"max_len={max_len} leaves no room for label word {label_words[l]!r}")
            ctx = pids if keep is None else pids[-keep:]
            seqs.append((i, l, ctx + wids[:-1], wids))
            if single:
                break
    dev = model_device(model)
    out = torch.zeros(len(prompts), len(label_words), dtype=torch.float64)
    pad = tokenizer.eot_id
    for b in tqdm(range(0, len(seqs), batch_size), desc="sst2 scoring", disable=not progress, leave=False):
        chunk = seqs[b:b + batch_size]
        T = max(len(s[2]) for s in chunk)
        inp = torch.full((len(chunk), T), pad, dtype=torch.long)
        for r, (_, _, ids, _) in enumerate(chunk):
            inp[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = model_logits(model, inp.to(dev))  # [b, T, V]; only a few positions are read (on device)
        for r, (i, l, ids, tgt) in enumerate(chunk):
            if single:
                lp = torch.log_softmax(logits[r, len(ids) - 1].double(), dim=-1)
                first = torch.tensor([w[0] for w in word_ids], device=dev)
                out[i] = lp[first].cpu()
            else:
                n = len(tgt)
                lp = torch.log_softmax(logits[r, len(ids) - n:len(ids)].double(), dim=-1)
                out[i, l] = lp[torch.arange(n, device=dev), torch.tensor(tgt, device=dev)].sum().cpu()
    return out


def calibrate(logp: torch.Tensor, cf_logp: torch.Tensor) -> torch.Tensor:
    """Contextual calibration in log space: [N, L] scores from label log-probs ``logp`` [N, L] and the
    content-free log-probs ``cf_logp`` [L] or [M, L] (M content-free inputs, probabilities averaged):

        log p̂_l(x) = logp_l(x) − logsumexp_l' logp_l'(x)          (renormalise over labels)
        log p_cf,l  = log mean_m softmax(cf_logp_m)_l
        calibrated_l(x) = log p̂_l(x) − log p_cf,l
    """
    logp = torch.as_tensor(logp, dtype=torch.float64)
    cf = torch.as_tensor(cf_logp, dtype=torch.float64)
    if cf.dim() == 1:
        cf = cf[None]
    if logp.dim() != 2 or cf.dim() != 2 or cf.shape[1] != logp.shape[1]:
        raise ValueError(f"calibrate needs logp [N, L] and cf_logp [L] or [M, L]; got {tuple(logp.shape)} and "
                         f"{tuple(torch.as_tensor(cf_logp).shape)}")
    p_cf = torch.softmax(cf, dim=-1).mean(0)
    return torch.log_softmax(logp, dim=-1) - torch.log(p_cf)[None]


def confusion(gold: Sequence[int], pred: Sequence[int], names: Sequence[str] = LABEL_NAMES) -> Dict[str, Dict[str, int]]:
    """counts[gold_name][pred_name]."""
    counts = {g: {p: 0 for p in names} for g in names}
    for g, p in zip(gold, pred):
        counts[names[g]][names[p]] += 1
    return counts


def _scores_to_result(scores: torch.Tensor, gold: Sequence[int]) -> Dict:
    pred = scores.argmax(-1).tolist()
    correct = sum(int(p == g) for p, g in zip(pred, gold))
    return {"accuracy": correct / len(gold), "correct": correct, "n": len(gold), "confusion": confusion(gold, pred),
            "predicted_positive_fraction": sum(pred) / len(pred)}


def evaluate_sst2(model, tokenizer, eval_rows: Sequence[dict], pool_rows: Sequence[dict] = (), shots: int = 0,
                  seed: int = 0, calibrate_with: Optional[Sequence[str]] = CONTENT_FREE, template: str = TEMPLATE,
                  label_words: Sequence[str] = LABEL_WORDS, batch_size: int = 16, max_len: Optional[int] = None,
                  progress: bool = True) -> Dict:
    """Accuracy of label-word scoring on ``eval_rows`` ({"sentence", "label"}).

    ``shots`` demonstrations come from ``pool_rows`` (made disjoint from ``eval_rows`` here too).
    ``calibrate_with``: content-free strings for contextual calibration (None or () = no calibration).
    Returns {"uncalibrated": {accuracy, correct, n, confusion, predicted_positive_fraction},
    "calibrated": {... , "content_free", "content_free_probs"} or None, "shots", "seed", "shot_examples",
    "template", "label_words", "majority_class_accuracy", "convention"}.
    """
    if not eval_rows:
        raise ValueError("eval_rows is empty")
    _check_rows(eval_rows, "eval_rows")
    pool = disjoint_pool(pool_rows, eval_rows) if shots else []
    demo = draw_shots(pool, shots, seed) if shots else []
    prompts = [build_prompt(r["sentence"], demo, template, label_words) for r in eval_rows]
    gold = [int(r["label"]) for r in eval_rows]
    logp = label_logprobs(model, tokenizer, prompts, label_words, batch_size, max_len, progress)
    res = {"uncalibrated": _scores_to_result(logp, gold), "calibrated": None}
    if calibrate_with:
        cf_prompts = [build_prompt(c, demo, template, label_words) for c in calibrate_with]
        cf_logp = label_logprobs(model, tokenizer, cf_prompts, label_words, batch_size, max_len)
        cal = _scores_to_result(calibrate(logp, cf_logp), gold)
        cal["content_free"] = list(calibrate_with)
        cal["content_free_probs"] = torch.softmax(cf_logp, -1).mean(0).tolist()
        res["calibrated"] = cal
    pos = sum(gold) / len(gold)
    res.update({
        "shots": shots, "seed": seed, "shot_examples": [{"sentence": s["sentence"], "label": s["label"]} for s in demo],
        "template": template, "label_words": list(label_words), "majority_class_accuracy": max(pos, 1 - pos),
        "convention": (f"{shots}-shot label-word scoring: argmax_l log p(word_l | prompt), words {list(label_words)}"
                       + ("; calibrated = contextual calibration (Zhao et al. 2021) with content-free "
                          f"{list(calibrate_with)}" if calibrate_with else "")),
    })
    return res


def best_accuracy(res: Dict) -> float:
    """The calibrated accuracy when calibration ran, else the uncalibrated one."""
    return (res["calibrated"] or res["uncalibrated"])["accuracy"]


__all__ = ["LABEL_NAMES", "LABEL_WORDS", "TEMPLATE", "CONTENT_FREE", "split_pool_and_eval", "disjoint_pool",
           "draw_shots", "build_prompt", "label_logprobs", "calibrate", "confusion", "evaluate_sst2",
           "best_accuracy"]
