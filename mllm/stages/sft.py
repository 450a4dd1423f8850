"""Supervised fine-tuning (SFT): Alpaca instructions + GSM8K worked solutions, loss on response tokens only.

Starts from ``checkpoints/pretrain/final``; trains through the shared ``Trainer`` (``sft`` config section).

Prompt templates (what the model sees before its answer)::

    Alpaca, with input (the Stanford Alpaca template, verbatim from tatsu-lab/stanford_alpaca ``PROMPT_DICT``):
        Below is an instruction that describes a task, paired with an input that provides further context. Write a
        response that appropriately completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}
        \\n\\n### Response:\\n
    Alpaca, without input:
        Below is an instruction that describes a task. Write a response that appropriately completes the request.
        \\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n
    GSM8K (``GSM8K_PROMPT_TEMPLATE``, the one evaluation prompts with, so the generator is scored as trained):
        Question: {question}\\nAnswer:

Response: the Alpaca ``output`` / ``" " + answer`` (the worked GSM8K solution that ends ``#### N``), then the
end-of-text token. One example = ``prompt tokens ++ response tokens ++ [eot]`` (prompt and response tokenised
separately, so the boundary is a token boundary). Labels are aligned to positions (``labels[t]`` = token t+1);
a label whose target is a prompt token is -100, so the loss is the mean next-token cross-entropy over the response
tokens and the eot (``sft.prompt_loss: true`` trains on prompt tokens too).

Mixture: ``N = sft.max_examples`` (None: every train example of both datasets) examples, ``round(gsm8k_weight·N)``
from GSM8K and the rest from Alpaca, each drawn in a seeded random order; examples longer than ``sft.seq_len``
tokens are skipped and counted (``too_long``) rather than cut, so every kept example ends with its eot (and a
GSM8K one with its ``#### N``). A pool too small for its share is cycled (``repeated`` counts the repeats).

Held-out data: Alpaca records with ``split_holdout(data.val_fraction, seed, key=(instruction, input))``; GSM8K
questions with ``split_holdout(data.val_fraction, seed, key="question")`` on the train file: the same GSM8K dev
slice ``mllm.evaluation`` carves (``gsm8k_splits``), never trained on by any stage. Validation = the first
``eval_batches · micro_batch_size`` held-out examples, mixed with the same weight.

Bad data is skipped and counted (logged as a ``data`` record): GSM8K rows without a final ``#### N`` or with
the wrong schema, Alpaca records with an empty instruction or output.

Rows: ``data.packing: true`` packs examples into rows of ``seq_len`` (``mllm.data.packing.build_rows`` with
the prompt tokens' loss masks; attention and positions restart per example); ``false`` gives one padded row per
example. Each evaluation also logs greedy generations for a few held-out prompts.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.evaluation.gsm8k import PROMPT_TEMPLATE as GSM8K_PROMPT_TEMPLATE
from mllm.evaluation.gsm8k import truncate_completion
from mllm.training import checkpoint as ckpt
from mllm.training.batches import EvalBatches

from .common import SegmentRows, available_split, fit_stage, next_token_loss, stage_tokenizer, stage_trainer

STAGE = "sft"
INPUT_STAGE = "pretrain"
IGNORE_INDEX = -100

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

__all__ = ["ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "GSM8K_PROMPT_TEMPLATE", "alpaca_prompt", "gsm8k_prompt",
           "gsm8k_response", "gsm8k_splits", "load_gsm8k_records", "sft_document", "select_examples", "run"]


# ----------------------------------------------------------------------------------------------------
# helpers shared by the post-training stages (dpo and verifier import them, and available_split and
# stage_tokenizer, which live in .common, from here)
# ----------------------------------------------------------------------------------------------------
def load_input_model(cfg: PipelineConfig, run_dir, input_stage: str, consumer: str):
    """``(Transformer(cfg.model), path)`` with the weights of ``input_stage``'s final checkpoint in ``run_dir``.
    A missing checkpoint raises ``CheckpointError`` naming the file and the stage that writes it; a checkpoint of
    another model shape raises ``ConfigError`` naming the config section. Extra tensors (a verifier's value head)
    are ignored."""
    from mllm.models.transformer import Transformer

    path = ckpt.require_stage_output(run_dir, input_stage, consumer)
    state = ckpt.load_checkpoint(path)
    if "model" not in state:
        raise ckpt.CheckpointError(f"{path}: no 'model' entry in the checkpoint of stage '{input_stage}'")
    model = Transformer(cfg.model)
    own = model.state_dict()
    weights = {k: v for k, v in state["model"].items() if k in own}
    missing = sorted(set(own) - set(weights))
    shapes = [k for k in weights if weights[k].shape != own[k].shape]
    if missing or shapes:
        saved = (state.get("config") or {}).get("model", {})
        raise ConfigError(f"stage '{consumer}': {path} does not fit config section 'model' "
                          f"(missing tensors {missing[:3]}, shape mismatches {shapes[:3]}); the checkpoint was "
                          f"written with model={saved}")
    model.load_state_dict(weights)
    return model, path


def eval_source(examples, stage_cfg, dist, collate=None):
    """``EvalBatches`` over the first ``eval_batches · micro_batch_size`` examples, cut to a multiple of
    ``micro_batch_size · world_size`` so that every rank reads the same number of full micro-batches (the Trainer
    all-reduces one metric vector per rank: a rank without batches would not match the others); None when fewer
    than one micro-batch per rank remain."""
    from mllm.training.batches import collate_rows

    per = stage_cfg.micro_batch_size * dist.world_size
    n = (min(len(examples), stage_cfg.eval_batches * stage_cfg.micro_batch_size) // per) * per
    if n == 0:
        return None
    return EvalBatches(examples, micro_batch_size=stage_cfg.micro_batch_size, rank=dist.rank,
                       world_size=dist.world_size, max_examples=n, collate=collate or collate_rows)


def pad_right(seqs: Sequence[Sequence[int]], value: int, length: Optional[int] = None) -> torch.Tensor:
    """[len(seqs), length or longest] int64, each sequence left-aligned and padded with ``value``."""
    T = length if length is not None else max(len(s) for s in seqs)
    out = torch.full((len(seqs), max(T, 1)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


# ----------------------------------------------------------------------------------------------------
# prompt templates
# ----------------------------------------------------------------------------------------------------
def alpaca_prompt(record: Dict[str, str]) -> str:
    """The Stanford Alpaca prompt for ``{"instruction", "input"}`` (the no-input form when input is blank)."""
    inp = record.get("input", "") or ""
    if inp.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def gsm8k_prompt(question: str) -> str:
    return GSM8K_PROMPT_TEMPLATE.format(question=question)


def gsm8k_response(answer: str) -> str:
    """The training target for a GSM8K answer: a space (the prompt ends with ``Answer:``) and the worked solution."""
    return " " + answer.strip()


def sft_document(prompt_ids: Sequence[int], response_ids: Sequence[int], prompt_loss: bool = False
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """``(tokens, loss_mask)`` of one example before the eot is appended: tokens = prompt ++ response and
    ``loss_mask[p]`` says whether token p may be a target (the response's; all with ``prompt_loss``)."""
    tokens = np.asarray(list(prompt_ids) + list(response_ids), dtype=np.int64)
    mask = np.ones(len(tokens), dtype=bool)
    if not prompt_loss:
        mask[:len(prompt_ids)] = False
    return tokens, mask


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def load_gsm8k_records(source=None, split: str = "train") -> Tuple[List[Dict[str, str]], Dict[str, int]]:
    """GSM8K records from ``source`` (as ``load_gsm8k``: a file, a data folder, None for $MLLM_DATA_DIR / the
    hub), with bad rows skipped and counted instead of failing the whole load.

    Local files are read row by row (``bad_schema``: not an object with string question/answer;
    ``no_final_answer``: the answer has no ``#### N`` line, or the question is blank); from the hub the strict
    loader is used."""
    from mllm.data.datasets import (DatasetError, check_schema, gsm8k_final_answer, iter_records, load_gsm8k,
                                    resolve_source)

    counts = {"rows": 0, "bad_schema": 0, "no_final_answer": 0}
    res = resolve_source("gsm8k", None, split, source=source)
    if res.kind != "local":
        recs = load_gsm8k(source, split=split)
        counts["rows"] = len(recs)
        return recs, counts
    out = []
    for path in res.paths:
        for where, obj in iter_records(path):
            counts["rows"] += 1
            try:
                rec = check_schema(obj, {"question": str, "answer": str}, where)
            except DatasetError:
                counts["bad_schema"] += 1
                continue
            if gsm8k_final_answer(rec["answer"], strict=False) is None or not rec["question"].strip():
                counts["no_final_answer"] += 1
                continue
            out.append(rec)
    return out, counts


def gsm8k_splits(cfg: PipelineConfig) -> Tuple[List[Dict], List[Dict], Dict[str, int]]:
    """(train, dev, counts): GSM8K train records with the dev slice held out by question
    (``split_holdout(data.val_fraction, seed=cfg.seed, key="question")``, as ``mllm.evaluation`` does)."""
    from mllm.data.datasets import split_holdout

    data_dir = cfg.resolved_data_dir()
    recs, counts = load_gsm8k_records(data_dir, available_split("gsm8k", data_dir))
    train, dev = split_holdout(recs, cfg.data.val_fraction, seed=cfg.seed, key="question")
    return train, dev, counts


def _alpaca_records(cfg: PipelineConfig) -> Tuple[List[Dict], List[Dict], Dict[str, int]]:
    from mllm.data.datasets import load_alpaca, split_holdout

    data_dir = cfg.resolved_data_dir()
    recs = load_alpaca(data_dir, split=available_split("alpaca", data_dir))
    good = [r for r in recs if r["instruction"].strip() and r["output"].strip()]
    counts = {"rows": len(recs), "empty_instruction_or_output": len(recs) - len(good)}
    train, val = split_holdout(good, cfg.data.val_fraction, seed=cfg.seed, key=("instruction", "input"))
    return train, val, counts


def select_examples(pairs: Sequence[Tuple[str, str]], n: int, seq_len: int, tok, seed: int,
                    shuffle: bool = True, cycle: bool = True, chunk: int = 1024
                    ) -> Tuple[List[Tuple[List[int], List[int]]], Dict]:
    """Up to ``n`` tokenised ``(prompt_ids, response_ids)`` from ``(prompt, response)`` texts that fit in
    ``seq_len`` tokens with the eot (and have a non-empty response), taken in a seeded random order (``shuffle``)
    and tokenised lazily in chunks. When fewer than ``n`` fit, ``cycle`` repeats the fitting ones up to ``n``.
    Returns the examples and counts {"candidates", "too_long", "empty_response", "repeated"}."""
    order = np.random.default_rng(seed).permutation(len(pairs)) if shuffle else np.arange(len(pairs))
    kept: List[Tuple[List[int], List[int]]] = []
    counts = {"candidates": 0, "too_long": 0, "empty_response": 0, "repeated": 0}
    for s in range(0, len(order), chunk):
        if len(kept) >= n:
            break
        idx = order[s:s + chunk]
        p_ids = tok.encode_batch([pairs[i][0] for i in idx], allow_special=False)
        r_ids = tok.encode_batch([pairs[i][1] for i in idx], allow_special=False)
        for p, r in zip(p_ids, r_ids):
            if len(kept) >= n:
                break
            counts["candidates"] += 1
            if not r:
                counts["empty_response"] += 1
                continue
            if len(p) + len(r) + 1 > seq_len:
                counts["too_long"] += 1
                continue
            kept.append((p, r))
    if cycle and kept and len(kept) < n:
        base = len(kept)
        counts["repeated"] = n - base
        kept = [kept[i % base] for i in range(n)]
    return kept, counts


def build_rows(examples: Sequence[Tuple[List[int], List[int]]], cfg: PipelineConfig, tok, packing: bool,
               seed: int) -> SegmentRows:
    from mllm.data.packing import build_rows as _build

    T = cfg.sft.seq_len
    docs, masks = zip(*[sft_document(p, r, cfg.sft.prompt_loss) for p, r in examples])
    rows = _build(list(docs), T, pad_id=tok.eot_id, packing=packing, ignore_index=IGNORE_INDEX,
                  loss_masks=list(masks), eot_id=tok.eot_id, algorithm=cfg.data.packing_algorithm,
                  overflow="truncate", seed=seed if packing else None)
    return SegmentRows(rows)


def _mix(a: Sequence, b: Sequence, n_b: int, n: int, seed: int) -> List:
    """``n - n_b`` items of ``a`` and ``n_b`` of ``b`` in a seeded interleaving (b's share spread evenly)."""
    items = list(a[:n - n_b]) + list(b[:n_b])
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def build_sft_data(cfg: PipelineConfig, tok) -> Tuple[SegmentRows, Optional[SegmentRows], List[Tuple[str, str]], Dict]:
    """(train rows, validation rows, sample prompts [(source, prompt text)], info) — see the module docstring."""
    sc = cfg.sft
    t0 = time.perf_counter()
    alp_train, alp_val, alp_counts = _alpaca_records(cfg)
    gsm_train, gsm_dev, gsm_counts = gsm8k_splits(cfg)
    to_alp = lambda rs: [(alpaca_prompt(r), r["output"]) for r in rs]  # noqa: E731
    to_gsm = lambda rs: [(gsm8k_prompt(r["question"]), gsm8k_response(r["answer"])) for r in rs]  # noqa: E731

    w = cfg.sft.gsm8k_weight
    n = sc.max_examples if sc.max_examples is not None else len(alp_train) + len(gsm_train)
    n_gsm = int(round(w * n)) if gsm_train else 0
    n_alp = n - n_gsm if alp_train else 0
    if n_alp + n_gsm < sc.batch_size:
        raise ConfigError(f"config key 'sft.max_examples': {n_alp + n_gsm} SFT examples are fewer than one batch "
                          f"(sft.batch_size={sc.batch_size})")
    alp, c_alp = select_examples(to_alp(alp_train), n_alp, sc.seq_len, tok, cfg.seed)
    gsm, c_gsm = select_examples(to_gsm(gsm_train), n_gsm, sc.seq_len, tok, cfg.seed + 1)
    if len(alp) + len(gsm) < sc.batch_size:
        raise ConfigError(f"config key 'sft.seq_len': only {len(alp) + len(gsm)} SFT examples fit in "
                          f"{sc.seq_len} tokens, fewer than one batch (sft.batch_size={sc.batch_size})")
    train_examples = _mix(alp, gsm, len(gsm), len(alp) + len(gsm), cfg.seed)

    n_val = sc.eval_batches * sc.micro_batch_size
    v_gsm_n = int(round(w * n_val)) if gsm_dev else 0
    v_alp, _ = select_examples(to_alp(alp_val), n_val - v_gsm_n, sc.seq_len, tok, cfg.seed + 2, cycle=False)
    v_gsm, _ = select_examples(to_gsm(gsm_dev), v_gsm_n, sc.seq_len, tok, cfg.seed + 3, cycle=False)
    val_examples = _mix(v_alp, v_gsm, len(v_gsm), len(v_alp) + len(v_gsm), cfg.seed + 4)

    train = build_rows(train_examples, cfg, tok, cfg.data.packing, cfg.seed)
    val = build_rows(val_examples, cfg, tok, cfg.data.packing, cfg.seed + 1) if val_examples else None

    samples: List[Tuple[str, str]] = [("alpaca", alpaca_prompt(r)) for r in alp_val[:2]]
    samples += [("gsm8k", gsm8k_prompt(r["question"])) for r in gsm_dev[:1]]
    n_tokens = lambda ex: int(sum(len(p) + len(r) + 1 for p, r in ex))  # noqa: E731
    info = {
        "alpaca": {**alp_counts, "train_pool": len(alp_train), "heldout_pool": len(alp_val), **c_alp,
                   "train_examples": len(alp)},
        "gsm8k": {**gsm_counts, "train_pool": len(gsm_train), "dev_pool": len(gsm_dev), **c_gsm,
                  "train_examples": len(gsm)},
        "train_examples": len(train_examples), "val_examples": len(val_examples),
        "train_tokens": n_tokens(train_examples), "train_rows": len(train), "val_rows": len(val) if val else 0,
        "packing": cfg.data.packing, "packing_efficiency": train.efficiency, "gsm8k_weight": w,
        "skipped": {"gsm8k_bad_schema": gsm_counts["bad_schema"], "gsm8k_no_final_answer": gsm_counts["no_final_answer"],
                    "alpaca_empty": alp_counts["empty_instruction_or_output"],
                    "too_long": c_alp["too_long"] + c_gsm["too_long"],
                    "empty_response": c_alp["empty_response"] + c_gsm["empty_response"]},
        "data_time_s": time.perf_counter() - t0,
    }
    return train, val, samples, info


# ----------------------------------------------------------------------------------------------------
# loss and evaluation samples
# ----------------------------------------------------------------------------------------------------
# labels are IGNORE_INDEX (-100) on prompt tokens, so this is the mean cross-entropy over the response tokens (and
# the eot), weighted by their number
response_loss = next_token_loss


def generate_samples(model, tok, prompts: Sequence[Tuple[str, str]], max_new_tokens: int) -> List[Dict[str, str]]:
    """Greedy responses (cut at the eot, and after a ``#### N`` line for GSM8K) to ``(source, prompt)`` pairs;
    a prompt keeps its last ``max_seq_len - max_new_tokens`` tokens."""
    from mllm.models.generation import generate

    keep = model.cfg.max_seq_len - max_new_tokens
    if keep < 1 or not prompts:
        return []
    ids = [tok.encode(p, allow_special=False)[-keep:] for _, p in prompts]
    new = generate(model, ids, max_new_tokens, temperature=0.0, eos_id=tok.eot_id)
    out = []
    for (src, p), toks in zip(prompts, new):
        text = tok.decode([t for t in toks if t != tok.eot_id])
        if src == "gsm8k":
            text = truncate_completion(text)
        out.append({"source": src, "prompt": p[-200:], "response": text})
    return out


def samples_eval_fn(tok, prompts: Sequence[Tuple[str, str]], max_new_tokens: int = 64):
    """``eval_fn`` for the Trainer: greedy samples on rank 0, logged with the validation record."""

    def fn(trainer) -> Dict[str, Any]:
        if not trainer.dist.is_main or not prompts:
            return {}
        n_new = min(max_new_tokens, trainer.model.cfg.max_seq_len // 2)
        with trainer.autocast():
            samples = generate_samples(trainer.model, tok, prompts, n_new)
        for s in samples:
            trainer.info(f"sample ({s['source']}): {s['response'][:160]!r}")
        return {"samples": samples}

    return fn


# ----------------------------------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------------------------------
def run(cfg: PipelineConfig, ctx) -> Dict[str, Any]:
    """Fine-tune the pretrained model for ``cfg.sft.steps`` steps; ``ctx`` is a ``StageContext``."""
    dist = ctx.dist
    sc = cfg.sft
    tok = stage_tokenizer(cfg)
    model, src = load_input_model(cfg, ctx.run_dir, INPUT_STAGE, STAGE)
    train_rows, val_rows, sample_prompts, info = build_sft_data(cfg, tok)
    info["init_checkpoint"] = str(src)
    val_src = eval_source(val_rows, sc, dist) if val_rows else None
    trainer = stage_trainer(cfg, ctx, STAGE, sc, model, response_loss, train_rows, val_src,
                            eval_fn=samples_eval_fn(tok, sample_prompts))
    del model  # the trainer holds the only reference, so close() really frees it

    def extra(tr) -> Dict[str, Any]:
        out: Dict[str, Any] = {"input_checkpoint": str(src)}
        if "samples" in tr.last_eval:
            out["final_samples"] = tr.last_eval["samples"]
        return out

    return fit_stage(trainer, ctx, info,
                     f"data: {info['train_examples']} examples ({info['gsm8k']['train_examples']} GSM8K, "
                     f"{info['alpaca']['train_examples']} Alpaca) in {info['train_rows']} rows of {sc.seq_len}, "
                     f"{info['val_examples']} held-out; skipped {info['skipped']}; from {src}", extra)
