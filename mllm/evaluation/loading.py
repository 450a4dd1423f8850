"""Find and load stage checkpoints for evaluation, through ``mllm.training.checkpoint``'s API.

Run layout (written by the trainer, see ``mllm.training.runner``)::

    <run>/config.json  <run>/metrics.jsonl  <run>/summary.json  <run>/figures/<stage>_loss.png
    <run>/checkpoints/<stage>/step_XXXXXXXX.pt, latest, final

A checkpoint file holds ``model`` (our Transformer's state dict), ``config`` (the whole PipelineConfig as a
dict), ``stage`` and ``step``; the model is rebuilt from ``config["model"]``. A file without ``config``
falls back to ``<run>/config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

STAGE_ORDER = ("pretrain", "sft", "dpo", "verifier")


def find_stage_checkpoints(run_dir: str | Path, stages=STAGE_ORDER) -> Dict[str, Path]:
    """{stage: checkpoint file} for every stage of ``run_dir`` that has one: the ``final`` checkpoint, else
    the ``latest`` (a stage that stopped early is still evaluated; its ``complete`` flag says so)."""
    from mllm.training import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    out: Dict[str, Path] = {}
    for stage in stages:
        d = ckpt.stage_checkpoint_dir(run_dir, stage)
        found = ckpt.final_checkpoint(d) or ckpt.latest_checkpoint(d)
        if found is not None:
            out[stage] = found
    return out


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # torch.compile wraps names in "_orig_mod.", DDP in "module."
    out = {}
    for k, v in state.items():
        for p in ("_orig_mod.", "module."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _pipeline_config(path: Path, state: Dict[str, Any]):
    from mllm.config.pipeline_config import config_from_dict

    data = state.get("config")
    if not data:
        # <run>/checkpoints/<stage>/step.pt -> <run>/config.json
        cand = path.parent.parent.parent / "config.json"
        if not cand.is_file():
            raise ValueError(f"{path}: the checkpoint has no 'config' entry and {cand} does not exist, so the "
                             "model's shape is unknown")
        data = json.loads(cand.read_text())
    return config_from_dict(data)


def load_stage_model(path: str | Path, device: str | torch.device = "cpu") -> Tuple[torch.nn.Module, Any, Dict]:
    """(Transformer in eval mode, PipelineConfig, meta) from a checkpoint file or a stage checkpoint folder.

    meta = {"checkpoint", "stage", "step", "total_steps", "complete"} (what the checkpoint records).
    Extra state-dict entries that are not the Transformer's (e.g. a verifier's value head) are ignored here;
    missing Transformer entries raise.
    """
    from mllm.models import Transformer
    from mllm.training import checkpoint as ckpt

    path = Path(path)
    if path.is_dir():
        found = ckpt.final_checkpoint(path) or ckpt.latest_checkpoint(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path} (expected 'final', 'latest' or step_*.pt)")
        path = found
    state = ckpt.load_checkpoint(path, map_location="cpu")
    if "model" not in state:
        raise ckpt.CheckpointError(f"{path}: no 'model' entry in the checkpoint")
    cfg = _pipeline_config(path, state)
    model_cfg = cfg.model
    model = Transformer(model_cfg)
    weights = _strip_prefixes(state["model"])
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ckpt.CheckpointError(f"{path}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own})
    model.to(device).eval()
    meta = {"checkpoint": str(path), "stage": state.get("stage"), "step": state.get("step"),
            "total_steps": state.get("total_steps"), "complete": state.get("complete")}
    return model, cfg, meta


def resolve_device(name: str = "auto") -> torch.device:
    """auto (CUDA when available), cpu, cuda or cuda:N; a ValueError naming the problem otherwise (a bad name, or
    CUDA on a machine without it), rather than torch's own error deep in the model load."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch.cuda.is_available() is False on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def list_stage_names(found: Dict[str, Path]) -> List[str]:
    return [s for s in STAGE_ORDER if s in found] + sorted(s for s in found if s not in STAGE_ORDER)
