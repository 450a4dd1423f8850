"""`--stage all` end to end on a micro config (byte tokenizer, 1-layer model, a few steps per stage, real data
slices) including the eval stage and its report, interrupted-stage resume, eval reuse, the final message, and the
missing-input-checkpoint errors (one line, no traceback)."""
import json
import shutil

import pytest
import torch

from mllm.training import checkpoint as ckpt
from mllm.training.runner import main

MICRO = [
    "data.tokenizer=byte", "model.vocab_size=257", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.n_kv_heads=1", "model.ffn_dim=64", "model.max_seq_len=256", "data.max_docs=30",
    "pretrain.seq_len=64", "pretrain.steps=6", "pretrain.batch_size=8", "pretrain.micro_batch_size=4",
    "pretrain.lr=5e-3", "pretrain.warmup_steps=1", "pretrain.eval_every=6", "pretrain.eval_batches=1",
    "pretrain.save_every=6", "pretrain.log_every=3",
    "sft.seq_len=256", "sft.steps=4", "sft.batch_size=4", "sft.micro_batch_size=4", "sft.max_examples=16",
    "sft.lr=3e-3", "sft.warmup_steps=1", "sft.eval_every=4", "sft.eval_batches=2", "sft.save_every=2",
    "sft.log_every=2",
    "dpo.seq_len=128", "dpo.max_prompt_len=64", "dpo.steps=3", "dpo.batch_size=4", "dpo.micro_batch_size=4",
    "dpo.max_pairs=12", "dpo.heldout_pairs=8", "dpo.eval_every=3", "dpo.eval_batches=2", "dpo.save_every=3",
    "dpo.warmup_steps=1", "dpo.log_every=1",
    "verifier.seq_len=256", "verifier.steps=3", "verifier.batch_size=4", "verifier.micro_batch_size=4",
    "verifier.num_questions=3", "verifier.samples_per_question=2", "verifier.max_new_tokens=16",
    "verifier.eval_every=3", "verifier.eval_batches=1", "verifier.save_every=3", "verifier.warmup_steps=1",
    "verifier.log_every=1",
    "eval.gsm8k_examples=2", "eval.gsm8k_samples=2", "eval.gsm8k_max_new_tokens=16", "eval.sst2_examples=4",
    "eval.sst2_shots=1", "eval.perplexity_context=256", "eval.perplexity_max_documents=1", "eval.batch_size=32",
    "eval.baselines=[\"mllm-test/no-such-model\"]",
]
STAGES = ["pretrain", "sft", "dpo", "verifier", "eval"]


def _args(root, name, stage, *extra):
    args = ["--config", "local-smoke", "--stage", stage, "--run-name", name, "--no-progress"]
    for s in MICRO + [f"run_root={root}"]:
        args += ["--set", s]
    return args + list(extra)


def test_missing_input_checkpoint_names_file_and_stage(tmp_path):
    from mllm.config.pipeline_config import load_config
    from mllm.stages import StageContext
    from mllm.stages import dpo, sft, verifier
    from mllm.training.distributed import DistContext

    cfg = load_config("local-smoke", MICRO)
    ctx = StageContext(run_dir=tmp_path / "run", dist=DistContext())
    for mod, needed in ((sft, "pretrain"), (dpo, "sft"), (verifier, "sft")):
        with pytest.raises(ckpt.CheckpointError) as e:
            mod.run(cfg, ctx)
        msg = str(e.value)
        assert f"stage '{mod.STAGE}' needs the final checkpoint of stage '{needed}'" in msg
        assert str(tmp_path / "run" / "checkpoints" / needed / "final") in msg
        assert f"--stage {needed}" in msg


def test_missing_input_checkpoint_cli_prints_one_line(tmp_path, capsys):
    """`run_pipeline.py --stage sft` (or eval) without the input checkpoint: exit 2 and one `error:` line naming
    the missing file and the stage that makes it, no traceback."""
    for stage, needed, file in (("sft", "pretrain", "final"), ("dpo", "sft", "final"), ("eval", "pretrain", "final")):
        assert main(_args(tmp_path, f"m-{stage}", stage)) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err
        assert str(tmp_path / f"m-{stage}" / "checkpoints" / needed / file) in lines[0]
        assert f"--stage {needed}" in lines[0] and f"stage '{stage}'" in lines[0]
        # the failed command leaves no run behind (one holding only config.json was what --resume then picked)
        assert not (tmp_path / f"m-{stage}").exists()


def test_failed_command_restores_the_runs_config(tmp_path, capsys):
    """A command that fails on an existing run before any checkpoint puts config.json back: its `--set` values were
    read by the next command on that run as the run's own config."""
    from mllm.config.pipeline_config import load_config
    from mllm.training.runner import prepare_run_dir

    run = tmp_path / "sticky"
    prepare_run_dir(load_config("local-smoke", MICRO + [f"run_root={tmp_path}"]), run, "sft", resume=False)
    before = (run / "config.json").read_bytes()
    assert main(_args(tmp_path, "sticky", "sft", "--set", "sft.lr=0.5")) == 2  # no pretrain checkpoint
    err = capsys.readouterr().err
    assert f"note: restored {run / 'config.json'}" in err and "error: " in err
    assert (run / "config.json").read_bytes() == before


def test_resume_without_run_name_picks_the_newest_run_with_checkpoints(tmp_path):
    import os
    from mllm.training.runner import newest_run

    for i, name in enumerate(["local-smoke-1", "local-smoke-2", "local-smoke-3", "other-4"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        os.utime(tmp_path / name / "config.json", (1000 + i, 1000 + i))
    assert newest_run(tmp_path, "local-smoke") == "local-smoke-3"  # none has checkpoints: the newest
    for name in ("local-smoke-1", "local-smoke-2"):
        (tmp_path / name / "checkpoints" / "pretrain").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "pretrain" / "step_00000005.pt").write_bytes(b"x")
    (tmp_path / "local-smoke-3" / "checkpoints" / "pretrain").mkdir(parents=True)
    (tmp_path / "local-smoke-3" / "checkpoints" / "pretrain" / "step_00000005.pt.tmp").write_bytes(b"x")  # torn
    assert newest_run(tmp_path, "local-smoke") == "local-smoke-2"
    assert newest_run(tmp_path / "nope", "local-smoke") is None


def test_checkpoint_error_line_names_the_stage_that_makes_the_file():
    from mllm.training.runner import checkpoint_error_line

    e = ckpt.CheckpointError("no checkpoint in runs/x/checkpoints/verifier: no such file or folder")
    assert checkpoint_error_line(e) == ("error: no checkpoint in runs/x/checkpoints/verifier: no such file or folder "
                                        "(that file is made by `--stage verifier`; run it first with the same "
                                        "--run-name)")
    # a message that already says which stage to run is kept as it is, on one line
    e = ckpt.CheckpointError("stage 'dpo' needs ... checkpoints/sft/final does not exist:\n run `--stage sft` first")
    assert checkpoint_error_line(e) == "error: stage 'dpo' needs ... checkpoints/sft/final does not exist: run " \
                                       "`--stage sft` first"
    # a damaged or unfit checkpoint exists: "run --stage pretrain first" was wrong advice (it refuses to overwrite)
    e = ckpt.CheckpointError("cannot read checkpoint runs/x/checkpoints/pretrain/step_00000008.pt: RuntimeError: bad zip")
    assert checkpoint_error_line(e) == f"error: {e}"


def test_all_end_to_end_then_resume_interrupted_stage(data_dir, tmp_path, capsys):
    assert main(_args(tmp_path, "r", "all")) == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    for s in ("pretrain", "sft", "dpo", "verifier"):
        assert ckpt.final_checkpoint(ckpt.stage_checkpoint_dir(run, s)) is not None, s
        assert s in summary
    rows = {r["stage"]: r for r in summary["all"]["stages"]}
    assert [r["stage"] for r in summary["all"]["stages"]] == STAGES
    assert all(r["status"] == "ran" and r["wall_s"] > 0 for r in rows.values())
    assert summary["all"]["total_wall_s"] >= sum(r["wall_s"] for r in rows.values()) - 1e-6
    # each stage started from its input stage's final checkpoint
    assert summary["sft"]["input_checkpoint"] == str(ckpt.final_checkpoint(ckpt.stage_checkpoint_dir(run, "pretrain")))
    assert summary["dpo"]["input_checkpoint"] == summary["verifier"]["input_checkpoint"] == \
        str(ckpt.final_checkpoint(ckpt.stage_checkpoint_dir(run, "sft")))
    # SFT lowers the held-out response loss; DPO logged held-out reward metrics; verifier reported dev accuracies
    assert summary["sft"]["final_val_loss"] < summary["sft"]["first_val_loss"]
    assert 0.0 <= summary["dpo"]["final_heldout_reward_accuracy"] <= 1.0
    assert summary["dpo"]["heldout_pairs_evaluated"] == 8
    dev = summary["verifier"]["gsm8k_dev"]
    assert dev["greedy"]["n"] == dev["verifier"]["n"] == 2 and dev["sampled_solutions"]["n"] == 4
    assert set(rows["verifier"]["metrics"]) >= {"dev_greedy_accuracy", "dev_majority_accuracy", "dev_verifier_accuracy"}

    # the eval stage: every stage checkpoint on every task, the baseline skipped (offline), the report in the run
    report = run / "report" / "REPORT.md"
    ev = summary["eval"]
    assert ev["report"] == str(report) == summary["all"]["outputs"]["report"] and report.is_file()
    assert ev["evaluated"] == ["pretrain", "sft", "dpo", "verifier"] and ev["reused"] == []
    assert ev["skipped_baselines"] == ["baseline-no-such-model"]
    for s in ("pretrain", "sft", "dpo", "verifier"):
        for t in ("perplexity", "sst2", "gsm8k", "attention"):
            doc = json.loads((run / "results" / s / f"{t}.json").read_text())
            assert "not_run" not in doc["result"], (s, t, doc["result"])
            assert "run_pipeline.py" in doc["command"] and "--stage all" in doc["command"]
    g = json.loads((run / "results" / "dpo" / "gsm8k.json").read_text())["result"]
    assert ev["models"]["dpo"]["gsm8k_greedy"] == g["greedy"]["accuracy"]
    assert g["verifier"]["n"] == 2  # best-of-N with the verifier stage's scorer for every stage
    md = report.read_text()
    assert "(fill)" not in md and "skipped: mllm-test/no-such-model" in md
    # each stage's start record names the command (with its --set overrides), and the report cites it
    from mllm.training.metrics import read_metrics

    starts = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "start"]
    assert len(starts) == 4 and len({r["command"] for r in starts}) == 1
    assert "--stage all" in starts[0]["command"] and "--set pretrain.steps=6" in starts[0]["command"]
    assert f"during `{starts[0]['command']}` (recorded in the start record of every stage)" in md
    ppl = json.loads((run / "results" / "sft" / "perplexity.json").read_text())["result"]
    assert f"| sft | {ppl['token']['perplexity']:.2f} |" in md
    assert rows["eval"]["status"] == "ran" and rows["eval"]["wall_s"] > 0 and rows["eval"]["steps"] is None
    # the final message names the real outputs
    out = capsys.readouterr().out
    assert f"run summary: {run / 'summary.json'}" in out and f"report: {report}" in out
    assert "checkpoints/all" not in out

    # resumed with nothing to do: every stage skipped, eval included (results newer than every checkpoint)
    assert main(_args(tmp_path, "r", "all", "--resume")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert {r["stage"]: r["status"] for r in summary["all"]["stages"]} == dict.fromkeys(STAGES, "skipped")
    # `--stage eval` alone reuses the results and rebuilds the report; --recompute evaluates again
    assert main(_args(tmp_path, "r", "eval")) == 0
    ev = json.loads((run / "summary.json").read_text())["eval"]
    assert ev["evaluated"] == [] and ev["reused"] == ["pretrain", "sft", "dpo", "verifier"]
    out = capsys.readouterr().out
    assert f"report: {report}" in out and f"results: {run / 'results'}" in out and "checkpoints/eval" not in out

    # the verifier checkpoint serves evaluation: a scorer, and the LM part through the evaluation loader
    from mllm.evaluation.loading import load_stage_model
    from mllm.stages.verifier import load_scorer

    vdir = ckpt.stage_checkpoint_dir(run, "verifier")
    score = load_scorer(vdir)("Tom has 3 apples. How many?", " He has 3. #### 3")
    assert 0.0 < score < 1.0
    lm, _, meta = load_stage_model(vdir)
    assert meta["stage"] == "verifier" and lm(torch.tensor([[1, 2, 3]])).shape == (1, 3, 257)

    # without --resume a started run directory is refused
    assert main(_args(tmp_path, "r", "all")) == 2

    # interrupt sft after its step-2 checkpoint: drop its last file and 'final', and everything after it
    sft_dir = ckpt.stage_checkpoint_dir(run, "sft")
    (sft_dir / "final").unlink()
    (sft_dir / "latest").unlink()
    (sft_dir / ckpt.checkpoint_name(4)).unlink()
    for s in ("dpo", "verifier"):
        shutil.rmtree(ckpt.stage_checkpoint_dir(run, s))
    assert main(_args(tmp_path, "r", "all", "--resume")) == 0
    summary = json.loads((run / "summary.json").read_text())
    status = {r["stage"]: r["status"] for r in summary["all"]["stages"]}
    # sft, dpo and verifier were redone, so eval re-evaluates them; pretrain's results depend on the verifier
    # checkpoint too (GSM8K best-of-N), so nothing is reusable: eval ran again
    assert status == {"pretrain": "skipped", "sft": "resumed", "dpo": "ran", "verifier": "ran", "eval": "ran"}
    assert summary["eval"]["evaluated"] == ["pretrain", "sft", "dpo", "verifier"]
    assert ckpt.final_checkpoint(sft_dir).name == ckpt.checkpoint_name(4)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sft_train_steps = [r["step"] for r in recs if r["stage"] == "sft" and r["kind"] == "train"]
    assert sft_train_steps == [2, 4]  # the resumed run continued at step 3; its logs after step 2 were replaced


def test_started_stage_must_follow_its_inputs_current_final(tmp_path):
    """After SFT is trained further, a finished (or interrupted) DPO trained from the old SFT checkpoint is refused,
    not reported as if it came from the new one."""
    import torch

    from mllm.config.pipeline_config import ConfigError
    from mllm.stages.pipeline import check_input_current
    from mllm.training import checkpoint as ckpt

    run = tmp_path / "run"
    sft_dir = ckpt.stage_checkpoint_dir(run, "sft")
    old = ckpt.save_checkpoint(sft_dir, 60, {"model": {"w": torch.zeros(1)}}, final=True)
    (run / "summary.json").write_text(json.dumps({"dpo": {"input_checkpoint": str(old)}}))
    check_input_current(run, "dpo")  # trained from the current final: fine
    check_input_current(run, "pretrain")  # no input stage
    new = ckpt.save_checkpoint(sft_dir, 120, {"model": {"w": torch.ones(1)}}, final=True)
    with pytest.raises(ConfigError, match=rf"'dpo'.*step_00000060\.pt.*'sft' has since finished at .*{new.name}"):
        check_input_current(run, "dpo")
    # an interrupted verifier: its input is in its metrics data record
    (run / "metrics.jsonl").write_text(json.dumps({"stage": "verifier", "step": 0, "kind": "data",
                                                   "init_checkpoint": str(old)}) + "\n")
    with pytest.raises(ConfigError, match="'verifier'"):
        check_input_current(run, "verifier")
    # dpo retrained from the new sft after the refusal, then interrupted: its summary still names the old input,
    # its newest data record the new one, which is what its checkpoints follow
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": "dpo", "step": 0, "kind": "data", "init_checkpoint": str(new)}) + "\n")
    check_input_current(run, "dpo")


def test_device_cuda_without_cuda_is_one_error_line(tmp_path, capsys, monkeypatch):
    """`--set device=cuda` where torch has no CUDA: exit 2 and one `error:` line naming the key, no traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_args(tmp_path, "dev", "pretrain", "--set", "device=cuda")) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: config key 'device' is 'cuda' but torch.cuda.is_available() is False"
    assert not (tmp_path / "dev").exists()


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    import mllm.stages.pretrain as pretrain

    def interrupted(cfg, ctx):
        ckpt.save_checkpoint(ckpt.stage_checkpoint_dir(ctx.run_dir, "pretrain"), 5, {"model": {"w": torch.zeros(1)}})
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run", interrupted)
    assert main(_args(tmp_path, "cc", "pretrain")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"interrupted: newest checkpoint {tmp_path / 'cc' / 'checkpoints' / 'pretrain' / 'step_00000005.pt'}; "
        "continue with the same command plus `--run-name cc --resume`")
    assert (tmp_path / "cc" / "config.json").is_file()  # Ctrl-C undoes nothing
    from mllm.training.runner import interrupted_line

    assert interrupted_line(tmp_path / "cc", "eval") == (
        f"interrupted: the models evaluated so far are kept in {tmp_path / 'cc' / 'results'}; continue with the same "
        "command plus `--run-name cc --resume`")
    assert interrupted_line(tmp_path / "cc", "sft") == ("interrupted: no 'sft' checkpoint yet; continue with the same "
                                                        "command plus `--run-name cc --resume`")
