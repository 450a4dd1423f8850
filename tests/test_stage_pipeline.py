"""`--stage all` end to end on a micro config (byte tokenizer, 1-layer model, a few steps per stage, real data
slices), interrupted-stage resume, and the missing-input-checkpoint errors."""
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
    "eval.gsm8k_examples=2", "eval.gsm8k_samples=2", "eval.gsm8k_max_new_tokens=16",
]


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


def test_all_end_to_end_then_resume_interrupted_stage(data_dir, tmp_path):
    assert main(_args(tmp_path, "r", "all")) == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    for s in ("pretrain", "sft", "dpo", "verifier"):
        assert ckpt.final_checkpoint(ckpt.stage_checkpoint_dir(run, s)) is not None, s
        assert s in summary
    rows = {r["stage"]: r for r in summary["all"]["stages"]}
    assert [r["stage"] for r in summary["all"]["stages"]] == ["pretrain", "sft", "dpo", "verifier"]
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
    assert status == {"pretrain": "skipped", "sft": "resumed", "dpo": "ran", "verifier": "ran"}
    assert ckpt.final_checkpoint(sft_dir).name == ckpt.checkpoint_name(4)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sft_train_steps = [r["step"] for r in recs if r["stage"] == "sft" and r["kind"] == "train"]
    assert sft_train_steps == [2, 4]  # the resumed run continued at step 3; its logs after step 2 were replaced
