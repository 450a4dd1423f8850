"""Process-group set-up for ``torchrun`` (single node or multi-node) and plain ``python`` runs.

``torchrun`` exports RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; when they are present we join the
process group (nccl on CUDA, gloo on CPU), otherwise we run as a single process with ``world_size == 1``.
Multi-node is the same code: only the launcher flags differ (see ``scripts/slurm/pipeline.slurm``).

Shutdown order matters (measured, see ``docs/toolchain-notes.md``): free the model and optimizer, ``gc.collect()``,
``barrier()``, then ``destroy_process_group()``; otherwise gloo ranks abort in about a quarter of the runs.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits in the job. ``device`` is the one this rank computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None when no process group was created

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> List[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.is_distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (e.g. a timestamped run name)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """``pref`` is the config's ``device`` key: "auto" (CUDA when available), "cpu" or "cuda"."""
    from mllm.config.pipeline_config import ConfigError  # a ValueError the CLIs print as one line, not a traceback

    if pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'device': must be auto, cpu or cuda, got {pref!r}")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but torch.cuda.is_available() is False")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the ``torchrun`` process group if the launcher's variables are set, else a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return DistContext(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        dist.init_process_group(**kwargs)
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def shutdown_distributed(ctx: Optional[DistContext]) -> None:
    """gc + barrier + destroy_process_group; the caller must already have dropped model/optimizer references."""
    gc.collect()
    if ctx is not None and ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    if ctx is not None and ctx.is_distributed and dist.is_initialized():
        ctx.barrier()
        dist.destroy_process_group()
