"""Training metrics: JSON-lines log, throughput, model FLOPs utilisation (MFU) and the loss-curve figure.

MFU (PaLM appendix B / nanoGPT convention)::

    flops_per_token = 6·N + 12·L·H·Q·T          (N parameters, L layers, H heads, Q head dim, T sequence length)
    MFU             = flops_per_token · tokens_per_s / (peak_flops_per_device · world_size)

T is the length of the rows the model ran on (the padded batch length, or the packed row length), not the stage's
``seq_len`` when a stage pads each batch to its longest row; the trainer sums tokens · flops_per_token(T) per
micro-batch, so a logged ``flops_per_token`` is the token-weighted mean over the logged steps.

``tokens_per_s`` counts the tokens of all ranks. The peak is the dense bf16 tensor-core number of the device from
its datasheet (no sparsity; half the datasheet's "with sparsity" figure): H100 SXM 989.4 TFLOP/s, H200 (SXM)
989.4 TFLOP/s (same compute die as the H100 SXM), H100 PCIe 756.5, H100 NVL and H200 NVL 835.5 (lower clocks and
power), A100 312 TFLOP/s. On CPU, or a GPU not in the table, MFU is ``null`` (there is no honest peak to divide by).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

# (substring of torch.cuda.get_device_name(), label, dense bf16 FLOP/s); the first match wins, so the PCIe/NVL
# variants (same names plus a suffix, lower peaks) come before their SXM rows
PEAK_BF16_FLOPS: Tuple[Tuple[str, str, float], ...] = (
    ("H100 PCIe", "NVIDIA H100 PCIe bf16 dense", 756.5e12),
    ("H100 NVL", "NVIDIA H100 NVL bf16 dense", 835.5e12),
    ("H200 NVL", "NVIDIA H200 NVL bf16 dense", 835.5e12),
    ("H200", "NVIDIA H200 bf16 dense", 989.4e12),
    ("H100", "NVIDIA H100 SXM bf16 dense", 989.4e12),
    ("A100", "NVIDIA A100 bf16 dense", 312e12),
)


def device_peak_flops(device: torch.device | str) -> Tuple[Optional[float], str]:
    """(peak FLOP/s per device or None, a sentence naming where it came from) for MFU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"{device.type}: no peak FLOP/s defined, MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, label, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak, f"{label} {peak / 1e12:.1f} TFLOP/s per device ({name})"
    return None, f"{name}: not in the peak-FLOP/s table, MFU not reported"


def mfu(flops_per_token: Optional[float], tokens_per_s: float, peak_flops: Optional[float],
        world_size: int = 1) -> Optional[float]:
    """flops_per_token · tokens_per_s / (peak_flops · world_size), or None when either FLOP number is unknown."""
    if not flops_per_token or not peak_flops or world_size <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * world_size)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().tolist() if v.numel() != 1 else v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it readable instead of producing an invalid file
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class MetricsWriter:
    """Appends one JSON object per line to ``path``; a no-op when ``enabled`` is False (ranks other than 0).

    Opening an existing file cuts a last line left unfinished by a killed writer, so the next record starts a line of
    its own instead of joining the fragment into an unreadable one."""

    def __init__(self, path: Optional[str | Path], enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(_jsonable(record), sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def drop(self, stage: str, predicate: Callable[[Dict[str, Any]], bool]) -> int:
        """Drop the ``stage`` records for which ``predicate`` holds, and unreadable lines; returns how many were
        dropped. Rewritten atomically."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut short by a crash
                continue
            if rec.get("stage") == stage and predicate(rec):
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def truncate_after(self, stage: str, step: int) -> int:
        """Drop ``stage`` records with step > ``step`` (logged after the checkpoint we resume from, so they would
        be logged twice); returns how many were dropped."""
        return self.drop(stage, lambda r: isinstance(r.get("step"), int) and r["step"] > step)

    def drop_before(self, stage: str, t: float) -> int:
        """Drop ``stage`` records written before time ``t`` (an earlier attempt of a stage that now starts over
        from step 0: its records would be logged twice)."""
        return self.drop(stage, lambda r: isinstance(r.get("time"), (int, float)) and r["time"] < t)


def read_metrics(path: str | Path, stage: Optional[str] = None) -> List[Dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not a JSON line: {e.msg}") from e
        if stage is None or rec.get("stage") == stage:
            out.append(rec)
    return out


LOSS_LABELS = {  # what each stage's logged ``loss`` is (y-axis of its loss curve)
    "pretrain": "cross-entropy (nats/token)",
    "sft": "response cross-entropy (nats/token)",
    "dpo": "DPO loss −log σ(β·margin) (nats/pair)",
    "verifier": "value BCE + λ·LM cross-entropy",
}


def plot_loss_curve(records: Iterable[Dict[str, Any]], out_png: str | Path, title: str = "",
                    ylabel: Optional[str] = None) -> Optional[Path]:
    """Train loss (``loss``) and validation loss (``val_loss``) against step; returns the PNG path or None
    when there is nothing to plot. ``ylabel`` defaults to the cross-entropy label (see ``LOSS_LABELS``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val" and finite(r.get("val_loss"))]
    if not train and not val:
        return None
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel or LOSS_LABELS["pretrain"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
