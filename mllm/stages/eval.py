"""Evaluation stage: every stage checkpoint of the run (and the configured baselines) on every task, then the report.

    python scripts/run_pipeline.py --config local-smoke --stage eval --run-name RUN [--recompute]
    (also the last stage of ``--stage all``)

Inputs: ``<run>/checkpoints/{pretrain,sft,dpo,verifier}/`` (final, else latest; at least one must exist) and the
baselines of ``eval.baselines`` (Hugging Face names or folders; offline without weights each gets a "skipped: ..."
record and a line in the report). Tasks and sizes come from the ``eval`` config section (see
``mllm.evaluation.runner``): WikiText-2 perplexity (``eval.perplexity_max_documents`` articles at most), SST-2,
GSM8K (greedy, majority of ``eval.gsm8k_samples``, verifier best-of-N) and attention maps.

Outputs (rank 0; the other ranks wait, see :func:`_wait_group`):
  ``<run>/results/<model>/<task>.json``, ``<run>/results/environment.json``, ``<run>/results/eval_state.json``
  ``<run>/report/REPORT.md`` (+ ``<run>/report/figures/``), written by ``mllm.evaluation.report.build_report``.
The report lives inside the run directory so that runs never overwrite each other's report; the project's
committed sample is a copy of one (``report/local-smoke/``).

Resume: a model whose results are newer than its checkpoint and were computed with the same eval settings
(``mllm.evaluation.runner.is_up_to_date``) is not evaluated again; ``--recompute`` (``ctx.recompute``) forces a
fresh evaluation. The report is rebuilt every time the stage runs (seconds).

Summary (``summary.json["eval"]``): results folder, report path, which models were evaluated / reused / skipped,
evaluation seconds per model and a few headline numbers per model (token perplexity, SST-2 k-shot calibrated
accuracy, GSM8K greedy / majority / verifier accuracy).
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional

from mllm.config.pipeline_config import PipelineConfig
from mllm.training import checkpoint as ckpt

STAGE = "eval"
RESULTS_DIR = "results"
REPORT_PATH = Path("report") / "REPORT.md"
# rank 0 evaluates alone; the others wait this long for it (a gpu-full evaluation takes far longer than the
# default process-group timeout of init_distributed, 30 min)
WAIT_TIMEOUT = timedelta(hours=12)


def results_dir(run_dir) -> Path:
    return Path(run_dir) / RESULTS_DIR


def report_path(run_dir) -> Path:
    return Path(run_dir) / REPORT_PATH


def _plan(cfg: PipelineConfig, run_dir: Path) -> Dict[str, Dict[str, Any]]:
    from mllm.evaluation.runner import TASKS, plan_run
    return plan_run(run_dir, cfg, results_dir(run_dir), None, list(cfg.eval.baselines), TASKS,
                    cfg.eval.perplexity_max_documents)


def state(cfg: PipelineConfig, run_dir) -> str:
    """"complete" (every stage checkpoint's results up to date, each baseline evaluated or recorded as skipped,
    and the report written after the last evaluation), "partial" (some results reusable) or "absent"."""
    run_dir = Path(run_dir)
    try:
        plan = _plan(cfg, run_dir)
    except ValueError:  # no run directory yet
        return "absent"
    stages = [m for m, p in plan.items() if "checkpoint" in p]
    if not stages:
        return "absent"
    ok = [m for m in stages if plan[m]["up_to_date"]]
    out = results_dir(run_dir)
    baselines_ok = all(p["up_to_date"] or (out / m / "status.json").is_file()
                       for m, p in plan.items() if "checkpoint" not in p)
    rep, st = report_path(run_dir), out / "eval_state.json"
    report_ok = rep.is_file() and st.is_file() and rep.stat().st_mtime_ns >= st.stat().st_mtime_ns
    if len(ok) == len(stages) and baselines_ok and report_ok:
        return "complete"
    return "partial" if ok else "absent"


def _headline(results: Path, model: str) -> Dict[str, Any]:
    """A few numbers of one model's results JSONs (None where a task did not run)."""
    import json

    def get(task, *keys):
        p = results / model / f"{task}.json"
        if not p.is_file():
            return None
        cur = json.loads(p.read_text(encoding="utf-8")).get("result")
        for k in keys:
            if not isinstance(cur, dict) or k not in cur:
                return None
            cur = cur[k]
        return cur

    return {"token_ppl": get("perplexity", "token", "perplexity"),
            "word_ppl": get("perplexity", "rolling", "word_perplexity"),
            "sst2_k_shot_calibrated": get("sst2", "k_shot", "calibrated", "accuracy"),
            "gsm8k_greedy": get("gsm8k", "greedy", "accuracy"),
            "gsm8k_majority": get("gsm8k", "majority", "accuracy"),
            "gsm8k_verifier": get("gsm8k", "verifier", "accuracy")}


def _wait_group(ctx):
    """A gloo group with a long timeout over every rank (None in a single process), created up front on all ranks:
    the non-main ranks wait on it for rank 0's evaluation, which the default group's timeout (init_distributed,
    30 min) would abort on a large config."""
    if not ctx.dist.is_distributed:
        return None
    import torch.distributed as dist
    return dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def _wait_for_main(group) -> None:
    if group is None:
        return
    import torch.distributed as dist
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def evaluate(cfg: PipelineConfig, run_dir: Path, recompute: bool = False, command: Optional[str] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Evaluate the run (reusing up-to-date results unless ``recompute``) and write the report; returns the
    stage summary. Raises ``CheckpointError`` when the run has no stage checkpoint at all."""
    from mllm.evaluation.loading import STAGE_ORDER, find_stage_checkpoints
    from mllm.evaluation.report import build_report
    from mllm.evaluation.runner import TASKS, evaluate_run, read_state

    found = find_stage_checkpoints(run_dir) if run_dir.is_dir() else {}
    if not found:
        first = ckpt.stage_checkpoint_dir(run_dir, STAGE_ORDER[0]) / ckpt.FINAL
        raise ckpt.CheckpointError(
            f"stage '{STAGE}' needs at least one stage checkpoint under {run_dir / 'checkpoints'}, but there is none "
            f"(e.g. {first} is made by `--stage {STAGE_ORDER[0]}`): run the training stages first (same --run-name)")
    t0 = time.perf_counter()
    out = results_dir(run_dir)

    def log(line: str) -> None:
        print(f"[{STAGE}] {line}", file=sys.stderr, flush=True)

    log(f"evaluating {', '.join(found)}" + (f" + baselines {', '.join(cfg.eval.baselines)}"
                                            if cfg.eval.baselines else " (no baselines configured: eval.baselines)")
        + f" -> {out}" + ("" if recompute else " (up-to-date results are reused; --recompute to redo them)"))
    evaluate_run(run_dir, cfg, out, None, list(cfg.eval.baselines), TASKS, cfg.device,
                 cfg.eval.batch_size, cfg.eval.perplexity_max_documents, command, progress,
                 cfg.eval.gen_batch_size, reuse=not recompute, log=log)
    eval_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    from mllm.stages.pipeline import INPUT_STAGES, input_mismatch

    for st in INPUT_STAGES:  # each stage is still evaluated; only its delta to the input stage is meaningless
        why = input_mismatch(run_dir, st)
        if why is not None:
            log(f"warning: {why}; the report gives no stage-wise deltas for '{st}'")
    rep = report_path(run_dir)
    build_report(out, run_dir, rep, command=command)
    report_s = time.perf_counter() - t1
    log(f"report: {rep}")
    st = read_state(out)
    inv = st.get("last_invocation", {})
    models = [m for m in STAGE_ORDER if m in found] + [m for m in inv.get("evaluated", []) + inv.get("reused", [])
                                                        if m.startswith("baseline-")]
    return {"stage": STAGE, "steps": None, "results_dir": str(out), "report": str(rep),
            "evaluated": inv.get("evaluated", []), "reused": inv.get("reused", []),
            "skipped_baselines": inv.get("skipped", []),
            "eval_s_per_model": {m: st["models"][m].get("eval_s") for m in models if m in st["models"]},
            "models": {m: _headline(out, m) for m in models},
            "eval_wall_s": eval_s, "report_wall_s": report_s, "wall_s": time.perf_counter() - t0}


def run(cfg: PipelineConfig, ctx) -> Dict[str, Any]:
    """The stage entry point: rank 0 evaluates and writes the report, every rank returns its summary."""
    run_dir = Path(ctx.run_dir)
    summary = None
    error: Optional[BaseException] = None
    group = _wait_group(ctx)
    if ctx.dist.is_main:
        try:
            summary = evaluate(cfg, run_dir, getattr(ctx, "recompute", False), getattr(ctx, "command", None),
                               ctx.progress)
        except ckpt.CheckpointError as e:  # raised on every rank below, so all exit the same way
            error = e
    _wait_for_main(group)
    summary, why = ctx.dist.broadcast_object((summary, str(error) if error is not None else None))
    if why is not None:
        raise ckpt.CheckpointError(why)
    return summary
