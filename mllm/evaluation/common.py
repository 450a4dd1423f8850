"""Helpers shared by the evaluation modules: calling a model for logits, per-token log-probs, and
writing results JSONs that say which command produced them.

A "model" here is anything callable as ``model(input_ids [B, T] long) -> logits [B, T, V]``: our
``Transformer``, a Hugging Face causal LM (its output's ``.logits`` is taken), or a small stand-in module
in the tests. Evaluation never needs more than that, which is what lets baselines and our checkpoints
go through the same functions.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch


def model_device(model) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free module)."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] fp32 for input_ids [B, T]; accepts a tensor or an object with ``.logits``."""
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a 2-D long tensor [B, T], got shape {tuple(input_ids.shape)} "
                         f"dtype {input_ids.dtype}")
    out = model(input_ids)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits [B, T, V] for input_ids {tuple(input_ids.shape)}, got {shape}")
    return logits.float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: logits [..., V] and targets [...] long -> [...] fp32,
    log_softmax(logits)[target] = logit[target] − logsumexp(logits)."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def command_line(script: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> str:
    """A shell-quoted ``python <script> <args>`` line for results JSONs: ``script``/``argv`` when given (a script's
    ``main(argv)`` called in-process), else this process's ``sys.argv``."""
    if script is None:
        script = sys.argv[0] if sys.argv and sys.argv[0] else "-"
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + " ".join(shlex.quote(a) for a in [Path(script).as_posix()] + args)


def write_result(path: str | os.PathLike, result: Dict[str, Any], command: Optional[str] = None,
                 **meta: Any) -> Path:
    """Write ``result`` to ``path`` as JSON with provenance: ``{"command", "created", **meta, "result"}``.

    ``command`` defaults to the current process's command line. The file is written atomically
    (temp file + rename) so a report never reads half a JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": command if command is not None else command_line(),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta,
           "result": result}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return o.as_posix()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_result(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a JSON written by :func:`write_result`; errors name the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(doc, dict) or "result" not in doc:
        raise ValueError(f"{path}: not a results JSON (needs a top-level 'result' key)")
    return doc

