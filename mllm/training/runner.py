"""Command-line driver behind ``scripts/run_pipeline.py``: config, run directory, process group, one stage.

    python scripts/run_pipeline.py --config local-smoke --stage pretrain
    torchrun --standalone --nproc_per_node=8 scripts/run_pipeline.py --config gpu-full --stage pretrain \\
        --run-name full-1 [--resume]

Run directory ``<cfg.run_root>/<run-name>/``: ``config.json`` (the resolved config), ``metrics.jsonl`` (every
stage's records, tagged with ``stage``), ``checkpoints/<stage>/``, ``figures/<stage>_loss.png``, ``summary.json``
(per-stage summaries) and, with ``--profile``, ``profile/<stage>_rank<r>.json``.

``--run-name`` defaults to ``<config name>-<YYYYmmdd-HHMMSS>`` (chosen on rank 0 and broadcast). ``--resume``
without ``--run-name`` picks the newest run directory of that config that holds checkpoints (else the newest). A
command that fails before writing a checkpoint leaves no trace: a run directory it created is removed, an existing
run's ``config.json`` is restored (``RunDirGuard``). Ctrl-C prints the newest checkpoint and the flags that continue
from it (exit status 130). Without ``--config``, an existing run
directory's own ``config.json`` is the config (``--set`` applies on top), so ``--stage eval --run-name R`` evaluates
R as it was trained. Starting a stage that already has checkpoints in the run directory without ``--resume`` is
refused (nothing is overwritten).

``--stage eval`` evaluates every stage checkpoint of the run into ``<run>/results/`` and writes
``<run>/report/REPORT.md`` (``mllm.stages.eval``); up-to-date results are reused unless ``--recompute``.
``--stage all`` runs every stage and ends by printing where the run summary and the report are.

Errors: a bad config key, an unknown stage, missing data or tokenizer files (``DatasetError``,
``TokenizerError``: they name what was looked for) or a missing/unreadable input checkpoint prints one ``error:`` line
(for a checkpoint: the file, and the stage that makes it) and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mllm.config.pipeline_config import ConfigError, PipelineConfig, config_changes, load_config
from mllm.training import checkpoint as ckpt
from mllm.training.distributed import DistContext, init_distributed, shutdown_distributed


def build_parser(stages: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_pipeline.py", description="Run a stage of the mllm pipeline (under torchrun for several GPUs/nodes).",
        epilog="Multi-node: torchrun --nnodes=N --nproc_per_node=G --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT "
               "--rdzv_id=JOB scripts/run_pipeline.py ... (see scripts/slurm/pipeline.slurm).")
    p.add_argument("--config", default=None,
                   help="preset name (local-smoke, gpu-full) or a .json/.yaml file; default: the run's own config.json "
                        "when --run-name names an existing run, else local-smoke")
    p.add_argument("--config-file", default=None, help="JSON/YAML file of keys applied on top of the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set pretrain.steps=100 (repeatable)")
    p.add_argument("--stage", required=True, help=f"stage to run: {', '.join(stages)}")
    p.add_argument("--run-name", default=None, help="run directory name under cfg.run_root")
    p.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler trace of a few steps")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--recompute", action="store_true",
                   help="eval stage: evaluate again even when the results are newer than the checkpoints")
    return p


def checkpoint_error_line(err: Exception) -> str:
    """One line for a missing/unreadable checkpoint: the message (which names the file) plus, when the message
    does not already say it, the stage that makes a file under ``checkpoints/<stage>/``."""
    msg = " ".join(str(err).split())
    if msg.startswith("no checkpoint in") and "--stage" not in msg:  # a missing file, not a damaged or unfit one
        m = re.search(r"checkpoints[/\\](\w+)", msg)
        if m:
            msg += f" (that file is made by `--stage {m.group(1)}`; run it first with the same --run-name)"
    return f"error: {msg}"


def outputs_line(stage: str, run_dir: Path, summary: Dict[str, Any], summary_path: Path) -> str:
    """Where a finished stage's outputs are, naming only files and folders the stage writes."""
    if stage == "all":
        report = (summary.get("outputs") or {}).get("report")
        return (f"run directory: {run_dir}\nrun summary: {summary_path} (key 'all'; per-stage summaries under "
                f"their own keys)\nreport: {report or 'not written (the eval stage did not run)'}")
    if stage == "eval":
        return (f"run directory: {run_dir}\nresults: {summary.get('results_dir')}\nreport: {summary.get('report')}"
                f"\nsummary: {summary_path} (key 'eval')")
    return (f"run directory: {run_dir}  (config.json, metrics.jsonl, checkpoints/{stage}/, figures/{stage}_loss.png, "
            f"{summary_path.name})")


def _write_json_atomic(path: Path, data: Any) -> None:
    ckpt.atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in config_changes(old, new)]


def newest_run(run_root: Path, config_name: str) -> Optional[str]:
    """The run ``--resume`` without ``--run-name`` continues: the newest ``<config_name>-*`` run (by its config.json's
    time) that holds a checkpoint of any stage, else the newest one at all. Runs with checkpoints come first so that
    a run holding only a config.json (one whose first stage stopped before its first checkpoint) does not hide the
    run with the work."""
    runs = [p for p in run_root.glob(f"{config_name}-*") if (p / "config.json").is_file()] if run_root.is_dir() else []
    if not runs:
        return None
    with_ckpts = [p for p in runs if any(ckpt.list_checkpoints(d) for d in (p / "checkpoints").glob("*"))]
    return max(with_ckpts or runs, key=lambda p: (p / "config.json").stat().st_mtime).name


def interrupted_line(run_dir: Optional[Path], stage: str) -> str:
    """The console line for Ctrl-C: the newest checkpoint (atomic writes: a checkpoint is either complete or
    absent) and how to continue from it."""
    if run_dir is None:
        return "interrupted before a run directory was chosen; nothing was written"
    if stage == "eval":  # no checkpoints: the evaluation keeps each finished model's results (eval_state.json)
        where = f"the models evaluated so far are kept in {run_dir / 'results'}"
    else:
        stages = TRAINING_STAGES if stage == "all" else (stage,)
        saved = [p for st in stages for p in ckpt.list_checkpoints(ckpt.stage_checkpoint_dir(run_dir, st))]
        newest = max(saved, key=lambda p: p.stat().st_mtime) if saved else None
        where = f"newest checkpoint {newest}" if newest else f"no '{stage}' checkpoint yet"
    return f"interrupted: {where}; continue with the same command plus `--run-name {run_dir.name} --resume`"


class RunDirGuard:
    """Undo what a failed command did to the run directory before any checkpoint came of it (rank 0).

    ``prepare_run_dir`` writes config.json before the stage runs; a command that then fails (bad data key, missing
    input checkpoint, NaN) would otherwise leave a new run holding only that file — which ``--resume`` picked
    as "the newest run" — or leave an existing run's config.json holding the failed command's ``--set`` values,
    which the next command on that run reads as the run's own config. On failure with no new checkpoint: a run
    directory this command created is removed when nothing but config.json was written into it; an existing run's
    config.json is put back as it was. Checkpoints, metrics and Ctrl-C (KeyboardInterrupt) leave everything as is."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created = not run_dir.exists()
        cfg = run_dir / "config.json"
        self.old_config = cfg.read_bytes() if cfg.is_file() else None
        self.ckpts_before = self._ckpts()

    def _ckpts(self) -> set:
        return {p for d in (self.run_dir / "checkpoints").glob("*") for p in ckpt.list_checkpoints(d)}

    def undo(self) -> Optional[str]:
        """Roll back after a failure; returns a line for the console when an existing run's file was restored."""
        if self._ckpts() - self.ckpts_before:
            return None
        if self.created:
            if [p.name for p in self.run_dir.rglob("*") if p.is_file()] in ([], ["config.json"]):
                shutil.rmtree(self.run_dir, ignore_errors=True)  # as if never made: the error line says why
            return None
        cfg = self.run_dir / "config.json"
        if self.old_config is not None and cfg.is_file() and cfg.read_bytes() != self.old_config:
            ckpt.atomic_write_bytes(cfg, self.old_config)
            return f"restored {cfg} as it was before this failed command"
        return None


def prepare_run_dir(cfg: PipelineConfig, run_dir: Path, stage: str, resume: bool) -> List[str]:
    """Create the layout and write config.json (rank 0). Returns warnings (config changes on resume)."""
    warnings: List[str] = []
    stage_ckpts = ckpt.list_checkpoints(ckpt.stage_checkpoint_dir(run_dir, stage))
    if stage_ckpts and not resume:
        raise ConfigError(f"run directory {run_dir} already has '{stage}' checkpoints ({stage_ckpts[-1].name}): "
                          "pass --resume to continue it, or choose another --run-name")
    for sub in ("checkpoints", "figures"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    new = cfg.to_dict()
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
            diff = config_diff(old, new)
            if diff:
                warnings.append(f"config differs from {cfg_path}: " + "; ".join(diff))
        except json.JSONDecodeError:
            warnings.append(f"{cfg_path} was not valid JSON; rewritten")
    _write_json_atomic(cfg_path, new)
    return warnings


def record_summary(run_dir: Path, stage: str, summary: Dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = {}
    data[stage] = summary
    _write_json_atomic(path, data)
    return path


TRAINING_STAGES = ("pretrain", "sft", "dpo", "verifier")


def check_batch_sizes(cfg: PipelineConfig, stage: str, world_size: int) -> None:
    """Each training stage the run reaches needs batch_size % (micro_batch_size · world_size) == 0; a ConfigError
    naming the key now, instead of a failure after DPO's reference pass or the verifier's sampling."""
    from mllm.training.trainer import accumulation_steps

    for st in TRAINING_STAGES if stage == "all" else (stage,) if stage in TRAINING_STAGES else ():
        accumulation_steps(getattr(cfg, st), world_size, st)


def _prints(ctx: Optional[DistContext]) -> bool:
    """Whether this process reports an error: rank 0. Before the process group exists (a config error) torchrun's
    RANK says which one, so the message is printed once, not once per rank."""
    if ctx is not None:
        return ctx.is_main
    return os.environ.get("RANK", "0") == "0"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mllm.data.datasets import DatasetError
    from mllm.data.tokenizer import TokenizerError
    from mllm.evaluation.common import command_line
    from mllm.stages import StageContext, get_stage, valid_stages

    args = build_parser(valid_stages()).parse_args(argv)
    command = command_line("scripts/run_pipeline.py", sys.argv[1:] if argv is None else argv)
    ctx: Optional[DistContext] = None
    guard: Optional[RunDirGuard] = None
    run_dir: Optional[Path] = None
    try:
        stage_fn = get_stage(args.stage)  # an unknown stage fails before any process group exists
        cfg = load_config(args.config or "local-smoke", args.overrides, args.config_file)
        run_root = Path(cfg.run_root)
        # an existing run's name is known before any process group (the file system is the same on every rank)
        name = args.run_name
        if name is None and args.resume:
            name = newest_run(run_root, cfg.name)
        own = run_root / name / "config.json" if name is not None else None
        if args.config is None and args.config_file is None and own is not None and own.is_file():
            # an existing run continues (or is evaluated) with its own config, not the local-smoke preset's: its
            # device, batch sizes and model, read before the process group and the batch check that depend on them
            cfg = load_config(str(own), args.overrides)
        else:
            own = None
        ctx = init_distributed(cfg.device)
        check_batch_sizes(cfg, args.stage, ctx.world_size)  # before any data loading or sampling pass
        if own is not None and ctx.is_main:
            print(f"config: {own} (the run's own; --config picks another)", file=sys.stderr)
        if name is None and args.resume and ctx.is_main:
            print(f"--resume: no earlier '{cfg.name}' run under {run_root}; starting a new one", file=sys.stderr)
        if name is None:
            name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = ctx.broadcast_object(name)
        run_dir = run_root / name
        if ctx.is_main:
            guard = RunDirGuard(run_dir)
            for w in prepare_run_dir(cfg, run_dir, args.stage, args.resume):
                print(f"warning: {w}", file=sys.stderr)
        ctx.barrier()
        sctx = StageContext(run_dir=run_dir, dist=ctx, resume=args.resume, profile=args.profile,
                            progress=not args.no_progress, recompute=args.recompute, command=command)
        try:
            summary = stage_fn(cfg, sctx)
        except Exception:
            if guard is not None:
                done = guard.undo()
                if done:
                    print(f"note: {done}", file=sys.stderr)
            raise
        if ctx.is_main:
            path = record_summary(run_dir, args.stage, summary)
            print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2, default=str))
            print(outputs_line(args.stage, run_dir, summary, path))
        return 0
    except ConfigError as e:  # includes unknown stage / bad key: a message, not a traceback
        if _prints(ctx):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, TokenizerError) as e:  # data or tokenizer files missing offline: the message says where
        if _prints(ctx):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except ckpt.CheckpointError as e:  # a missing input checkpoint: which file, which stage makes it
        if _prints(ctx):
            print(checkpoint_error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: where the work stands and the command that continues it, not a traceback
        if _prints(ctx):
            print(interrupted_line(run_dir, args.stage), file=sys.stderr)
        return 130
    finally:
        shutdown_distributed(ctx)
