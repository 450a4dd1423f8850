"""``--stage all``: pretrain -> sft -> dpo -> verifier -> eval in one process, each training stage starting from its
input stage's final checkpoint in the same run directory (sft <- pretrain, dpo <- sft, verifier <- sft: the verifier
judges the SFT generator), then ``eval`` (``mllm.stages.eval``: every stage checkpoint on every task, and
``<run>/report/REPORT.md``), then a run summary.

Resuming (``--resume``): a stage whose ``final`` checkpoint exists is not run again (its summary is taken from
``summary.json`` when recorded there, else the stage re-enters and returns at once), a stage with checkpoints but
no ``final`` continues from its latest one, the rest run from scratch. ``eval`` is complete when every stage
checkpoint's results are newer than it and computed with the same eval settings and the report was written after
them (skipped), partial when some are (it re-evaluates only the rest: resumed); ``--recompute`` re-evaluates all.
Without ``--resume`` a run directory that already holds any stage's checkpoints is refused, as for a single stage
(nothing is overwritten). A started stage whose input stage has since finished at another checkpoint (trained
further) is refused too (``check_input_current``), rather than skipped or resumed on top of a stale input.

Run summary (``summary.json["all"]``, also printed as a table): per stage its status (ran / resumed / skipped),
wall-clock seconds of this invocation, steps and the final metrics that show the stage did its job::

    pretrain  final_val_loss (first_val_loss)
    sft       response-token val loss first -> final
    dpo       held-out reward accuracy / margin first -> final, train reward accuracy
    verifier  GSM8K dev greedy / majority / verifier best-of-N / oracle accuracy, sample AUC, reference AUC
    eval      models evaluated / reused, skipped baselines, report path

plus the total wall-clock and ``outputs`` (the summary file and the report). Every stage's full summary is also recorded under its own key of ``summary.json``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mllm.config.pipeline_config import ConfigError, PipelineConfig
from mllm.training import checkpoint as ckpt

ORDER = ("pretrain", "sft", "dpo", "verifier", "eval")
HEADLINE = {
    "pretrain": ("first_val_loss", "final_val_loss", "final_val_ppl"),
    "sft": ("first_val_loss", "final_val_loss"),
    "dpo": ("first_heldout_reward_accuracy", "final_heldout_reward_accuracy", "final_heldout_reward_accuracy_ci95",
            "final_heldout_reward_margins", "final_train_reward_accuracy", "heldout_pairs_evaluated"),
    "verifier": ("dev_greedy_accuracy", "dev_majority_accuracy", "dev_verifier_accuracy", "dev_oracle_accuracy",
                 "dev_sample_base_rate", "dev_sample_auc", "dev_reference_vs_samples_auc", "dev_reference_top1_rate",
                 "dev_reference_top1_chance"),
    "eval": ("evaluated", "reused", "skipped_baselines", "report"),
}


def stage_state(run_dir: Path, stage: str, cfg: Optional[PipelineConfig] = None) -> str:
    """"complete" (final checkpoint), "partial" (checkpoints, no final) or "absent"; for ``eval`` (needs ``cfg``)
    see :func:`mllm.stages.eval.state`."""
    if stage == "eval":
        if cfg is None:
            raise ValueError("stage_state('eval') needs the config (its eval settings decide what is up to date)")
        from mllm.stages import eval as eval_stage
        return eval_stage.state(cfg, run_dir)
    d = ckpt.stage_checkpoint_dir(run_dir, stage)
    if ckpt.final_checkpoint(d) is not None:
        return "complete"
    return "partial" if ckpt.list_checkpoints(d) else "absent"


def _recorded(run_dir: Path, stage: str) -> Optional[Dict[str, Any]]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(stage)
    except json.JSONDecodeError:
        return None


INPUT_STAGES = {"sft": "pretrain", "dpo": "sft", "verifier": "sft"}


def _trained_from(run_dir: Path, stage: str) -> Optional[str]:
    """The input checkpoint a started stage was trained from: the newest data record of its metrics (every attempt
    logs one, so a stage retrained after an earlier finish is judged by its current attempt), else its recorded
    summary."""
    from mllm.training.metrics import read_metrics

    try:
        data = [r for r in read_metrics(run_dir / "metrics.jsonl", stage)
                if r.get("kind") == "data" and r.get("init_checkpoint")]
    except ValueError:
        data = []
    if data:
        return data[-1]["init_checkpoint"]
    return (_recorded(run_dir, stage) or {}).get("input_checkpoint")


def input_mismatch(run_dir: Path, stage: str) -> Optional[str]:
    """Why a started ``stage`` no longer follows from its input stage's current final checkpoint (that input was
    trained further after it, e.g. ``--stage sft --resume --set sft.steps=120``), or None when it does (or when
    either side is unknown)."""
    up = INPUT_STAGES.get(stage)
    if up is None:
        return None
    final = ckpt.final_checkpoint(ckpt.stage_checkpoint_dir(run_dir, up))
    was = _trained_from(run_dir, stage)
    if final is None or was is None or Path(was).name == final.name:
        return None
    return f"stage '{stage}' in {run_dir} was trained from {was}, but '{up}' has since finished at {final}"


def check_input_current(run_dir: Path, stage: str) -> None:
    """A started stage must have been trained from its input stage's current final checkpoint: keeping or resuming
    it on top of a stale input would report it against a checkpoint it never saw. Raises ConfigError naming both
    files (:func:`input_mismatch`)."""
    why = input_mismatch(run_dir, stage)
    if why is not None:
        raise ConfigError(f"{why}: its checkpoints no longer follow from it. Retrain '{stage}' in a new run "
                          f"(--run-name), or move {ckpt.stage_checkpoint_dir(run_dir, stage)} aside to retrain it "
                          "here")


def headline(stage: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    return {k: summary.get(k) for k in HEADLINE.get(stage, ()) if k in summary}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [f"{'stage':<9} {'status':<8} {'wall_s':>8} {'steps':>6}  final metrics"]
    for r in rows:
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
        lines.append(f"{r['stage']:<9} {r['status']:<8} {r['wall_s']:>8.1f} {'-' if r.get('steps') is None else str(r['steps']):>6}  {metrics}")
    return "\n".join(lines)


def run(cfg: PipelineConfig, ctx, stages: Sequence[str] = ORDER) -> Dict[str, Any]:
    """Run ``stages`` in order (see the module docstring); returns the run summary."""
    from mllm.stages import StageContext, get_stage
    from mllm.training.runner import record_summary

    run_dir = Path(ctx.run_dir)
    fns = {s: get_stage(s) for s in stages}  # every stage importable before anything runs
    states = {s: stage_state(run_dir, s, cfg) for s in stages}
    if not ctx.resume:
        started = [s for s in stages if states[s] != "absent"]
        if started:
            raise ConfigError(f"run directory {run_dir} already has checkpoints of stage(s) {', '.join(started)}: "
                              "pass --resume to continue the pipeline (finished stages are kept, an interrupted one "
                              "resumes), or choose another --run-name")
    t_all = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    for s in stages:
        t0 = time.perf_counter()
        state = stage_state(run_dir, s, cfg)
        if s == "eval" and getattr(ctx, "recompute", False):
            state = "absent"
        if state != "absent":
            check_input_current(run_dir, s)
        prior = _recorded(run_dir, s) if state == "complete" else None
        if prior is not None:
            summary, status = prior, "skipped"
        else:
            status = {"complete": "skipped", "partial": "resumed", "absent": "ran"}[state]
            if ctx.dist.is_main:
                print(f"[all] stage {s}: {'resuming' if state == 'partial' else 'running'}", file=sys.stderr)
            sub = StageContext(run_dir=run_dir, dist=ctx.dist, resume=state != "absent", profile=ctx.profile,
                               progress=ctx.progress, recompute=getattr(ctx, "recompute", False),
                               command=getattr(ctx, "command", None))
            summary = fns[s](cfg, sub)
            if ctx.dist.is_main:
                record_summary(run_dir, s, summary)
        ctx.dist.barrier()
        wall = time.perf_counter() - t0
        rows.append({"stage": s, "status": status, "wall_s": wall, "steps": summary.get("steps"),
                     "stage_wall_s_when_run": summary.get("wall_s"), "metrics": headline(s, summary),
                     "checkpoint": summary.get("checkpoint"), "report": summary.get("report")})
    total = time.perf_counter() - t_all
    table = format_table(rows)
    if ctx.dist.is_main:
        print(f"[all] pipeline finished in {total:.1f} s\n{table}", file=sys.stderr)
    report = next((r["report"] for r in rows if r["stage"] == "eval" and r.get("report")), None)
    outputs = {"run_dir": str(run_dir), "summary": str(run_dir / "summary.json"),
               "checkpoints": {r["stage"]: r["checkpoint"] for r in rows if r.get("checkpoint")},
               "report": report}
    return {"stage": "all", "stages": rows, "total_wall_s": total, "table": table.splitlines(), "outputs": outputs}
