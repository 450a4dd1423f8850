"""The report generator on a small fake results folder: no placeholder left, numbers match the JSONs, missing
results say why; and the evaluate_tasks -> make_report path end to end on a tiny checkpoint."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from mllm.evaluation.common import write_result
from mllm.evaluation.report import build_report

ROOT = Path(__file__).resolve().parents[1]
CMD = "python scripts/evaluation/evaluate_tasks.py --stage-checkpoints RUN"


def _script(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ppl(tok_ppl, word_ppl, bpb):
    conv = "token-level perplexity, sliding window (HF perplexity guide): context=128, stride=128"
    return {"token": {"perplexity": tok_ppl, "context": 128, "stride": 128, "n_tokens": 5000, "convention": conv},
            "rolling": {"word_perplexity": word_ppl, "byte_perplexity": 2.5, "bits_per_byte": bpb,
                        "convention": "lm-eval-harness rolling loglikelihood"},
            "detokenized": True, "source": "wikitext-2 validation"}


def _sst2(z, zc, k, kc):
    def one(acc, n=40):
        c = round(acc * n)
        return {"accuracy": acc, "correct": c, "n": n,
                "confusion": {"negative": {"negative": c // 2, "positive": 20 - c // 2},
                              "positive": {"negative": 20 - (c - c // 2), "positive": c - c // 2}}}
    return {"source": "SST-2 dev carve",
            "zero_shot": {"uncalibrated": one(z), "calibrated": one(zc), "shots": 0, "seed": 1,
                          "majority_class_accuracy": 0.55},
            "k_shot": {"uncalibrated": one(k), "calibrated": one(kc), "shots": 2, "seed": 1,
                       "majority_class_accuracy": 0.55}}


def _gsm(g, m, v=None):
    acc = lambda c: {"accuracy": c / 8, "correct": c, "n": 8}  # noqa: E731
    return {"greedy": acc(g), "majority": {**acc(m), "n_samples": 4},
            "verifier": {**acc(v), "n_samples": 4} if v is not None else {"not_run": "no verifier score function given"},
            "oracle": {**acc(max(g, m) + 1), "n_samples": 4}, "n_samples": 4, "temperature": 0.7,
            "max_new_tokens": 48, "source": "GSM8K held-out carve",
            "taxonomy": {"counts": {"correct": g, "extraction": 8 - g - 2, "arithmetic": 1, "reasoning": 1},
                         "n_wrong": 8 - g, "n": 8,
                         "examples": {"extraction": [{"question": "How many eggs?", "solution": "eggs eggs",
                                                      "predicted": None, "gold": "7", "wrong_step": None}],
                                      "arithmetic": [{"question": "Sum?", "solution": "2 + 2 = 5\n#### 5",
                                                      "predicted": "5", "gold": "4",
                                                      "wrong_step": "2 + 2 = 5 (actually 4)"}],
                                      "reasoning": []}}}


@pytest.fixture
def fake(tmp_path):
    run = tmp_path / "runs" / "smoke-1"
    res = run / "results"
    (run).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": "local-smoke"}))
    write_result(res / "environment.json", {"hardware": {"cpu": "Test CPU", "cpu_cores": 2, "gpus": [], "gpu_count": 0,
                                                         "cuda": None, "platform": "Linux"},
                                            "software": {"python": "3.11", "torch": "2.13.0", "triton": "3.9.0",
                                                         "transformers": None, "mllm_git_commit": "abc123",
                                                         "mllm_git_dirty": None}}, CMD, model="environment")
    meta = dict(command=CMD)
    write_result(res / "pretrain" / "perplexity.json", _ppl(812.3456, 2345.678, 2.71828), **meta, model="pretrain")
    write_result(res / "sft" / "perplexity.json", _ppl(701.25, 2001.5, 2.5), **meta, model="sft")
    write_result(res / "pretrain" / "sst2.json", _sst2(0.5, 0.525, 0.55, 0.6), **meta, model="pretrain")
    write_result(res / "sft" / "sst2.json", _sst2(0.575, 0.6, 0.625, 0.675), **meta, model="sft")
    write_result(res / "pretrain" / "gsm8k.json", _gsm(0, 1), **meta, model="pretrain")
    write_result(res / "sft" / "gsm8k.json", _gsm(1, 2, 3), **meta, model="sft")
    write_result(res / "dpo" / "perplexity.json", {"not_run": "WikiText-2 test not available"}, **meta, model="dpo")
    write_result(res / "baseline-gpt2" / "status.json",
                 {"name": "gpt2", "status": "skipped", "reason": "skipped: gpt2 not available offline",
                  "detail": "OSError: no cache"}, **meta, model="baseline-gpt2")
    write_result(res / "pretrain" / "attention.json",
                 {"layers": [{"layer": 0, "mean_first_mass": 0.61, "mean_local_mass": 0.2, "mean_self_mass": 0.1,
                              "mean_entropy": 1.234, "mean_mean_distance": 5.5, "heads": []}],
                  "observations": ["Sink heads (> 50% of attention on the first token): 1 of 2: L0H1 (91%)."],
                  "figures": ["pretrain/attention/layer_0.png"]}, **meta, model="pretrain")
    (res / "eval_state.json").write_text(json.dumps({"models": {"pretrain": {"key": {}, "eval_s": 12.345,
                                                                         "finished": "2026-11-26T02:00:00+0000"}},
                                                      "last_invocation": {"command": CMD}}))
    recs = [{"stage": "pretrain", "step": 0, "kind": "start", "device": "cpu", "world_size": 1, "params": 123456},
            {"stage": "pretrain", "step": 0, "kind": "val", "val_loss": 10.5},
            {"stage": "pretrain", "step": 5, "kind": "train", "loss": 9.0, "tokens_per_s": 1000.0, "mfu": None},
            {"stage": "pretrain", "step": 10, "kind": "train", "loss": 8.0, "tokens_per_s": 1100.0, "mfu": None},
            {"stage": "pretrain", "step": 10, "kind": "val", "val_loss": 8.25},
            {"stage": "pretrain", "step": 10, "kind": "end", "steps": 10, "tokens_seen": 20480, "train_time_s": 16.0,
             "wall_s": 20.5, "final_train_loss": 8.0},
            {"stage": "dpo", "step": 0, "kind": "val", "val_loss": 0.69, "val_reward_acc": 0.5, "val_margin": 0.0},
            {"stage": "dpo", "step": 20, "kind": "val", "val_loss": 0.6, "val_reward_acc": 0.6875, "val_margin": 0.1234}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "summary.json").write_text(json.dumps({"dpo": {"final_heldout_reward_accuracy": 0.6875,
                                                          "heldout_pairs_evaluated": 256,
                                                          "final_heldout_reward_accuracy_ci95": [0.6282, 0.7413],
                                                          "final_train_reward_accuracy": 0.75},
                                                  "verifier": {"gsm8k_dev": {
                                                      "n_questions": 16, "n_samples": 4,
                                                      "greedy": {"accuracy": 0.0625, "correct": 1, "n": 16},
                                                      "sampled_solutions": {"n": 64, "positives": 0, "auc": None},
                                                      "reference_vs_samples": {"auc": 0.8105, "top1_rate": 0.5625,
                                                                               "chance_top1_rate": 0.2}}}}))
    return run


def test_report_from_fake_results(fake, tmp_path):
    out = tmp_path / "report" / "REPORT.md"
    md = build_report(fake / "results", fake, out, command="python scripts/make_report.py --run X")
    assert out.read_text() == md
    assert "Generated by `python scripts/make_report.py --run X`" in md
    # DPO: the final held-out accuracy with its sample size and interval, from summary.json
    assert ("Final held-out reward accuracy 68.8% on 256 pairs, 95% Wilson interval [62.8%, 74.1%] (above chance: "
            "the interval excludes 50%); last logged training-batch reward accuracy 75.0%") in md
    assert "(fill)" not in md.lower() and "todo" not in md.lower() and "nan" not in md.split()
    # numbers formatted from the JSONs
    for s in ["812.35", "701.25", "2345.68", "2001.50", "2.7183", "128/128",           # perplexity
              "50.0%", "52.5%", "55.0%", "60.0%", "67.5%", "55.0%",                      # SST-2
              "0.0% (0/8)", "12.5% (1/8)", "25.0% (2/8)", "37.5% (3/8)",                 # GSM8K
              "-111.10", "+7.5 pp", "+12.5 pp",                                          # deltas
              "+25.0 pp", "+12.5 pp",                                                    # verifier − greedy / − majority
              "| sft | 7/8 | 5 | 1 | 1 |", "2 + 2 = 5 (actually 4)",                     # taxonomy
              "20,480", "16.0", "20.5", "1,280", "8.0000", "8.2500",                       # training (20480/16 = 1280 tok/s)
              "0.6875", "0.1234",                                                         # DPO val records
              "Test CPU (2 cores)", "123,456", "L0H1 (91%)", "61%",
              "| pretrain | 12.3 | 2026-11-26T02:00:00+0000 |",
              "| transformers | not installed |", "| mllm_git_commit | abc123 |", "| mllm_git_dirty | not recorded |"]:                            # eval time (eval_state)
        assert s in md, s
    # the verifier stage's own dev check, from summary.json
    for x in ["| dev greedy accuracy | 6.2% (1/16) |", "| sampled solutions: correct / total | 0/64 |",
              "| AUC, correct vs wrong samples | not run: needs both correct and wrong samples |",
              "| AUC, reference solution vs its question's samples | 0.810 |",
              "| reference ranked first among reference + samples | 56.2% (chance 20.0%) |"]:
        assert x in md, x
    # notes shared by several models are printed once, naming the models
    assert "- pretrain, sft: k = 2 shots (seed 1); data: SST-2 dev carve" in md
    assert md.count("token-level perplexity, sliding window") == 1 and "- token ppl (pretrain, sft): " in md
    # deltas follow the pipeline's lineage: the verifier is trained from sft, not from dpo
    assert "| pretrain → sft |" in md and "| sft → dpo |" in md and "| sft → verifier |" in md
    assert "dpo → verifier" not in md
    # missing results say why
    assert "not run: WikiText-2 test not available" in md
    assert "not run: skipped: gpt2 not available offline" in md and "OSError: no cache" in md
    assert "not run: no ../runs/smoke-1/results/verifier/perplexity.json" in md
    assert "not run: no 'sft' records in" in md
    assert "not run: no verifier score function given" in md
    # traceability: each table names JSONs and the command
    assert md.count(f"by `{CMD}`") >= 8 and "results/sft/gsm8k.json" in md and "metrics.jsonl" in md
    assert "run_pipeline.py --config local-smoke --stage pretrain --run-name smoke-1" in md
    # a loss curve was plotted from metrics.jsonl
    assert (out.parent / "figures" / "pretrain_loss.png").is_file() and "figures/pretrain_loss.png" in md


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="results folder not found"):
        build_report(tmp_path / "none", None, tmp_path / "r.md")
    (tmp_path / "res" / "x").mkdir(parents=True)
    (tmp_path / "res" / "x" / "sst2.json").write_text("{bad")
    with pytest.raises(ValueError, match="sst2.json:1: invalid JSON"):
        build_report(tmp_path / "res", None, tmp_path / "r.md")


def test_evaluate_tasks_then_make_report(tmp_path, data_dir):
    """The two scripts on a tiny checkpoint: every stage found is evaluated, missing ones are reported."""
    from mllm.config import load_config
    from mllm.models import Transformer
    from mllm.training.checkpoint import save_checkpoint

    cfg = load_config("local-smoke", ["model.vocab_size=257", "model.d_model=32", "model.n_layers=1",
                                      "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=32",
                                      "data.tokenizer=byte", "eval.sst2_examples=4", "eval.sst2_shots=1",
                                      "eval.gsm8k_examples=2", "eval.gsm8k_samples=2", "eval.gsm8k_max_new_tokens=8",
                                      "eval.perplexity_context=64"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints" / "pretrain", 2, {"model": Transformer(cfg.model).state_dict(),
                                                          "config": cfg.to_dict(), "stage": "pretrain", "step": 2},
                    final=True)
    ev = _script("evaluate_tasks", "scripts/evaluation/evaluate_tasks.py")
    assert ev.main(["--stage-checkpoints", str(run), "--max-docs", "1", "--no-progress", "--device", "cpu",
                    "--baseline", "mllm-test/no-such-model", "--stages", "pretrain,sft"]) == 0
    ppl = json.loads((run / "results" / "pretrain" / "perplexity.json").read_text())
    assert ppl["step"] == 2 and "evaluate_tasks.py" in ppl["command"] and ppl["result"]["token"]["perplexity"] > 1
    assert json.loads((run / "results" / "sft" / "status.json").read_text())["result"]["status"] == "not run"
    # --reuse: the pretrain results are newer than its checkpoint, so nothing is evaluated again
    assert ev.main(["--stage-checkpoints", str(run), "--max-docs", "1", "--no-progress", "--device", "cpu",
                    "--stages", "pretrain", "--reuse"]) == 0
    inv = json.loads((run / "results" / "eval_state.json").read_text())["last_invocation"]
    assert inv["reused"] == ["pretrain"] and inv["evaluated"] == []
    assert json.loads((run / "results" / "pretrain" / "perplexity.json").read_text()) == ppl
    rep = _script("make_report", "scripts/make_report.py")
    out = tmp_path / "report" / "REPORT.md"
    assert rep.main(["--run", str(run), "--out", str(out)]) == 0
    md = out.read_text()
    assert f"Generated by `python scripts/make_report.py --run {run} --out {out}`" in md
    env = json.loads((run / "results" / "environment.json").read_text())["result"]["software"]
    assert isinstance(env["mllm_git_dirty"], bool) and len(env["mllm_git_commit"]) == 40
    assert f"{ppl['result']['token']['perplexity']:.2f}" in md
    assert "not run: no sft checkpoint in the run" in md
    assert "skipped: mllm-test/no-such-model not available offline" in md
    assert ev.main(["--stage-checkpoints", str(tmp_path / "nope")]) == 2


def _cites_pipeline_command(fake, tmp_path, cmd):
    """Record ``cmd`` as the results' command; the report must name it as the one that trained every stage."""
    env = fake / "results" / "environment.json"
    env.write_text(env.read_text().replace(CMD, cmd))
    md = build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")
    assert f"written by the trainer during `{cmd}` (the `--stage all` command" in md
    assert "commands reconstructed" not in md
    return env


def test_training_source_names_the_pipeline_command(fake, tmp_path):
    """Results written by `--stage all` of this run name the command that trained every stage too."""
    env = _cites_pipeline_command(
        fake, tmp_path, "python scripts/run_pipeline.py --config local-smoke --stage all --run-name smoke-1 --no-progress")
    # another run's pipeline command does not count
    env.write_text(env.read_text().replace("smoke-1", "smoke-2"))
    md = build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")
    assert "commands reconstructed" in md
    env.write_text(env.read_text().replace("--run-name smoke-2", f"--run-name={fake.name}"))
    assert "commands reconstructed" not in build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")


def test_training_source_names_a_pipeline_command_without_run_name(fake, tmp_path):
    """`make smoke` runs `--stage all` without --run-name (the name is generated): the JSONs in the run's own results
    folder name that command; the same JSONs read as another folder's results do not."""
    cmd = "python scripts/run_pipeline.py --config local-smoke --stage all --no-progress"
    env = _cites_pipeline_command(fake, tmp_path, cmd)
    elsewhere = tmp_path / "copied_results"
    shutil.copytree(fake / "results", elsewhere)
    md = build_report(elsewhere, fake, tmp_path / "r2" / "REPORT.md")
    assert "commands reconstructed" in md and f"written by the trainer during `{cmd}`" not in md
    # a single stage of the pipeline is not the command that trained every stage
    env.write_text(env.read_text().replace("--stage all", "--stage eval"))
    assert "commands reconstructed" in build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")


def test_grouped_notes():
    from mllm.evaluation.report import grouped

    items = [("data", "a", "x"), ("data", "b", "y"), ("data", "c", "x"), ("", "a", "n"), ("", "b", "n")]
    assert grouped(items) == ["data (a, c): x", "data (b): y", "a, b: n"]


def test_sst2_constant_predictions_are_named(tmp_path):
    from mllm.evaluation.report import _constant_label

    assert _constant_label({"negative": {"negative": 29, "positive": 0}, "positive": {"negative": 35, "positive": 0}}) \
        == 'always "negative"'
    assert _constant_label({"negative": {"negative": 0, "positive": 3}, "positive": {"negative": 0, "positive": 5}}) \
        == 'always "positive"'
    assert _constant_label({"negative": {"negative": 2, "positive": 1}, "positive": {"negative": 0, "positive": 5}}) \
        is None
    res = _sst2(0.5, 0.525, 0.55, 0.6)
    res["zero_shot"]["uncalibrated"] = {"accuracy": 0.45, "correct": 18, "n": 40,
                                        "confusion": {"negative": {"negative": 18, "positive": 0},
                                                      "positive": {"negative": 22, "positive": 0}}}
    write_result(tmp_path / "res" / "pretrain" / "sst2.json", res, CMD, model="pretrain")
    md = build_report(tmp_path / "res", None, tmp_path / "r" / "REPORT.md")
    assert '- pretrain (zero-shot uncalibrated): always "negative"' in md
    assert md.count("always ") == 1


def test_out_folder_means_report_md_inside_it(fake, tmp_path, capsys):
    """`make_report.py --out DIR` with an existing folder writes DIR/REPORT.md and DIR/figures/ (it used to write the
    figures beside DIR — `--out /tmp` put them in /figures — and then fail writing a file over the folder)."""
    (fake / "figures").mkdir(exist_ok=True)
    (fake / "figures" / "pretrain_loss.png").write_bytes(b"png")
    out = tmp_path / "nested" / "outdir"
    out.mkdir(parents=True)
    rep = _script("make_report", "scripts/make_report.py")
    assert rep.main(["--run", str(fake), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'REPORT.md'}"
    assert (out / "REPORT.md").is_file() and (out / "figures" / "pretrain_loss.png").read_bytes() == b"png"
    assert not (out.parent / "figures").exists()
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "figures"]  # no temp file left behind


def test_default_out_is_the_runs_report_folder(fake, tmp_path, monkeypatch, capsys):
    """Without --out the report goes where the eval stage puts it, RUN/report/REPORT.md: the old default,
    report/REPORT.md under the working directory, overwrote the committed sample when run from the repo root."""
    monkeypatch.chdir(tmp_path)
    rep = _script("make_report", "scripts/make_report.py")
    assert rep.main(["--run", str(fake)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {fake / 'report' / 'REPORT.md'}"
    assert (fake / "report" / "REPORT.md").is_file() and not (tmp_path / "report").exists()


def test_training_source_names_the_commands_of_the_start_records(fake, tmp_path):
    """The trainer records its command (with its --set overrides) in each start record; the report names those
    commands, one per start or resume, before any reconstruction."""
    first = "python scripts/run_pipeline.py --stage pretrain --run-name smoke-1 --set pretrain.steps=5"
    again = "python scripts/run_pipeline.py --stage pretrain --run-name smoke-1 --resume --set pretrain.steps=10"
    mpath = fake / "metrics.jsonl"
    recs = [json.loads(line) for line in mpath.read_text().splitlines()]
    recs[0]["command"] = first
    recs.insert(3, {**recs[0], "step": 5, "command": again})
    mpath.write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")
    assert (f"written by the trainer during pretrain: `{first}`, then `{again}`; dpo: `python scripts/run_pipeline.py "
            "--config local-smoke --stage dpo --run-name smoke-1` (reconstructed: its start records name no command) "
            "(the commands recorded in each stage's start records, in order)") in md  # the fake dpo has no start
    assert "commands reconstructed" not in md
    # a start record without a command (an older trainer): that stage's commands are not known
    del recs[3]["command"]
    mpath.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert "commands reconstructed" in build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")


def test_deltas_skip_a_stage_trained_from_an_older_input_checkpoint(fake, tmp_path):
    """After `--stage pretrain --resume --set pretrain.steps=22`, sft (trained from pretrain's step 20) is no longer
    "compared with the checkpoint it was trained from": its delta row says why instead of giving numbers."""
    from mllm.training import checkpoint as ckpt

    pdir = ckpt.stage_checkpoint_dir(fake, "pretrain")
    step20 = ckpt.save_checkpoint(pdir, 20, {"model": {"w": torch.zeros(1)}}, final=True)
    with (fake / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "sft", "step": 0, "kind": "data", "init_checkpoint": str(step20)}) + "\n")
    md = build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")
    row = next(line for line in md.splitlines() if line.startswith("| pretrain → sft |"))
    assert "not comparable" not in row and "-111.10" in row  # sft 701.25 − pretrain 812.35 token ppl
    step22 = ckpt.save_checkpoint(pdir, 22, {"model": {"w": torch.ones(1)}}, final=True)
    md = build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")
    row = next(line for line in md.splitlines() if line.startswith("| pretrain → sft |"))
    assert f"not comparable: stage 'sft' in {fake} was trained from {step20}, but 'pretrain' has since finished at " \
           f"{step22}" in row and "-111.10" not in row


def test_training_mfu_names_its_formula_and_peak(fake, tmp_path):
    """The report's MFU line names the formula and, per stage, the peak it divides by (from the stage's start
    record); the tokens/s sentence says what a token is (the start record's ``tokens``)."""
    mpath = fake / "metrics.jsonl"
    recs = [json.loads(line) for line in mpath.read_text().splitlines()]
    peak = "NVIDIA H100 SXM bf16 dense 989.4 TFLOP/s per device (NVIDIA H100 80GB HBM3)"
    for r in recs:
        if r["kind"] == "start":
            r.update(peak_flops_per_device=989.4e12, peak_flops_note=peak,
                     mfu_formula="flops_per_token * tokens_per_s / (peak_flops_per_device * world_size)",
                     tokens="Tokens processed: elements of every tensor whose key ends in ``input_ids`` "
                            "(padding included).")
        if r["kind"] == "train":
            r["mfu"] = 0.25
    mpath.write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = build_report(fake / "results", fake, tmp_path / "r" / "REPORT.md")
    line = next(x for x in md.splitlines() if x.startswith("MFU"))
    assert "pretrain 25.0%" in line and peak in line
    assert "flops_per_token * tokens_per_s / (peak_flops_per_device * world_size)" in line
    assert "record. Tokens processed: elements of every tensor" in md and "Tokens: Tokens" not in md
