"""``report/REPORT.md`` from a results folder (see :mod:`mllm.evaluation.runner`) and the run directory.

Every table is followed by its sources: the results JSON of each row and the command recorded in it (training
numbers come from the run's ``metrics.jsonl``, whose command is reconstructed from ``config.json`` and the run
name, and says so). A number that is not there is printed as ``not run: <why>``, where the reason comes from
the results (a ``not_run`` entry or a ``status.json``) or names the missing file. Nothing is ever left as a
placeholder.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mllm.training.checkpoint import atomic_write_text

from .loading import STAGE_ORDER

TASK_FILES = ("perplexity", "sst2", "gsm8k", "attention")
# the checkpoint each stage starts from (mllm.stages.pipeline): the verifier is trained from SFT, not from DPO,
# so its delta is taken against sft
PARENT = {"sft": "pretrain", "dpo": "sft", "verifier": "sft"}
PUBLISHED_ANCHORS = ("Published anchors for orientation (not measured here): GPT-2 small (124M) WikiText-2 perplexity "
                     "29.41 in the GPT-2 paper (its own detokenised, zero-shot setup) vs 37.37 word perplexity "
                     "in lm-eval-harness (wikitext-2-raw, rolling loglikelihood per document).")


# ----------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------
def fmt_num(x: Any, digits: int = 2) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_delta(x: float, digits: int = 2, pct: bool = False) -> str:
    return f"{100 * x:+.1f} pp" if pct else f"{x:+.{digits}f}"


def not_run(why: str) -> str:
    return f"not run: {why}".replace("|", "/").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# Reading results
# ----------------------------------------------------------------------------------------------------
class Results:
    """The JSONs of a results folder: ``get(model, task) -> (result dict | None, why not, path)``."""

    def __init__(self, results_dir: str | Path, report_dir: Path):
        self.dir = Path(results_dir)
        self.report_dir = report_dir
        if not self.dir.is_dir():
            raise ValueError(f"results folder not found: {self.dir} (run scripts/evaluation/evaluate_tasks.py first)")
        self.docs: Dict[Tuple[str, str], Dict] = {}
        for p in sorted(self.dir.glob("*/*.json")):
            try:
                self.docs[(p.parent.name, p.stem)] = {**json.loads(p.read_text()), "_path": p}
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from e
        env = self.dir / "environment.json"
        try:
            self.env = {**json.loads(env.read_text()), "_path": env} if env.is_file() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{env}:{e.lineno}: invalid JSON: {e.msg}") from e
        st = self.dir / "eval_state.json"  # per-model evaluation times (mllm.evaluation.runner)
        try:
            self.state = {**json.loads(st.read_text()), "_path": st} if st.is_file() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{st}:{e.lineno}: invalid JSON: {e.msg}") from e
        names = {m for m, _ in self.docs}
        # every pipeline stage gets a row, so a stage that never ran is reported as such
        self.stages = list(STAGE_ORDER)
        self.evaluated = [s for s in STAGE_ORDER if any((s, t) in self.docs for t in TASK_FILES)]
        self.baselines = sorted(m for m in names if m.startswith("baseline-"))
        self.others = sorted(names - set(self.stages) - set(self.baselines))

    @property
    def models(self) -> List[str]:
        return self.stages + self.others + self.baselines

    def rel(self, p: Path) -> str:
        return os.path.relpath(p, self.report_dir)

    def get(self, model: str, task: str) -> Tuple[Optional[Dict], str, Optional[Dict]]:
        """(result, why-not, doc). result is None when the task did not run; why-not then says why."""
        status = self.docs.get((model, "status"))
        doc = self.docs.get((model, task))
        if doc is None:
            if status is not None:
                return None, status["result"].get("reason", "skipped"), status
            return None, f"no {self.rel(self.dir / model / (task + '.json'))}", None
        res = doc["result"]
        if isinstance(res, dict) and "not_run" in res:
            return None, res["not_run"], doc
        return res, "", doc

    def sources(self, task: str, models: Optional[Sequence[str]] = None) -> str:
        """Markdown list: model -> results JSON and the command that wrote it."""
        lines = []
        for m in models or self.models:
            for t in ([task] if isinstance(task, str) else task):
                doc = self.docs.get((m, t)) or self.docs.get((m, "status"))
                if doc is not None:
                    lines.append(f"- {m}: [{self.rel(doc['_path'])}]({self.rel(doc['_path'])}), "
                                 f"written {doc.get('created', '?')} by `{doc.get('command', '?')}`")
                    break
        return "Sources:\n" + "\n".join(lines) if lines else "Sources: none (no results JSONs for this table)."


def _sub(res: Optional[Dict], *keys) -> Tuple[Optional[Any], str]:
    """Nested lookup; a level holding {"not_run": why} stops with that reason."""
    cur = res
    for k in keys:
        if not isinstance(cur, dict):
            return None, "missing"
        if "not_run" in cur:
            return None, cur["not_run"]
        if cur.get(k) is None:
            return None, f"no '{k}' in the results"
        cur = cur[k]
    if isinstance(cur, dict) and "not_run" in cur:
        return None, cur["not_run"]
    return cur, ""


# ----------------------------------------------------------------------------------------------------
# Training metrics
# ----------------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line: {e.msg}") from e
    return out


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def training_rows(records: List[Dict], stages: Sequence[str]) -> Dict[str, Dict]:
    """Per stage: steps, tokens, train/wall time, tokens/s, final losses, MFU, device (from metrics.jsonl)."""
    out = {}
    for st in stages:
        recs = [r for r in records if r.get("stage") == st]
        if not recs:
            continue
        train = [r for r in recs if r.get("kind") == "train"]
        vals = [r for r in recs if r.get("kind") == "val" and _num(r.get("val_loss")) is not None]
        ends = [r for r in recs if r.get("kind") == "end"]
        starts = [r for r in recs if r.get("kind") == "start"]
        row: Dict[str, Any] = {"n_records": len(recs)}
        if ends:
            e = ends[-1]
            row.update({k: e.get(k) for k in ("steps", "tokens_seen", "train_time_s", "wall_s", "final_train_loss")})
        elif train:
            row.update({"steps": train[-1].get("step"), "tokens_seen": train[-1].get("tokens_seen")})
        tt, tok = _num(row.get("train_time_s")), _num(row.get("tokens_seen"))
        row["tokens_per_s"] = tok / tt if tt and tok else None
        mfus = [_num(r.get("mfu")) for r in train if _num(r.get("mfu")) is not None]
        row["mfu"] = sum(mfus) / len(mfus) if mfus else None
        if vals:
            row["final_val_loss"] = vals[-1]["val_loss"]
            row["val_records"] = vals
        if starts:
            s = starts[-1]
            row.update({"device": s.get("device"), "world_size": s.get("world_size"), "params": s.get("params"),
                        "peak_flops_note": s.get("peak_flops_note"), "mfu_formula": s.get("mfu_formula"),
                        "tokens_counted": s.get("tokens")})
            # every command that started or resumed the stage, in order (None for runs of older trainers)
            cmds = [r["command"] for r in starts if r.get("command")]
            row["commands"] = list(dict.fromkeys(cmds)) if len(cmds) == len(starts) else None
        out[st] = row
    return out


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------
def _cell(v, why, f=fmt_num):
    return f(v) if v is not None else not_run(why)


def section_environment(R: Results, training: Dict[str, Dict]) -> str:
    parts = ["## Hardware and software"]
    if R.env is None:
        parts.append(not_run(f"no {R.rel(R.dir / 'environment.json')} (written by evaluate_tasks.py)"))
    else:
        e = R.env["result"]
        hw, sw = e["hardware"], e["software"]
        rows = [["evaluation CPU", f"{hw['cpu']} ({hw['cpu_cores']} cores)"],
                ["evaluation GPUs", ", ".join(hw["gpus"]) if hw["gpus"] else "none (CPU only)"],
                ["CUDA", hw["cuda"] or "none"], ["platform", hw["platform"]]]
        rows += [[k, v if v is not None else ("not recorded" if k.startswith("mllm_") else "not installed")]
                 for k, v in sw.items()]
        parts.append(table(["item", "value"], rows))
        parts.append(f"Source: [{R.rel(R.env['_path'])}]({R.rel(R.env['_path'])}), written by `{R.env.get('command')}`")
    if training:
        rows = [[st, str(t.get("device") or "not recorded"), str(t.get("world_size") or "not recorded")]
                for st, t in training.items()]
        parts.append("Training devices (from the `start` records of metrics.jsonl):\n\n"
                     + table(["stage", "device", "ranks"], rows))
    return "\n\n".join(parts)


def section_training(R: Results, training: Dict[str, Dict], run_dir: Optional[Path], cfg_name: str,
                     out_dir: Path) -> str:
    parts = ["## Training: wall-clock and throughput per stage"]
    if run_dir is None:
        return parts[0] + "\n\n" + not_run("no run directory given (make_report.py --run RUN)")
    mpath = run_dir / "metrics.jsonl"
    rows = []
    for st in STAGE_ORDER:
        t = training.get(st)
        if t is None:
            rows.append([st] + [not_run(f"no '{st}' records in {R.rel(mpath)}")] * 7)
            continue
        rows.append([st, _cell(t.get("steps"), "no end record"), _cell(t.get("tokens_seen"), "no end record"),
                     _cell(t.get("train_time_s"), "no end record", lambda v: f"{v:,.1f}"),
                     _cell(t.get("wall_s"), "no end record", lambda v: f"{v:,.1f}"),
                     _cell(t.get("tokens_per_s"), "no end record", lambda v: f"{v:,.0f}"),
                     _cell(t.get("final_train_loss"), "no end record", lambda v: f"{v:.4f}"),
                     _cell(t.get("final_val_loss"), "no val record", lambda v: f"{v:.4f}")])
    parts.append(table(["stage", "steps", "tokens", "train time (s)", "wall (s)", "tokens/s",
                        "final train loss", "final val loss"], rows))
    ev = _eval_times(R)
    if ev:
        parts.append(ev)
    mf = [(st, t) for st, t in training.items() if t.get("mfu") is not None]
    if mf:
        formula = "flops_per_token * tokens_per_s / (peak_flops_per_device * world_size), flops_per_token = 6N + 12*L*H*Q*T"
        # the formula and the peak once when every stage shares them (they do within one run), else per stage
        formulas = {st: t.get("mfu_formula") or formula for st, t in mf}
        peaks = {st: t.get("peak_flops_note") or "not recorded" for st, t in mf}
        line = "MFU (mean over logged steps): " + ", ".join(f"{st} {fmt_pct(t['mfu'])}" for st, t in mf) + "."
        for label, per in (("MFU", formulas), ("Peak", peaks)):
            vals = list(dict.fromkeys(per.values()))
            line += (f" {label} = {vals[0]}." if label == "MFU" and len(vals) == 1 else
                     f" {label}: {vals[0]}." if len(vals) == 1 else
                     f" {label}: " + "; ".join(f"{st}: {v}" for st, v in per.items()) + ".")
        parts.append(line)
    else:
        parts.append("MFU (mean over logged steps): "
                     + not_run("no MFU in metrics.jsonl (CPU runs, or a GPU without a peak-FLOP/s entry)"))
    if training:
        made_by = _training_commands(training, cfg_name, run_dir.name)
        whole = None if made_by else _pipeline_command(R, run_dir)
        if whole:
            made_by = f"`{whole}` (the `--stage all` command recorded in the results JSONs, which ran every stage)"
        elif not made_by:
            made_by = (", ".join(f"`python scripts/run_pipeline.py --config {cfg_name} --stage {st} --run-name "
                                 f"{run_dir.name}`" for st in training)
                       + " (commands reconstructed from config.json and the run name, without the `--set` overrides "
                       "they may have had: config.json holds the resolved values; metrics.jsonl's start records of "
                       "this run do not name their commands)")
        counted = {st: t["tokens_counted"] for st, t in training.items() if t.get("tokens_counted")}
        what = ""
        if counted:
            one = next(iter(counted.values()))
            # the trainer's text already starts "Tokens processed: ..."; others get the label
            what = ((" " + one if one.lower().startswith("tokens") else f" Tokens: {one}")
                    if len(set(counted.values())) == 1 else
                    " Tokens counted: " + "; ".join(f"{st}: {v}" for st, v in counted.items()))
            what = what.rstrip(".") + "."
        parts.append(f"tokens/s = tokens_seen / train_time_s of each stage's `end` record.{what} Source: "
                     f"[{R.rel(mpath)}]({R.rel(mpath)}), written by the trainer during {made_by}.")
    else:
        parts.append(f"Source: {R.rel(mpath)}, which holds no stage records"
                     + ("" if mpath.is_file() else " (the file does not exist)") + ".")
    # loss curves
    figs = ["### Loss curves"]
    for st in STAGE_ORDER:
        src = run_dir / "figures" / f"{st}_loss.png"
        dst = out_dir / "figures" / f"{st}_loss.png"
        made = None
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            made = f"copied from {R.rel(src)}"
        elif st in training:
            from mllm.training.metrics import LOSS_LABELS, plot_loss_curve
            recs = [r for r in read_metrics(mpath) if r.get("stage") == st]
            if plot_loss_curve(recs, dst, title=f"{st} loss", ylabel=LOSS_LABELS.get(st)) is not None:
                made = f"plotted from {R.rel(mpath)}"
        if made:
            figs.append(f"![{st} loss]({os.path.relpath(dst, out_dir)})\n\n*{st}: train and validation loss ({made}).*")
        else:
            figs.append(f"{st}: " + not_run(f"no {R.rel(src)} and no '{st}' loss records in metrics.jsonl"))
    return "\n\n".join(parts + figs)


def _training_commands(training: Dict[str, Dict], cfg_name: str, run_name: str) -> Optional[str]:
    """The commands that trained each stage, from their start records in metrics.jsonl (a stage whose start records
    do not all name one, from an older trainer, gets a reconstructed command, marked so); None when no stage's
    start records name their commands."""
    per_stage = {st: t.get("commands") for st, t in training.items()}
    if not any(per_stage.values()):
        return None
    unique = list(dict.fromkeys(c for cmds in per_stage.values() if cmds for c in cmds))
    if all(per_stage.values()) and len(unique) == 1:
        return f"`{unique[0]}` (recorded in the start record of every stage)"
    parts = []
    for st, cmds in per_stage.items():
        if cmds:
            parts.append(f"{st}: " + ", then ".join(f"`{c}`" for c in cmds))
        else:
            parts.append(f"{st}: `python scripts/run_pipeline.py --config {cfg_name} --stage {st} --run-name "
                         f"{run_name}` (reconstructed: its start records name no command)")
    return "; ".join(parts) + " (the commands recorded in each stage's start records, in order)"


def _pipeline_command(R: Results, run_dir: Path) -> Optional[str]:
    """The ``run_pipeline.py --stage all`` command of this run recorded in the results JSONs (the eval stage of that
    pipeline wrote them), or None when they were written by another command.

    A command that names a run (``--run-name R``) belongs to this run when R is its name. One without ``--run-name``
    (``make smoke``: the name is generated, or ``--resume`` picks the newest run) belongs to it when the JSONs are this
    run's own ``results/`` folder, which only an eval stage running on this run directory writes."""
    own = R.dir.resolve() == (run_dir / "results").resolve()
    for doc in list(R.docs.values()) + ([R.env] if R.env else []):
        cmd = str(doc.get("command") or "")
        try:
            words = shlex.split(cmd)
        except ValueError:  # unbalanced quotes: not a command this report can attribute
            continue
        opts = _long_options(words)
        if not any(w.endswith("run_pipeline.py") for w in words) or opts.get("--stage") != "all":
            continue
        if opts.get("--run-name") == run_dir.name or ("--run-name" not in opts and own):
            return cmd
    return None


def _long_options(words: Sequence[str]) -> Dict[str, Optional[str]]:
    """``--key value`` and ``--key=value`` of a command line as {key: value} (the last one wins, as in argparse)."""
    opts: Dict[str, Optional[str]] = {}
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        key, eq, val = w.partition("=")
        nxt = words[i + 1] if i + 1 < len(words) else None
        opts[key] = val if eq else (nxt if nxt is not None and not nxt.startswith("-") else None)
    return opts


def _eval_times(R: Results) -> str:
    """Evaluation wall-clock per model (all tasks, model loading included) from ``eval_state.json``."""
    if R.state is None:
        return ""
    models = R.state.get("models", {})
    rows = [[m, f"{models[m]['eval_s']:,.1f}", models[m].get("finished", "?")]
            for m in R.models if _num((models.get(m) or {}).get("eval_s")) is not None]
    if not rows:
        return ""
    return ("Evaluation wall-clock per model (all tasks, model loading included):\n\n"
            + table(["model", "eval (s)", "finished"], rows)
            + f"\n\nSource: [{R.rel(R.state['_path'])}]({R.rel(R.state['_path'])}), written by the evaluation "
            f"runner (last invocation: `{(R.state.get('last_invocation') or {}).get('command') or 'not recorded'}`).")


def grouped(items: Sequence[Tuple[str, str, str]]) -> List[str]:
    """``(label, model, text)`` items as lines ``label (model, model, ...): text``, one line per distinct
    (label, text) in first-seen order, so a note shared by every model is printed once."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for label, model, text in items:
        groups.setdefault((label, text), []).append(model)
    return [f"{label} ({', '.join(models)}): {text}" if label else f"{', '.join(models)}: {text}"
            for (label, text), models in groups.items()]


def section_perplexity(R: Results) -> str:
    rows, conventions = [], []
    for m in R.models:
        res, why, _ = R.get(m, "perplexity")
        if res is None:
            rows.append([m] + [not_run(why)] * 6)
            continue
        tok, roll = res["token"], res["rolling"]
        rows.append([m, f"{tok['perplexity']:.2f}", f"{tok['context']}/{tok['stride']}", f"{roll['word_perplexity']:.2f}",
                     f"{roll['byte_perplexity']:.4f}", f"{roll['bits_per_byte']:.4f}", f"{tok['n_tokens']:,}"])
        conventions += [("token ppl", m, tok["convention"]), ("word ppl / bits per byte", m, roll["convention"]),
                        ("data", m, str(res.get("source", "not recorded"))
                         + ("; documents detokenised as lm-eval does" if res.get("detokenized") else ""))]
    out = ["## Perplexity (WikiText-2)",
           table(["model", "token ppl", "context/stride", "word ppl", "byte ppl", "bits/byte", "tokens scored"], rows),
           "Conventions (each number uses the one stated for it):\n" + "\n".join(f"- {c}" for c in grouped(conventions))
           if conventions else "", PUBLISHED_ANCHORS, R.sources("perplexity")]
    return "\n\n".join(x for x in out if x)


def _sst2_acc(res, setting, cal):
    v, why = _sub(res, setting, "calibrated" if cal else "uncalibrated", "accuracy")
    return v, why


def _constant_label(confusion) -> Optional[str]:
    """The label a setting predicted for every example (from its confusion counts gold → predicted), else None."""
    if not isinstance(confusion, dict):
        return None
    try:
        pred = {p: sum(int(confusion[g][p]) for g in ("negative", "positive")) for p in ("negative", "positive")}
    except (KeyError, TypeError, ValueError):
        return None
    if sum(pred.values()) == 0:
        return None
    for p, other in (("negative", "positive"), ("positive", "negative")):
        if pred[other] == 0:
            return f'always "{p}"'
    return None


def section_sst2(R: Results) -> str:
    rows, conf, notes, constant = [], [], [], []
    for m in R.models:
        res, why, _ = R.get(m, "sst2")
        if res is None:
            rows.append([m] + [not_run(why)] * 6)
            continue
        cells = []
        for setting in ("zero_shot", "k_shot"):
            for cal in (False, True):
                v, w = _sst2_acc(res, setting, cal)
                cells.append(fmt_pct(v) if v is not None else not_run(w))
        maj, w = _sub(res, "zero_shot", "majority_class_accuracy")
        n, w2 = _sub(res, "zero_shot", "uncalibrated", "n")
        rows.append([m] + cells + [fmt_pct(maj) if maj is not None else not_run(w), str(n) if n else not_run(w2)])
        k, _ = _sub(res, "k_shot", "shots")
        if k is not None:
            notes.append(("", m, f"k = {k} shots (seed {res['k_shot']['seed']}); data: {res.get('source')}"))
        for setting in ("zero_shot", "k_shot"):
            for cal in ("uncalibrated", "calibrated"):
                c, _ = _sub(res, setting, cal, "confusion")
                label = _constant_label(c)
                if label:
                    constant.append((f"{setting.replace('_', '-')} {cal}", m, label))
        for setting in ("k_shot", "zero_shot"):
            for cal in ("calibrated", "uncalibrated"):
                c, _ = _sub(res, setting, cal, "confusion")
                if c is not None:
                    conf.append([m, f"{setting.replace('_', '-')} {cal}", str(c["negative"]["negative"]),
                                 str(c["negative"]["positive"]), str(c["positive"]["negative"]),
                                 str(c["positive"]["positive"])])
                    break
            else:
                continue
            break
    out = ["## SST-2 (prompted label-word scoring)",
           table(["model", "0-shot", "0-shot calibrated", "k-shot", "k-shot calibrated", "majority class", "n"], rows),
           "Label words \" negative\" / \" positive\" scored after `Review: <sentence>\\nSentiment:`; calibrated = "
           "contextual calibration with the content-free input \"N/A\" (Zhao et al. 2021).",
           ("\n".join(f"- {x}" for x in grouped(notes))) if notes else "",
           ("Settings that gave every example the same label (their accuracy is that label's share of the data, "
            "not a measure of sentiment; from the confusion counts in the JSONs):\n"
            + "\n".join(f"- {x}" for x in grouped([(m, setting, lab) for setting, m, lab in constant])))
           if constant else "",
           "### Confusion counts (gold × predicted)\n\n" + (table(
               ["model", "setting", "neg→neg", "neg→pos", "pos→neg", "pos→pos"], conf) if conf else
               not_run("no SST-2 results")),
           R.sources("sst2")]
    return "\n\n".join(x for x in out if x)


def _gsm(res, key):
    v, why = _sub(res, key, "accuracy")
    if v is None:
        return None, why, ""
    return v, "", f"{fmt_pct(v)} ({res[key]['correct']}/{res[key]['n']})"


def section_gsm8k(R: Results) -> str:
    rows, notes = [], []
    for m in R.models:
        res, why, _ = R.get(m, "gsm8k")
        if res is None:
            rows.append([m] + [not_run(why)] * 4)
            continue
        cells = []
        for key in ("greedy", "majority", "verifier", "oracle"):
            v, w, txt = _gsm(res, key)
            cells.append(txt if v is not None else not_run(w))
        rows.append([m] + cells)
        notes.append(("", m, f"N = {res.get('n_samples')} samples at T = {res.get('temperature')}, "
                             f"max {res.get('max_new_tokens')} new tokens; data: {res.get('source')}"))
    out = ["## GSM8K (exact match)",
           table(["model", "greedy", "majority of N", "verifier best-of-N", "oracle (any of N right)"], rows),
           "Answer = the number after `####`, else the last number (commas, $, signs, trailing period and 5.0 = 5 "
           "normalised); majority-vote ties go to the answer seen first; verifier best-of-N picks the highest-scored "
           "sample (ties: earliest).",
           "\n".join(f"- {x}" for x in grouped(notes)), R.sources("gsm8k")]
    return "\n\n".join(x for x in out if x)


def _task_results(R: Results, model: str) -> Dict[str, Dict]:
    """{task: result, or {"not_run": "<model>: why"}} for the three scored tasks."""
    out = {}
    for t in ("perplexity", "sst2", "gsm8k"):
        res, why, _ = R.get(model, t)
        out[t] = res if res is not None else {"not_run": f"{model}: {why}"}
    return out


def section_deltas(R: Results, run_dir: Optional[Path] = None) -> str:
    """Differences between each stage and the stage it starts from (:data:`PARENT`); a stage trained from another
    checkpoint of its parent than the one evaluated (the parent was trained further afterwards) gets no deltas."""
    from mllm.stages.pipeline import input_mismatch

    metrics = [
        ("token ppl", lambda r: _sub(r["perplexity"], "token", "perplexity"), False),
        ("word ppl", lambda r: _sub(r["perplexity"], "rolling", "word_perplexity"), False),
        ("SST-2 k-shot calibrated", lambda r: _sub(r["sst2"], "k_shot", "calibrated", "accuracy"), True),
        ("SST-2 0-shot", lambda r: _sub(r["sst2"], "zero_shot", "uncalibrated", "accuracy"), True),
        ("GSM8K greedy", lambda r: _sub(r["gsm8k"], "greedy", "accuracy"), True),
        ("GSM8K majority", lambda r: _sub(r["gsm8k"], "majority", "accuracy"), True),
    ]
    rows = []
    for b in STAGE_ORDER:
        a = PARENT.get(b)
        if a is None:
            continue
        ra, rb = _task_results(R, a), _task_results(R, b)
        row = [f"{a} → {b}"]
        stale = input_mismatch(run_dir, b) if run_dir is not None else None
        if stale is not None:
            rows.append(row + [not_run(f"not comparable: {stale}")] + [not_run("not comparable")] * (len(metrics) - 1))
            continue
        for _, get, pct in metrics:
            (va, wa), (vb, wb) = get(ra), get(rb)
            row.append(not_run(wa or wb) if va is None or vb is None else fmt_delta(vb - va, 2, pct))
        rows.append(row)
    return "\n\n".join(["## Stage-wise deltas (stage − the stage it starts from)",
                        table(["transition"] + [m[0] for m in metrics], rows),
                        "Each stage is compared with the checkpoint it was trained from (sft ← pretrain, dpo ← sft, "
                        "verifier ← sft). Perplexity deltas in perplexity units (negative = better); accuracy deltas "
                        "in percentage points. Computed from the perplexity, SST-2 and GSM8K tables above (same "
                        "sources)."])


def _verifier_stage_check(run_dir: Optional[Path], R: Results) -> str:
    """The verifier stage's own check on its dev questions (``summary.json["verifier"]["gsm8k_dev"]``): how well
    its scores separate correct from wrong solutions, which the best-of-N accuracy alone cannot show when the
    generator rarely samples a right answer."""
    summ, spath = _stage_summary(run_dir, "verifier")
    dev = (summ or {}).get("gsm8k_dev")
    if not isinstance(dev, dict):
        return ""
    rows = []
    ss, rv = dev.get("sampled_solutions") or {}, dev.get("reference_vs_samples") or {}
    for label, d in (("greedy", dev.get("greedy")), (f"majority of {dev.get('n_samples')}", dev.get("majority")),
                     ("verifier best-of-N", dev.get("verifier")), ("oracle", dev.get("oracle"))):
        if isinstance(d, dict) and _num(d.get("accuracy")) is not None:
            rows.append([f"dev {label} accuracy", f"{fmt_pct(d['accuracy'])} ({d.get('correct')}/{d.get('n')})"])
    if ss:
        rows.append(["sampled solutions: correct / total", f"{ss.get('positives')}/{ss.get('n')}"])
        rows.append(["AUC, correct vs wrong samples",
                     f"{ss['auc']:.3f}" if _num(ss.get("auc")) is not None else
                     not_run("needs both correct and wrong samples" if ss.get("positives") in (0, ss.get("n"))
                             else "no AUC recorded")])
    if _num(rv.get("auc")) is not None:
        rows.append(["AUC, reference solution vs its question's samples", f"{rv['auc']:.3f}"])
    if _num(rv.get("top1_rate")) is not None:
        rows.append(["reference ranked first among reference + samples",
                     f"{fmt_pct(rv['top1_rate'])} (chance {fmt_pct(rv.get('chance_top1_rate') or 0)})"])
    if not rows:
        return ""
    return ("### The verifier stage's own dev check\n\n"
            f"On {dev.get('n_questions')} held-out GSM8K questions with the SFT generator (the verifier's input "
            "checkpoint). The reference-vs-samples numbers ask whether the verifier scores each question's gold "
            "solution above the model's own samples, which is informative when few samples are right.\n\n"
            + table(["metric", "value"], rows)
            + f"\n\nSource: `verifier.gsm8k_dev` of [{R.rel(spath)}]({R.rel(spath)}), written by run_pipeline.py "
              "when the verifier stage finished.")


def section_verifier(R: Results, run_dir: Optional[Path] = None) -> str:
    rows = []
    for m in R.models:
        res, why, doc = R.get(m, "gsm8k")
        if res is None:
            continue
        g, _, gt = _gsm(res, "greedy")
        mj, wm, mt = _gsm(res, "majority")
        v, wv, vt = _gsm(res, "verifier")
        if v is None:
            reason = wv
            if doc is not None and isinstance(doc.get("verifier"), str) and not doc["verifier"].endswith(".pt"):
                reason = f"{wv} ({doc['verifier']})"
            rows.append([m, gt, mt if mj is not None else not_run(wm), not_run(reason), not_run(reason),
                         not_run(reason)])
            continue
        rows.append([m, gt, mt if mj is not None else not_run(wm), vt, fmt_delta(v - g, pct=True),
                     fmt_delta(v - mj, pct=True) if mj is not None else not_run(wm)])
    body = table(["model", "greedy", "majority of N", "verifier best-of-N", "verifier − greedy",
                  "verifier − majority"], rows) if rows else not_run("no GSM8K results")
    parts = ["## Verifier impact on GSM8K", body,
             "Same samples for majority vote and verifier selection; every row uses the run's verifier "
             "checkpoint as the scorer. Source: the GSM8K table's JSONs."]
    own = _verifier_stage_check(run_dir, R)
    return "\n\n".join(parts + ([own] if own else []))


def section_taxonomy(R: Results, n_examples: int = 2) -> str:
    rows, examples = [], []
    for m in R.models:
        res, why, _ = R.get(m, "gsm8k")
        if res is None:
            rows.append([m] + [not_run(why)] * 4)
            continue
        t = res.get("taxonomy")
        if not isinstance(t, dict) or not {"counts", "n_wrong", "n"} <= set(t):  # written by an older version
            rows.append([m] + [not_run(f"no error taxonomy in {R.rel(R.docs[(m, 'gsm8k')]['_path'])}")] * 4)
            continue
        c = t["counts"]
        rows.append([m, f"{t['n_wrong']}/{t['n']}", str(c["extraction"]), str(c["arithmetic"]), str(c["reasoning"])])
    # examples from the last stage (or model) with results
    for m in reversed(R.models):
        res, _, _ = R.get(m, "gsm8k")
        if res is None:
            continue
        examples.append(f"### Examples ({m}, greedy)")
        for cat in ("extraction", "arithmetic", "reasoning"):
            ex = res["taxonomy"]["examples"].get(cat, [])[:n_examples]
            if not ex:
                examples.append(f"**{cat}**: no examples ({res['taxonomy']['counts'][cat]} errors of this kind).")
                continue
            examples.append(f"**{cat}** ({res['taxonomy']['counts'][cat]} errors):")
            for e in ex:
                sol = e["solution"].strip().replace("\n", " ⏎ ")
                examples.append(f"- Q: {e['question'][:200]}\n  - model: {sol[:300]}\n  - predicted "
                                f"{e['predicted']!s}, gold {e['gold']}"
                                + (f"; wrong step: `{e['wrong_step']}`" if e.get("wrong_step") else ""))
        break
    return "\n\n".join(["## GSM8K error taxonomy (greedy solutions)",
                        table(["model", "wrong", "extraction", "arithmetic", "reasoning"], rows),
                        "extraction = no parsable answer; arithmetic = a computed step (`a op b = c` or `<<a*b=c>>`) "
                        "is wrong; reasoning = every checkable step right but the answer wrong."]
                       + examples + [R.sources("gsm8k")])


def _stage_summary(run_dir: Optional[Path], stage: str) -> Tuple[Optional[Dict], Optional[Path]]:
    """``summary.json[stage]`` of the run (written by run_pipeline.py after the stage), or None."""
    if run_dir is None or not (run_dir / "summary.json").is_file():
        return None, None
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text()).get(stage), path
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def section_dpo(R: Results, training: Dict[str, Dict], run_dir: Optional[Path]) -> str:
    head = "## DPO: reward accuracy and margins (held-out preference pairs)"
    t = training.get("dpo")
    if t is None or not t.get("val_records"):
        why = ("no run directory given" if run_dir is None else
               f"no 'dpo' validation records in {R.rel(run_dir / 'metrics.jsonl')}")
        return head + "\n\n" + not_run(why)
    last = t["val_records"][-1]
    first = t["val_records"][0]
    keys = [k for k in last if any(s in k for s in ("reward", "margin", "acc")) and _num(last[k]) is not None]
    if not keys:
        return head + "\n\n" + not_run("the dpo validation records hold no reward/margin/accuracy metrics")
    rows = [[k, f"{first.get(k, float('nan')):.4f}" if _num(first.get(k)) is not None else "not recorded",
             f"{last[k]:.4f}"] for k in keys]
    parts = [head, table(["metric", f"step {first.get('step')}", f"step {last.get('step')}"], rows),
             "Reward r = β·(log π(y|x) − log π_ref(y|x)) summed over the answer tokens; accuracy = share of pairs with "
             "r_chosen > r_rejected (strict: a tie counts as wrong, so at step 0, where the policy equals the reference "
             "up to float rounding, it is about 0); margin = mean r_chosen − r_rejected.",
             f"Source: `val` records of stage dpo in [{R.rel(run_dir / 'metrics.jsonl')}]"
             f"({R.rel(run_dir / 'metrics.jsonl')}), written by the DPO stage's evaluation."]
    summ, spath = _stage_summary(run_dir, "dpo")
    if summ and _num(summ.get("final_heldout_reward_accuracy")) is not None:
        n, ci = summ.get("heldout_pairs_evaluated"), summ.get("final_heldout_reward_accuracy_ci95")
        line = f"Final held-out reward accuracy {fmt_pct(summ['final_heldout_reward_accuracy'])}"
        if n:
            line += f" on {n:,} pairs"
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(x) is not None for x in ci):
            line += f", 95% Wilson interval [{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]"
            line += (" (above chance: the interval excludes 50%)" if ci[0] > 0.5 else
                     " (not distinguishable from chance: the interval contains 50%)" if ci[1] >= 0.5 else
                     " (below chance)")
        if _num(summ.get("final_train_reward_accuracy")) is not None:
            line += f"; last logged training-batch reward accuracy {fmt_pct(summ['final_train_reward_accuracy'])}"
        parts.append(line + f". Source: `dpo` entry of [{R.rel(spath)}]({R.rel(spath)}), written by "
                            "run_pipeline.py when the stage finished.")
    return "\n\n".join(parts)


def section_attention(R: Results) -> str:
    parts = ["## Attention maps"]
    any_ = False
    for m in R.models:
        res, why, doc = R.get(m, "attention")
        if res is None:
            if not m.startswith("baseline-"):
                parts.append(f"**{m}**: " + not_run(why))
            continue
        any_ = True
        from .attention_maps import observations_markdown
        parts.append(f"### {m}\n\n" + observations_markdown(res, res["observations"], res.get("chance")).strip())
        figs = [f"[layer {i}]({R.rel(R.dir / f)})" for i, f in enumerate(res.get("figures", []))]
        if figs:
            parts.append("Heatmaps: " + ", ".join(figs))
        parts.append(f"Source: [{R.rel(doc['_path'])}]({R.rel(doc['_path'])}), written by `{doc.get('command')}`")
    if not any_ and len(parts) == 1:
        parts.append(not_run("no attention results"))
    return "\n\n".join(parts)


def section_baselines(R: Results) -> str:
    lines = []
    for m in R.baselines:
        st = R.docs.get((m, "status"))
        if st is not None:
            detail = (st["result"].get("detail") or "").replace("\n", " ").replace("`", "'")
            lines.append(f"- {m}: {st['result'].get('reason')}" + (f" (`{detail}`)" if detail else ""))
        else:
            src = R.docs.get((m, "perplexity"), {}).get("source") or m
            lines.append(f"- {m}: evaluated ({src})")
    return "## Baselines\n\n" + ("\n".join(lines) if lines else
                                 "No baselines were requested (the config's eval.baselines is empty for the eval stage; "
                                 "evaluate_tasks.py takes --include-baselines / --baseline NAME).")


def build_report(results_dir: str | Path, run_dir: Optional[str | Path] = None,
                 out_path: str | Path = "report/REPORT.md", command: Optional[str] = None) -> str:
    """Write ``out_path`` (and ``figures/`` beside it) and return the markdown. ``command``: the command line that
    builds the report (named in its header). An existing folder as ``out_path`` means ``<folder>/REPORT.md`` (its
    figures go into the folder, not beside it)."""
    out_path = report_path(out_path)
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    R = Results(results_dir, out_dir)
    run = Path(run_dir) if run_dir is not None else None
    cfg_name, run_name = "not recorded", (run.name if run else "not given")
    if run is not None and (run / "config.json").is_file():
        cfg_name = json.loads((run / "config.json").read_text()).get("name", cfg_name)
    records = read_metrics(run / "metrics.jsonl") if run is not None else []
    training = training_rows(records, STAGE_ORDER)
    params = next((t.get("params") for t in training.values() if t.get("params")), None)
    head = [f"# mllm report: run `{run_name}` (config `{cfg_name}`)",
            f"Generated by `{command or 'mllm.evaluation.report.build_report'}` from measured results only; every "
            "table names the results JSON and the command behind each number, and anything that did not run says "
            "why.",
            table(["item", "value"], [
                ["run directory", R.rel(run) if run is not None else not_run("no --run given")],
                ["results folder", R.rel(R.dir)],
                ["stages evaluated", ", ".join(R.evaluated) or "none"],
                ["baselines", ", ".join(R.baselines) or "none"],
                ["model parameters", f"{params:,}" if params else not_run("no start record in metrics.jsonl")]])]
    sections = [
        "\n\n".join(head), section_environment(R, training), section_training(R, training, run, cfg_name, out_dir),
        section_perplexity(R), section_sst2(R), section_gsm8k(R), section_deltas(R, run), section_verifier(R, run),
        section_taxonomy(R), section_dpo(R, training, run), section_attention(R), section_baselines(R)]
    md = "\n\n".join(sections).rstrip() + "\n"
    # atomic: a reader (or the eval stage's up-to-date check, which goes by the file's time) never sees half a report
    atomic_write_text(out_path, md)
    return md


def report_path(out: str | Path) -> Path:
    """``out`` itself, or ``out/REPORT.md`` when ``out`` is an existing folder."""
    out = Path(out)
    return out / "REPORT.md" if out.is_dir() else out
