"""Pieces every training stage shares: split choice, the checked tokenizer, segment rows, the next-token loss, and
building / running the stage's ``Trainer``.

``pretrain`` and ``sft`` use all of it; ``dpo`` and ``verifier`` reach ``available_split`` and ``stage_tokenizer``
through ``mllm.stages.sft`` (which re-exports them).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.training.batches import RowBatchSource, collate_rows
from mllm.training.trainer import Trainer


def available_split(name: str, data_dir) -> str:
    """``train`` when it is on disk (or there is no local folder: the hub has every split; or nothing of ``name`` is
    on disk: the loader then says where it looked), else the first split on disk (the shared folder holds only
    validation / test files for some datasets; held-out slices are carved from what is used)."""
    from mllm.data.datasets import local_splits

    if data_dir is None:
        return "train"
    on_disk = local_splits(name, data_dir)
    return "train" if (not on_disk or "train" in on_disk) else on_disk[0]


def stage_tokenizer(cfg: PipelineConfig):
    """The config's tokenizer (``data.tokenizer``), checked against ``model.vocab_size``."""
    from mllm.data.tokenizer import tokenizer_from_config

    tok = tokenizer_from_config(cfg.data)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
                          f"{tok.name} tokenizer's {tok.vocab_size} ids")
    return tok


class SegmentRows(Sequence):
    """Rows of ``mllm.data.packing.build_rows`` (input_ids, labels, position_ids, each [R, T]). Item ``i`` also
    carries that row's own ``cu_seqlens`` (segment starts = where position_ids is 0, then T), which
    ``collate_rows`` offsets into batch-level FlashAttention-varlen boundaries."""

    def __init__(self, rows: Dict[str, Any]):
        self.input_ids = rows["input_ids"]
        self.labels = rows["labels"]
        self.position_ids = rows["position_ids"]
        self.efficiency = float(rows.get("efficiency", 1.0))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        pos = self.position_ids[i]
        cu = np.append(np.flatnonzero(pos == 0), pos.shape[0]).astype(np.int64)
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "position_ids": pos, "cu_seqlens": cu}


def next_token_loss(model, batch) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
    """``(loss, {}, weight)``: loss = mean next-token cross-entropy over the labels that are not -100 (labels are
    aligned to positions, [B, T]), weight = their number. Runs through ``model.forward(labels=...)`` so DDP hooks
    and, on the triton backend, the fused head + loss cover it."""
    labels = batch["labels"]
    loss = model(batch["input_ids"], position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
                 labels=labels)
    return loss, {}, (labels != -100).sum()


def stage_trainer(cfg: PipelineConfig, ctx, stage: str, stage_cfg, model, loss_fn, train_rows, val_data,
                  eval_fn=None, collate=None) -> Trainer:
    """The ``Trainer`` of ``stage``: ``train_rows`` shuffled per epoch and disjoint per rank (``RowBatchSource``
    with ``stage_cfg``'s batch sizes and ``cfg.seed``), ``val_data`` as given. The caller should drop its own
    reference to ``model`` afterwards, so that ``Trainer.close`` really frees it."""
    dist = ctx.dist
    train_src = RowBatchSource(train_rows, batch_size=stage_cfg.batch_size, micro_batch_size=stage_cfg.micro_batch_size,
                               rank=dist.rank, world_size=dist.world_size, seed=cfg.seed,
                               collate=collate or collate_rows)
    return Trainer(model, loss_fn, train_src, stage_cfg, cfg.optim, stage=stage, run_dir=ctx.run_dir,
                   val_data=val_data, dist=dist, compile=cfg.compile, compile_mode=cfg.compile_mode, seed=cfg.seed,
                   profile=ctx.profile, progress=ctx.progress, config=cfg.to_dict(), eval_fn=eval_fn,
                   command=ctx.command)


def fit_stage(trainer: Trainer, ctx, info: Dict[str, Any], data_line: str,
              extra: Optional[Callable[[Trainer], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Log the data record ``info`` (and ``data_line`` on the console), resume when ``ctx.resume``, fit, and return
    ``trainer.fit()``'s summary with ``"data": info`` and then ``extra(trainer)``'s keys added. The trainer is
    closed in every case."""
    try:
        trainer.log({"kind": "data", **info})
        trainer.info(data_line)
        if ctx.resume and not trainer.resume():
            trainer.info(f"--resume: no '{trainer.stage}' checkpoint in {trainer.ckpt_dir}; starting at step 0")
        summary = trainer.fit()
        summary["data"] = info
        if extra is not None:
            summary.update(extra(trainer))
        return summary
    finally:
        trainer.close()


__all__ = ["SegmentRows", "available_split", "fit_stage", "next_token_loss", "stage_tokenizer", "stage_trainer"]
