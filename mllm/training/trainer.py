"""One training loop for every stage: a stage is its data + its loss + its config, not a copy of the loop.

    trainer = Trainer(model, loss_fn, train_source, cfg.pretrain, cfg.optim, stage="pretrain",
                      run_dir=run_dir, val_data=val_batches, dist=ctx, compile=cfg.compile, seed=cfg.seed)
    trainer.resume()          # optional: continue from checkpoints/<stage>/latest
    summary = trainer.fit()   # train to stage_cfg.steps, evaluating, logging and checkpointing on the way
    trainer.close()           # free model + optimizer (before destroy_process_group)

``loss_fn(model, batch) -> (loss, metrics, n)``: ``loss`` is a scalar tensor, the MEAN over the ``n`` terms of the
micro-batch (target tokens for a language-model loss, pairs for DPO); ``metrics`` a dict of scalar tensors/floats
(averaged with weight ``n`` over the step and all ranks; the same keys on every rank); ``n`` a number or 0-d tensor.
The loss must be finite when ``n == 0`` (e.g. a sum divided by ``max(n, 1)``). ``model`` is the bare module, so
the loss may call any of its methods (``forward``, ``hidden_states``, ``lm_head_weight``); under DDP the whole
``loss_fn`` runs inside the DDP wrapper's forward, so gradient synchronisation still sees it.

One optimizer step (``accum = batch_size / (micro_batch_size · world_size)`` micro-batches per rank)::

    for each micro-batch i:  (loss_i · n_i).backward()            # DDP all-reduce (mean over ranks) on the last only
    g ← g · world / Σ_ranks Σ_i n_i                               # = ∇ (Σ loss_i·n_i / Σ n_i): token-weighted mean
    grad_norm ← ‖g‖₂; clip to optim.grad_clip
    if loss or grad_norm is NaN/inf: skip the update, count it  # NonFiniteError after max_consecutive_nonfinite
    else AdamW step with lr(step)

so the update equals a single-process step over the same examples, for any world size and accumulation.

Learning rate (linear warm-up, cosine decay to ``lr · min_lr_ratio`` at ``steps``)::

    lr(s) = lr · (s + 1) / warmup                                            s < warmup
    lr(s) = lr · (r + (1 - r) · ½ (1 + cos(π · (s - warmup) / (steps - warmup))))   otherwise, r = min_lr_ratio

Weight decay applies to matrices only: not to 1-D tensors (norm weights, biases) nor to parameters whose name
contains "norm", "bias" or "sink". bf16 autocast on CUDA, fp32 on CPU. AdamW is fused on CUDA.

CUDA graphs (``compile_mode="reduce-overhead"`` or ``"max-autotune"``, i.e. ``CUDAGRAPH_MODES``): torch.compile then
replays each micro-batch's forward and backward as recorded graphs, which removes the host's launch cost (+14% on
one H100 for the triton backend, benchmarks/NOTES.md tuning step 6). Three things keep that correct and cheap:
gradients are allocated once and zeroed in place (a graph's outputs live in memory the next replay overwrites, so
AccumulateGrad must add into ``.grad`` rather than keep an output as it), ``cudagraph_mark_step_begin`` opens every
forward, and ``cu_seqlens`` is padded to B·T + 1 values (``batches.pad_cu_seqlens``) so that packed batches with
different numbers of documents replay one graph. Costs: the fp32 gradients stay allocated through every forward
(``set_to_none`` would free them between steps: one more copy of the parameters at peak), and, since gradients are
never ``None``, AdamW also steps parameters that got no gradient in a step (momentum and weight decay move them).
A graph is recorded per input shape: stages that pad each batch to its own longest row (DPO, the verifier) record
one per length, which the trainer reports once it has seen ``MAX_GRAPH_SHAPES`` shapes; pretraining and SFT rows
(packed or one padded example per row) all have the stage's length.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mllm.config.pipeline_config import ConfigError, OptimConfig, StageConfig, config_changes, validate_optim
from mllm.training import checkpoint as ckpt
from mllm.training.batches import DataPositionMismatch, batch_to_device
from mllm.training.distributed import DistContext
from mllm.training.metrics import (LOSS_LABELS, MetricsWriter, device_peak_flops, mfu, peak_memory_gib, plot_loss_curve,
                                   read_metrics)
from mllm.training.profiling import NVTX_BACKEND, maybe_profiler, trace_range

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that record CUDA graphs
MAX_GRAPH_SHAPES = 8  # distinct micro-batch shapes under CUDA graphs before the trainer warns (one graph each)
Batch = Dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], Tuple[torch.Tensor, Dict[str, Any], Union[torch.Tensor, int, float]]]


# ----------------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based); see the module docstring."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _no_decay(name: str, p: torch.Tensor) -> bool:
    low = name.lower()
    return p.ndim < 2 or "norm" in low or "bias" in low or "sink" in low


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decayed matrices, undecayed norms/biases/sinks (trainable parameters only)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Python, NumPy and CPU torch RNG states, plus the CUDA generator of ``device`` (default: the current CUDA
    device). One device only: a checkpoint from a node with 8 visible GPUs must resume on a process that sees 1."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device if device is not None else "cuda")
    return state


def set_rng_state(state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return
    dev = torch.device(device if device is not None else "cuda")
    if isinstance(cuda, (list, tuple)):  # format of earlier checkpoints: one state per device the writer saw
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if idx >= len(cuda):
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(cuda)} devices, none for cuda:{idx}; this "
                          "device's CUDA RNG stream is not restored")
            return
        cuda = cuda[idx]
    torch.cuda.set_rng_state(cuda, dev)


def count_input_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens processed: elements of every tensor whose key ends in ``input_ids`` (padding included)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))


def batch_seq_len(batch: Mapping[str, Any]) -> int:
    """Length T of the rows the model runs on: the last dimension of the ``input_ids`` tensors (the padded batch
    length, or the packed row length); 0 when the batch has none."""
    return max((int(v.shape[-1]) for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor)
                and v.dim() > 0), default=0)


def accumulation_steps(stage_cfg: StageConfig, world_size: int, stage: str = "stage") -> int:
    """batch_size / (micro_batch_size · world_size), or a ConfigError naming the keys."""
    per_step = stage_cfg.micro_batch_size * world_size
    if stage_cfg.batch_size % per_step != 0:
        raise ConfigError(
            f"config key '{stage}.batch_size': batch_size={stage_cfg.batch_size} is not a multiple of "
            f"{stage}.micro_batch_size={stage_cfg.micro_batch_size} x world_size={world_size}; the effective batch "
            "must be the same on every rank (change batch_size, micro_batch_size or the number of processes)")
    return stage_cfg.batch_size // per_step


def check_stage_config(stage_cfg: StageConfig, optim_cfg: OptimConfig, stage: str) -> None:
    for k in ("steps", "batch_size", "micro_batch_size", "eval_batches", "keep_last", "log_every",
              "eval_every", "save_every"):
        v = getattr(stage_cfg, k)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"config key '{stage}.{k}': must be a positive integer, got {v!r}")
    if not stage_cfg.lr > 0:
        raise ConfigError(f"config key '{stage}.lr': must be positive, got {stage_cfg.lr!r}")
    if stage_cfg.warmup_steps < 0:
        raise ConfigError(f"config key '{stage}.warmup_steps': must be >= 0, got {stage_cfg.warmup_steps}")
    validate_optim(optim_cfg)


class _LossModule(nn.Module):
    """model + loss_fn as one module, so DDP's forward (and torch.compile) covers whatever the loss calls."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch):
        return self.loss_fn(self.model, batch)


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------
class Trainer:
    """Owns model placement, DDP, optimizer, schedule, accumulation, clipping, AMP, RNG, data position,
    validation, logging, profiling and checkpoints of one stage.

    Args:
        model: the bare ``nn.Module`` (moved to the rank's device here).
        loss_fn: ``loss_fn(model, batch) -> (mean loss, metrics dict, n)``; see the module docstring.
        train_data: batch source with ``next_batch()``, ``state_dict()``, ``load_state_dict()`` that yields this
            rank's micro-batches of ``stage_cfg.micro_batch_size`` (e.g. ``batches.RowBatchSource``).
        stage_cfg: steps, batch sizes, lr, warm-up, eval/save/log cadence, keep_last.
        optim_cfg: AdamW betas/eps/weight decay, grad clip, min_lr_ratio, max_consecutive_nonfinite.
        stage: name used for the checkpoint folder, metrics records and figures.
        run_dir: ``experiments/runs/<name>``; None writes nothing (tests).
        val_data: re-iterable of this rank's validation micro-batches (e.g. ``batches.EvalBatches`` with
            ``max_examples = eval_batches · micro_batch_size``, the same examples for any world size); at most
            ``stage_cfg.eval_batches`` per rank are read per evaluation.
        dist: the ``DistContext`` (None: one process on ``device``).
        device: used only when ``dist`` is None (default CPU).
        compile: ``torch.compile`` the loss module (the model's forward and the loss together).
        compile_mode: torch.compile's ``mode`` (None: its default); the CUDA-graph modes are described above.
        seed: seeds python/numpy/torch RNGs with ``seed + rank`` (None leaves them alone).
        flops_per_token: for MFU: a number, or a function of the row length T (called once per distinct T, its
            value cached: it must depend on T only); default ``model.flops_per_token``,
            evaluated per micro-batch at the length of its rows (``batch_seq_len``: the padded batch length or the
            packed row length, not ``stage_cfg.seq_len`` when batches are padded to their longest row).
        mfu_unavailable: a reason why the 6N + attention FLOP model does not describe this stage's step; MFU is then
            not reported (``null``) and the start record says why.
        eval_fn: ``eval_fn(trainer) -> dict`` run after the validation loss (samples, task metrics); all ranks call it.
        profile: write a ``torch.profiler`` trace of a few steps to ``run_dir/profile/``.
        progress: show the tqdm bar (rank 0 only in any case).
        config: a dict stored in every checkpoint (the run's config).
        find_unused_parameters: passed to DDP.
        count_tokens: batch -> tokens processed (default: elements of keys ending in ``input_ids``).
        command: the command line that runs this stage, written into each ``start`` record of metrics.jsonl (the
            report names it as the source of the stage's numbers, ``--set`` overrides included).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, train_data, stage_cfg: StageConfig,
                 optim_cfg: OptimConfig, *, stage: str = "pretrain", run_dir: Optional[str | Path] = None,
                 val_data: Optional[Iterable[Batch]] = None, dist: Optional[DistContext] = None,
                 device: Optional[torch.device | str] = None, compile: bool = False,
                 compile_mode: Optional[str] = None, seed: Optional[int] = None,
                 flops_per_token: Optional[Union[float, Callable[[int], float]]] = None,
                 eval_fn: Optional[Callable[["Trainer"], Dict]] = None,
                 profile: bool = False, progress: bool = True, config: Optional[Dict[str, Any]] = None,
                 find_unused_parameters: bool = False,
                 count_tokens: Callable[[Mapping[str, Any]], int] = count_input_tokens,
                 perplexity: bool = True, mfu_unavailable: Optional[str] = None, command: Optional[str] = None):
        check_stage_config(stage_cfg, optim_cfg, stage)
        self.dist = dist if dist is not None else DistContext(device=torch.device(device or "cpu"))
        self.device = self.dist.device
        self.stage = stage
        self.perplexity = perplexity  # val_ppl = exp(val_loss) only means something for a token cross-entropy
        self.stage_cfg = stage_cfg
        self.optim_cfg = optim_cfg
        self.accum_steps = accumulation_steps(stage_cfg, self.dist.world_size, stage)
        src_mb = getattr(train_data, "micro_batch_size", stage_cfg.micro_batch_size)
        if src_mb != stage_cfg.micro_batch_size:
            raise ConfigError(f"config key '{stage}.micro_batch_size' is {stage_cfg.micro_batch_size} but the batch "
                              f"source yields micro-batches of {src_mb}")
        self.train_data = train_data
        self.val_data = val_data
        self.eval_fn = eval_fn
        self.count_tokens = count_tokens
        self.config = config
        self.profile = profile
        self.progress = progress

        if compile_mode is not None and not compile:
            raise ConfigError(f"config key 'compile_mode' is {compile_mode!r} but compile is off; set compile=true")
        # the bookkeeping follows the mode on any device (on a CPU inductor records no graph, but the same code runs)
        self.cudagraphs = bool(compile) and compile_mode in CUDAGRAPH_MODES
        self.compile_mode = compile_mode
        self.model = model.to(self.device)
        self._loss_module = _LossModule(self.model, loss_fn)
        # compile first, then DDP (the nanoGPT order): DDP's hooks and no_sync() stay plain eager code
        self._eval_module = torch.compile(self._loss_module, **({"mode": compile_mode} if compile_mode else {})) \
            if compile else self._loss_module
        self._ddp: Optional[nn.parallel.DistributedDataParallel] = None
        self._train_module: nn.Module = self._eval_module
        if self.dist.is_distributed:
            self._ddp = nn.parallel.DistributedDataParallel(
                self._eval_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # buffers (RoPE tables) are deterministic: nothing to sync
                find_unused_parameters=find_unused_parameters)
            self._train_module = self._ddp
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        if self.cudagraphs:  # see the module docstring: AccumulateGrad adds into these instead of keeping an output
            for p in self._params:
                p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, optim_cfg.weight_decay), lr=stage_cfg.lr,
            betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
            fused=True if self.device.type == "cuda" else None)
        if seed is not None:
            seed_everything(seed + self.dist.rank)
        self.seed = seed

        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ckpt_dir = ckpt.stage_checkpoint_dir(self.run_dir, stage) if self.run_dir is not None else None
        self._created = time.time()  # records of this stage older than this come from an earlier attempt
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if self.run_dir is not None else None,
                                     enabled=self.dist.is_main)
        if flops_per_token is None and hasattr(model, "flops_per_token") and mfu_unavailable is None:
            flops_per_token = model.flops_per_token
        # FLOPs per token as a function of the row length T (None: MFU not reported); flops_per_token: at the
        # stage's seq_len, for the start record. Cached per T: the model's flops_per_token walks every parameter
        # (num_params), 0.1-0.5 ms of host time on every micro-batch of the training loop otherwise
        self._flops_fn: Optional[Callable[[int], float]] = None
        if mfu_unavailable is None and flops_per_token is not None:
            fn = flops_per_token if callable(flops_per_token) else (lambda T, f=float(flops_per_token): f)
            self._flops_fn = functools.lru_cache(maxsize=None)(lambda T, fn=fn: float(fn(T)))
        seq_len = getattr(stage_cfg, "seq_len", 0)
        self.flops_per_token = self._flops_fn(seq_len) if self._flops_fn is not None and seq_len > 0 else None
        self.mfu_unavailable = mfu_unavailable
        self.command = command
        doc = (getattr(count_tokens, "__doc__", None) or "").strip()
        self.count_tokens_doc = doc.splitlines()[0] if doc else getattr(count_tokens, "__name__",
                                                                         type(count_tokens).__name__)
        self.peak_flops, self.peak_flops_note = device_peak_flops(self.device)

        self.step = 0  # optimizer steps done (skipped non-finite steps included)
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.tokens_seen = 0  # all ranks
        self.train_time_s = 0.0  # time inside train_step, summed over resumed runs
        self.last_train: Dict[str, float] = {}
        self.last_eval: Dict[str, Any] = {}
        self.first_eval: Dict[str, Any] = {}
        self._graph_shapes: set = set()  # micro-batch shapes seen under CUDA graphs (one recorded graph each)
        self._closed = False

    # ------------------------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast on CUDA, nothing (fp32) on CPU: use it in stage code that runs the model too."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_weight_cache(self) -> None:
        """Recast stale ``model.weight_cache`` copies before a (possibly compiled) forward: a compiled graph cannot
        check them itself (mllm/models/weight_cache.py); a no-op for models without the option."""
        sync = getattr(self.model, "sync_weight_cache", None)
        if sync is not None:
            with self.autocast():
                sync()

    def lr_at(self, step: int) -> float:
        return lr_at(step, lr=self.stage_cfg.lr, warmup_steps=self.stage_cfg.warmup_steps,
                     total_steps=self.stage_cfg.steps, min_lr_ratio=self.optim_cfg.min_lr_ratio)

    def info(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[{self.stage}] {msg}", file=sys.stderr)

    def log(self, record: Dict[str, Any]) -> None:
        """Append a record (with stage and step) to metrics.jsonl from rank 0."""
        self.metrics.write({"stage": self.stage, "step": self.step, "time": time.time(), **record})

    # ------------------------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches per rank; returns the step's global metrics."""
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        self._sync_weight_cache()
        dev = self.device
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        n_sum = torch.zeros((), dtype=torch.float32, device=dev)
        metric_sums: Dict[str, torch.Tensor] = {}
        tokens = 0
        flops = 0.0  # model FLOPs of this rank's micro-batches: tokens · flops_per_token(their row length)
        with trace_range("step"):
            for i in range(self.accum_steps):
                with trace_range("data"):
                    batch = self.train_data.next_batch()
                    n_tok = self.count_tokens(batch)
                    tokens += n_tok
                    if self._flops_fn is not None:
                        T = batch_seq_len(batch)
                        flops += n_tok * (self._flops_fn(T) if T > 0 else (self.flops_per_token or 0.0))
                    batch = batch_to_device(batch, dev, fixed_cu_seqlens=self.cudagraphs)
                    self._note_graph_shape(batch)
                last = i == self.accum_steps - 1
                sync = self._ddp.no_sync() if (self._ddp is not None and not last) else contextlib.nullcontext()
                with sync:  # forward AND backward inside: DDP decides at forward time whether to all-reduce
                    if self.cudagraphs:  # the previous micro-batch's graph outputs are consumed: replay may reuse them
                        torch.compiler.cudagraph_mark_step_begin()
                    with trace_range("forward"), self.autocast():
                        loss, metrics, n = self._train_module(batch)
                    n = torch.as_tensor(n, dtype=torch.float32, device=dev)
                    with trace_range("backward"):
                        (loss.float() * n).backward()
                loss_sum += loss.detach().float() * n
                n_sum += n
                for k, v in metrics.items():
                    v = torch.as_tensor(v, device=dev).detach().float()
                    metric_sums[k] = metric_sums.get(k, 0.0) + v * n
            with trace_range("optimizer"):
                keys = sorted(metric_sums)
                stats = torch.stack([loss_sum, n_sum, torch.tensor(float(tokens), device=dev),
                                     torch.tensor(flops, dtype=torch.float32, device=dev)]
                                    + [metric_sums[k] for k in keys])
                self.dist.all_reduce_sum_(stats)
                vals = stats.tolist()
                g_loss_sum, g_n, g_tokens, g_flops = vals[0], vals[1], int(vals[2]), vals[3]
                grads = [p.grad for p in self._params if p.grad is not None]
                if g_n > 0 and grads:
                    # DDP averaged over ranks; turn Σ_i loss_i·n_i into the token-weighted mean over the step
                    torch._foreach_mul_(grads, self.dist.world_size / g_n)
                clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, clip)) if grads else 0.0
                loss = g_loss_sum / g_n if g_n > 0 else float("nan")
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                    self.consecutive_nonfinite = 0
                else:
                    self.skipped_steps += 1
                    self.consecutive_nonfinite += 1
                self.optimizer.zero_grad(set_to_none=not self.cudagraphs)
        self.step += 1
        self.tokens_seen += g_tokens
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": g_tokens, "n": g_n, "finite": finite,
               "flops": g_flops}
        out.update({k: vals[4 + j] / g_n if g_n > 0 else float("nan") for j, k in enumerate(keys)})
        self.last_train = out
        if not finite:
            self.log({"kind": "nonfinite", "loss": loss, "grad_norm": grad_norm,
                      "consecutive": self.consecutive_nonfinite, "skipped_steps": self.skipped_steps})
            self.info(f"step {self.step}: non-finite loss/gradients (loss={loss}, grad_norm={grad_norm}); "
                      f"update skipped ({self.consecutive_nonfinite} in a row, {self.skipped_steps} in total)")
            if self.consecutive_nonfinite >= self.optim_cfg.max_consecutive_nonfinite:
                last = ckpt.latest_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
                raise ckpt.NonFiniteError(
                    f"stage '{self.stage}': {self.consecutive_nonfinite} consecutive optimizer steps with non-finite "
                    f"loss or gradients (limit optim.max_consecutive_nonfinite="
                    f"{self.optim_cfg.max_consecutive_nonfinite}) at step {self.step}; last good checkpoint: "
                    f"{last or 'none'}. Lower the learning rate or check the data.")
        return out

    def _note_graph_shape(self, batch: Mapping[str, Any]) -> None:
        """Under CUDA graphs, count the distinct micro-batch shapes and warn once there are more than
        ``MAX_GRAPH_SHAPES``: each is a graph of its own, with its own memory, recorded on first sight."""
        if not self.cudagraphs:
            return
        shape = tuple((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, torch.Tensor))
        if shape in self._graph_shapes:
            return
        self._graph_shapes.add(shape)
        if len(self._graph_shapes) == MAX_GRAPH_SHAPES + 1:
            msg = (f"CUDA graphs (compile_mode={self.compile_mode!r}): micro-batches of stage '{self.stage}' have come "
                   f"in {len(self._graph_shapes)} different shapes so far (latest: {dict(shape)}); each records a "
                   "graph of its own, with its own memory. Pad batches to one length (the stage's seq_len) or use "
                   "compile_mode=default.")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self.info(msg)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """Token-weighted mean validation loss (and loss_fn metrics, prefixed ``val_``) over at most
        ``eval_batches`` micro-batches per rank, all ranks combined; ``val_ppl = exp(val_loss)`` (unless built with
        ``perplexity=False``: losses that are not a token cross-entropy); plus eval_fn.
        The RNG states are restored afterwards, so how often one evaluates never changes the training run."""
        out: Dict[str, Any] = {}
        saved_rng = rng_state(self.device)  # evaluation must not shift the training RNG streams (eval cadence-independent)
        if self.val_data is not None:
            was_training = self.model.training
            self.model.eval()
            self._sync_weight_cache()
            dev = self.device
            sums: Dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=dev)
            n_sum = torch.zeros((), device=dev)
            for j, batch in enumerate(self.val_data):
                if j >= self.stage_cfg.eval_batches:
                    break
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                batch = batch_to_device(batch, dev, fixed_cu_seqlens=self.cudagraphs)
                self._note_graph_shape(batch)
                with trace_range("eval"), self.autocast():
                    loss, metrics, n = self._eval_module(batch)
                n = torch.as_tensor(n, dtype=torch.float32, device=dev)
                loss_sum += loss.float() * n
                n_sum += n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=dev).float() * n
            keys = sorted(sums)
            stats = torch.stack([loss_sum, n_sum] + [sums[k] for k in keys])
            vals = self.dist.all_reduce_sum_(stats).tolist()
            self.model.train(was_training)
            if vals[1] > 0:
                val_loss = vals[0] / vals[1]
                out["val_loss"] = val_loss
                if self.perplexity:
                    out["val_ppl"] = math.exp(val_loss) if val_loss < 700 else float("inf")
                out["val_tokens"] = int(vals[1])
                out.update({f"val_{k}": vals[2 + j] / vals[1] for j, k in enumerate(keys)})
        if self.eval_fn is not None:
            out.update(self.eval_fn(self) or {})
        set_rng_state(saved_rng, self.device)
        return out

    def _run_eval(self) -> None:
        res = self.evaluate()
        if not res:
            return
        self.last_eval = res
        if not self.first_eval:
            self.first_eval = dict(res)
        self.log({"kind": "val", **res})
        if "val_loss" in res:
            ppl = f"  val_ppl {res['val_ppl']:.2f}" if "val_ppl" in res else ""
            self.info(f"step {self.step}: val_loss {res['val_loss']:.4f}{ppl}")

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit for bit. Collective: every rank must call it."""
        rngs = self.dist.all_gather_object(rng_state(self.device))
        datas = self.dist.all_gather_object(self.train_data.state_dict())
        return {
            "format": 1, "stage": self.stage, "step": self.step, "total_steps": self.stage_cfg.steps,
            "complete": self.step >= self.stage_cfg.steps, "world_size": self.dist.world_size,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rngs, "data": datas,
            "trainer": {"skipped_steps": self.skipped_steps, "consecutive_nonfinite": self.consecutive_nonfinite,
                        "tokens_seen": self.tokens_seen, "train_time_s": self.train_time_s,
                        "first_eval": self.first_eval, "last_eval": self.last_eval, "last_train": self.last_train},
            "config": self.config,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``. Another stage's state or a data-position mismatch raises before anything
        changes; a model or optimizer that does not fit raises ``CheckpointError`` with this trainer partly loaded
        (build a new one)."""
        if state.get("stage", self.stage) != self.stage:
            raise ckpt.CheckpointError(f"checkpoint is from stage '{state.get('stage')}', not '{self.stage}'")
        # the data position first: its checks (DataPositionMismatch) raise before anything of this trainer changes
        rank, world = self.dist.rank, self.dist.world_size
        datas = state["data"]
        if len(datas) == world:
            self.train_data.load_state_dict(datas[rank])
        elif all(d == datas[0] for d in datas):
            self.train_data.load_state_dict(datas[0])  # a global position: valid for any world size
        else:
            raise ckpt.CheckpointError(f"checkpoint holds per-rank data positions for {len(datas)} ranks; "
                                       f"cannot resume them on {world} ranks")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # torch's multi-line key/shape listing: summarised, with the config keys to blame
            raise ckpt.CheckpointError(self._model_mismatch(state)) from e
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"its optimizer state does not fit this run's parameters ({e})") from e
        # the saved param groups carry the writer's hyperparameters; this run's config decides them (lr is set
        # every step), as config.json and the checkpoints written from now on record
        o = self.optim_cfg
        for g in self.optimizer.param_groups:
            g["betas"], g["eps"] = (o.beta1, o.beta2), o.eps
            g["weight_decay"] = o.weight_decay if g.get("name") == "decay" else 0.0
        self.step = int(state["step"])
        t = state.get("trainer", {})
        self.skipped_steps = int(t.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(t.get("consecutive_nonfinite", 0))
        self.tokens_seen = int(t.get("tokens_seen", 0))
        self.train_time_s = float(t.get("train_time_s", 0.0))
        self.first_eval = dict(t.get("first_eval", {}) or {})
        self.last_eval = dict(t.get("last_eval", {}) or {})
        self.last_train = dict(t.get("last_train", {}) or {})
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank], self.device)
        else:
            warnings.warn(f"checkpoint was written by {len(rngs)} ranks, resuming on {world}: RNG streams are "
                          "re-seeded, so the continuation is not bit-identical")
            seed_everything((self.seed or 0) + rank + 1_000_003 * self.step)

    def _config_changes(self, state: Mapping[str, Any], sections: Iterable[str]) -> str:
        """'; changed since the checkpoint: data.max_docs 400 -> 300, ...' from the configs both sides recorded."""
        saved, mine = state.get("config"), self.config
        if not isinstance(saved, Mapping) or not isinstance(mine, Mapping):
            return ""
        prefixes = tuple(f"{sec}." for sec in sections)
        out = [f"{k} {a!r} -> {b!r}" for k, a, b in config_changes(dict(saved), dict(mine))
               if (k.startswith(prefixes) or k in sections) and not k.endswith(".steps")]  # more steps: a resume's aim
        return f"; changed since the checkpoint: {', '.join(out)}" if out else ""

    def _model_mismatch(self, state: Mapping[str, Any]) -> str:
        have, got = self.model.state_dict(), state["model"]
        missing = [k for k in have if k not in got]
        extra = [k for k in got if k not in have]
        shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(have[k].shape)}" for k in have
                  if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(have[k].shape)]
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for what, v in
                 (("tensors missing from it", missing), ("tensors this model lacks", extra),
                  ("shapes differ, checkpoint vs this model", shapes)) if v]
        return (f"its model does not fit this run's model: {'; '.join(parts) or 'the state dicts differ'}"
                f"{self._config_changes(state, ('model',))}; resume with the model.* keys of the run that wrote it, "
                "or start a new run (another --run-name)")

    def _position_mismatch(self, e: DataPositionMismatch, state: Mapping[str, Any]) -> str:
        if e.key == "batch_size":
            return (f"it was trained with {self.stage}.batch_size={e.saved} and this run has {e.current}, so its data "
                    f"position means nothing here; pass --set {self.stage}.batch_size={e.saved}, or start a new run "
                    "(another --run-name)")
        if e.key == "seed":
            return (f"its data order was drawn with seed={e.saved} and this run has seed={e.current}; pass --set "
                    f"seed={e.saved}, or start a new run (another --run-name)")
        return (f"its training data had {e.saved} examples and this run's has {e.current} (data.* keys, "
                f"{self.stage}.seq_len or the data files changed){self._config_changes(state, ('data', self.stage))}; "
                "resume with the settings of the run that wrote it, or start a new run (another --run-name)")

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current state (all ranks call it; rank 0 writes)."""
        if self.ckpt_dir is None:
            return None
        # every rank holds the same weights, so every rank reaches the same verdict and none waits forever
        ckpt.assert_finite_state(self.model.state_dict(), "model")
        state = self.state_dict()
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, state, keep_last=self.stage_cfg.keep_last,
                                        final=self.step >= self.stage_cfg.steps)
        self.dist.barrier()
        return path or ckpt.latest_checkpoint(self.ckpt_dir)

    def resume(self, path: Optional[str | Path] = None) -> bool:
        """Load ``path`` or the stage's latest checkpoint; False when there is none. A checkpoint that cannot
        continue this run (unreadable, another model, batch size, seed or data, or past ``steps``) raises
        ``CheckpointError`` naming the file, the config keys involved and the way out."""
        latest = path is None
        if path is None:
            if self.ckpt_dir is None:
                return False
            path = ckpt.latest_checkpoint(self.ckpt_dir)
            if path is None:
                return False
        try:
            state = ckpt.load_checkpoint(path, map_location="cpu")
        except ckpt.CheckpointError as e:
            older = [p for p in ckpt.list_checkpoints(Path(path).parent) if p.name != Path(path).name]
            if not latest or not older:
                raise
            # not read past automatically: the user decides whether the damaged file is to be given up
            raise ckpt.CheckpointError(f"{str(e).rstrip('.')}. The file is damaged: move it out of {Path(path).parent} "
                                       f"and --resume continues from {older[-1].name}, the newest other checkpoint") from e
        try:
            self.load_state_dict(state)
        except DataPositionMismatch as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {self._position_mismatch(e, state)}") from e
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {e}") from e
        if self.step > self.stage_cfg.steps:  # fit() would otherwise call step 8 of 6 "final"
            raise ckpt.CheckpointError(f"cannot resume from {path}: it is at step {self.step}, past "
                                       f"{self.stage}.steps={self.stage_cfg.steps}; pass --set {self.stage}.steps="
                                       f"{self.step} or more, or start a new run (another --run-name)")
        dropped = self.metrics.truncate_after(self.stage, self.step)
        self.info(f"resumed from {path} at step {self.step}"
                  + (f" ({dropped} metrics records after it dropped)" if dropped else ""))
        return True

    # ------------------------------------------------------------------------------------------------
    def _start_record(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        tokens_per_step = self.stage_cfg.batch_size * getattr(self.stage_cfg, "seq_len", 0)
        pairs = ", chosen + rejected rows" if self.stage == "dpo" else ""
        rows_per_example = 2 if self.stage == "dpo" else 1
        rec = {"kind": "start", "world_size": self.dist.world_size, "device": str(self.device),
               "accum_steps": self.accum_steps, "batch_size": self.stage_cfg.batch_size,
               "micro_batch_size": self.stage_cfg.micro_batch_size, "params": n_params,
               "flops_per_token": self.flops_per_token, "peak_flops_per_device": self.peak_flops,
               "peak_flops_note": self.peak_flops_note, "nvtx": NVTX_BACKEND,
               "mfu_formula": ("not reported: " + self.mfu_unavailable) if self.mfu_unavailable else
                              "flops_per_token * tokens_per_s / (peak_flops_per_device * world_size); "
                              "flops_per_token = 6N + 12*L*H*Q*T, T = each micro-batch's row length (padded batch "
                              "length or packed row length), token-weighted over the logged steps (the start "
                              "record's flops_per_token is at the stage's seq_len)",
               "tokens": self.count_tokens_doc,
               "tokens_per_s_formula": "tokens / seconds inside train_step: the tokens of all ranks over this "
                                       "rank's time in train_step, for the steps since the previous train record "
                                       "(end record: tokens_seen / train_time_s)"}
        if self.command is not None:
            rec["command"] = self.command
        self.log(rec)
        self.info(f"{n_params / 1e6:.2f}M params | {self.dist.world_size} rank(s) on {self.device.type} | "
                  f"batch {self.stage_cfg.batch_size} = {self.stage_cfg.micro_batch_size} x {self.accum_steps} "
                  f"accum x {self.dist.world_size} ranks (at most {rows_per_example * tokens_per_step} tokens/step{pairs}) | "
                  f"steps {self.step}->{self.stage_cfg.steps} | MFU peak: {self.peak_flops_note}")
        if self.stage_cfg.warmup_steps > self.stage_cfg.steps:  # allowed (short debug runs), but say so
            self.info(f"note: {self.stage}.warmup_steps={self.stage_cfg.warmup_steps} > {self.stage}.steps="
                      f"{self.stage_cfg.steps}: the learning rate ends at {self.lr_at(self.stage_cfg.steps - 1):.3g}, "
                      f"short of the peak {self.stage_cfg.lr:.3g}")

    def fit(self) -> Dict[str, Any]:
        """Train until ``stage_cfg.steps``; evaluate every ``eval_every`` (and at steps 0 and the end), log every
        ``log_every``, save every ``save_every`` and at the end. Returns a summary dict."""
        cfg = self.stage_cfg
        wall0 = time.perf_counter()
        if self.step >= cfg.steps:
            if self.ckpt_dir is not None and ckpt.final_checkpoint(self.ckpt_dir) is None:
                self.save()
            return self.summary(time.perf_counter() - wall0)
        if self.step == 0:  # a fresh start (no checkpoint): an earlier attempt's records would be logged twice
            dropped = self.metrics.drop_before(self.stage, self._created)
            if dropped:
                self.info(f"starting from step 0: {dropped} metrics records of an earlier '{self.stage}' attempt "
                          "dropped")
        self._start_record()
        if self.step == 0:
            self._run_eval()
        prof = maybe_profiler(self.profile, self.run_dir / "profile" if self.run_dir else None,
                              self.stage, self.dist.rank)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.dist.is_main), file=sys.stderr)
        win_tokens, win_time, win_flops = 0, 0.0, 0.0
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                res = self.train_step()
                dt = time.perf_counter() - t0
                self.train_time_s += dt
                win_tokens += res["tokens"]
                win_flops += res["flops"]
                win_time += dt
                tok_s = win_tokens / win_time if win_time > 0 else 0.0
                bar.update(1)
                bar.set_postfix(loss=f"{res['loss']:.4f}", lr=f"{res['lr']:.2e}", tok_s=f"{tok_s:,.0f}",
                                refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    fpt = win_flops / win_tokens if self._flops_fn is not None and win_tokens > 0 else None
                    rec = {"kind": "train", **{k: v for k, v in res.items() if k not in ("finite", "n", "flops")},
                           "tokens_per_s": tok_s, "flops_per_token": fpt,
                           "mfu": mfu(fpt, tok_s, self.peak_flops, self.dist.world_size),
                           "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}
                    mem = peak_memory_gib(self.device)
                    if mem is not None:
                        rec["peak_mem_gib"] = mem
                    self.log(rec)
                    win_tokens, win_time, win_flops = 0, 0.0, 0.0
                if prof is not None:
                    prof.step()
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self._run_eval()
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            bar.close()
            if prof is not None:
                trace = prof.stop()
                if trace is not None:
                    self.info(f"profiler trace: {trace}")
        summary = self.summary(time.perf_counter() - wall0)
        self.log({"kind": "end", **{k: v for k, v in summary.items() if k != "stage"}})
        if self.dist.is_main and self.run_dir is not None:
            png = plot_loss_curve(read_metrics(self.run_dir / "metrics.jsonl", self.stage),
                                  self.run_dir / "figures" / f"{self.stage}_loss.png", title=f"{self.stage} loss",
                                  ylabel=LOSS_LABELS.get(self.stage))
            if png is not None:
                summary["loss_curve"] = str(png)
        return summary

    def summary(self, wall_s: float) -> Dict[str, Any]:
        s = {"stage": self.stage, "steps": self.step, "skipped_steps": self.skipped_steps,
             "tokens_seen": self.tokens_seen, "train_time_s": self.train_time_s, "wall_s": wall_s,
             "final_train_loss": self.last_train.get("loss")}
        for k in ("val_loss", "val_ppl"):
            if k in self.first_eval:
                s[f"first_{k}"] = self.first_eval[k]
            if k in self.last_eval:
                s[f"final_{k}"] = self.last_eval[k]
        if self.ckpt_dir is not None:
            final = ckpt.final_checkpoint(self.ckpt_dir)
            s["checkpoint"] = str(final) if final else None
        return s

    def close(self) -> None:
        """Drop model/optimizer/DDP references and collect, so ``destroy_process_group`` can follow safely."""
        if self._closed:
            return
        self._closed = True
        for name in ("optimizer", "_train_module", "_eval_module", "_ddp", "_loss_module", "model", "_params",
                     "_flops_fn"):  # _flops_fn: model.flops_per_token by default, a reference to the model
            setattr(self, name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
