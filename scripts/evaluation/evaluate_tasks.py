#!/usr/bin/env python
"""Evaluate every stage checkpoint of a run (and the baselines) and write the results JSONs.

    python scripts/evaluation/evaluate_tasks.py --stage-checkpoints experiments/runs/<run>/ [--include-baselines]
        [--baseline gpt2] [--config NAME] [--set eval.gsm8k_examples=50] [--tasks perplexity,sst2,gsm8k,attention]
        [--out DIR] [--max-docs N] [--device auto|cpu|cuda] [--batch-size 8] [--gen-batch-size 32] [--reuse]

Stages: checkpoints/{pretrain,sft,dpo,verifier}/ (final, else latest). Config: the run's config.json (or
--config, a preset or file) with --set overrides; its ``eval`` section sets the task sizes. Baselines:
--baseline NAME_OR_PATH (repeatable), or with --include-baselines the config's eval.baselines; a baseline
that is not available (offline, no weights) gets a "skipped: ..." record. Results: <run>/results/ (see
mllm.evaluation.runner); then `python scripts/make_report.py --run <run>` writes report/REPORT.md.
--reuse keeps the results of models that are up to date (newer than their checkpoint, same eval settings), as the
pipeline's eval stage does; --max-docs, --batch-size and --gen-batch-size default to the config's
eval.perplexity_max_documents, eval.batch_size and eval.gen_batch_size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    from mllm.config.pipeline_config import ConfigError, apply_overrides, config_from_dict, load_config, validate
    from mllm.evaluation.common import command_line
    from mllm.evaluation.loading import STAGE_ORDER, find_stage_checkpoints, resolve_device
    from mllm.evaluation.runner import evaluate_run, task_list

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage-checkpoints", required=True, metavar="RUN_DIR", help="the run directory")
    ap.add_argument("--include-baselines", action="store_true", help="also evaluate the config's eval.baselines")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME_OR_PATH",
                    help="a Hugging Face model name or folder to evaluate as a baseline (repeatable)")
    ap.add_argument("--config", default=None, help="preset or config file (default: the run's config.json)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tasks", default=None, help="comma list of perplexity,sst2,gsm8k,attention (default: all)")
    ap.add_argument("--stages", default=None, help="comma list of stages (default: pretrain,sft,dpo,verifier)")
    ap.add_argument("--out", default=None, help="results folder (default: RUN_DIR/results)")
    ap.add_argument("--max-docs", type=int, default=None,
                    help="only the first N WikiText articles (default: eval.perplexity_max_documents)")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: the config's device)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per scoring forward, perplexity and SST-2 (default: eval.batch_size)")
    ap.add_argument("--gen-batch-size", type=int, default=None,
                    help="prompts per generation call, GSM8K (default: eval.gen_batch_size)")
    ap.add_argument("--reuse", action="store_true", help="keep up-to-date results instead of evaluating again")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    run = Path(args.stage_checkpoints)
    try:
        if not run.is_dir():
            raise ConfigError(f"--stage-checkpoints: run directory not found: {run}")
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg_path = run / "config.json"
            if not cfg_path.is_file():
                raise ConfigError(f"{cfg_path} not found: pass --config NAME")
            cfg = validate(apply_overrides(config_from_dict(json.loads(cfg_path.read_text())), args.overrides))
        tasks = task_list(args.tasks)
        stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
        unknown = [s for s in stages or () if s not in STAGE_ORDER]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)} (choose from {', '.join(STAGE_ORDER)})")
        for flag, v in (("--batch-size", args.batch_size), ("--gen-batch-size", args.gen_batch_size),
                        ("--max-docs", args.max_docs)):
            if v is not None and v < 1:  # 0 documents used to read as "all", 0 batch size failed after the load
                raise ConfigError(f"{flag} must be >= 1, got {v}")
        resolve_device(args.device or cfg.device)  # a bad or absent device: one line here, not a traceback later
        if not find_stage_checkpoints(run, stages or STAGE_ORDER) and not (args.baseline or args.include_baselines):
            raise ConfigError(f"--stage-checkpoints: no {', '.join(stages or STAGE_ORDER)} checkpoint under "
                              f"{run}/checkpoints, and no baseline to evaluate")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    baselines = list(args.baseline) + (list(cfg.eval.baselines) if args.include_baselines else [])
    command = command_line("scripts/evaluation/evaluate_tasks.py", sys.argv[1:] if argv is None else argv)
    pick = lambda v, default: default if v is None else v  # noqa: E731
    written = evaluate_run(run, cfg, args.out, stages, list(dict.fromkeys(baselines)), tasks,
                           args.device or cfg.device, pick(args.batch_size, cfg.eval.batch_size),
                           pick(args.max_docs, cfg.eval.perplexity_max_documents), command,
                           progress=not args.no_progress,
                           gen_batch_size=pick(args.gen_batch_size, cfg.eval.gen_batch_size), reuse=args.reuse,
                           log=lambda line: print(line, file=sys.stderr))
    for name, files in written.items():
        print(f"{name}: " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
