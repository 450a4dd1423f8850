"""The evaluation runner's run-level logic: WikiText articles used for pretraining are not scored, and results are
reused only while they are up to date (same checkpoint, same eval settings, newer than the checkpoint)."""
import json
import os

import pytest
import torch

from mllm.config import load_config
from mllm.evaluation import runner
from mllm.training.checkpoint import save_checkpoint

TINY = ["model.vocab_size=257", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_dim=32", "data.tokenizer=byte", "eval.sst2_examples=4", "eval.sst2_shots=1", "eval.sst2_calibrate=false",
        "eval.perplexity_context=64", "eval.perplexity_max_documents=1", "eval.baselines=[]"]


def test_wikitext_excludes_pretrained_articles(data_dir):
    from mllm.data.datasets import load_wikitext2, split_holdout

    cfg = load_config("local-smoke", [f"data.data_dir={data_dir}"])
    assert "wikitext2" in cfg.data.pretrain_datasets and cfg.eval.perplexity_split == "validation"
    articles = load_wikitext2(data_dir, split="validation")
    _, held = split_holdout(articles, cfg.data.val_fraction, seed=cfg.seed)
    d = runner.wikitext_lines(cfg)
    # exactly the articles the pretrain stage held out (it read all 60 < data.max_docs of this split)
    assert d["lines"] == [r["text"] for r in held] and 0 < len(held) < len(articles)
    assert f"the {len(held)} of {len(articles)} articles the pretrain stage did not train on" in d["source"]
    # articles past data.max_docs were never read by pretraining, so they are scored too
    cfg2 = load_config("local-smoke", [f"data.data_dir={data_dir}", "data.max_docs=10"])
    first10 = {r["text"] for r in split_holdout(articles[:10], cfg.data.val_fraction, seed=cfg.seed)[0]}
    assert runner.wikitext_lines(cfg2)["lines"] == [r["text"] for r in articles if r["text"] not in first10]
    # pretraining without WikiText: every article is scored
    cfg3 = load_config("local-smoke", [f"data.data_dir={data_dir}", 'data.pretrain_datasets=["tinystories"]'])
    d3 = runner.wikitext_lines(cfg3, max_documents=5)
    assert d3["lines"] == [r["text"] for r in articles[:5]] and "did not train on" not in d3["source"]


@pytest.fixture
def tiny_run(tmp_path, data_dir):
    cfg = load_config("local-smoke", TINY + [f"data.data_dir={data_dir}"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    state = {"model": __import__("mllm.models", fromlist=["Transformer"]).Transformer(cfg.model).state_dict(),
             "config": cfg.to_dict(), "stage": "pretrain", "step": 2}
    save_checkpoint(run / "checkpoints" / "pretrain", 2, state, final=True)
    return cfg, run


def test_gsm8k_eval_never_scores_a_question_sft_trains_on(tmp_path):
    """A data folder with only GSM8K's test file: SFT and the verifier train on it minus a held-out carve, so the
    evaluation must take exactly that carve (not the whole test file, of which they trained on 95%)."""
    from mllm.stages.sft import gsm8k_splits

    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(400)]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("local-smoke", [f"data.data_dir={tmp_path}", "eval.gsm8k_examples=null"])
    train, dev, _ = gsm8k_splits(cfg)
    ev = runner.gsm8k_eval_rows(cfg)
    assert ev["rows"] == dev and 0 < len(dev) < 60
    assert not {r["question"] for r in train} & {r["question"] for r in ev["rows"]}
    assert "held out of the SFT/verifier training" in ev["source"]


def test_local_baseline_key_follows_its_files(tmp_path, monkeypatch):
    """A local baseline folder re-exported with other weights must not reuse the old results."""
    cfg = load_config("local-smoke")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"v1")
    key = lambda: runner.model_key({"baseline": str(folder), "files": runner._folder_sig(str(folder))},  # noqa
                                   cfg, ["sst2"], None, None)
    first = key()
    assert key() == first
    (folder / "model.safetensors").write_bytes(b"v2 weights")
    assert key() != first
    assert runner._folder_sig("gpt2") is None  # a hub name: no files to sign
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runner._folder_sig("~/hf") == runner._folder_sig(str(folder))  # "~" as load_baseline expands it


def test_evaluate_run_reuses_only_up_to_date_results(tiny_run):
    cfg, run = tiny_run
    tasks = ["sst2"]  # the cheapest task: the logic under test is per model, not per task
    lines = []
    kw = dict(stages=["pretrain", "sft"], tasks=tasks, device="cpu", progress=False, reuse=True, log=lines.append)

    def ev():
        lines.clear()
        runner.evaluate_run(run, cfg, **kw)
        return json.loads((run / "results" / "eval_state.json").read_text())["last_invocation"]

    assert ev()["evaluated"] == ["pretrain"]
    ppl = run / "results" / "pretrain" / "sst2.json"
    first = ppl.read_text()
    plan = runner.plan_run(run, cfg, stages=["pretrain", "sft"], tasks=tasks)
    assert plan["pretrain"]["up_to_date"] and "sft" not in plan
    # unchanged: reused, files untouched
    inv = ev()
    assert inv["evaluated"] == [] and inv["reused"] == ["pretrain"] and ppl.read_text() == first
    assert any("results up to date" in line for line in lines)
    # an eval setting changed: stale
    cfg2 = load_config("local-smoke", TINY + [f"data.data_dir={cfg.data.data_dir}", "eval.sst2_shots=0"])
    assert not runner.plan_run(run, cfg2, stages=["pretrain"], tasks=tasks)["pretrain"]["up_to_date"]
    # a data key that changes the scored rows (the held-out carves): stale too
    cfg3 = load_config("local-smoke", TINY + [f"data.data_dir={cfg.data.data_dir}", "data.val_fraction=0.2"])
    assert not runner.plan_run(run, cfg3, stages=["pretrain"], tasks=tasks)["pretrain"]["up_to_date"]
    # the checkpoint was rewritten after the results: stale, evaluated again
    ck = runner.plan_run(run, cfg, stages=["pretrain"], tasks=tasks)["pretrain"]["checkpoint"]
    st = ck.stat()
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ev()["evaluated"] == ["pretrain"]
    # a results file older than its checkpoint (e.g. copied back) is not trusted either
    os.utime(ppl, ns=(ppl.stat().st_atime_ns, ck.stat().st_mtime_ns - 10**9))
    assert ev()["evaluated"] == ["pretrain"]
    # reuse=False re-evaluates although everything is up to date
    kw["reuse"] = False
    assert ev()["evaluated"] == ["pretrain"]


def test_evaluate_run_drops_results_of_a_vanished_checkpoint(tiny_run):
    cfg, run = tiny_run
    runner.evaluate_run(run, cfg, stages=["pretrain"], tasks=["sst2"], device="cpu", progress=False)
    assert (run / "results" / "pretrain" / "sst2.json").is_file()
    import shutil
    shutil.rmtree(run / "checkpoints" / "pretrain")
    runner.evaluate_run(run, cfg, stages=["pretrain"], tasks=["sst2"], device="cpu", progress=False,
                        reuse=True)
    assert not (run / "results" / "pretrain" / "sst2.json").exists()
    status = json.loads((run / "results" / "pretrain" / "status.json").read_text())
    assert status["result"]["reason"] == "no pretrain checkpoint in the run"


def test_environment_names_the_commit(monkeypatch):
    monkeypatch.delenv("MLLM_GIT_COMMIT", raising=False)
    sw = runner.environment_info()["software"]
    assert len(sw["mllm_git_commit"]) == 40 and isinstance(sw["mllm_git_dirty"], bool)
    # a copied tree (GPU machine) names its commit through the environment; whether it was dirty is then unknown
    monkeypatch.setenv("MLLM_GIT_COMMIT", "0123abc")
    sw = runner.environment_info()["software"]
    assert sw["mllm_git_commit"] == "0123abc" and sw["mllm_git_dirty"] is None


def test_plan_finds_the_verifier_when_only_other_stages_are_evaluated(tmp_path):
    """``--stages sft`` still reranks with the run's verifier (its file is part of the sft results' key); unknown
    stage names and a run without checkpoints are errors, not a silent empty evaluation."""
    import subprocess
    import sys

    from mllm.training import checkpoint as ckpt

    for st in ("sft", "verifier"):
        ckpt.save_checkpoint(ckpt.stage_checkpoint_dir(tmp_path, st), 1, {"model": {"w": torch.zeros(1)}}, final=True)
    cfg = load_config("local-smoke")
    plan = runner.plan_run(tmp_path, cfg, stages=["sft"], tasks=["gsm8k"])
    assert list(plan) == ["sft"] and plan["sft"]["key"]["verifier"]["path"].endswith("step_00000001.pt")
    with pytest.raises(ValueError, match="unknown stage.*sfft"):
        runner.plan_run(tmp_path, cfg, stages=["sfft"], tasks=["gsm8k"])
    script = [sys.executable, "scripts/evaluation/evaluate_tasks.py", "--config", "local-smoke"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for extra, msg in ((["--stage-checkpoints", str(empty)], "no pretrain, sft, dpo, verifier checkpoint"),
                       (["--stage-checkpoints", str(tmp_path), "--stages", "sfft"], "unknown stage")):
        r = subprocess.run(script + extra, capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_eval_stage_recompute_flag_reevaluates_up_to_date_results(tiny_run):
    """``run_pipeline.py --stage eval`` reuses up-to-date results, and ``--recompute`` must evaluate them again: the
    flag has to travel from the command line through the stage context to the evaluation (``reuse=False``), or a
    user who changed evaluation code would silently get the old numbers."""
    from mllm.training.runner import main

    cfg, run = tiny_run
    cheap = ["eval.gsm8k_examples=1", "eval.gsm8k_samples=1", "eval.gsm8k_max_new_tokens=4", "eval.sst2_examples=2",
             f"run_root={run.parent}"]
    args = ["--stage", "eval", "--run-name", run.name, "--no-progress"] + [a for s in cheap for a in ("--set", s)]

    def eval_summary(*extra):
        assert main(args + list(extra)) == 0
        return json.loads((run / "summary.json").read_text())["eval"]

    assert eval_summary()["evaluated"] == ["pretrain"]
    res = run / "results" / "pretrain" / "sst2.json"
    first = res.stat().st_mtime_ns
    ev = eval_summary()
    assert ev["evaluated"] == [] and ev["reused"] == ["pretrain"] and res.stat().st_mtime_ns == first
    ev = eval_summary("--recompute")
    assert ev["evaluated"] == ["pretrain"] and ev["reused"] == []


@pytest.mark.parametrize("extra, msg", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # failed after the model load
    (["--max-docs", "0"], "--max-docs must be >= 1, got 0"),  # read as "all documents"
    (["--device", "bogus"], "device 'bogus': expected auto, cpu, cuda or cuda:N"),  # a torch RuntimeError
    (["--device", "tpu"], "device 'tpu': expected auto, cpu, cuda or cuda:N"),
])
def test_evaluate_tasks_bad_flags_are_one_error_line(tmp_path, capsys, extra, msg):
    import importlib.util

    from mllm.training import checkpoint as ckpt

    ckpt.save_checkpoint(ckpt.stage_checkpoint_dir(tmp_path, "sft"), 1, {"model": {"w": torch.zeros(1)}}, final=True)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "evaluation",
                        "evaluate_tasks.py")
    spec = importlib.util.spec_from_file_location("evaluate_tasks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--config", "local-smoke", "--stage-checkpoints", str(tmp_path)] + extra) == 2
    assert capsys.readouterr().err.strip() == f"error: {msg}"


def test_resolve_device_names_the_problem(monkeypatch):
    from mllm.evaluation.loading import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda:1': torch.cuda.is_available\(\) is False"):
        resolve_device("cuda:1")


def test_unused_verifier_is_not_reported_missing(tiny_run):
    """Without GSM8K among the tasks the run's verifier is not loaded; the results said "no verifier checkpoint"
    although the run has one."""
    cfg, run = tiny_run
    save_checkpoint(run / "checkpoints" / "verifier", 1, {"model": {"w": torch.zeros(1)}}, final=True)
    runner.evaluate_run(run, cfg, stages=["pretrain"], tasks=["sst2"], device="cpu", progress=False)
    doc = json.loads((run / "results" / "pretrain" / "sst2.json").read_text())
    assert doc["verifier"] == "not used: GSM8K is not among the tasks evaluated"
