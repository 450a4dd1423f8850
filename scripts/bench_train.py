#!/usr/bin/env python
"""Training-step throughput of one model config for several kernel backends, in one run.

    python scripts/bench_train.py                                   # CUDA: gpu-full, B=8, T=1024, bf16, 4 backends
    python scripts/bench_train.py --config local-smoke --backends eager --steps 3 --warmup 1   # CPU smoke
    python scripts/bench_train.py --backends triton,eager --set model.n_layers=24 --docs-per-row 4

Backends: ``eager`` (mllm_kernels.reference ops, SDPA attention when no packing/window/sinks),
``eager+compile`` (the same under ``torch.compile``), ``triton`` (the fused kernels, and the fused LM head +
cross-entropy unless ``--set model.fused_lm_loss=false``) and ``triton+compile``.
Each backend gets a fresh model with the same seed and the same synthetic batches (uniform random tokens:
throughput does not depend on the token values), then ``--warmup`` untimed steps (compilation, autotuning,
allocator warm-up) and ``--steps`` timed optimizer steps of::

    step ⊃ [data (host→device copy) · forward (+ loss, autocast) · backward] × grad_accum · optimizer (clip + AdamW)

``--grad-accum`` defaults to the config's pretraining batch over the micro-batch (gpu-full: 128 / 8 = 16, the
real optimizer step on one GPU); ``--grad-accum 1`` puts an optimizer step after every micro-batch. The range
names are those of ``mllm.training.profiling`` (NVTX + ``record_function``); the timed steps sit inside one
more range, ``timed_steps``, that ``scripts/profile.sh`` uses as the Nsight capture range.

Reported per backend:
  * tokens/s = steps · grad_accum · B · T / wall time of the timed steps (device synchronised at both ends);
  * MFU = flops_per_token · tokens/s / peak, flops_per_token = 6N + 12·L·H·Q·T (PaLM/nanoGPT, N = parameters,
    L layers, H heads, Q head dim, T sequence length); the peak is the card's dense bf16 number
    (H100 SXM 989.4 TFLOP/s; ``--peak-tflops`` overrides); on CPU MFU is n/a;
  * peak memory (``torch.cuda.max_memory_allocated``, warm-up included, so optimizer state counts; on the CPU the
    process's peak resident set since the backend started, ``peak_rss_mb``, marked "(RSS)" in the table, or
    "(RSS, process peak)" where the high-water mark cannot be reset, ``peak_rss_scope`` "process");
  * median per-range times, measured with CUDA events on the GPU (no extra synchronisation inside the
    step) and ``time.perf_counter`` on the CPU, and the first step's time (compilation for +compile).
``--loop trainer`` times ``mllm.training.trainer.Trainer.train_step`` instead of this script's own step (same model,
batches, accumulation, ``--compile-mode``; the loss of the pretraining stage, ``next_token_loss``): the rate of the real
training loop, with its per-step metric reduction, gradient clipping, non-finite check and, under CUDA graphs, its
gradient and ``cu_seqlens`` handling. It has no per-range breakdown (the trainer carries no CUDA-event timer), uses
the trainer's autocast (bf16 on CUDA, fp32 on CPU) and its cosine schedule (losses after the first step differ from
the script's loop; the rate does not depend on them).
Writes ``bench_train_<date>_<card>.json`` and ``.md`` into ``--out``; exit code 1 if any backend failed.
The model is trained in fp32 master weights with bf16 autocast on CUDA (``--dtype``), like the trainer.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.run import describe_exception, environment, jsonable, resolve_device, result_stem  # noqa: E402
from mllm.config.pipeline_config import COMPILE_MODES, ConfigError, load_config, validate  # noqa: E402
from mllm.training.batches import batch_to_device  # noqa: E402
from mllm.training.metrics import device_peak_flops, mfu  # noqa: E402
from mllm.training.profiling import StepProfiler, trace_range  # noqa: E402
from mllm.training.trainer import CUDAGRAPH_MODES  # noqa: E402

# backend name -> (cfg.model.kernel_backend, torch.compile?)
BACKENDS = {
    "eager": ("eager", False),
    "eager+compile": ("eager", True),
    "triton": ("triton", False),
    "triton+compile": ("triton", True),
}
PHASES = ("data", "forward", "backward", "optimizer")
TIMED_RANGE = "timed_steps"  # the Nsight capture range (scripts/profile.sh)
# the ops whose dispatch path (mllm_kernels._common.last_path) is recorded, to show what really ran
KERNEL_OPS = ("rms_norm", "fused_add_rms_norm", "swiglu", "apply_rope", "rope", "attention", "sequence_logprobs",
              "linear_cross_entropy")
# issue 9's target on one H100 for the gpu-full model (reported, never asserted)
GOAL_TOKENS_PER_S = 260_000
GOAL_SPEEDUP_VS_EAGER = 1.3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------
# Arguments and config
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="preset or .json/.yaml file (default: gpu-full on CUDA, local-smoke on CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated subset of {', '.join(BACKENDS)} (default: all on CUDA, eager on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per backend (default 10 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CUDA, 2 CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default pretrain.micro_batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default pretrain.seq_len)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step (default: pretrain.batch_size / micro-batch, i.e. the "
                        "config's optimizer step on one GPU; 1 = an optimizer step after every micro-batch)")
    p.add_argument("--docs-per-row", type=int, default=1,
                   help="packed documents per row (>1 passes cu_seqlens: the varlen attention path)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="autocast dtype (default bf16 CUDA, fp32 CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s for MFU (default: from the card name; H100 SXM 989.4)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (default: torch's default)")
    p.add_argument("--compiled-autograd", action="store_true",
                   help="+compile backends: run each backward under compiled autograd (the whole backward, gradient "
                        "accumulation included, as one inductor graph with --compile-mode; benchmarks/NOTES.md, "
                        "tuning step 20). Experimental: bench loop only")
    p.add_argument("--loop", choices=("bench", "trainer"), default="bench",
                   help="time this script's training step (with a per-range breakdown) or the Trainer's train_step")
    p.add_argument("--torch-profile", default=None, metavar="DIR",
                   help="also write a torch.profiler Chrome trace per backend into DIR: the first timed step "
                        "warms the profiler up, the next (up to 3) are recorded; needs --steps >= 2 (timings of a "
                        "profiled run are perturbed and marked so)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="folder for the JSON/Markdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids OpenMP stalls on a shared CPU")
    p.add_argument("--isolate", action="store_true",
                   help="benchmark each backend in a process of its own (same arguments) and report them together: "
                        "the host-bound triton backend measured 5%% slower after the other backends in one process "
                        "than alone (H200, benchmarks/NOTES.md)")
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)  # --isolate's child: write one result here
    return p.parse_args(argv)


def _strip_args(argv: Sequence[str], names: Sequence[str], with_value: Sequence[str]) -> List[str]:
    """argv without the flags ``names`` and the options ``with_value`` (as "--opt V" or "--opt=V")."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if a in names:
            continue
        if key in with_value:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def run_isolated(argv: Sequence[str], backends: Sequence[str]) -> List[Dict[str, Any]]:
    """One child process per backend (this script, the same arguments, ``--backends NAME``); their results."""
    import subprocess
    import tempfile

    base = _strip_args(argv, ["--isolate"], ["--backends", "--result-json"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in backends:
            path = Path(tmp) / f"{name.replace('+', '_')}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--backends", name, "--result-json", str(path)]
            rc = subprocess.run(cmd).returncode
            if path.exists():
                res = json.loads(path.read_text())
            else:
                res = {"backend": name, "error": f"isolated child process exited with {rc} and wrote no result"}
            res["isolated"] = True
            results.append(res)
    return results


def resolve_args(args: argparse.Namespace):
    """Fill device-dependent defaults and validate; returns (args, cfg, device, backends)."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    name = args.config or ("gpu-full" if cuda else "local-smoke")
    cfg = load_config(name, overrides=args.overrides)
    args.config = name
    args.backends = args.backends or (",".join(BACKENDS) if cuda else "eager")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"--backends: unknown backend {b!r}; valid: {', '.join(BACKENDS)}")
    if not backends:
        raise ValueError("--backends: empty list")
    if any(BACKENDS[b][0] == "triton" for b in backends):  # the config's own check, for the backend swapped in later
        try:
            validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernel_backend="triton")))
        except ConfigError as e:
            raise ValueError(f"--backends triton: {e}") from None
    args.steps = args.steps if args.steps is not None else (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    # `is None`, not `or`: an explicit 0 must reach the range checks below instead of becoming the default
    args.micro_batch = args.micro_batch if args.micro_batch is not None else cfg.pretrain.micro_batch_size
    args.seq_len = args.seq_len if args.seq_len is not None else cfg.pretrain.seq_len
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.micro_batch >= 1 and args.grad_accum is None:
        args.grad_accum = max(1, cfg.pretrain.batch_size // args.micro_batch)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.warmup < 1 and any(BACKENDS[b][1] for b in backends):
        raise ValueError("--warmup must be >= 1 with a +compile backend, or compilation would be timed")
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    if not 2 <= args.seq_len <= cfg.model.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} must be in [2, model.max_seq_len={cfg.model.max_seq_len}]")
    if not 1 <= args.docs_per_row <= args.seq_len:
        raise ValueError(f"--docs-per-row must be in [1, seq_len={args.seq_len}], got {args.docs_per_row}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.torch_profile and args.steps < 2:
        raise ValueError("--torch-profile needs --steps >= 2 (one profiler warm-up step, then active steps)")
    if args.loop == "trainer":
        if args.dtype != ("bf16" if cuda else "fp32"):
            raise ValueError(f"--loop trainer runs the trainer's autocast (bf16 on CUDA, fp32 on CPU), not --dtype "
                             f"{args.dtype}")
        if args.torch_profile:
            raise ValueError("--torch-profile is not available with --loop trainer (use the trainer's --profile)")
        if args.compiled_autograd:
            raise ValueError("--compiled-autograd is not available with --loop trainer (bench loop only)")
    if args.compiled_autograd and not any(BACKENDS[b][1] for b in backends):
        raise ValueError("--compiled-autograd needs a +compile backend in --backends")
    return args, cfg, device, backends


# ----------------------------------------------------------------------------------------------------
# Synthetic batches
# ----------------------------------------------------------------------------------------------------
def make_batches(n: int, batch: int, seq_len: int, vocab: int, docs_per_row: int, seed: int,
                 pin: bool) -> List[Dict[str, Optional[torch.Tensor]]]:
    """n host batches: input_ids [B, T] int64, labels [B, T] (aligned: labels[:, t] = input[:, t+1]),
    position_ids [B, T] (restarting at 0 in each document) and, with docs_per_row > 1, cu_seqlens
    [B·docs_per_row + 1] int32 over the flattened B·T tokens (random cut points, every row start included).
    The last position of each document gets label -100 so no document predicts its neighbour's first token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        input_ids, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
        position_ids = torch.arange(seq_len).repeat(batch, 1)
        cu_seqlens = None
        if docs_per_row > 1:
            bounds = [0]
            for b in range(batch):
                cuts = torch.randperm(seq_len - 1, generator=g)[: docs_per_row - 1] + 1
                starts = [0] + sorted(cuts.tolist())
                ends = starts[1:] + [seq_len]
                for s, e in zip(starts, ends):
                    position_ids[b, s:e] = torch.arange(e - s)
                    labels[b, e - 1] = -100
                    bounds.append(b * seq_len + e)
            cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        batch_d = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu_seqlens}
        if pin:  # pinned host memory makes the copy in the "data" range asynchronous, as a DataLoader would
            batch_d = {k: (v.pin_memory() if v is not None else None) for k, v in batch_d.items()}
        out.append(batch_d)
    return out


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
class PhaseTimer:
    """Marks the end of each phase of each step; CUDA events on the GPU (recorded in stream order, read after
    one synchronisation at the end), perf_counter on the CPU. A phase met several times in one step (data,
    forward and backward once per micro-batch) is summed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: List[List[Any]] = []  # per step: [(None, t0), (phase, t_end), ...]

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start_step(self) -> None:
        self.steps.append([(None, self._now())])

    def mark(self, phase: str) -> None:
        self.steps[-1].append((phase, self._now()))

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def phase_ms(self) -> Dict[str, List[float]]:
        """{phase: [ms per step]} plus 'step' (first mark to last)."""
        out: Dict[str, List[float]] = {p: [] for p in PHASES + ("step",)}
        for marks in self.steps:
            per = dict.fromkeys(PHASES, 0.0)
            for (_, t0), (phase, t1) in zip(marks[:-1], marks[1:]):
                per[phase] += self._ms(t0, t1)
            for p in PHASES:
                out[p].append(per[p])
            out["step"].append(self._ms(marks[0][1], marks[-1][1]))
        return out


CLEAR_REFS = "/proc/self/clear_refs"
PROC_STATUS = "/proc/self/status"


def reset_rss_peak() -> bool:
    """Restart the process's resident-set high-water mark (Linux: ``/proc/self/clear_refs`` 5). False where that
    is refused or absent (a container or sandbox without it, another OS): the peak is then the process's own."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vmhwm_mb() -> Optional[float]:
    try:
        for line in Path(PROC_STATUS).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_peak_mb() -> Optional[float]:
    """The process's peak resident set in MiB: VmHWM (since the last ``reset_rss_peak``), else ru_maxrss (KiB on
    Linux, bytes on macOS; never reset)."""
    hwm = _vmhwm_mb()
    if hwm is not None:
        return hwm
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):
        return None


def rss_peak_scope(reset: bool) -> str:
    """What ``peak_rss_mb`` covers: "backend" when the high-water mark was reset as the backend started and is read
    from VmHWM, else "process" (the whole process so far: earlier backends and set-up included)."""
    return "backend" if reset and _vmhwm_mb() is not None else "process"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# One backend
# ----------------------------------------------------------------------------------------------------
def build_model(cfg, kernel_backend: str, device: torch.device, seed: int):
    from mllm.models.transformer import Transformer

    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(cfg.model, kernel_backend=kernel_backend)
    return Transformer(model_cfg).to(device)


def make_optimizer(model: torch.nn.Module, cfg, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the trainer configures it: weight decay on matrices only; the fused CUDA implementation
    (one kernel for all parameters) on the GPU, foreach on the CPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, **kw)


def flops_per_token(model, cfg, seq_len: int) -> float:
    """6N + 12·L·H·Q·T from the model (the shared interface) — computed here only if the model lacks it."""
    if hasattr(model, "flops_per_token"):
        return float(model.flops_per_token(seq_len))
    m = cfg.model
    n = sum(p.numel() for p in model.parameters())
    return float(6 * n + 12 * m.n_layers * m.n_heads * m.head_dim * seq_len)


def kernel_paths() -> Dict[str, str]:
    """The path each kernel op took since ``forget_kernel_paths()``."""
    try:
        from mllm_kernels._common import last_path
    except ImportError:
        return {}
    return {op: last_path(op) for op in KERNEL_OPS if last_path(op) is not None}


def forget_kernel_paths() -> None:
    try:
        from mllm_kernels._common import reset_paths
    except ImportError:
        return
    reset_paths()


def _median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def _median_step_rate(tokens_per_step: int, step_ms: Sequence[float]) -> Optional[float]:
    """Tokens per optimizer step over the median timed step: unlike ``tokens_per_s`` (the wall time of every timed
    step), not moved by a step or two that have not settled yet. The H100 packed run of session 6 (2 warm-up + 4 timed
    steps, forward 86.9, 76.5, 63.8, 64.2 ms) gave 209,851 tokens/s over its wall time but ~222,500 over its last two
    steps; compare layouts by both numbers, from runs with the same number of steps."""
    med = _median(step_ms)
    return tokens_per_step / (med / 1e3) if med else None


class _CycleBatches:
    """The Trainer's batch-source contract over the synthetic host batches, in order, round and round."""

    def __init__(self, batches, micro_batch_size: int):
        self.batches = [{k: v for k, v in b.items() if v is not None} for b in batches]
        self.micro_batch_size = micro_batch_size
        self.i = 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def bench_trainer_backend(name: str, cfg, args, device: torch.device, host_batches,
                          peak_flops: Optional[float]) -> Dict[str, Any]:
    """``--loop trainer``: warm up, then time ``args.steps`` calls of ``Trainer.train_step`` for one backend."""
    from mllm.config.pipeline_config import StageConfig
    from mllm.stages.common import next_token_loss
    from mllm.training.trainer import Trainer

    kernel_backend, compiled = BACKENDS[name]
    model = build_model(cfg, kernel_backend, device, args.seed)
    forget_kernel_paths()
    accum = args.grad_accum
    total = args.warmup + args.steps
    stage_cfg = StageConfig(steps=total, batch_size=args.micro_batch * accum, micro_batch_size=args.micro_batch,
                            seq_len=args.seq_len, lr=args.lr, warmup_steps=0, eval_every=total + 1, eval_batches=1,
                            save_every=total + 1, keep_last=1, log_every=total + 1)
    tr = Trainer(model, next_token_loss, _CycleBatches(host_batches, args.micro_batch), stage_cfg, cfg.optim,
                 stage="bench", device=device, compile=compiled, compile_mode=args.compile_mode if compiled else None,
                 progress=False)
    del model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type != "cuda" and reset_rss_peak()
    losses, step_ms, first_step_s = [], [], None
    from tqdm import tqdm

    for i in tqdm(range(args.warmup), desc=f"{name} warm-up (trainer)", leave=False, disable=args.warmup == 0):
        t0 = time.perf_counter()
        losses.append(tr.train_step()["loss"])
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - t0
    paths = kernel_paths() if kernel_backend == "triton" else {}
    _sync(device)
    t0 = time.perf_counter()
    with trace_range(TIMED_RANGE):
        for _ in tqdm(range(args.steps), desc=f"{name} timed (trainer)", leave=False):
            ts = time.perf_counter()
            losses.append(tr.train_step()["loss"])  # ends in host reads of the step's metrics: steps do not overlap
            step_ms.append((time.perf_counter() - ts) * 1e3)
        _sync(device)
    wall = time.perf_counter() - t0
    if first_step_s is None:
        first_step_s = step_ms[0] / 1e3
    tokens = args.steps * accum * args.micro_batch * args.seq_len
    tps = tokens / wall
    res = _result(name, tr.model, cfg, args, device, peak_flops, tps, losses, paths, rss_reset)
    res.update(loop="trainer", cudagraphs=tr.cudagraphs, step_ms_median=_median(step_ms), wall_s=wall,
               tokens_per_s_median_step=_median_step_rate(accum * args.micro_batch * args.seq_len, step_ms),
               phase_ms_median=dict.fromkeys(PHASES), phase_ms_all={"step": step_ms}, first_step_s=first_step_s,
               profiled=False, torch_trace=None)
    tr.close()
    return res


def _result(name: str, model, cfg, args, device: torch.device, peak_flops: Optional[float], tps: float,
            losses: Sequence[float], paths: Dict[str, str], rss_reset: bool = False) -> Dict[str, Any]:
    """The fields both loops report: rate, MFU, memory, losses, kernel paths (and an error on a non-finite loss)."""
    kernel_backend, compiled = BACKENDS[name]
    fpt = flops_per_token(model, cfg, args.seq_len)
    res: Dict[str, Any] = {
        "backend": name,
        "kernel_backend": kernel_backend,
        "compiled": compiled,
        "tokens_per_s": tps,
        "mfu": mfu(fpt, tps, peak_flops),
        "model_tflops_per_s": fpt * tps / 1e12,
        "flops_per_token": fpt,
        "n_params": sum(p.numel() for p in model.parameters()),
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        # CPU: the process's resident-set high-water mark since this backend started (Linux VmHWM, reset per backend)
        # or, where the reset is unavailable, over the whole process so far: peak_rss_scope says which
        "peak_rss_mb": rss_peak_mb() if device.type != "cuda" else None,
        "peak_rss_scope": rss_peak_scope(rss_reset) if device.type != "cuda" else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "kernel_paths": paths,
        # the attention backward's dq variant (MLLM_ATTN_DQ): "separate" kernel or "atomic" (benchmarks/NOTES.md 17)
        "attention_bwd_dq": _attention_bwd_dq() if kernel_backend == "triton" else None,
        # the attention tile table: "shipped" GPU_CONFIGS or the MLLM_ATTN_TILES file loaded over them
        "attention_tiles": _attention_module().TILES_SOURCE if kernel_backend == "triton" else None,
        "compiled_autograd": bool(args.compiled_autograd and compiled and args.loop == "bench"),
    }
    if not all(math.isfinite(v) for v in losses):
        res["error"] = f"non-finite loss during the run: {list(losses)}"
    return res


def compiled_autograd_context(compile_mode: Optional[str]):
    """A context factory under which ``loss.backward()`` runs through compiled autograd: the autograd engine's
    whole backward (the AOT backward graphs and the AccumulateGrad nodes) is traced at run time and compiled by
    inductor with ``compile_mode``. What it changes for the gpu-full step: each weight gradient leaves the backward
    graph as bf16, is cast to fp32 by one kernel and added into .grad by another (eager AccumulateGrad, outside any
    CUDA graph); under compiled autograd cast and add are one fused kernel in the graph (read 2 + 4, write 4 bytes
    per parameter instead of 2 + 4 and 4 + 4 + 4). The entry point is private in torch (``_enable`` since 2.5,
    ``enable`` before)."""
    import torch._dynamo.compiled_autograd as ca

    enable = getattr(ca, "_enable", None) or getattr(ca, "enable")
    compiler = torch.compile(backend="inductor", **({"mode": compile_mode} if compile_mode else {}))
    return lambda: enable(compiler)


def bench_backend(name: str, cfg, args, device: torch.device, host_batches, peak_flops: Optional[float]) -> Dict[str, Any]:
    """Warm up, time ``args.steps`` steps, and summarise one backend."""
    if args.loop == "trainer":
        return bench_trainer_backend(name, cfg, args, device, host_batches, peak_flops)
    kernel_backend, compiled = BACKENDS[name]
    model = build_model(cfg, kernel_backend, device, args.seed)
    model.train()
    forget_kernel_paths()  # a backend run before in this process must not lend this one its records
    opt = make_optimizer(model, cfg, args.lr, device)
    params = [p for p in model.parameters() if p.requires_grad]
    amp_dtype = DTYPES[args.dtype]
    use_amp = amp_dtype != torch.float32

    def forward_loss(input_ids, labels, position_ids, cu_seqlens):
        # the model's own loss path: logits + cross-entropy, or the fused head + loss (triton, model.fused_lm_loss)
        return model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, labels=labels)

    # compiling forward+loss lets inductor fuse the cross-entropy over the [B, T, V] logits too
    fwd = torch.compile(forward_loss, **({"mode": args.compile_mode} if args.compile_mode else {})) \
        if compiled else forward_loss
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    backward_ctx = compiled_autograd_context(args.compile_mode) if compiled and args.compiled_autograd \
        else contextlib.nullcontext
    timer = PhaseTimer(device)

    accum = args.grad_accum
    # CUDA graphs (mode="reduce-overhead") keep graph outputs in a private pool that the next replay overwrites.
    # The first micro-batch's backward would hand its weight gradients to AccumulateGrad, which keeps them as
    # .grad (no copy); the next replay then overwrites them ("accessing tensor output of CUDAGraphs that has been
    # overwritten", H200 2026-11-26). With .grad allocated up front, AccumulateGrad adds in place instead.
    cudagraphs = compiled and args.compile_mode in CUDAGRAPH_MODES  # the trainer's rule
    if cudagraphs:
        for p in params:
            p.grad = torch.zeros_like(p)
            if args.compiled_autograd:
                # the compiled-autograd graph adds into .grad in place: a mutated graph input makes cudagraph trees
                # skip the graph unless the input is static (inductor's check_for_mutation)
                torch._dynamo.mark_static_address(p.grad)

    def step(i: int, timed: bool) -> torch.Tensor:
        """One optimizer step over ``accum`` micro-batches (mean loss, as the trainer's accumulation)."""
        mark = timer.mark if timed else (lambda phase: None)
        total = None
        with trace_range("step"):
            if timed:
                timer.start_step()
            with autocast():  # model.weight_cache: recast the copies the last step made stale (outside the graph)
                model.sync_weight_cache()
            for j in range(accum):
                hb = host_batches[(i * accum + j) % len(host_batches)]
                with trace_range("data"):
                    # cu_seqlens validated on the host (no sync per micro-batch); under CUDA graphs padded to B·T + 1
                    # values as the trainer does (one graph for any number of documents)
                    b = batch_to_device(hb, device, fixed_cu_seqlens=cudagraphs)
                mark("data")
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with trace_range("forward"), autocast():
                    loss = fwd(b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"]) / accum
                mark("forward")
                with trace_range("backward"), backward_ctx():
                    loss.backward()
                mark("backward")
                total = loss.detach() if total is None else total + loss.detach()
            with trace_range("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=not cudagraphs)
            mark("optimizer")
        return total

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type != "cuda" and reset_rss_peak()
    losses = []
    first_step_s = None
    from tqdm import tqdm

    for i in tqdm(range(args.warmup), desc=f"{name} warm-up", leave=False, disable=args.warmup == 0):
        t0 = time.perf_counter()
        losses.append(step(i, timed=False))
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - t0
    paths = kernel_paths() if kernel_backend == "triton" else {}

    prof = None
    if args.torch_profile:
        prof = StepProfiler(args.torch_profile, prefix=f"bench_train_{name.replace('+', '_')}", rank=0,
                            wait=0, warmup=1, active=min(3, args.steps - 1)).start()
    _sync(device)
    t0 = time.perf_counter()
    with trace_range(TIMED_RANGE):
        for i in tqdm(range(args.steps), desc=f"{name} timed", leave=False):
            losses.append(step(args.warmup + i, timed=True))
            if prof is not None:
                prof.step()
        _sync(device)
    wall = time.perf_counter() - t0
    trace_path = prof.stop() if prof is not None else None
    if first_step_s is None:  # no warm-up: the first timed step is the first step
        first_step_s = timer.phase_ms()["step"][0] / 1e3

    phases = timer.phase_ms()
    tokens = args.steps * accum * args.micro_batch * args.seq_len
    tps = tokens / wall
    loss_vals = [float(x) for x in torch.stack(losses).float().cpu()]
    res = _result(name, model, cfg, args, device, peak_flops, tps, loss_vals, paths, rss_reset)
    res.update(step_ms_median=_median(phases["step"]), wall_s=wall,
               tokens_per_s_median_step=_median_step_rate(accum * args.micro_batch * args.seq_len, phases["step"]),
               phase_ms_median={p: _median(phases[p]) for p in PHASES}, phase_ms_all=phases,
               first_step_s=first_step_s, profiled=prof is not None,
               torch_trace=str(trace_path) if trace_path else None)
    del model, opt, params, fwd
    return res


def _attention_module():
    return __import__("importlib").import_module("mllm_kernels.attention")  # the package exports a same-named function


def _attention_bwd_dq() -> str:
    return _attention_module().BWD_DQ


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()  # drop compiled graphs (and their guards on the freed model)
    except Exception:  # noqa: BLE001 - nothing to reset when dynamo never ran
        pass


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _peak_text(r: Dict[str, Any]) -> str:
    """The device's peak allocated MiB on CUDA; on the CPU the process's peak resident set, marked (RSS)."""
    if r.get("peak_mem_mb") is not None:
        return _f(r["peak_mem_mb"], ",.0f")
    if r.get("peak_rss_mb") is None:
        return "n/a"
    return f"{r['peak_rss_mb']:,.0f} (RSS{', process peak' if r.get('peak_rss_scope') == 'process' else ''})"


def markdown(report: Dict[str, Any]) -> str:
    a, env = report["args"], report["environment"]
    lines = [
        f"# Training-step throughput: {env.get('card')} ({env.get('date_utc')})",
        "",
        f"config `{a['config']}` {' '.join('--set ' + o for o in a['overrides'])}; micro-batch {a['micro_batch']} × "
        f"T {a['seq_len']} × {a['grad_accum']} accumulation = {a['micro_batch'] * a['seq_len'] * a['grad_accum']:,} "
        f"tokens per optimizer step, {a['docs_per_row']} doc(s)/row, "
        f"{a['dtype'] + ' autocast' if a['dtype'] != 'fp32' else 'fp32 (no autocast)'}, {a['warmup']} warm-up + {a['steps']} timed steps; torch {env.get('torch')}, "
        f"triton {env.get('triton')}, CUDA {env.get('cuda_runtime') or 'n/a'}, driver {env.get('driver') or 'n/a'}, "
        f"git {str(env.get('git_commit'))[:12]}{' (dirty)' if env.get('git_dirty') else ''}.",
        "",
        f"MFU = (6N + 12·L·H·Q·T) · tokens/s / peak; peak: {report['peak_source']}.",
        "",
        "| backend | tokens/s | × eager | MFU | model TFLOP/s | step ms | data | forward | backward | optimizer "
        "| peak MiB | first step s | loss first→last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if any(r.get("loop") == "trainer" for r in report["results"]):
        lines[-2:-2] = ["Timed loop: `Trainer.train_step` (`--loop trainer`): the real training loop; no per-range "
                        "breakdown.", ""]
    if any(r.get("compiled_autograd") for r in report["results"]):
        lines[-2:-2] = ["Backward under compiled autograd (`--compiled-autograd`) for the +compile backends.", ""]
    tiles = sorted({r["attention_tiles"] for r in report["results"] if r.get("attention_tiles") not in (None, "shipped")})
    if tiles:  # a tuned tile table instead of the shipped GPU_CONFIGS (benchmarks/NOTES.md, tuning step 15)
        lines[-2:-2] = [f"Attention tiles: {', '.join(tiles)} (MLLM_ATTN_TILES) over the shipped table.", ""]
    dq_modes = sorted({r["attention_bwd_dq"] for r in report["results"] if r.get("attention_bwd_dq")})
    if dq_modes and dq_modes != ["separate"]:  # the non-default backward (benchmarks/NOTES.md, tuning step 17)
        lines[-2:-2] = [f"Attention backward dq: {', '.join(dq_modes)} (MLLM_ATTN_DQ).", ""]
    base = next((r["tokens_per_s"] for r in report["results"] if r.get("backend") == "eager" and "tokens_per_s" in r), None)
    for r in report["results"]:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['backend']} | error: {r['error'].splitlines()[0][:200]} |" + " |" * 11)
            continue
        ph = r["phase_ms_median"]
        spd = f"{r['tokens_per_s'] / base:.2f}" if base else "n/a"
        mfu_s = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['backend']}{' (error)' if 'error' in r else ''} | {r['tokens_per_s']:,.0f} | {spd} | {mfu_s} | "
            f"{r['model_tflops_per_s']:.3g} | {r['step_ms_median']:.2f} | {_f(ph['data'], '.2f')} | "
            f"{_f(ph['forward'], '.2f')} | {_f(ph['backward'], '.2f')} | {_f(ph['optimizer'], '.2f')} | "
            f"{_peak_text(r)} | {r['first_step_s']:.2f} | {r['loss_first']:.3f}→{r['loss_last']:.3f} |")
    lines.append("")
    goal = report.get("goal")
    if goal:
        lines.append(goal)
        lines.append("")
    proj = projection_line(report.get("pretrain_projection"), a["config"])
    if proj:
        lines.append(proj)
        lines.append("")
    notes = [f"- {r['backend']}: kernel paths {r['kernel_paths']}" for r in report["results"] if r.get("kernel_paths")]
    if any(r.get("isolated") for r in report["results"]):
        notes.append("- each backend ran in a process of its own (--isolate)")
    if any(r.get("profiled") for r in report["results"]):
        notes.append("- profiled run (torch.profiler on): the timings above are perturbed by the profiler")
    return "\n".join(lines + notes).rstrip() + "\n"


def goal_line(results: List[Dict[str, Any]], device: torch.device, cfg_name: str) -> Optional[str]:
    """Issue 9's H100 target for gpu-full, stated next to the measurement (never asserted)."""
    if device.type != "cuda" or cfg_name != "gpu-full":
        return None
    by = {r["backend"]: r for r in results if "tokens_per_s" in r}
    best = max((by[b] for b in ("triton", "triton+compile") if b in by), key=lambda r: r["tokens_per_s"], default=None)
    if best is None:
        return None
    s = (f"Goal (issue 9, one H100): triton ≥ {GOAL_TOKENS_PER_S:,} tokens/s and ≥ {GOAL_SPEEDUP_VS_EAGER}× eager. "
         f"Measured: {best['backend']} {best['tokens_per_s']:,.0f} tokens/s")
    if "eager" in by:
        s += f", {best['tokens_per_s'] / by['eager']['tokens_per_s']:.2f}× eager"
    return s + "."


def pretrain_projection(results: List[Dict[str, Any]], cfg, seq_len: int, docs_per_row: int = 1) -> Dict[str, Any]:
    """What the measured rates mean for the config's pretraining stage: its tokens (steps × batch × seq_len) over each
    backend's tokens/s, on one device. Only stated when the benchmark's T is the stage's (tokens/s depends on T).
    ``packed_mismatch``: the stage packs documents (``data.packing``) but the run fed one per row, whose step is
    faster than a packed one (H100, session 6: 234,833 vs 209,851 tokens/s), so the hours are a lower bound."""
    pre = cfg.pretrain
    tokens = pre.steps * pre.batch_size * pre.seq_len
    out: Dict[str, Any] = {"steps": pre.steps, "batch_size": pre.batch_size, "seq_len": pre.seq_len, "tokens": tokens,
                           "same_seq_len": seq_len == pre.seq_len, "hours": {},
                           "packed_mismatch": bool(cfg.data.packing) and docs_per_row == 1}
    if out["same_seq_len"]:
        out["hours"] = {r["backend"]: tokens / r["tokens_per_s"] / 3600 for r in results if r.get("tokens_per_s")}
    return out


def _count_text(n: float) -> str:
    """5.24 B / 12.3 M / 122,880: a token count readable at both the gpu-full and the local-smoke scale."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,.0f}"


def _hours_text(h: float) -> str:
    """5.8 h, 1.7 min or 42 s: a smoke config's minutes must not read as 0.0 h."""
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:.1f} min" if h * 60 >= 1 else f"{h * 3600:.0f} s"


def projection_line(proj: Dict[str, Any], config: str) -> Optional[str]:
    if not proj or not proj["hours"]:
        return None
    times = ", ".join(f"{b} {_hours_text(h)}" for b, h in proj["hours"].items())
    return (f"Pretraining of `{config}` ({proj['steps']:,} steps × {proj['batch_size']} × {proj['seq_len']:,} = "
            f"{_count_text(proj['tokens'])} tokens) at these rates on one device: {times} (tokens / tokens/s; the "
            f"trainer adds evaluation and checkpoint time)." + (
                " The stage packs documents (`data.packing`) and this run fed one per row, so these hours are a lower "
                "bound: `--docs-per-row N` measures the packed layout." if proj.get("packed_mismatch") else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        args, cfg, device, backends = resolve_args(args)
    except (ValueError, ConfigError) as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (e.g. --dtype fp32) use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    elif any(BACKENDS[b][0] == "triton" for b in backends):
        from mllm_kernels._common import interpreting

        how = "the Triton interpreter (very slow)" if interpreting() else "the eager fallback (TRITON_INTERPRET unset)"
        print(f"bench_train: note: on CPU the triton backend runs {how}; its numbers say nothing about the GPU")
    if args.peak_tflops is not None:
        peak, peak_src = args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g} TFLOP/s"
    else:
        peak, peak_src = device_peak_flops(device)
    env = environment(device)
    host_batches = make_batches(4, args.micro_batch, args.seq_len, cfg.model.vocab_size, args.docs_per_row,
                                args.seed, pin=device.type == "cuda")
    print(f"bench_train: {args.config} on {env['card']}: B={args.micro_batch} T={args.seq_len} {args.dtype}, "
          f"backends {', '.join(backends)}, {args.warmup}+{args.steps} steps")
    results = []
    if args.isolate and len(backends) > 1:
        results = run_isolated(list(argv) if argv is not None else sys.argv[1:], backends)
        for res in results:
            msg = res.get("error") or f"{res['tokens_per_s']:,.0f} tokens/s"
            print(f"bench_train: {res['backend']} (own process): {msg}")
        backends = []
    for name in backends:
        try:
            res = bench_backend(name, cfg, args, device, host_batches, peak)
        except Exception as e:  # noqa: BLE001 - one backend failing (OOM, compile error) must not hide the others
            res = {"backend": name, "error": describe_exception(e), "traceback": traceback.format_exc()}
        results.append(res)
        msg = res.get("error") or (f"{res['tokens_per_s']:,.0f} tokens/s (median step: "
                                   f"{res.get('tokens_per_s_median_step') or 0:,.0f}), MFU "
                                   f"{'n/a' if res['mfu'] is None else format(100 * res['mfu'], '.1f') + '%'}")
        print(f"bench_train: {name}: {msg}")
        _free(device)

    if args.result_json:  # --isolate's child: the parent writes the report
        Path(args.result_json).write_text(json.dumps(jsonable(results[0])) + "\n")
        return 1 if "error" in results[0] else 0
    report = {
        "environment": env,
        "args": {k: v for k, v in vars(args).items()},
        "model": vars(cfg.model),
        "peak_flops": peak,
        "peak_source": peak_src,
        "mfu_formula": "(6*N + 12*L*H*Q*T) * tokens_per_s / peak_flops",
        "results": results,
    }
    report["goal"] = goal_line(results, device, args.config)
    report["pretrain_projection"] = pretrain_projection(results, cfg, args.seq_len, args.docs_per_row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the runner's naming (date of the run's start, card), with -2, -3, ... when taken: no run overwrites another
    stem = result_stem(out, env, prefix="bench_train")
    md = markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"bench_train: wrote {out / (stem + '.json')} and {stem}.md")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
