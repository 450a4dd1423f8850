"""Evaluate stage checkpoints and baselines on every task and write the results JSONs the report reads.

Results folder (default ``<run>/results/``)::

    environment.json                 hardware + software versions of the evaluating machine
    <model>/perplexity.json          WikiText-2, both conventions (mllm.evaluation.perplexity)
    <model>/sst2.json                {"zero_shot", "k_shot"} label-word prompting (mllm.evaluation.sst2)
    <model>/gsm8k.json               greedy / majority / verifier best-of-N + taxonomy (mllm.evaluation.gsm8k)
    <model>/attention.json           attention statistics + observations (+ <model>/attention/*.png)
    <model>/status.json              only for a model that did not run (e.g. a baseline unavailable offline)

``<model>`` is a stage name (pretrain, sft, dpo, verifier) or ``baseline-<name>``. Every file is written by
:func:`mllm.evaluation.common.write_result`: ``{"command", "created", "model", ..., "result"}``. A task that
cannot run (its data is not available) writes ``{"result": {"not_run": "<why>"}}`` so the report says why.

Evaluation data: WikiText-2 ``eval.perplexity_split``; SST-2 validation when available, else a development
split carved from train with ``split_holdout(fraction=data.val_fraction, seed, key="sentence")`` (the rest of
train is the shot pool); GSM8K test when available, else the same kind of carve of train keyed by question
(the SFT stage must hold out the same questions: same fraction, seed and key; see :func:`gsm8k_eval_rows`).
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .common import write_result

TASKS = ("perplexity", "sst2", "gsm8k", "attention")


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------
def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:  # an optional package that is absent or broken is simply reported as absent
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> Dict:
    """Hardware and software of this process: CPU, cores, GPUs, python/torch/triton/transformers versions."""
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "hardware": {"cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "gpus": gpus, "gpu_count": len(gpus),
                     "cuda": torch.version.cuda, "platform": platform.platform()},
        "software": {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                     "transformers": _version("transformers"), "numpy": _version("numpy"),
                     "tiktoken": _version("tiktoken"), "mllm_git_commit": _git_commit()},
    }


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _data_source(cfg):
    return cfg.resolved_data_dir()


def wikitext_lines(cfg, max_documents: Optional[int] = None) -> Dict:
    """{"lines", "source"} of WikiText-2 ``cfg.eval.perplexity_split`` (articles as records)."""
    from mllm.data.datasets import load_wikitext2
    split = cfg.eval.perplexity_split
    docs = load_wikitext2(_data_source(cfg), split=split, max_rows=max_documents)
    return {"lines": [d["text"] for d in docs], "source": f"wikitext-2 (v1, tokenized) {split} split"
            + (f", first {max_documents} articles" if max_documents else "")}


def sst2_rows(cfg) -> Dict:
    """{"eval", "pool", "source"}: validation rows (or a carve of train) and the disjoint train shot pool."""
    from mllm.data.datasets import DatasetError, load_sst2, split_holdout
    src = _data_source(cfg)
    train = load_sst2(src, split="train")
    n = cfg.eval.sst2_examples
    try:
        ev = load_sst2(src, split="validation")
        pool = train
        source = "SST-2 GLUE validation split"
    except DatasetError as e:
        pool, ev = split_holdout(train, cfg.data.val_fraction, seed=cfg.seed, key="sentence")
        source = (f"SST-2 development split carved from train (split_holdout fraction={cfg.data.val_fraction}, "
                  f"seed={cfg.seed}, key=sentence) because the GLUE validation split is not available here")
        unavailable = str(e)
    else:
        unavailable = None
    if n is not None:
        ev = ev[:n]
        source += f", first {n} rows"
    return {"eval": ev, "pool": pool, "source": source, "validation_unavailable": unavailable}


def gsm8k_eval_rows(cfg) -> Dict:
    """{"rows", "source"}: GSM8K test (or the held-out carve of train, keyed by question)."""
    from mllm.data.datasets import DatasetError, load_gsm8k, split_holdout
    src = _data_source(cfg)
    n = cfg.eval.gsm8k_examples
    try:
        rows = load_gsm8k(src, split="test")
        source = "GSM8K test split"
    except DatasetError as e:
        _, rows = split_holdout(load_gsm8k(src, split="train"), cfg.data.val_fraction, seed=cfg.seed, key="question")
        source = (f"GSM8K questions held out of train (split_holdout fraction={cfg.data.val_fraction}, "
                  f"seed={cfg.seed}, key=question) because the test split is not available here")
        unavailable = str(e)
    else:
        unavailable = None
    if n is not None:
        rows = rows[:n]
        source += f", first {n} questions"
    return {"rows": rows, "source": source, "test_unavailable": unavailable}


def gsm8k_template() -> str:
    """The SFT stage's GSM8K prompt template when it defines one (so evaluation prompts like training), else
    :data:`mllm.evaluation.gsm8k.PROMPT_TEMPLATE`."""
    from .gsm8k import PROMPT_TEMPLATE
    try:
        from mllm.stages import sft
    except ImportError:
        return PROMPT_TEMPLATE
    return getattr(sft, "GSM8K_PROMPT_TEMPLATE", PROMPT_TEMPLATE)


# ----------------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------------
def _max_len(model) -> Optional[int]:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "max_seq_len", None) or getattr(model, "max_seq_len", None)


def _load(loader: Callable[[], Dict], cache: Dict, key: str):
    """Load a task's data once per run; a DatasetError becomes {"error": why} (the task is then 'not run')."""
    from mllm.data.datasets import DatasetError
    if key not in cache:
        try:
            cache[key] = loader()
        except DatasetError as e:
            cache[key] = {"error": str(e)}
    return cache[key]


def evaluate_model(model, tokenizer, name: str, cfg, out_dir: str | Path, tasks: Sequence[str] = TASKS,
                   score_fn=None, meta: Optional[Dict] = None, data_cache: Optional[Dict] = None,
                   batch_size: int = 8, max_documents: Optional[int] = None, command: Optional[str] = None,
                   progress: bool = True, gen_batch_size: int = 32) -> Dict[str, Path]:
    """Run ``tasks`` for one model and write ``<out_dir>/<name>/<task>.json``; returns {task: path}.
    ``batch_size``: sequences per scoring forward (perplexity, SST-2); ``gen_batch_size``: prompts per
    generation call (GSM8K)."""
    from .gsm8k import evaluate_gsm8k
    from .perplexity import evaluate_perplexity
    from .sst2 import evaluate_sst2

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: valid tasks are {', '.join(TASKS)}")
    cache = {} if data_cache is None else data_cache
    folder = Path(out_dir) / name
    meta = {"model": name, **(meta or {})}
    max_len = _max_len(model)
    ev = cfg.eval
    written: Dict[str, Path] = {}

    def save(task, result, **extra):
        written[task] = write_result(folder / f"{task}.json", result, command, **meta, **extra)

    if "perplexity" in tasks:
        d = _load(lambda: wikitext_lines(cfg, max_documents), cache, f"wikitext:{max_documents}")
        if "error" in d:
            save("perplexity", {"not_run": f"WikiText-2 {ev.perplexity_split} not available: {d['error']}"})
        else:
            ctx = min(ev.perplexity_context, max_len) if max_len else ev.perplexity_context
            stride = min(ev.perplexity_stride, ctx) if ev.perplexity_stride else None
            res = evaluate_perplexity(model, tokenizer, d["lines"], ctx, stride, batch_size=batch_size,
                                      progress=progress)
            save("perplexity", {**res, "source": d["source"]})
    if "sst2" in tasks:
        d = _load(lambda: sst2_rows(cfg), cache, "sst2")
        if "error" in d:
            save("sst2", {"not_run": f"SST-2 not available: {d['error']}"})
        else:
            res = {"source": d["source"]}
            cal = ("N/A",) if ev.sst2_calibrate else None
            res["zero_shot"] = evaluate_sst2(model, tokenizer, d["eval"], calibrate_with=cal, batch_size=batch_size,
                                             max_len=max_len, seed=cfg.seed, progress=progress)
            res["k_shot"] = (evaluate_sst2(model, tokenizer, d["eval"], d["pool"], shots=ev.sst2_shots, seed=cfg.seed,
                                           calibrate_with=cal, batch_size=batch_size, max_len=max_len,
                                           progress=progress)
                             if ev.sst2_shots > 0 else {"not_run": "eval.sst2_shots = 0"})
            res["validation_unavailable"] = d["validation_unavailable"]
            save("sst2", res)
    if "gsm8k" in tasks:
        d = _load(lambda: gsm8k_eval_rows(cfg), cache, "gsm8k")
        if "error" in d:
            save("gsm8k", {"not_run": f"GSM8K not available: {d['error']}"})
        else:
            res = evaluate_gsm8k(model, tokenizer, d["rows"], n_samples=ev.gsm8k_samples,
                                 temperature=ev.gsm8k_temperature, max_new_tokens=ev.gsm8k_max_new_tokens,
                                 seed=cfg.seed, score_fn=score_fn, template=gsm8k_template(), max_len=max_len,
                                 batch_size=gen_batch_size, progress=progress)
            save("gsm8k", {**res, "source": d["source"], "test_unavailable": d["test_unavailable"]})
    if "attention" in tasks:
        from .attention_maps import analyze
        if not hasattr(model, "attention_maps"):
            save("attention", {"not_run": f"{type(model).__name__} exposes no attention probabilities"})
        else:
            doc = analyze(model, tokenizer, out_dir=folder / "attention")
            doc["figures"] = [os.path.relpath(f, folder.parent) for f in doc["figures"]]
            save("attention", doc)
    return written


# ----------------------------------------------------------------------------------------------------
# A run: every stage checkpoint (+ baselines)
# ----------------------------------------------------------------------------------------------------
def verifier_scorer(checkpoint: Path, device):
    """``score(question, solution) -> float`` from the verifier stage, via ``mllm.stages.verifier.load_scorer
    (checkpoint, device)``; None (and the reason) when the verifier stage does not provide one."""
    try:
        from mllm.stages import verifier
    except ImportError:
        return None, "the verifier stage (mllm.stages.verifier) is not available"
    load = getattr(verifier, "load_scorer", None)
    if load is None:
        return None, "mllm.stages.verifier has no load_scorer(checkpoint, device)"
    return load(checkpoint, device), None


def evaluate_run(run_dir: str | Path, cfg, out_dir: Optional[str | Path] = None, stages: Optional[Sequence[str]] = None,
                 baselines: Sequence[str] = (), tasks: Sequence[str] = TASKS, device: str = "auto",
                 batch_size: int = 8, max_documents: Optional[int] = None, command: Optional[str] = None,
                 progress: bool = True, gen_batch_size: int = 32) -> Dict[str, Dict[str, Path]]:
    """Evaluate every stage checkpoint found in ``run_dir`` and each baseline; write ``environment.json``.
    Returns {model name: {task: results path}}."""
    from .baselines import BaselineUnavailable, load_baseline, skip_record
    from .loading import STAGE_ORDER, find_stage_checkpoints, load_stage_model, resolve_device

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "results"
    dev = resolve_device(device)
    found = find_stage_checkpoints(run_dir, stages or STAGE_ORDER)
    write_result(out / "environment.json", environment_info(), command, model="environment")
    cache: Dict = {}
    written: Dict[str, Dict[str, Path]] = {}
    score_fn, why_no_verifier = (None, f"no verifier checkpoint in {run_dir}")
    if "verifier" in found and "gsm8k" in tasks:
        score_fn, why_no_verifier = verifier_scorer(found["verifier"], dev)
    for stage in (stages or STAGE_ORDER):
        if stage not in found:
            written[stage] = {"status": write_result(out / stage / "status.json", {
                "status": "not run", "reason": f"no {stage} checkpoint in the run",
                "detail": f"{run_dir}/checkpoints/{stage} has no final/latest/step_*.pt"},
                command, model=stage)}
            continue
        from mllm.data.tokenizer import tokenizer_from_config
        model, stage_cfg, meta = load_stage_model(found[stage], dev)
        tok = tokenizer_from_config(stage_cfg.data)
        meta = {**meta, "kind": "stage", "device": str(dev),
                **({"verifier": why_no_verifier} if score_fn is None else {"verifier": str(found["verifier"])})}
        written[stage] = evaluate_model(model, tok, stage, cfg, out, tasks, score_fn, meta, cache, batch_size,
                                        max_documents, command, progress, gen_batch_size)
        del model
    for name in baselines:
        label = f"baseline-{Path(name).name}"
        try:
            model, tok = load_baseline(name, dev)
        except BaselineUnavailable as e:
            written[label] = {"status": write_result(out / label / "status.json",
                                                     skip_record(name, str(e), e.detail), command, model=label)}
            continue
        meta = {"kind": "baseline", "source": name, "device": str(dev)}
        written[label] = evaluate_model(model, tok, label, cfg, out, [t for t in tasks if t != "attention"], None,
                                        meta, cache, batch_size, max_documents, command, progress, gen_batch_size)
        del model
    return written


def task_list(spec: Optional[str]) -> List[str]:
    if not spec:
        return list(TASKS)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"--tasks: unknown task(s) {bad}; valid: {', '.join(TASKS)}")
    return tasks
