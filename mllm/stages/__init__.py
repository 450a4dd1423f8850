"""Pipeline stages. A stage is ``run(cfg: PipelineConfig, ctx: StageContext) -> summary dict``: it builds its data,
its loss and its model, and hands them to the shared ``mllm.training.trainer.Trainer``.

The registry maps a stage name to ``"module:function"`` so that importing this package stays cheap. ``eval`` evaluates
every stage checkpoint of the run and writes ``<run>/report/REPORT.md``; ``all`` runs pretrain -> sft -> dpo ->
verifier -> eval.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.training.distributed import DistContext

STAGES: Dict[str, str] = {
    "pretrain": "mllm.stages.pretrain:run",
    "sft": "mllm.stages.sft:run",
    "dpo": "mllm.stages.dpo:run",
    "verifier": "mllm.stages.verifier:run",
    "eval": "mllm.stages.eval:run",
    "all": "mllm.stages.pipeline:run",
}


@dataclass
class StageContext:
    """What a stage needs besides the config: where to write, which process it is, and how to run."""

    run_dir: Path
    dist: DistContext
    resume: bool = False  # continue from the stage's latest checkpoint when there is one
    profile: bool = False  # write a torch.profiler trace of a few steps to run_dir/profile/
    progress: bool = True  # tqdm bar on rank 0
    recompute: bool = False  # eval stage: evaluate again even when the results are newer than the checkpoints
    command: Optional[str] = None  # the command line, recorded in results JSONs (None: this process's sys.argv)


def valid_stages() -> list:
    return sorted(STAGES)


def get_stage(name: str) -> Callable[[PipelineConfig, StageContext], Dict[str, Any]]:
    """The ``run`` function of stage ``name``; an unknown name raises a ``ConfigError`` listing the valid ones."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}: valid stages are {', '.join(valid_stages())}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def run_stage(name: str, cfg: PipelineConfig, ctx: StageContext) -> Dict[str, Any]:
    return get_stage(name)(cfg, ctx)


__all__ = ["STAGES", "StageContext", "get_stage", "run_stage", "valid_stages"]
