"""Pretraining stage: next-token prediction on real text (TinyStories, WikiText), through the shared Trainer.

Data path (``cfg.data``):
  1. each dataset in ``data.pretrain_datasets`` is loaded with its ``mllm.data.datasets`` loader from
     ``data.data_dir`` / ``$MLLM_DATA_DIR`` (else the hub), one record per document, at most ``data.max_docs``;
     the split is ``train`` when it is available, else the first split on disk (the shared folder only holds
     validation files; the held-out set below keeps them honest);
  2. documents are held out for validation with ``split_holdout(fraction=data.val_fraction, seed=cfg.seed)``
     (deterministic per document, so evaluation code can carve the same set);
  3. documents are tokenised without special tokens into cached memmap shards (``mllm.data.shards``, under
     ``data.cache_dir``; every document ends with the end-of-text id), and
     * ``data.packing: false`` (GPT-2/nanoGPT baseline): joined into one stream with the end-of-text token after
       every document and cut into windows of ``seq_len + 1`` (``TokenWindows``); attention crosses documents;
     * ``data.packing: true``: documents (+ end-of-text) are bin-packed into rows of ``seq_len`` with
       ``mllm.data.packing.build_rows`` (``data.packing_algorithm``); each row carries ``position_ids`` that
       restart per document and the batch gets ``cu_seqlens``, so attention never crosses a document and no
       label predicts across a boundary;
  4. train rows are shuffled per epoch, disjoint per rank (``RowBatchSource``); validation rows are read in order.

Loss: ``causal_lm_loss`` (mean over non-ignored labels), weighted by the number of target tokens.
Output: ``checkpoints/pretrain/final`` -> the last step's checkpoint (model weights under ``"model"``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.training.batches import EvalBatches, TokenWindows

from .common import SegmentRows, available_split, fit_stage, next_token_loss, stage_tokenizer, stage_trainer

STAGE = "pretrain"


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def load_documents(cfg: PipelineConfig) -> Tuple[List[str], Dict[str, Any]]:
    """Texts of all pretraining documents (``data.pretrain_datasets`` in order) and a description of the sources."""
    from mllm.data.datasets import load_dataset

    data_dir = cfg.resolved_data_dir()
    texts: List[str] = []
    sources: Dict[str, Any] = {}
    for name in cfg.data.pretrain_datasets:
        split = available_split(name, data_dir)
        try:
            recs = load_dataset(name, source=data_dir, split=split, max_rows=cfg.data.max_docs)
        except TypeError as e:
            raise ConfigError(f"config key 'data.pretrain_datasets': {name!r} is not a text dataset ({e})") from e
        if recs and "text" not in recs[0]:
            raise ConfigError(f"config key 'data.pretrain_datasets': {name!r} has no 'text' field "
                              f"(fields: {', '.join(recs[0])}); pretraining needs text datasets")
        docs = [r["text"] for r in recs if r["text"].strip()]
        sources[name] = {"split": split, "documents": len(docs)}
        texts.extend(docs)
    if not texts:
        raise ConfigError("config key 'data.pretrain_datasets': no documents were loaded")
    return texts, sources


def split_documents(texts: Sequence[str], fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """(train, validation) documents, held out per document with ``split_holdout``."""
    from mllm.data.datasets import split_holdout

    train, val = split_holdout([{"text": t} for t in texts], fraction, seed=seed)
    return [r["text"] for r in train], [r["text"] for r in val]


def token_shard(texts: Sequence[str], tok, cfg: PipelineConfig, split: str, dist=None, progress: bool = True):
    """Tokenised documents (each followed by the end-of-text id) as a cached ``mllm.data.shards`` memmap shard.
    Rank 0 tokenises; the other ranks wait and open the cached shard."""
    from mllm.data.shards import ShardKey, build_shard

    key = ShardKey("pretrain", split, {"datasets": list(cfg.data.pretrain_datasets), "max_docs": cfg.data.max_docs,
                                       "val_fraction": cfg.data.val_fraction, "seed": cfg.seed})
    is_main = dist is None or dist.is_main
    shard = build_shard(texts, tok, cfg.data.cache_dir, key, progress=progress and is_main) if is_main else None
    if dist is not None:
        dist.barrier()
    return shard if shard is not None else build_shard(texts, tok, cfg.data.cache_dir, key, progress=False)


def build_datasets(cfg: PipelineConfig, tok, dist=None, progress: bool = True) -> Tuple[Sequence, Sequence, Dict[str, Any]]:
    """(train rows, validation rows, info) for ``cfg`` (see the module docstring)."""
    T = cfg.pretrain.seq_len
    t0 = time.perf_counter()
    texts, sources = load_documents(cfg)
    train_txt, val_txt = split_documents(texts, cfg.data.val_fraction, cfg.seed)
    if not train_txt:
        raise ConfigError(f"config key 'data.val_fraction': {cfg.data.val_fraction} held out every document")
    train_sh = token_shard(train_txt, tok, cfg, "train", dist, progress)
    val_sh = token_shard(val_txt, tok, cfg, "val", dist, progress) if val_txt else None
    info: Dict[str, Any] = {"sources": sources, "train_documents": train_sh.n_docs,
                            "val_documents": val_sh.n_docs if val_sh else 0, "train_tokens": train_sh.n_tokens,
                            "val_tokens": val_sh.n_tokens if val_sh else 0, "packing": cfg.data.packing,
                            "token_cache": str(train_sh.path.parent), "cache_hit": train_sh.cache_hit}
    empty = np.zeros((0, T), np.int64)
    if cfg.data.packing:
        from mllm.data.packing import build_rows

        def rows(shard, seed):
            if shard is None:
                return SegmentRows({"input_ids": empty, "labels": empty, "position_ids": empty})
            docs = [shard.doc(i) for i in range(shard.n_docs)]  # each ends with eot, which is a target
            return SegmentRows(build_rows(docs, T, pad_id=tok.eot_id, packing=True, eot_id=None,
                                          algorithm=cfg.data.packing_algorithm, overflow="split", seed=seed))

        train, val = rows(train_sh, cfg.seed), rows(val_sh, cfg.seed + 1)
        info["packing_efficiency"] = train.efficiency
        info["packing_algorithm"] = cfg.data.packing_algorithm
    else:
        train = TokenWindows(train_sh.tokens, T)  # the shard is doc_0 eot doc_1 eot ...: the nanoGPT stream
        val = TokenWindows(val_sh.tokens if val_sh else np.zeros(0, np.int64), T)
    info.update(train_rows=len(train), val_rows=len(val), data_time_s=time.perf_counter() - t0)
    return train, val, info


# ----------------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------------
lm_loss = next_token_loss  # mean next-token cross-entropy over non-ignored labels; weight = their number


# ----------------------------------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------------------------------
def run(cfg: PipelineConfig, ctx) -> Dict[str, Any]:
    """Pretrain ``Transformer(cfg.model)`` for ``cfg.pretrain.steps`` steps; ``ctx`` is a ``StageContext``."""
    from mllm.models.transformer import Transformer

    dist = ctx.dist
    tok = stage_tokenizer(cfg)
    train_rows, val_rows, info = build_datasets(cfg, tok, dist, ctx.progress)
    sc = cfg.pretrain
    # eval_batches micro-batches in total, spread over the ranks: the same validation rows for any world size
    val_src = EvalBatches(val_rows, micro_batch_size=sc.micro_batch_size, rank=dist.rank, world_size=dist.world_size,
                          max_examples=sc.eval_batches * sc.micro_batch_size) if len(val_rows) else None

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    # the model is built inline so that the trainer holds the only reference and close() really frees it
    trainer = stage_trainer(cfg, ctx, STAGE, sc, Transformer(cfg.model), lm_loss, train_rows, val_src)
    return fit_stage(trainer, ctx, info,
                     f"data: {info['train_rows']} train rows / {info['val_rows']} val rows of {sc.seq_len} tokens "
                     f"({info['train_tokens']:,} / {info['val_tokens']:,} tokens, packing={cfg.data.packing}) "
                     f"from {info['sources']}")
