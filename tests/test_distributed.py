"""DDP under ``torchrun`` with gloo on CPU: 2 ranks x accumulation 2 == 1 process x accumulation 4 (same 8
sequences per step, token-weighted), ranks hold identical weights, and the pipeline CLI trains, checkpoints and
resumes with 2 ranks. This file is also the torchrun worker (``python tests/test_distributed.py --worker OUT``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.config.pipeline_config import ModelConfig, OptimConfig, StageConfig
from mllm.models.transformer import Transformer, causal_lm_loss
from mllm.training.batches import EvalBatches, RowBatchSource, TokenWindows
from mllm.training.distributed import DistContext, init_distributed, shutdown_distributed
from mllm.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
STEPS = 4
SC = StageConfig(steps=STEPS, batch_size=8, micro_batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1, eval_every=2,
                 eval_batches=2, save_every=2, keep_last=2, log_every=1)


class MaskedWindows(TokenWindows):
    """Examples with different numbers of target tokens, so ranks see different token counts."""

    def __getitem__(self, i):
        ex = super().__getitem__(i)
        labels = ex["labels"].copy()
        labels[: (i * 7) % 13] = -100
        return {"input_ids": ex["input_ids"], "labels": labels}


def tokens():
    rng = np.random.default_rng(0)
    return (np.arange(4000) * 5 + (rng.random(4000) < 0.1) * rng.integers(0, 64, 4000)) % 64


def loss_fn(model, batch):
    logits = model(batch["input_ids"])
    return causal_lm_loss(logits, batch["labels"]), {}, (batch["labels"] != -100).sum()


def train(ctx: DistContext, run_dir, compile_mode=None):
    torch.manual_seed(0)
    model = Transformer(CFG)
    t = tokens()
    src = RowBatchSource(MaskedWindows(t[:3200], 16), batch_size=SC.batch_size, micro_batch_size=SC.micro_batch_size,
                         rank=ctx.rank, world_size=ctx.world_size, seed=1)
    val = EvalBatches(MaskedWindows(t[3200:], 16), micro_batch_size=SC.micro_batch_size, rank=ctx.rank,
                      world_size=ctx.world_size, max_examples=SC.eval_batches * SC.micro_batch_size)
    tr = Trainer(model, loss_fn, src, SC, OptimConfig(), run_dir=run_dir, val_data=val, dist=ctx, seed=3,
                 progress=False, compile=compile_mode is not None, compile_mode=compile_mode)
    del model
    summary = tr.fit()
    params = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    accum = tr.accum_steps
    tr.close()
    return params, summary, accum


def worker(out: Path, compile_mode=None) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        params, summary, accum = train(ctx, out / "run", compile_mode)
        torch.save({"params": params, "summary": summary, "accum": accum, "world": ctx.world_size},
                   out / f"rank{ctx.rank}.pt")
    finally:
        shutdown_distributed(ctx)


def torchrun(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ddp_two_ranks_equal_single_process(tmp_path):
    torchrun(__file__, "--worker", tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2 and r0["accum"] == 2
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks disagree on {k}"

    single, summary, accum = train(DistContext(), tmp_path / "single")
    assert accum == 4
    for k, v in single.items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    # the logged metrics are global (all ranks) in both runs
    assert r0["summary"]["tokens_seen"] == summary["tokens_seen"] == STEPS * 8 * 16
    assert r0["summary"]["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert r0["summary"]["checkpoint"].endswith("step_00000004.pt")
    state = torch.load(r0["summary"]["checkpoint"], weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["complete"]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in recs) == STEPS  # rank 0 alone writes


def test_ddp_under_the_cuda_graph_mode_equals_plain_training(tmp_path):
    """DDP around the loss module compiled with mode="reduce-overhead": the trainer's CUDA-graph bookkeeping
    (gradients allocated once and zeroed in place, which DDP's reducer must add into; a new graph step per
    micro-batch; no_sync on all but the last) gives the weights of the plain single-process run. On CPU inductor records
    no CUDA graph; the bookkeeping and DDP's handling of the preallocated gradients are what is tested."""
    torchrun(__file__, "--worker", tmp_path, "reduce-overhead", timeout=400)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks disagree on {k}"
    single, summary, _ = train(DistContext(), tmp_path / "single")
    for k, v in single.items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert r0["summary"]["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)


def test_pipeline_cli_two_ranks_resume_is_exact(data_dir, tmp_path):
    """Two ranks through the CLI: 4 steps in one go, then the same run resumed from its step-2 checkpoint ends on
    bitwise the same weights and logs the same losses."""
    sets = ["data.tokenizer=byte", "model.vocab_size=257", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64", "data.max_docs=20",
            "pretrain.seq_len=64", "pretrain.batch_size=8", "pretrain.micro_batch_size=2", "pretrain.eval_every=2",
            "pretrain.eval_batches=1", "pretrain.save_every=2", "pretrain.log_every=1", f"run_root={tmp_path}",
            f"data.cache_dir={tmp_path}/cache"]
    args = [REPO / "scripts" / "run_pipeline.py", "--config", "local-smoke", "--stage", "pretrain",
            "--run-name", "ddp", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    full = torchrun(*args, "--set", "pretrain.steps=4")
    assert "run directory:" in full.stdout
    run = tmp_path / "ddp"
    ckdir = run / "checkpoints" / "pretrain"
    end = torch.load(ckdir / "step_00000004.pt", weights_only=False)
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"}
    # a crash right after the step-2 checkpoint: step 4's file never got written
    (ckdir / "step_00000004.pt").unlink()
    r = torchrun(*args, "--set", "pretrain.steps=4", "--resume")
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    summary = json.loads((run / "summary.json").read_text())["pretrain"]
    assert summary["steps"] == 4 and summary["checkpoint"].endswith("step_00000004.pt")
    # exact: weights, optimizer state and both ranks' data positions came back
    again = torch.load(ckdir / "step_00000004.pt", weights_only=False)
    for k, v in end["model"].items():
        assert torch.equal(again["model"][k], v), k
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in recs if r["kind"] == "train"} == losses
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 for r in recs if r["kind"] == "start")


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), *sys.argv[3:])
    else:
        sys.exit("usage: torchrun --nproc_per_node=2 tests/test_distributed.py --worker OUT_DIR")
