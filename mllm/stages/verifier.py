"""GSM8K verifier (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"), from the SFT generator.

Starts from ``checkpoints/sft/final``: the SFT model is the generator (it samples the training solutions and, at
test time, the candidates) and the verifier's initial backbone. (DPO trains on hh-rlhf dialogue; the verifier
judges the GSM8K generator, so it builds on SFT, as in the paper.) Trains through the shared ``Trainer``.

1. Data. For ``verifier.num_questions`` GSM8K train questions (the SFT stage's train side of the dev split:
   ``sft.gsm8k_splits``), sample ``K = verifier.samples_per_question`` solutions with batched KV-cache generation
   at ``verifier.temperature`` (at most ``verifier.max_new_tokens`` tokens, prompt ``GSM8K_PROMPT_TEMPLATE``),
   cut each with ``mllm.evaluation.gsm8k.truncate_completion`` and label it ``y = 1`` iff its extracted final
   answer equals the gold ``#### N`` (``extract_answer`` / ``is_correct``). With ``verifier.include_gold_solutions``
   the reference solution is added too, labelled 1 (documented deviation; off by default). Skipped and counted:
   empty samples, examples that cannot fit ``verifier.seq_len`` tokens (and GSM8K rows without ``#### N``, at load).
2. Model: ``VerifierModel`` = the Transformer LM + a scalar value head ``v_t = w · h_t + b`` on the final hidden
   state h_t [d] of every position.
3. Loss over the solution tokens S of each example (prompt tokens are context only)::

       value_loss = mean_{t ∈ S} BCE(σ(v_t), y)                       (every solution token predicts correctness)
       lm_loss    = mean next-token cross-entropy on the solution tokens
       loss       = verifier.value_loss_weight · value_loss + verifier.lm_loss_weight · lm_loss

4. Test time (``VerifierScorer`` / ``load_scorer``): ``score(question, solution) = σ(v_T)`` at the solution's last
   token (the value after reading the whole solution); best-of-N takes the top-scored of N samples
   (``mllm.evaluation.gsm8k.best_of_n``).

Report (held-out GSM8K dev questions, ``eval.gsm8k_examples`` of them, ``N = eval.gsm8k_samples``): greedy vs
majority-of-N vs verifier best-of-N exact match (``evaluate_gsm8k``, with the oracle "any of N right"); the
verifier as a classifier of those N·Q sampled solutions (base rate of correct ones, ROC AUC — undefined when
every sample has the same label — and accuracy at 0.5 vs always predicting the majority label); and the rank of
each dev question's reference solution among its N samples (AUC reference-vs-samples, top-1 rate vs the chance
rate 1/(N+1)), which stays measurable when the generator is too weak to sample any correct solution.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.data.shards import texts_digest
from mllm.evaluation.gsm8k import evaluate_gsm8k, extract_answer, gold_answer, is_correct, truncate_completion
from mllm.models.transformer import Transformer, causal_lm_loss
from mllm.training import checkpoint as ckpt
from mllm.training.batches import RowBatchSource
from mllm.training.trainer import Trainer

from .sft import (GSM8K_PROMPT_TEMPLATE, IGNORE_INDEX, eval_source, gsm8k_splits, load_input_model, pad_right,
                  stage_tokenizer)

STAGE = "verifier"
INPUT_STAGE = "sft"


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------
class VerifierModel(Transformer):
    """Transformer LM + scalar value head. State dict = the Transformer's + ``value_head.{weight,bias}``, so
    the LM part loads anywhere a Transformer checkpoint does."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)  # σ(v) = 0.5 everywhere at the start: no prior preference
        nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Value logits [B, T] fp32 from final hidden states [B, T, d]."""
        return self.value_head(hidden).squeeze(-1).float()

    @classmethod
    def from_lm(cls, lm: Transformer) -> "VerifierModel":
        vm = cls(lm.cfg)
        missing, unexpected = vm.load_state_dict(lm.state_dict(), strict=False)
        if unexpected or set(missing) != {"value_head.weight", "value_head.bias"}:
            raise ValueError(f"LM weights do not fit the verifier: missing {missing}, unexpected {unexpected}")
        return vm


# ----------------------------------------------------------------------------------------------------
# examples
# ----------------------------------------------------------------------------------------------------
def gsm8k_prompt_ids(tok, question: str) -> List[int]:
    return tok.encode(GSM8K_PROMPT_TEMPLATE.format(question=question), allow_special=False)


def label_solution(solution: str, gold: str) -> int:
    """1 iff the solution's extracted final answer equals the gold answer (normalised), else 0."""
    return int(is_correct(extract_answer(solution), gold))


def verifier_example(prompt_ids: Sequence[int], solution_ids: Sequence[int], label: int, seq_len: int
                     ) -> Optional[Dict[str, np.ndarray]]:
    """One training row: ``input_ids = prompt ++ solution`` (the prompt cut from the left to fit ``seq_len``);
    ``value_mask`` 1 on solution tokens; ``value_target`` = label there; ``labels`` (LM) = the next token where
    that token is a solution token, else -100. None when the solution is empty or alone exceeds ``seq_len - 1``."""
    S = len(solution_ids)
    if S == 0 or S > seq_len - 1:
        return None
    p = list(prompt_ids)[-(seq_len - S):]
    ids = np.asarray(p + list(solution_ids), dtype=np.int64)
    P = len(p)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[P - 1:len(ids) - 1] = ids[P:]
    mask = np.zeros(len(ids), dtype=np.float32)
    mask[P:] = 1.0
    return {"input_ids": ids, "labels": labels, "value_mask": mask,
            "value_target": mask * float(label), "label": np.int64(label)}


def make_collate(pad_id: int):
    def collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        T = max(len(it["input_ids"]) for it in items)
        out = {"input_ids": pad_right([it["input_ids"] for it in items], pad_id, T),
               "labels": pad_right([it["labels"] for it in items], IGNORE_INDEX, T)}
        for k in ("value_mask", "value_target"):
            t = torch.zeros(len(items), T, dtype=torch.float32)
            for i, it in enumerate(items):
                t[i, :len(it[k])] = torch.as_tensor(it[k])
            out[k] = t
        return out

    return collate


def make_verifier_loss(lm_weight: float, value_weight: float):
    """``loss_fn(model, batch) -> (value_weight·value_loss + lm_weight·lm_loss, metrics, #solution tokens)``."""

    def loss_fn(model, batch):
        h = model.hidden_states(batch["input_ids"])
        v = model.values(h)
        mask, target = batch["value_mask"], batch["value_target"]
        n = mask.sum()
        bce = F.binary_cross_entropy_with_logits(v, target, reduction="none")
        value_loss = (bce * mask).sum() / n.clamp(min=1)
        loss = value_weight * value_loss
        metrics = {"value_loss": value_loss.detach(),
                   "value_acc": (((v > 0).float() == target).float() * mask).sum() / n.clamp(min=1)}
        if lm_weight > 0:
            lm_loss = causal_lm_loss(F.linear(h, model.lm_head_weight), batch["labels"], IGNORE_INDEX)
            loss = loss + lm_weight * lm_loss
            metrics["lm_loss"] = lm_loss.detach()
        return loss, metrics, n

    return loss_fn


def verifier_flops_per_token(model: Transformer, lm_weight: float):
    """FLOPs per token of a verifier training step as a function of the row length T, for MFU: the model's
    ``flops_per_token(T)`` (6N + 12·L·H·Q·T, value head included), less the LM head's 6·V·d when ``lm_weight``
    is 0 (``make_verifier_loss`` then never runs the head)."""
    head = 6 * model.cfg.vocab_size * model.cfg.d_model if lm_weight <= 0 else 0
    return lambda T: model.flops_per_token(T) - head


# ----------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------
def sample_solutions(generator, tok, questions: Sequence[str], k: int, temperature: float, max_new_tokens: int,
                     seed: int, batch_size: int = 64, progress: bool = True, desc: str = "verifier samples"
                     ) -> List[List[str]]:
    """K solutions per question (texts, cut by ``truncate_completion``), batched KV-cache sampling; prompts keep
    their last ``max_seq_len - max_new_tokens`` tokens. Seeded per batch (``seed + batch start``)."""
    from mllm.models.generation import generate

    keep = generator.cfg.max_seq_len - max_new_tokens
    if keep < 1:
        raise ConfigError(f"config key 'verifier.max_new_tokens': {max_new_tokens} leaves no room for the prompt in "
                          f"model.max_seq_len={generator.cfg.max_seq_len}")
    prompts = [gsm8k_prompt_ids(tok, q)[-keep:] for q in questions for _ in range(k)]
    texts: List[str] = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        new = generate(generator, prompts[s:s + batch_size], max_new_tokens, temperature=temperature,
                       eos_id=tok.eot_id, seed=seed + s)
        texts += [truncate_completion(tok.decode([t for t in ids if t != tok.eot_id])) for ids in new]
    return [texts[i * k:(i + 1) * k] for i in range(len(questions))]


def sample_sharded(generator, tok, rows: Sequence[Dict], k: int, temperature: float, max_new_tokens: int, seed: int,
                   dist, progress: bool, desc: str) -> List[List[str]]:
    """``sample_solutions`` with the questions split over the ranks (rank r takes questions r, r+W, ...) and the
    results gathered in question order on every rank."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine_idx = list(range(rank, len(rows), world))
    mine = sample_solutions(generator, tok, [rows[i]["question"] for i in mine_idx], k, temperature, max_new_tokens,
                            seed + 1_000_003 * rank, progress=progress and rank == 0, desc=desc) if mine_idx else []
    parts = dist.all_gather_object(list(zip(mine_idx, mine))) if dist is not None else [list(zip(mine_idx, mine))]
    out: List[Optional[List[str]]] = [None] * len(rows)
    for part in parts:
        for i, sols in part:
            out[i] = sols
    return out  # type: ignore[return-value]


def labelled_examples(tok, rows: Sequence[Dict], samples: Sequence[Sequence[str]], seq_len: int,
                      include_gold: bool) -> Tuple[List[Dict[str, np.ndarray]], Dict[str, int]]:
    """Training rows from the sampled solutions (+ gold ones) and counts: samples, correct, empty, too_long."""
    counts = {"questions": len(rows), "samples": 0, "correct_samples": 0, "empty_samples": 0, "too_long": 0,
              "gold_solutions": 0}
    out = []
    for row, sols in zip(rows, samples):
        gold = gold_answer(row["answer"])
        p = gsm8k_prompt_ids(tok, row["question"])
        cands = [(s, label_solution(s, gold), "sample") for s in sols]
        if include_gold:
            cands.append((" " + row["answer"].strip(), 1, "gold"))
        for text, y, kind in cands:
            if kind == "sample":
                counts["samples"] += 1
                counts["correct_samples"] += y
                if not text.strip():
                    counts["empty_samples"] += 1
                    continue
            ex = verifier_example(p, tok.encode(text, allow_special=False), y, seq_len)
            if ex is None:
                counts["too_long"] += 1
                continue
            counts["gold_solutions"] += kind == "gold"
            out.append(ex)
    return out, counts


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
class VerifierScorer:
    """``scorer(question, solution) -> float`` = σ(value at the solution's last token); ``score_batch`` for many.

    The input is ``GSM8K_PROMPT_TEMPLATE(question) ++ solution`` tokens, cut from the left to ``max_seq_len``
    (the question's start goes first: the solution's end is what is judged)."""

    def __init__(self, model: VerifierModel, tok, batch_size: int = 32):
        self.model = model.eval()
        self.tok = tok
        self.batch_size = batch_size

    @torch.no_grad()
    def score_batch(self, questions: Sequence[str], solutions: Sequence[str]) -> List[float]:
        if len(questions) != len(solutions):
            raise ValueError(f"{len(questions)} questions but {len(solutions)} solutions")
        T = self.model.cfg.max_seq_len
        out: List[float] = []
        dev = self.model.device
        for s in range(0, len(questions), self.batch_size):
            seqs = [(gsm8k_prompt_ids(self.tok, q) + self.tok.encode(sol, allow_special=False))[-T:]
                    for q, sol in zip(questions[s:s + self.batch_size], solutions[s:s + self.batch_size])]
            ids = pad_right(seqs, self.tok.eot_id).to(dev)
            last = torch.tensor([len(x) - 1 for x in seqs], device=dev)
            with (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()):
                v = self.model.values(self.model.hidden_states(ids))
            out += torch.sigmoid(v[torch.arange(len(seqs), device=dev), last]).tolist()
        return out

    def __call__(self, question: str, solution: str) -> float:
        return self.score_batch([question], [solution])[0]


def load_scorer(checkpoint: str | Path, device: str | torch.device = "cpu") -> VerifierScorer:
    """A ``VerifierScorer`` from a verifier-stage checkpoint file (or its checkpoint folder): the model shape and
    tokenizer come from the config stored in the checkpoint."""
    from mllm.config.pipeline_config import config_from_dict

    path = Path(checkpoint)
    if path.is_dir():
        found = ckpt.final_checkpoint(path) or ckpt.latest_checkpoint(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path}: run `--stage {STAGE}` first")
        path = found
    state = ckpt.load_checkpoint(path)
    if not state.get("config"):
        raise ckpt.CheckpointError(f"{path}: no 'config' entry, so the verifier's shape and tokenizer are unknown")
    if "value_head.weight" not in state.get("model", {}):
        raise ckpt.CheckpointError(f"{path}: not a verifier checkpoint (no value head); it is from stage "
                                   f"'{state.get('stage')}'")
    cfg = config_from_dict(state["config"])
    model = VerifierModel(cfg.model)
    model.load_state_dict(state["model"])
    return VerifierScorer(model.to(device), stage_tokenizer(cfg))


# ----------------------------------------------------------------------------------------------------
# held-out report
# ----------------------------------------------------------------------------------------------------
def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> Optional[float]:
    """P(score of a random positive > score of a random negative), ties counted 1/2 (Mann-Whitney U / n₊n₋);
    None when one class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def classification_report(scores: Sequence[float], labels: Sequence[int]) -> Dict[str, Any]:
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    base = float(y.mean()) if len(y) else None
    return {"n": int(len(y)), "positives": int(y.sum()), "base_rate": base, "auc": roc_auc(s, y),
            "accuracy_at_0.5": float(((s > 0.5).astype(np.int64) == y).mean()) if len(y) else None,
            "majority_label_accuracy": max(base, 1 - base) if base is not None else None,
            "mean_score_correct": float(s[y == 1].mean()) if (y == 1).any() else None,
            "mean_score_wrong": float(s[y == 0].mean()) if (y == 0).any() else None}


def heldout_report(generator, scorer: VerifierScorer, tok, dev_rows: Sequence[Dict], cfg: PipelineConfig,
                   progress: bool = True) -> Dict[str, Any]:
    """Greedy / majority / verifier best-of-N / oracle on ``dev_rows``; the verifier as a classifier of the
    sampled solutions (the non-empty ones, which ``best_of_n`` scores: empty ones are skipped as in training); the
    reference solutions' rank among the samples (module docstring)."""
    ec = cfg.eval
    calls: List[Tuple[str, str, float]] = []

    def recording_score(question: str, solution: str) -> float:
        v = scorer(question, solution)
        calls.append((question, solution, v))
        return v

    res = evaluate_gsm8k(generator, tok, dev_rows, n_samples=ec.gsm8k_samples, temperature=ec.gsm8k_temperature,
                         max_new_tokens=ec.gsm8k_max_new_tokens, seed=cfg.seed, score_fn=recording_score,
                         template=GSM8K_PROMPT_TEMPLATE, max_len=generator.cfg.max_seq_len, progress=progress)
    gold_of = {r["question"]: gold_answer(r["answer"]) for r in dev_rows}
    labels = [label_solution(sol, gold_of[q]) for q, sol, _ in calls]
    sample_scores = [v for _, _, v in calls]
    report = {k: {kk: vv for kk, vv in res[k].items()} for k in ("greedy", "majority", "verifier", "oracle")}
    report["sampled_solutions"] = classification_report(sample_scores, labels)

    # reference solutions against the same questions' samples
    ref_scores = scorer.score_batch([r["question"] for r in dev_rows], [" " + r["answer"].strip() for r in dev_rows])
    by_q: Dict[str, List[float]] = {}
    for q, _, v in calls:
        by_q.setdefault(q, []).append(v)
    top1 = [float(all(g > v for v in by_q.get(r["question"], []))) for r, g in zip(dev_rows, ref_scores)]
    n_per = ec.gsm8k_samples
    report["reference_vs_samples"] = {
        "auc": roc_auc(ref_scores + sample_scores, [1] * len(ref_scores) + [0] * len(sample_scores)),
        "top1_rate": float(np.mean(top1)) if top1 else None, "chance_top1_rate": 1.0 / (n_per + 1),
        "mean_reference_score": float(np.mean(ref_scores)) if ref_scores else None,
        "note": "each dev question's reference solution ranked against its N sampled solutions "
                "(wrong ones when the generator is weak: then this measures correct-vs-incorrect separation)"}
    report["n_questions"] = len(dev_rows)
    report["n_samples"] = n_per
    report["convention"] = res["convention"]
    report["verifier_minus_greedy"] = report["verifier"].get("accuracy", 0.0) - report["greedy"].get("accuracy", 0.0)
    return report


# ----------------------------------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------------------------------
SAMPLES_CACHE = "samples.pt"  # in the stage's checkpoint folder


def cached_samples(ctx, key: Dict[str, Any], sample) -> Tuple[Any, str]:
    """``sample()``'s result, or the one stored under ``key`` by an earlier attempt of this stage. A resume must
    train on the solutions its checkpoint was trained on: sampling again could differ (the questions are split
    over the ranks, so another world size draws other samples) and would repeat the whole sampling pass. Every
    rank reads the cache; rank 0 writes it. Returns (result, "sampled" | "cached")."""
    path = ckpt.stage_checkpoint_dir(ctx.run_dir, STAGE) / SAMPLES_CACHE
    cached = ckpt.read_keyed_cache(path, key)
    if cached is not None:
        return cached["samples"], "cached"
    out = sample()
    if ctx.dist.is_main:
        ckpt.write_keyed_cache(path, key, {"samples": out})
    ctx.dist.barrier()
    return out, "sampled"


def _sample_seed(cfg: PipelineConfig, which: str) -> int:
    return cfg.seed * 1000 + {"train": 1, "val": 2}[which]


def run(cfg: PipelineConfig, ctx) -> Dict[str, Any]:
    """Sample, label, train the verifier for ``cfg.verifier.steps`` steps, report on dev questions."""
    dist = ctx.dist
    vc = cfg.verifier
    tok = stage_tokenizer(cfg)
    generator, src = load_input_model(cfg, ctx.run_dir, INPUT_STAGE, STAGE)
    generator.to(dist.device).eval()
    t0 = time.perf_counter()
    train_q, dev_q, load_counts = gsm8k_splits(cfg)
    n_q = len(train_q) if vc.num_questions is None else min(vc.num_questions, len(train_q))
    order = np.random.default_rng(cfg.seed).permutation(len(train_q))[:n_q]
    train_rows = [train_q[i] for i in order]
    n_dev = len(dev_q) if cfg.eval.gsm8k_examples is None else min(cfg.eval.gsm8k_examples, len(dev_q))
    dev_rows = dev_q[:n_dev]
    if not train_rows or not dev_rows:
        raise ConfigError(f"verifier: {len(train_rows)} train and {len(dev_rows)} dev GSM8K questions; need both "
                          "(verifier.num_questions, eval.gsm8k_examples, data.val_fraction)")

    def sample():
        with torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else contextlib.nullcontext():
            return (sample_sharded(generator, tok, train_rows, vc.samples_per_question, vc.temperature,
                                   vc.max_new_tokens, _sample_seed(cfg, "train"), dist, ctx.progress,
                                   "verifier samples (train)"),
                    sample_sharded(generator, tok, dev_rows, vc.samples_per_question, vc.temperature,
                                   vc.max_new_tokens, _sample_seed(cfg, "val"), dist, ctx.progress,
                                   "verifier samples (dev)"))

    key = {"generator": ckpt.file_identity(src),
           "train_questions": texts_digest([r["question"] for r in train_rows]),
           "dev_questions": texts_digest([r["question"] for r in dev_rows]),
           "samples_per_question": vc.samples_per_question,
           "temperature": vc.temperature, "max_new_tokens": vc.max_new_tokens,
           "seeds": [_sample_seed(cfg, "train"), _sample_seed(cfg, "val")]}
    (train_samples, val_samples), sampled = cached_samples(ctx, key, sample)
    train_ex, train_counts = labelled_examples(tok, train_rows, train_samples, vc.seq_len, vc.include_gold_solutions)
    val_ex, val_counts = labelled_examples(tok, dev_rows, val_samples, vc.seq_len, vc.include_gold_solutions)
    if len(train_ex) < vc.batch_size:
        raise ConfigError(f"config key 'verifier.num_questions': {len(train_ex)} labelled solutions, fewer than one "
                          f"batch (verifier.batch_size={vc.batch_size})")
    info = {"init_checkpoint": str(src), "gsm8k_load": load_counts, "train": train_counts, "heldout": val_counts,
            "train_base_rate": float(np.mean([e["label"] for e in train_ex])),
            "examples_of_samples": [{"question": train_rows[0]["question"][:200], "solution": s,
                                     "correct": label_solution(s, gold_answer(train_rows[0]["answer"]))}
                                    for s in train_samples[0][:2]],
            "include_gold_solutions": vc.include_gold_solutions, "samples": sampled,
            "sampling_time_s": time.perf_counter() - t0}

    model = VerifierModel.from_lm(generator)
    collate = make_collate(tok.eot_id)
    train_src = RowBatchSource(train_ex, batch_size=vc.batch_size, micro_batch_size=vc.micro_batch_size,
                               rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, collate=collate)
    val_src = eval_source(val_ex, vc, dist, collate)
    trainer = Trainer(model, make_verifier_loss(vc.lm_loss_weight, vc.value_loss_weight), train_src, vc, cfg.optim,
                      stage=STAGE, run_dir=ctx.run_dir, val_data=val_src, dist=dist, compile=cfg.compile,
                      compile_mode=cfg.compile_mode, seed=cfg.seed, profile=ctx.profile, progress=ctx.progress,
                      config=cfg.to_dict(), command=ctx.command,
                      flops_per_token=verifier_flops_per_token(model, vc.lm_loss_weight),
                      perplexity=False)  # its loss is not a token cross-entropy
    del model
    try:
        trainer.log({"kind": "data", **info})
        trainer.info(f"data: {len(train_ex)} labelled solutions of {n_q} questions ({train_counts['correct_samples']}"
                     f" of {train_counts['samples']} samples correct, {train_counts['gold_solutions']} gold added; "
                     f"skipped {train_counts['empty_samples']} empty, {train_counts['too_long']} too long), "
                     f"{len(val_ex)} held-out; from {src}")
        if ctx.resume:
            trainer.resume()
        summary = trainer.fit()
        report = None
        if dist.is_main:
            scorer = VerifierScorer(trainer.model, tok)
            report = heldout_report(generator, scorer, tok, dev_rows, cfg, ctx.progress)
            trainer.log({"kind": "gsm8k_dev", **report})
            trainer.info(
                f"dev ({report['n_questions']} questions, N={report['n_samples']}): greedy "
                f"{report['greedy']['accuracy']:.3f}, majority {report['majority'].get('accuracy', float('nan')):.3f}, "
                f"verifier best-of-N {report['verifier'].get('accuracy', float('nan')):.3f}, oracle "
                f"{report['oracle'].get('accuracy', float('nan')):.3f}; sampled solutions: base rate "
                f"{report['sampled_solutions']['base_rate']:.3f}, AUC {report['sampled_solutions']['auc']}; "
                f"reference vs samples: AUC {report['reference_vs_samples']['auc']}, top-1 "
                f"{report['reference_vs_samples']['top1_rate']:.3f} (chance "
                f"{report['reference_vs_samples']['chance_top1_rate']:.3f})")
        report = dist.broadcast_object(report)
        summary["gsm8k_dev"] = report
        for k in ("greedy", "majority", "verifier", "oracle"):
            summary[f"dev_{k}_accuracy"] = report[k].get("accuracy")
        summary["dev_sample_base_rate"] = report["sampled_solutions"]["base_rate"]
        summary["dev_sample_auc"] = report["sampled_solutions"]["auc"]
        summary["dev_reference_vs_samples_auc"] = report["reference_vs_samples"]["auc"]
        summary["dev_reference_top1_rate"] = report["reference_vs_samples"]["top1_rate"]
        summary["dev_reference_top1_chance"] = report["reference_vs_samples"]["chance_top1_rate"]
        summary["data"] = info
        summary["input_checkpoint"] = str(src)
        return summary
    finally:
        trainer.close()
