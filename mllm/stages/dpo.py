"""Direct Preference Optimisation (DPO, Rafailov et al. 2023) on Anthropic hh-rlhf, from the SFT model.

Starts from ``checkpoints/sft/final`` (policy and reference); trains through the shared ``Trainer`` (``dpo``).

Parsing a pair (``parse_hh_pair``): both dialogues are ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts that
share everything up to the final Assistant turn. prompt = the longest common prefix of the two strings, cut back
to the end of its last ``\\n\\nAssistant:``; chosen / rejected = the rest of each string (the final Assistant
turns, leading space kept). Dropped and counted: ``no_assistant_turn`` (the common prefix holds no Assistant
marker), ``identical`` (the two answers are the same text), ``empty_answer`` (an answer is blank),
``not_final_turn`` (the dialogues diverge before their last turn, so an "answer" holds further Human/Assistant
turns: log π(y|x) would score human text; 19 of hh-rlhf test's 8,552 records), and ``identical_after_truncation``
(the answers differ only beyond the token budget).

Tokens: ``prompt_ids`` keeps the LAST ``dpo.max_prompt_len`` tokens of the prompt (the end of a dialogue is what
the answer replies to); each answer is ``answer tokens ++ [eot]`` cut to ``dpo.seq_len - len(prompt_ids)``.
The log-probability of an answer is ``log π(y | x) = Σ_t log π(y_t | x, y_<t)`` over the answer tokens only,
computed by ``mllm_kernels.sequence_logprobs(hidden [N, A, d], lm_head_weight [V, d], labels [N, A]) -> [N]``
on the answer window of each row (``answer_window``: A = the longest answer in the batch, so the LM head never
runs over prompt or padding positions), chunked over the vocabulary on the kernel paths (Triton on CUDA, the
interpreter on CPU with ``TRITON_INTERPRET=1``, the eager reference otherwise).

Chosen and rejected rows of a micro-batch go through the model together ([2B, T], right-padded). Note: the
policy's log-probs at step 0 equal the precomputed ones only up to float rounding (other batch shapes), so the
step-0 reward accuracy (strict r_c > r_r) is ~0, not exactly 0.

Loss (sigmoid DPO, ``mllm_kernels.dpo_loss``), per pair with β = ``dpo.beta``::

    r_c = β (log π(y_c|x) − log π_ref(y_c|x)),   r_r = β (log π(y_r|x) − log π_ref(y_r|x))
    loss = mean_pairs −log σ(r_c − r_r)

Logged (train records and, prefixed ``val_``, on the held-out slice): ``rewards/chosen`` = mean r_c,
``rewards/rejected`` = mean r_r, ``rewards/margins`` = mean (r_c − r_r), ``rewards/accuracies`` = fraction of
pairs with r_c > r_r (strict: a tie, e.g. every pair at step 0, counts as wrong), ``logps/chosen|rejected``.

Reference log-probs (``dpo.reference``): ``precomputed`` (default) runs the SFT model once over every train and
held-out pair before training (cached in ``checkpoints/dpo/reference_logps.pt``, keyed by the SFT checkpoint and
the tokens, so a resumed run reuses them); ``frozen`` keeps a frozen copy of the SFT model and runs it on every
batch (same numbers, more compute, more memory).

Data: every pair of the hh-rlhf files (the shared folder has the four subsets' test files; the train files on the
hub), parsed and filtered as above, then ordered by ``holdout_score(pair, cfg.seed)``: the first
``dpo.heldout_pairs`` are the held-out slice, the next ``dpo.max_pairs`` (None: all) the training pairs.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.training import checkpoint as ckpt
from mllm.training.batches import RowBatchSource
from mllm.training.trainer import Trainer

from .sft import IGNORE_INDEX, available_split, eval_source, load_input_model, pad_right, stage_tokenizer

STAGE = "dpo"
INPUT_STAGE = "sft"
ASSISTANT = "\n\nAssistant:"
REFERENCE_CACHE = "reference_logps.pt"
HUMAN = "\n\nHuman:"
SKIP_REASONS = ("no_assistant_turn", "identical", "empty_answer", "not_final_turn", "identical_after_truncation")


# ----------------------------------------------------------------------------------------------------
# parsing and tokenisation
# ----------------------------------------------------------------------------------------------------
def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def parse_hh_pair(chosen: str, rejected: str) -> Tuple[Optional[Dict[str, str]], Optional[str]]:
    """``({"prompt", "chosen", "rejected"}, None)`` or ``(None, reason)`` (see the module docstring)."""
    k = _common_prefix_len(chosen, rejected)
    idx = chosen.rfind(ASSISTANT, 0, k)
    if idx < 0:
        return None, "no_assistant_turn"
    cut = idx + len(ASSISTANT)
    c, r = chosen[cut:], rejected[cut:]
    if c == r:
        return None, "identical"
    if not c.strip() or not r.strip():
        return None, "empty_answer"
    if any(m in a for a in (c, r) for m in (HUMAN, ASSISTANT)):
        return None, "not_final_turn"
    return {"prompt": chosen[:cut], "chosen": c, "rejected": r}, None


def parse_hh_records(records: Sequence[Dict[str, str]]) -> Tuple[List[Dict[str, str]], Dict[str, int]]:
    """Parsed pairs of hh-rlhf records ``{"chosen", "rejected"}`` and counts per skip reason (+ ``pairs_in``)."""
    counts = {"pairs_in": len(records), **{k: 0 for k in SKIP_REASONS if k != "identical_after_truncation"}}
    out = []
    for rec in records:
        pair, why = parse_hh_pair(rec["chosen"], rec["rejected"])
        if pair is None:
            counts[why] += 1
        else:
            out.append(pair)
    return out, counts


def tokenize_pair(pair: Dict[str, str], tok, seq_len: int, max_prompt_len: int) -> Optional[Dict[str, np.ndarray]]:
    """``{"prompt", "chosen", "rejected"}`` int64 token arrays within ``seq_len`` (prompt: its last
    ``max_prompt_len`` tokens; answers + eot, cut to the remaining budget); None when the cut answers coincide."""
    if not 0 < max_prompt_len < seq_len:
        raise ConfigError(f"config key 'dpo.max_prompt_len': must be in [1, dpo.seq_len={seq_len}), got {max_prompt_len}")
    p = tok.encode(pair["prompt"], allow_special=False)[-max_prompt_len:]
    budget = seq_len - len(p)
    c = (tok.encode(pair["chosen"], allow_special=False) + [tok.eot_id])[:budget]
    r = (tok.encode(pair["rejected"], allow_special=False) + [tok.eot_id])[:budget]
    if c == r:
        return None
    return {k: np.asarray(v, dtype=np.int64) for k, v in (("prompt", p), ("chosen", c), ("rejected", r))}


def answer_labels(prompt: np.ndarray, answer: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of ``prompt ++ answer`` with labels aligned to positions: ``labels[t] = ids[t+1]``
    where ids[t+1] is an answer token, else -100 (so Σ over labels = log π(answer | prompt))."""
    ids = np.concatenate([prompt, answer])
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[len(prompt) - 1:len(ids) - 1] = answer
    return ids, labels


class PairDataset(Sequence):
    """Tokenised pairs; ``ref`` ([n, 2] float32: reference log π of chosen, rejected) when precomputed."""

    def __init__(self, pairs: List[Dict[str, np.ndarray]]):
        self.pairs = pairs
        self.ref: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = dict(self.pairs[i])
        if self.ref is not None:
            item["ref_chosen"], item["ref_rejected"] = float(self.ref[i, 0]), float(self.ref[i, 1])
        return item

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.pairs:
            for k in ("prompt", "chosen", "rejected"):
                h.update(p[k].tobytes())
                h.update(b"|")
        return h.hexdigest()


def make_collate(pad_id: int):
    """Pairs -> {chosen,rejected}_{input_ids,labels} [B, T] (right-padded to the batch's longest sequence,
    pads ignored) and, when present, ref_chosen / ref_rejected [B] fp32."""

    def collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows = [answer_labels(it["prompt"], it[side]) for side in ("chosen", "rejected") for it in items]
        T = max(len(ids) for ids, _ in rows)
        ids = pad_right([r[0] for r in rows], pad_id, T)
        labels = pad_right([r[1] for r in rows], IGNORE_INDEX, T)
        B = len(items)
        out = {"chosen_input_ids": ids[:B], "chosen_labels": labels[:B],
               "rejected_input_ids": ids[B:], "rejected_labels": labels[B:]}
        if "ref_chosen" in items[0]:
            out["ref_chosen"] = torch.tensor([it["ref_chosen"] for it in items], dtype=torch.float32)
            out["ref_rejected"] = torch.tensor([it["ref_rejected"] for it in items], dtype=torch.float32)
        return out

    return collate


# ----------------------------------------------------------------------------------------------------
# log-probs and loss
# ----------------------------------------------------------------------------------------------------
def answer_window(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The answer part of each row: hidden [N, T, d], labels [N, T] whose non-ignored entries are ONE contiguous
    run per row (prompt first, answer after, as ``answer_labels`` builds them) -> hidden [N, A, d] and labels
    [N, A] of those runs, left-aligned, A = the longest run, shorter runs padded with -100. The LM head then
    only runs over answer positions (a prompt position contributes nothing to log π(answer | prompt))."""
    N, T, d = hidden.shape
    mask = labels != IGNORE_INDEX
    count = mask.sum(1)
    first = torch.where(count > 0, mask.float().argmax(1), torch.zeros_like(count))
    A = max(int(count.max()), 1) if N else 1
    offs = torch.arange(A, device=labels.device)
    valid = offs[None] < count[:, None]
    idx = torch.where(valid, first[:, None] + offs[None], torch.zeros_like(offs)[None]).clamp_(max=T - 1)
    h = hidden.gather(1, idx[..., None].expand(N, A, d))
    lab = torch.where(valid, labels.gather(1, idx), torch.full_like(idx, IGNORE_INDEX))
    return h, lab


def answer_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(answer | prompt) per row [N] fp32: the model's final hidden states at the answer positions
    (``answer_window``) through the fused chunked ``sequence_logprobs`` with the (tied) LM-head weight."""
    from mllm_kernels import sequence_logprobs

    h, lab = answer_window(model.hidden_states(input_ids), labels)
    w = model.lm_head_weight
    if w.dtype != h.dtype:  # autocast: bf16 hidden states, fp32 master weight
        w = w.to(h.dtype)
    return sequence_logprobs(h, w, lab, check_labels=input_ids.device.type == "cpu")


def _both(batch) -> Tuple[torch.Tensor, torch.Tensor, int]:
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return ids, labels, batch["chosen_input_ids"].shape[0]


def reward_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> Dict[str, torch.Tensor]:
    margin = rewards_chosen - rewards_rejected
    return {"rewards/chosen": rewards_chosen.mean(), "rewards/rejected": rewards_rejected.mean(),
            "rewards/margins": margin.mean(), "rewards/accuracies": (margin > 0).float().mean()}


def wilson_interval(p: float, n: int, z: float = 1.96) -> Optional[Tuple[float, float]]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` trials (None for n = 0): how far a
    held-out reward accuracy is from chance (0.5) at this sample size."""
    if n <= 0:
        return None
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return (c - h, c + h)


def make_dpo_loss(beta: float, ref_model: Optional[torch.nn.Module] = None):
    """``loss_fn(model, batch) -> (mean DPO loss over the pairs, metrics, number of pairs)`` for the Trainer;
    reference log-probs from ``batch["ref_*"]`` (precomputed) or from ``ref_model`` (frozen copy)."""
    from mllm_kernels import dpo_loss

    def loss_fn(model, batch):
        ids, labels, B = _both(batch)
        logps = answer_logprobs(model, ids, labels)
        pc, pr = logps[:B], logps[B:]
        if ref_model is None:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        else:
            with torch.no_grad():
                ref = answer_logprobs(ref_model, ids, labels)
            rc, rr = ref[:B], ref[B:]
        loss, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta)
        metrics = reward_metrics(rew_c, rew_r)
        metrics.update({"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()})
        return loss, metrics, B

    return loss_fn


@torch.no_grad()
def reference_logprobs(model, dataset: PairDataset, batch_size: int, device, dist=None, autocast=None,
                       progress: bool = True, desc: str = "dpo reference") -> np.ndarray:
    """[len(dataset), 2] fp32: log π_ref of (chosen, rejected) for every pair, in dataset order. Under several
    ranks each computes every world-th batch and the results are gathered (identical on all ranks)."""
    import contextlib

    was = model.training
    model.eval()
    collate = make_collate(0)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    starts = list(range(0, len(dataset), batch_size))
    mine: Dict[int, np.ndarray] = {}
    for s in tqdm(starts[rank::world], desc=desc, disable=not progress or rank != 0, leave=False):
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        ids, labels, B = _both(batch)
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            lp = answer_logprobs(model, ids.to(device), labels.to(device)).float().cpu().numpy()
        mine[s] = np.stack([lp[:B], lp[B:]], axis=1)
    model.train(was)
    parts: Dict[int, np.ndarray] = {}
    for d in (dist.all_gather_object(mine) if dist is not None else [mine]):
        parts.update(d)
    if not parts:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate([parts[s] for s in starts]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def build_pairs(cfg: PipelineConfig, tok) -> Tuple[PairDataset, PairDataset, Dict[str, Any]]:
    """(train pairs, held-out pairs, info with the skip counts) — see the module docstring."""
    from mllm.data.datasets import holdout_score, load_hh_rlhf

    dc = cfg.dpo
    t0 = time.perf_counter()
    data_dir = cfg.resolved_data_dir()
    split = available_split("hh_rlhf", data_dir)
    records = load_hh_rlhf(data_dir, split=split)
    pairs, counts = parse_hh_records(records)
    scores = [holdout_score(p, cfg.seed) for p in pairs]
    order = sorted(range(len(pairs)), key=scores.__getitem__)
    n_val = min(dc.heldout_pairs, len(order))
    want_train = len(order) - n_val if dc.max_pairs is None else min(dc.max_pairs, len(order) - n_val)
    counts["identical_after_truncation"] = 0

    def take(idx: Sequence[int], n: int) -> List[Dict[str, np.ndarray]]:
        out = []
        for i in idx:
            if len(out) >= n:
                break
            t = tokenize_pair(pairs[i], tok, dc.seq_len, dc.max_prompt_len)
            if t is None:
                counts["identical_after_truncation"] += 1
            else:
                out.append(t)
        return out

    val = take(order[:n_val], n_val)
    train = take(order[n_val:], want_train)
    if len(train) < dc.batch_size:
        raise ConfigError(f"config key 'dpo.max_pairs': only {len(train)} usable training pairs, fewer than one batch "
                          f"(dpo.batch_size={dc.batch_size})")
    skipped = {k: counts[k] for k in SKIP_REASONS}
    info = {"split": split, "records": counts["pairs_in"], "parsed_pairs": len(pairs), "skipped": skipped,
            "train_pairs": len(train), "heldout_pairs": len(val),
            "mean_prompt_tokens": float(np.mean([len(p["prompt"]) for p in train])),
            "mean_answer_tokens": float(np.mean([len(p[s]) for p in train for s in ("chosen", "rejected")])),
            "data_time_s": time.perf_counter() - t0}
    return PairDataset(train), PairDataset(val), info


def attach_reference(model, train: PairDataset, val: PairDataset, cfg: PipelineConfig, ctx, src, device,
                     autocast=None) -> Dict[str, Any]:
    """Fill ``train.ref`` / ``val.ref`` from the cache when it matches (same SFT checkpoint file: path, size and
    mtime; same tokens), else
    compute them with ``model`` (the reference) and write the cache (rank 0)."""
    key = {"input_checkpoint": ckpt.file_identity(src), "train": train.fingerprint(), "heldout": val.fingerprint()}
    path = ckpt.stage_checkpoint_dir(ctx.run_dir, STAGE) / REFERENCE_CACHE
    cached = ckpt.read_keyed_cache(path, key)
    if cached is not None:
        train.ref, val.ref = cached["train"], cached["heldout"]
        return {"reference": "precomputed (cached)", "reference_cache": str(path), "reference_time_s": 0.0}
    t0 = time.perf_counter()
    bs = 2 * cfg.dpo.micro_batch_size  # forward only: no activations kept, twice the training micro-batch fits
    train.ref = reference_logprobs(model, train, bs, device, ctx.dist, autocast, ctx.progress, "dpo reference (train)")
    val.ref = reference_logprobs(model, val, bs, device, ctx.dist, autocast, ctx.progress, "dpo reference (held-out)")
    if ctx.dist.is_main:
        ckpt.write_keyed_cache(path, key, {"train": train.ref, "heldout": val.ref})
    ctx.dist.barrier()
    return {"reference": "precomputed", "reference_cache": str(path), "reference_time_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------------------------------
def run(cfg: PipelineConfig, ctx) -> Dict[str, Any]:
    """DPO-train the SFT model for ``cfg.dpo.steps`` steps; ``ctx`` is a ``StageContext``."""
    import copy

    dist = ctx.dist
    dc = cfg.dpo
    tok = stage_tokenizer(cfg)
    model, src = load_input_model(cfg, ctx.run_dir, INPUT_STAGE, STAGE)
    train, val, info = build_pairs(cfg, tok)
    info["init_checkpoint"] = str(src)
    device = dist.device
    model.to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    ref_model = None
    if dc.reference == "precomputed":
        info.update(attach_reference(model, train, val, cfg, ctx, src, device, autocast))
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        info["reference"] = "frozen"

    collate = make_collate(tok.eot_id)
    train_src = RowBatchSource(train, batch_size=dc.batch_size, micro_batch_size=dc.micro_batch_size,
                               rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, collate=collate)
    val_src = eval_source(val, dc, dist, collate)
    trainer = Trainer(model, make_dpo_loss(dc.beta, ref_model), train_src, dc, cfg.optim, stage=STAGE,
                      run_dir=ctx.run_dir, val_data=val_src, dist=dist, compile=cfg.compile,
                      compile_mode=cfg.compile_mode, seed=cfg.seed, profile=ctx.profile, progress=ctx.progress,
                      config=cfg.to_dict(), command=ctx.command,
                      perplexity=False,  # its loss is not a token cross-entropy
                      mfu_unavailable="the DPO step runs the LM head on answer tokens only and pads pairs to the "
                                      "batch's longest row"
                                      + (", and a frozen reference forward per pair" if ref_model is not None else ""))
    del model
    try:
        trainer.log({"kind": "data", **info})
        trainer.info(f"data: {info['train_pairs']} train / {info['heldout_pairs']} held-out pairs from hh-rlhf "
                     f"{info['split']} ({info['records']} records; skipped {info['skipped']}); reference "
                     f"{info['reference']}; from {src}")
        if ctx.resume:
            trainer.resume()
        summary = trainer.fit()
        for k in ("val_rewards/accuracies", "val_rewards/margins", "val_rewards/chosen", "val_rewards/rejected"):
            name = k.replace("val_rewards/", "heldout_reward_").replace("accuracies", "accuracy")
            if k in trainer.first_eval:
                summary[f"first_{name}"] = trainer.first_eval[k]
            if k in trainer.last_eval:
                summary[f"final_{name}"] = trainer.last_eval[k]
        if trainer.last_train:
            summary["final_train_reward_accuracy"] = trainer.last_train.get("rewards/accuracies")
        n_eval = val_src.n_examples if val_src is not None else 0
        summary["heldout_pairs_evaluated"] = n_eval
        if "final_heldout_reward_accuracy" in summary:
            summary["final_heldout_reward_accuracy_ci95"] = wilson_interval(summary["final_heldout_reward_accuracy"],
                                                                            n_eval)
        summary["data"] = info
        summary["input_checkpoint"] = str(src)
        return summary
    finally:
        trainer.close()
        del ref_model
