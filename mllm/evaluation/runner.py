"""Evaluate stage checkpoints and baselines on every task and write the results JSONs the report reads.

Results folder (default ``<run>/results/``)::

    environment.json                 hardware + software versions of the evaluating machine
    <model>/perplexity.json          WikiText-2, both conventions (mllm.evaluation.perplexity)
    <model>/sst2.json                {"zero_shot", "k_shot"} label-word prompting (mllm.evaluation.sst2)
    <model>/gsm8k.json               greedy / majority / verifier best-of-N + taxonomy (mllm.evaluation.gsm8k)
    <model>/attention.json           attention statistics + observations (+ <model>/attention/*.png)
    <model>/status.json              only for a model that did not run (e.g. a baseline unavailable offline)

    eval_state.json                  what each model's results were computed from (see "Reuse" below)

``<model>`` is a stage name (pretrain, sft, dpo, verifier) or ``baseline-<name>``. Every file is written by
:func:`mllm.evaluation.common.write_result`: ``{"command", "created", "model", ..., "result"}``. A task that
cannot run (its data is not available) writes ``{"result": {"not_run": "<why>"}}`` so the report says why.

Evaluation data: WikiText-2 ``eval.perplexity_split``; SST-2 validation when available, else a development
split carved from train with ``split_holdout(fraction=data.val_fraction, seed, key="sentence")`` (the rest of
train is the shot pool); GSM8K test when available, else the same kind of carve of train keyed by question
(the SFT stage must hold out the same questions: same fraction, seed and key; see :func:`gsm8k_eval_rows`).
When the pretrain stage read the same WikiText split as the perplexity evaluation (local-smoke pretrains on the
first ``data.max_docs`` articles of WikiText-2 validation, the only split on disk), the articles it trained on are
left out: only the articles ``split_holdout(fraction=data.val_fraction, seed)`` held out of pretraining, and those
beyond ``data.max_docs``, are scored (see :func:`wikitext_lines`).

Reuse (``evaluate_run(..., reuse=True)``, the pipeline's ``eval`` stage): ``eval_state.json`` records, per model,
a key = the checkpoint file with its mtime (ns) and size, the verifier checkpoint likewise (its scores enter every
model's GSM8K best-of-N), the tasks, the ``eval`` config section, seed, data folder and ``max_documents``. A model
whose key is unchanged and whose task JSONs all exist and are newer than its checkpoint is not evaluated again.
A skipped (unavailable) baseline is always retried. Code changes are not part of the key: re-evaluate with
``reuse=False`` (``--recompute``) after changing evaluation code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

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


def _git_state() -> Dict[str, Any]:
    """{"commit", "dirty"} of this source tree: ``$MLLM_GIT_COMMIT`` when set (a copied tree whose .git is stale or
    absent, as on the GPU machine; dirty is then unknown), else ``git rev-parse HEAD`` and whether tracked files
    differ from it (``git status --porcelain --untracked-files=no``); None where git cannot tell."""
    named = os.environ.get("MLLM_GIT_COMMIT")
    if named:
        return {"commit": named, "dirty": None}
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return {"commit": None, "dirty": None}
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                            text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(st.stdout.strip()) if st.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment_info() -> Dict:
    """Hardware and software of this process: CPU, cores, GPUs, python/torch/triton/transformers versions, and the
    mllm commit (with ``mllm_git_dirty``: tracked files had uncommitted changes)."""
    gpus = []
    git = _git_state()
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "hardware": {"cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "gpus": gpus, "gpu_count": len(gpus),
                     "cuda": torch.version.cuda, "platform": platform.platform()},
        "software": {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                     "transformers": _version("transformers"), "numpy": _version("numpy"),
                     "tiktoken": _version("tiktoken"), "mllm_git_commit": git["commit"],
                     "mllm_git_dirty": git["dirty"]},
    }


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _data_source(cfg):
    return cfg.resolved_data_dir()


def pretrain_split(name: str, cfg) -> str:
    """The split the pretrain stage reads for text dataset ``name`` (its own rule,
    ``mllm.stages.common.available_split``: ``train`` when on disk or no data folder, else the first split on disk)."""
    from mllm.stages.common import available_split
    return available_split(name, _data_source(cfg))


def pretrained_articles(cfg, split: str) -> Dict[str, Any]:
    """{"texts": set of WikiText article texts the pretrain stage trained on from ``split``, "datasets": names}.

    WikiText-2 and WikiText-103 share their validation and test articles, so either one in
    ``data.pretrain_datasets`` reading ``split`` counts. Trained on = the first ``data.max_docs`` non-empty
    articles minus the ones ``split_holdout(fraction=data.val_fraction, seed)`` held out for pretraining
    validation (exactly the pretrain stage's records ``{"text": article}``, hashed the same way)."""
    from mllm.data.datasets import load_dataset, split_holdout
    texts: set = set()
    names = []
    for name in cfg.data.pretrain_datasets:
        if name not in ("wikitext2", "wikitext103") or pretrain_split(name, cfg) != split:
            continue
        recs = [{"text": r["text"]} for r in load_dataset(name, source=_data_source(cfg), split=split,
                                                          max_rows=cfg.data.max_docs) if r["text"].strip()]
        kept, _ = split_holdout(recs, cfg.data.val_fraction, seed=cfg.seed)
        texts.update(r["text"] for r in kept)
        names.append(name)
    return {"texts": texts, "datasets": names}


def wikitext_lines(cfg, max_documents: Optional[int] = None) -> Dict:
    """{"lines", "source"} of WikiText-2 ``cfg.eval.perplexity_split`` (articles as records), without the
    articles the pretrain stage trained on (:func:`pretrained_articles`); ``max_documents`` keeps the first N of
    what remains."""
    from mllm.data.datasets import DatasetError, load_wikitext2
    split = cfg.eval.perplexity_split
    docs = load_wikitext2(_data_source(cfg), split=split)
    source = f"wikitext-2 (v1, tokenized) {split} split"
    seen = pretrained_articles(cfg, split)
    if seen["texts"]:
        n_all = len(docs)
        docs = [d for d in docs if d["text"] not in seen["texts"]]
        source += (f", the {len(docs)} of {n_all} articles the pretrain stage did not train on (it read "
                   f"{'/'.join(seen['datasets'])} {split}: first data.max_docs={cfg.data.max_docs} articles, of which "
                   f"split_holdout(fraction={cfg.data.val_fraction}, seed={cfg.seed}) held out the ones kept here)")
        if not docs:
            raise DatasetError(f"every WikiText-2 {split} article was used for pretraining (data.pretrain_datasets "
                               f"{cfg.data.pretrain_datasets}, data.val_fraction {cfg.data.val_fraction}): no "
                               "held-out text for perplexity; set eval.perplexity_split to another split")
    if max_documents:
        docs = docs[:max_documents]
        source += f", first {max_documents} articles"
    return {"lines": [d["text"] for d in docs], "source": source}


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
    """{"rows", "source"}: GSM8K test (or the held-out carve of train, keyed by question). Never a question the
    SFT / verifier stages train on: where the data folder holds no train split, they train on the test split
    minus its held-out carve (``mllm.stages.sft.gsm8k_splits``), and the evaluation takes that carve."""
    from mllm.data.datasets import DatasetError, load_gsm8k, split_holdout
    from mllm.stages.common import available_split
    src = _data_source(cfg)
    n = cfg.eval.gsm8k_examples
    holdout = dict(fraction=cfg.data.val_fraction, seed=cfg.seed, key="question")
    try:
        rows = load_gsm8k(src, split="test")
        source = "GSM8K test split"
        if available_split("gsm8k", src) == "test":
            _, rows = split_holdout(rows, **holdout)
            source = (f"GSM8K test questions held out of the SFT/verifier training (split_holdout fraction="
                      f"{cfg.data.val_fraction}, seed={cfg.seed}, key=question): the data folder has no train split, "
                      "so those stages train on the rest of the test split")
    except DatasetError as e:
        _, rows = split_holdout(load_gsm8k(src, split="train"), **holdout)
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


STATE_FILE = "eval_state.json"


def _file_sig(path: Optional[Path]) -> Optional[Dict[str, Any]]:
    from mllm.training.checkpoint import file_identity

    return None if path is None else file_identity(path)


def _folder_sig(name: str) -> Optional[List[Dict[str, Any]]]:
    """File signatures of a local baseline folder (hub names: None): new weights in the same folder must not
    reuse the old results."""
    p = Path(name).expanduser()  # as load_baseline reads it
    if not p.is_dir():
        return None
    return [_file_sig(f) for f in sorted(p.rglob("*")) if f.is_file()]


def model_key(source: Dict[str, Any], cfg, tasks: Sequence[str], max_documents: Optional[int],
              verifier: Optional[Path]) -> Dict[str, Any]:
    """What one model's results depend on (see "Reuse" in the module docstring); ``source`` names the model:
    ``{"checkpoint": _file_sig(...)}`` or ``{"baseline": name}``."""
    ev = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "baselines"}
    # the data keys choose the scored rows: which WikiText articles were pretrained on (pretrain_datasets,
    # max_docs) and the held-out carves of SST-2 / GSM8K (val_fraction); cache_dir only says where shards live
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
    return json.loads(json.dumps({**source, "tasks": list(tasks), "eval": ev, "data": data, "seed": cfg.seed,
                                  "data_dir": cfg.resolved_data_dir(), "max_documents": max_documents,
                                  "verifier": _file_sig(verifier) if "gsm8k" in tasks else None}))


def read_state(out: Path) -> Dict[str, Any]:
    """``<out>/eval_state.json`` ({"models": {name: {"key", "finished", "eval_s"}}}); empty when absent or bad."""
    try:
        data = json.loads((Path(out) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"models": {}}
    return data if isinstance(data.get("models"), dict) else {"models": {}}


def _write_state(out: Path, state: Dict[str, Any]) -> None:
    path = Path(out) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_up_to_date(out: Path, name: str, key: Dict[str, Any], tasks: Sequence[str], state: Dict[str, Any]) -> bool:
    """``name``'s results can be reused: same key in the state, and every task JSON exists and is not older than
    the checkpoint it was computed from."""
    entry = state.get("models", {}).get(name)
    if not entry or entry.get("key") != key:
        return False
    ck = (key.get("checkpoint") or {}).get("mtime_ns", 0)
    for t in tasks:
        p = Path(out) / name / f"{t}.json"
        if not p.is_file() or p.stat().st_mtime_ns < ck:
            return False
    return True


def plan_run(run_dir: str | Path, cfg, out_dir: Optional[str | Path] = None, stages: Optional[Sequence[str]] = None,
             baselines: Sequence[str] = (), tasks: Sequence[str] = TASKS,
             max_documents: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """{model: {"key", "tasks", "checkpoint" (stages), "up_to_date"}} for every stage checkpoint found in
    ``run_dir`` and every baseline, without loading any model (the pipeline uses it to tell whether the eval
    stage is complete)."""
    from .loading import STAGE_ORDER, find_stage_checkpoints

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "results"
    unknown = [s for s in (stages or ()) if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGE_ORDER)}")
    found = find_stage_checkpoints(run_dir, stages or STAGE_ORDER)
    # the verifier reranks GSM8K samples of every evaluated stage, whether or not it is evaluated itself
    verifier = find_stage_checkpoints(run_dir, ["verifier"]).get("verifier")
    state = read_state(out)
    plan: Dict[str, Dict[str, Any]] = {}
    for stage in (stages or STAGE_ORDER):
        if stage in found:
            key = model_key({"checkpoint": _file_sig(found[stage])}, cfg, tasks, max_documents, verifier)
            plan[stage] = {"key": key, "tasks": list(tasks), "checkpoint": found[stage],
                           "up_to_date": is_up_to_date(out, stage, key, tasks, state)}
    btasks = [t for t in tasks if t != "attention"]
    for name in baselines:
        label = f"baseline-{Path(name).name}"
        key = model_key({"baseline": name, "files": _folder_sig(name)}, cfg, btasks, max_documents, None)
        plan[label] = {"key": key, "tasks": btasks, "up_to_date": is_up_to_date(out, label, key, btasks, state)}
    return plan


def evaluate_run(run_dir: str | Path, cfg, out_dir: Optional[str | Path] = None, stages: Optional[Sequence[str]] = None,
                 baselines: Sequence[str] = (), tasks: Sequence[str] = TASKS, device: str = "auto",
                 batch_size: int = 8, max_documents: Optional[int] = None, command: Optional[str] = None,
                 progress: bool = True, gen_batch_size: int = 32, reuse: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Path]]:
    """Evaluate every stage checkpoint found in ``run_dir`` and each baseline; write ``environment.json`` and
    ``eval_state.json``. With ``reuse``, models whose results are up to date (:func:`is_up_to_date`) are not
    evaluated again. ``log(line)`` gets one line per model. Returns {model name: {task: results path}}."""
    from .baselines import BaselineUnavailable, load_baseline, skip_record
    from .loading import STAGE_ORDER, find_stage_checkpoints, load_stage_model, resolve_device

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "results"
    say = log or (lambda line: None)
    dev = resolve_device(device)
    plan = plan_run(run_dir, cfg, out, stages, baselines, tasks, max_documents)
    found = {s: p["checkpoint"] for s, p in plan.items() if "checkpoint" in p}
    verifier_ckpt = find_stage_checkpoints(run_dir, ["verifier"]).get("verifier")  # also when not evaluated
    state = read_state(out)  # entries of models not evaluated now stay valid for later reuse
    state["last_invocation"] = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "evaluated": [], "reused": [], "skipped": []}
    cache: Dict = {}
    written: Dict[str, Dict[str, Path]] = {}

    def reused(name: str) -> bool:
        if not (reuse and plan[name]["up_to_date"]):
            return False
        written[name] = {t: out / name / f"{t}.json" for t in plan[name]["tasks"]}
        state["last_invocation"]["reused"].append(name)
        say(f"{name}: results up to date (newer than {plan[name].get('checkpoint') or 'the last run'}), reused")
        return True

    def done(name: str, t0: float) -> None:
        (out / name / "status.json").unlink(missing_ok=True)  # a stale "not run" record from an earlier invocation
        wall = time.perf_counter() - t0
        state["models"][name] = {"key": plan[name]["key"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "eval_s": round(wall, 3)}
        state["last_invocation"]["evaluated"].append(name)
        _write_state(out, state)  # after each model, so an interrupted evaluation keeps what it finished
        say(f"{name}: evaluated in {wall:.1f} s")

    if not (reuse and all(p["up_to_date"] for p in plan.values()) and (out / "environment.json").is_file()):
        write_result(out / "environment.json", environment_info(), command, model="environment")
    score_fn, why_no_verifier = (None, f"no verifier checkpoint in {run_dir}" if verifier_ckpt is None else
                                 "not used: GSM8K is not among the tasks evaluated")
    for stage in (stages or STAGE_ORDER):
        if stage not in found:
            state["models"].pop(stage, None)
            for t in TASKS:  # results of a checkpoint that is gone must not be reported as this run's
                (out / stage / f"{t}.json").unlink(missing_ok=True)
            written[stage] = {"status": write_result(out / stage / "status.json", {
                "status": "not run", "reason": f"no {stage} checkpoint in the run",
                "detail": f"{run_dir}/checkpoints/{stage} has no final/latest/step_*.pt"},
                command, model=stage)}
            continue
        if reused(stage):
            continue
        if score_fn is None and verifier_ckpt is not None and "gsm8k" in tasks:
            score_fn, why_no_verifier = verifier_scorer(verifier_ckpt, dev)
        from mllm.data.tokenizer import tokenizer_from_config
        t0 = time.perf_counter()
        model, stage_cfg, meta = load_stage_model(found[stage], dev)
        tok = tokenizer_from_config(stage_cfg.data)
        meta = {**meta, "kind": "stage", "device": str(dev),
                **({"verifier": why_no_verifier} if score_fn is None else {"verifier": str(verifier_ckpt)})}
        written[stage] = evaluate_model(model, tok, stage, cfg, out, tasks, score_fn, meta, cache, batch_size,
                                        max_documents, command, progress, gen_batch_size)
        del model
        done(stage, t0)
    for name in baselines:
        label = f"baseline-{Path(name).name}"
        if reused(label):
            continue
        t0 = time.perf_counter()
        try:
            model, tok = load_baseline(name, dev)
        except BaselineUnavailable as e:
            state["models"].pop(label, None)
            written[label] = {"status": write_result(out / label / "status.json",
                                                     skip_record(name, str(e), e.detail), command, model=label)}
            state["last_invocation"]["skipped"].append(label)
            say(f"{label}: {e}")
            continue
        meta = {"kind": "baseline", "source": name, "device": str(dev)}
        written[label] = evaluate_model(model, tok, label, cfg, out, plan[label]["tasks"], None,
                                        meta, cache, batch_size, max_documents, command, progress, gen_batch_size)
        del model
        done(label, t0)
    state["last_invocation"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_state(out, state)
    return written


def task_list(spec: Optional[str]) -> List[str]:
    if not spec:
        return list(TASKS)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"--tasks: unknown task(s) {bad}; valid: {', '.join(TASKS)}")
    return tasks
