"""Checkpoints: exact resume (2N steps == N + resume + N, bit for bit on CPU), atomic writes, keep-last-N,
pointer fallback, unreadable files, stage hand-over errors."""
import os
import re

import numpy as np
import pytest
import torch

from mllm.config.pipeline_config import ModelConfig, OptimConfig, StageConfig
from mllm.models.transformer import Transformer, causal_lm_loss
from mllm.training import checkpoint as ckpt
from mllm.training.batches import EvalBatches, RowBatchSource, TokenWindows
from mllm.training.trainer import Trainer, rng_state, set_rng_state


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread avoids OpenMP spinning on a shared 2-core machine (100x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
TOKENS = (np.arange(3000) * 7 + np.random.default_rng(0).integers(0, 3, 3000)) % 64


def noisy_lm_loss(model, batch):
    """LM loss with random label dropout drawn from torch's RNG, plus a numpy draw, so that resuming
    without the RNG states would diverge."""
    labels = batch["labels"].clone()
    labels[torch.rand(labels.shape) < 0.2] = -100
    jitter = float(np.random.rand()) * 1e-3
    logits = model(batch["input_ids"])
    return causal_lm_loss(logits, labels) * (1 + jitter), {"jitter": jitter}, (labels != -100).sum()


def trainer(run_dir, steps, model_seed=0):
    sc = StageConfig(steps=steps, batch_size=8, micro_batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2,
                     eval_every=3, eval_batches=2, save_every=100, keep_last=2, log_every=1)
    torch.manual_seed(model_seed)
    model = Transformer(CFG)
    data = TokenWindows(TOKENS[:2400], 16)
    src = RowBatchSource(data, batch_size=8, micro_batch_size=4, seed=5)  # 149 rows: an epoch ends at step 18
    val = EvalBatches(TokenWindows(TOKENS[2400:], 16), micro_batch_size=4, max_examples=8)
    return Trainer(model, noisy_lm_loss, src, sc, OptimConfig(), run_dir=run_dir, val_data=val, seed=11,
                   progress=False)


def test_exact_resume_bit_for_bit(tmp_path):
    n = 10  # 2n = 20 steps crosses the epoch boundary, so the epoch counter is resumed too
    full = trainer(tmp_path / "full", 2 * n)
    full.fit()

    first = trainer(tmp_path / "split", 2 * n)
    for _ in range(n):
        first.train_step()
    first.save()
    first.close()
    np.random.seed(123), torch.manual_seed(123)  # scramble the global RNGs: resume must restore them

    second = trainer(tmp_path / "split", 2 * n, model_seed=99)  # different init: overwritten by the checkpoint
    assert second.resume() and second.step == n
    second.fit()
    for (name, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) and torch.equal(sa[k]["step"], sb[k]["step"])
    assert full.train_data.state_dict() == second.train_data.state_dict()
    assert full.last_train["loss"] == second.last_train["loss"]
    assert full.last_eval["val_loss"] == second.last_eval["val_loss"]

    # and it is the RNG restore that makes it exact: the same resume with scrambled RNGs diverges
    third = trainer(tmp_path / "split", 2 * n)
    state = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "pretrain" / "step_00000010.pt")
    state["rng"] = [rng_state()]
    torch.manual_seed(7)
    state["rng"][0]["torch"] = torch.get_rng_state()
    third.load_state_dict(state)
    third.fit()
    assert not torch.equal(next(third.model.parameters()), next(full.model.parameters()))


def test_rng_state_roundtrip():
    s = rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _state(step, value=1.0):
    return {"step": step, "model": {"w": torch.full((3,), value)}, "complete": False}


def test_atomic_write_crash_before_rename_keeps_previous(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    first = ckpt.save_checkpoint(d, 1, _state(1))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".pt"):
            raise KeyboardInterrupt("simulated crash before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(d, 2, _state(2, 2.0))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    # a hard crash would also leave its temp file behind: readers must ignore it
    (d / ".step_00000002.pt.tmp-999").write_bytes(b"half a file")
    assert (d / "latest").read_text().strip() == first.name
    assert ckpt.latest_checkpoint(d) == first
    assert ckpt.load_checkpoint(d)["step"] == 1
    assert [p.name for p in ckpt.list_checkpoints(d)] == [first.name]


def test_crash_between_file_and_pointer(tmp_path, monkeypatch):
    """The file is complete but `latest` was not rewritten yet: latest still names the previous good file."""
    d = tmp_path / "ck"
    ckpt.save_checkpoint(d, 1, _state(1))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("latest"):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(d, 2, _state(2))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.load_checkpoint(d)["step"] == 1  # both files are loadable; the pointer decides
    assert ckpt.load_checkpoint(d / "step_00000002.pt")["step"] == 2


def test_keep_last_pointer_fallback_and_final(tmp_path):
    d = tmp_path / "ck"
    for s in range(1, 6):
        ckpt.save_checkpoint(d, s, _state(s), keep_last=2, final=(s == 5))
    assert [p.name for p in ckpt.list_checkpoints(d)] == ["step_00000004.pt", "step_00000005.pt"]
    assert ckpt.final_checkpoint(d).name == "step_00000005.pt"
    (d / "latest").unlink()
    assert ckpt.latest_checkpoint(d).name == "step_00000005.pt"  # newest file when the pointer is gone
    (d / "latest").write_text("step_00000001.pt\n")  # names a pruned file
    assert ckpt.latest_checkpoint(d).name == "step_00000005.pt"
    ckpt.save_checkpoint(d, 6, _state(6), keep_last=2)  # training went on: the old end is not final any more
    assert ckpt.final_checkpoint(d) is None


def test_refuses_nan_and_reports_unreadable(tmp_path):
    d = tmp_path / "ck"
    with pytest.raises(ckpt.NonFiniteError, match="'w'"):
        ckpt.save_checkpoint(d, 1, _state(1, float("nan")))
    assert ckpt.list_checkpoints(d) == []
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.load_checkpoint(d)
    d.mkdir(exist_ok=True)
    (d / "step_00000003.pt").write_bytes(b"\x80garbage")
    with pytest.raises(ckpt.CheckpointError, match="step_00000003.pt"):
        ckpt.load_checkpoint(d)


def test_require_stage_output_names_file_and_stage(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/pretrain/final.*--stage pretrain"):
        ckpt.require_stage_output(tmp_path, "pretrain", "sft")
    ckpt.save_checkpoint(ckpt.stage_checkpoint_dir(tmp_path, "pretrain"), 3, _state(3))
    with pytest.raises(ckpt.CheckpointError, match="stopped at step_00000003.pt.*--resume"):
        ckpt.require_stage_output(tmp_path, "pretrain", "sft")
    ckpt.save_checkpoint(ckpt.stage_checkpoint_dir(tmp_path, "pretrain"), 4, _state(4), final=True)
    path = ckpt.require_stage_output(tmp_path, "pretrain", "sft")
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(3)))
    meta = ckpt.load_model_weights(model, path)
    assert meta["step"] == 4 and torch.equal(model.w.data, torch.ones(3))


def test_cuda_rng_state_is_this_devices_only(monkeypatch):
    """A checkpoint keeps the CUDA generator of the trainer's device only: a node with 8 visible GPUs must resume
    on a process that sees 1 (e.g. 2 nodes x 4 GPUs instead of 1 x 8, same world size). Checkpoints written
    before kept one state per visible device; their entry for this device is used. CUDA is simulated."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append((s.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev = torch.device("cuda", 0)
    s = rng_state(dev)
    assert s["cuda"].tolist() == [7]  # one tensor, not a per-device list
    set_rng_state(s, dev)
    assert calls[-1] == ([7], dev)
    old = dict(s, cuda=[torch.tensor([i], dtype=torch.uint8) for i in range(8)])  # written on an 8-GPU node
    set_rng_state(old, torch.device("cuda", 3))
    assert calls[-1] == ([3], torch.device("cuda", 3))
    with pytest.warns(UserWarning, match="none for cuda:9"):
        set_rng_state(old, torch.device("cuda", 9))
    assert len(calls) == 2


def test_resume_takes_this_runs_optimizer_hyperparameters(tmp_path):
    """The optimizer's saved param groups carry the writer's betas/eps/weight decay; after a resume the current
    config's values apply (what config.json and later checkpoints record). lr is set every step anyway."""
    first = trainer(tmp_path, 4)
    first.train_step()
    first.save()
    first.close()
    second = trainer(tmp_path, 4)
    second.optim_cfg = OptimConfig(weight_decay=0.0, beta1=0.8, beta2=0.999, eps=1e-6)
    assert second.resume()
    groups = {g["name"]: g for g in second.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.0 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.999) and g["eps"] == 1e-6 for g in groups.values())
    second.optim_cfg = OptimConfig(weight_decay=0.05)
    assert second.resume()
    groups = {g["name"]: g for g in second.optimizer.param_groups}
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.05, 0.0)


def test_finished_stage_resume_keeps_its_summary(tmp_path):
    """``last_train`` is checkpointed: resuming a finished stage reports the same final train loss, not null."""
    t = trainer(tmp_path, 3)
    first = t.fit()
    t.close()
    again = trainer(tmp_path, 3)
    assert again.resume()
    assert again.fit()["final_train_loss"] == first["final_train_loss"] is not None


def test_data_position_refuses_another_dataset_batch_or_seed():
    """A data position (epoch, cursor, micro) only means something for the same dataset size, batch size and
    shuffling seed: ``RowBatchSource.load_state_dict`` must refuse each change (naming the key) rather than resume
    into a different example order, and accept its own state, after which it yields exactly the batches the
    writer would have yielded next."""
    data = TokenWindows(TOKENS[:2400], 16)  # 149 rows
    src = RowBatchSource(data, batch_size=8, micro_batch_size=4, seed=5)
    for _ in range(3):
        src.next_batch()
    state = src.state_dict()
    changed = {
        "n": RowBatchSource(TokenWindows(TOKENS[:2000], 16), batch_size=8, micro_batch_size=4, seed=5),
        "batch_size": RowBatchSource(data, batch_size=16, micro_batch_size=4, seed=5),
        "seed": RowBatchSource(data, batch_size=8, micro_batch_size=4, seed=6),
    }
    for key, other in changed.items():
        with pytest.raises(ValueError, match=rf"{key}=\d+ but this run has {key}="):
            other.load_state_dict(state)
    same = RowBatchSource(data, batch_size=8, micro_batch_size=4, seed=5)
    same.load_state_dict(state)
    assert same.state_dict() == state
    for _ in range(3):
        a, b = src.next_batch(), same.next_batch()
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_trainer_refuses_another_stages_checkpoint():
    """``Trainer.load_state_dict`` must reject a checkpoint written by another stage (e.g. an SFT state loaded by the
    pretrain trainer) before touching the model, instead of continuing at the other stage's step."""
    src = trainer(None, 4)
    src.stage = "sft"  # the state a stage-'sft' trainer of the same shapes writes
    state = src.state_dict()
    dst = trainer(None, 4, model_seed=1)
    before = [p.detach().clone() for p in dst.model.parameters()]
    with pytest.raises(ckpt.CheckpointError, match="checkpoint is from stage 'sft', not 'pretrain'"):
        dst.load_state_dict(state)
    assert dst.step == 0 and all(torch.equal(a, b) for a, b in zip(before, dst.model.parameters()))
    src.stage = "pretrain"
    dst.load_state_dict(src.state_dict())  # the same state under its own stage name loads
    assert all(torch.equal(a, b) for a, b in zip(src.model.parameters(), dst.model.parameters()))


def _variant(run_dir, steps=4, batch=8, n_tokens=2400, data_seed=5, n_layers=1):
    """A trainer whose checkpoint-relevant settings can each be changed, with the config dict a stage records."""
    sc = StageConfig(steps=steps, batch_size=batch, micro_batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2,
                     eval_every=100, eval_batches=2, save_every=100, keep_last=2, log_every=1)
    torch.manual_seed(0)
    mc = ModelConfig(**{**CFG.__dict__, "n_layers": n_layers})
    src = RowBatchSource(TokenWindows(TOKENS[:n_tokens], 16), batch_size=batch, micro_batch_size=4, seed=data_seed)
    config = {"seed": data_seed, "model": dict(mc.__dict__), "data": {"max_docs": n_tokens},
              "pretrain": {"steps": steps, "batch_size": batch}}
    return Trainer(Transformer(mc), causal_lm_loss_fn, src, sc, OptimConfig(), run_dir=run_dir, seed=11,
                   progress=False, config=config)


def causal_lm_loss_fn(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"]), {}, (batch["labels"] != -100).sum()


@pytest.mark.parametrize("change,match", [
    # each used to end in a traceback (ValueError from the batch source, RuntimeError from load_state_dict)
    (dict(batch=16), r"trained with pretrain\.batch_size=8 and this run has 16.*--set pretrain\.batch_size=8"),
    (dict(data_seed=6), r"seed=5 and this run has seed=6; pass --set seed=5"),
    (dict(n_tokens=2000), r"had 149 examples and this run's has 124 .*changed since the checkpoint: data\.max_docs "
                          r"2400 -> 2000; resume with the settings"),
    (dict(n_layers=2), r"its model does not fit this run's model: 9 tensors missing from it \(e\.g\. layers\.1\..*"
                       r"changed since the checkpoint: model\.n_layers 1 -> 2; resume with the model\.\* keys"),
    # fit() used to call the step-4 checkpoint of a 3-step stage "final"
    (dict(steps=3), r"it is at step 4, past pretrain\.steps=3; pass --set pretrain\.steps=4 or more"),
])
def test_resume_into_an_unfit_run_names_the_file_and_the_key(tmp_path, change, match):
    first = _variant(tmp_path)
    for _ in range(4):
        first.train_step()
    path = first.save()
    first.close()
    second = _variant(tmp_path, **change)
    with pytest.raises(ckpt.CheckpointError, match=rf"cannot resume from {re.escape(str(path))}: .*?{match}"):
        second.resume()


def test_damaged_latest_checkpoint_names_the_previous_one(tmp_path):
    t = _variant(tmp_path, steps=6)
    t.train_step()
    t.save()
    t.train_step()
    bad = t.save()
    t.close()
    os.truncate(bad, bad.stat().st_size // 2)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot read checkpoint .*step_00000002\.pt: .*The file is damaged: "
                                                   r"move it out of .* --resume continues from step_00000001\.pt"):
        _variant(tmp_path, steps=6).resume()
    bad.rename(tmp_path / "damaged.pt")  # what the message asks for: the previous checkpoint then resumes
    again = _variant(tmp_path, steps=6)
    assert again.resume() and again.step == 1


def test_save_removes_temp_files_of_dead_writers_only(tmp_path):
    """A save killed mid-write (SIGKILL, OOM) leaves ``.step_*.pt.tmp-<pid>`` behind, GBs for gpu-full; readers
    ignore it, and the next save deletes it unless its process still runs."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within this test is vanishingly unlikely)
    d = tmp_path / "ckpt"
    d.mkdir()
    stale = d / f".step_00000004.pt.tmp-{dead_pid}"
    live = d / f".step_00000004.pt.tmp-{os.getppid()}"  # a running process
    other = d / "notes.tmp-1"  # not a checkpoint temp file
    for p in (stale, live, other):
        p.write_bytes(b"x" * 10)
    ckpt.save_checkpoint(d, 5, {"model": {"w": torch.zeros(2)}})
    assert not stale.exists() and live.exists() and other.exists()
    assert ckpt.latest_checkpoint(d).name == "step_00000005.pt"
