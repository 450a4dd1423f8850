"""Trainer: schedule, weight-decay groups, accumulation == one big batch (token-weighted), non-finite handling,
NVTX/record_function names in a profiler trace, config errors, and the pretrain stage end to end on real data."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from mllm.config.pipeline_config import ConfigError, ModelConfig, OptimConfig, StageConfig
from mllm.models.transformer import Transformer, causal_lm_loss
from mllm.training import checkpoint as ckpt
from mllm.training.batches import EvalBatches, RowBatchSource, TokenWindows, batch_to_device, collate_rows
from mllm.training.metrics import MetricsWriter, device_peak_flops, mfu, plot_loss_curve, read_metrics
from mllm.training.profiling import RANGE_NAMES
from mllm.training.trainer import Trainer, lr_at, param_groups


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread avoids OpenMP spinning on a shared 2-core machine (100x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY.__dict__, **kw}))


def stream(n=4000, V=64, seed=0):
    """A learnable token stream: runs of +1 / +3 progressions mod V with a little noise."""
    rng = np.random.default_rng(seed)
    step = rng.choice([1, 3], size=n // 20).repeat(20)
    toks = (np.cumsum(step) + (rng.random(n) < 0.05) * rng.integers(0, V, n)) % V
    return toks.astype(np.int64)


def lm_loss(model, batch):
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"))
    return causal_lm_loss(logits, batch["labels"]), {}, (batch["labels"] != -100).sum()


def stage(**kw):
    base = dict(steps=6, batch_size=8, micro_batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=100,
                eval_batches=2, save_every=100, keep_last=2, log_every=1)
    return StageConfig(**{**base, **kw})


def make_trainer(sc=None, model=None, loss_fn=lm_loss, data=None, seed=0, **kw):
    sc = sc or stage()
    data = data if data is not None else TokenWindows(stream(), sc.seq_len)
    src = RowBatchSource(data, batch_size=sc.batch_size, micro_batch_size=sc.micro_batch_size, seed=seed)
    return Trainer(model or tiny_model(), loss_fn, src, sc, kw.pop("optim", OptimConfig()), seed=seed,
                   progress=False, **kw)


# ----------------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_to_min():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(21)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay after warm-up
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: mid-point of the cosine
    assert lrs[20] == pytest.approx(0.1)
    assert lr_at(3, lr=2.0, warmup_steps=0, total_steps=0, min_lr_ratio=0.1) == 2.0


def test_no_weight_decay_on_norms_biases_sinks():
    model = tiny_model(learned_sinks=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert any("sink" in n for n in nd) and any("norm" in n for n in nd)
    assert not any("norm" in n or "sink" in n for n in d)
    assert "tok_emb.weight" in d and all(p.ndim == 2 for p in decay["params"])
    assert len(d) + len(nd) == len(list(model.parameters()))


def test_accumulation_equals_one_big_batch_token_weighted():
    """8 sequences as 4 micro-batches of 2 == 1 micro-batch of 8, even with unequal target counts per micro-batch
    (the gradient is the mean over all target tokens of the step, not the mean of micro-batch means)."""
    data = TokenWindows(stream(2000), 16)

    class Masked:  # masks a different number of labels in every example
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            ex = dict(data[i])
            lab = ex["labels"].copy()
            lab[: (i * 5) % 15] = -100
            ex["labels"] = lab
            return ex

    params = []
    for mb in (2, 8):
        tr = make_trainer(stage(micro_batch_size=mb, steps=3), data=Masked())
        assert tr.accum_steps == 8 // mb
        for _ in range(3):
            tr.train_step()
        params.append([p.detach().clone() for p in tr.model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


class UnevenLabels:
    """TokenWindows with a different number of labels masked in every example (0-14 of 16): micro-batches of one
    step carry unequal target counts, so a mean of micro-batch means differs from the token mean."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        ex = dict(self.data[i])
        lab = ex["labels"].copy()
        lab[: (i * 7) % 15] = -100
        ex["labels"] = lab
        return ex


def test_train_step_matches_a_hand_written_step():
    """Two ``Trainer.train_step`` calls (2 micro-batches each, uneven target counts, an active grad_clip, warm-up)
    against the same two steps written out by hand: gradient of the token-mean loss over the whole step, global-norm
    clip to ``optim.grad_clip``, ``torch.optim.AdamW`` at ``lr_at(step)``. Pins, per step: the gradient the optimizer
    sees (clipped), the learning rate in its param groups, the logged ``grad_norm`` (the pre-clip norm of the
    token-mean gradient: a sum over tokens would be ~N times larger), the logged ``lr`` and ``loss``, and the
    parameters afterwards."""
    sc = stage(steps=10, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=4)
    oc = OptimConfig(grad_clip=0.05, weight_decay=0.1)
    data = UnevenLabels(TokenWindows(stream(2000), 16))
    tr = make_trainer(sc, data=data, optim=oc)
    assert tr.accum_steps == 2
    seen = []  # (lrs of the param groups, gradients) at each optimizer.step
    tr.optimizer.register_step_pre_hook(lambda opt, args, kw: seen.append(
        ([g["lr"] for g in opt.param_groups], [p.grad.detach().clone() for p in tr._params])))

    ref = tiny_model()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref_src = RowBatchSource(data, batch_size=8, micro_batch_size=4, seed=0)
    ref_opt = torch.optim.AdamW(param_groups(ref, oc.weight_decay), lr=sc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)
    for step in range(2):
        out = tr.train_step()
        lr = lr_at(step, lr=sc.lr, warmup_steps=sc.warmup_steps, total_steps=sc.steps, min_lr_ratio=oc.min_lr_ratio)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_opt.zero_grad(set_to_none=True)
        batches = [ref_src.next_batch() for _ in range(2)]
        counts = [int((b["labels"] != -100).sum()) for b in batches]
        n = sum(counts)
        assert counts[0] != counts[1], "the test needs unequal target counts per micro-batch"
        total = sum(causal_lm_loss(ref(b["input_ids"]), b["labels"], reduction="sum") for b in batches)
        (total / n).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref_params, oc.grad_clip))
        assert norm > 2 * oc.grad_clip, "the clip must be active for this test to pin it"
        clipped = [p.grad.detach().clone() for p in ref_params]
        ref_opt.step()

        lrs, grads = seen[step]
        assert out["lr"] == pytest.approx(lr) and lrs == pytest.approx([lr, lr])
        assert out["n"] == n and out["loss"] == pytest.approx(total.item() / n, rel=1e-5)
        assert out["grad_norm"] == pytest.approx(norm, rel=1e-4)
        for a, b in zip(grads, clipped):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        for (name, a), b in zip(tr.model.named_parameters(), ref.parameters()):
            # atol: Adam's first steps move each weight by ~lr·sign(g), so a gradient element near 0 may round
            # either way; 1e-5 is under 1% of a step (lr >= 2.5e-3 here), far below the effect of a wrong lr
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    # precondition: the warm-up lr differs from the stage lr, so an optimizer left at the stage lr shows
    assert lr_at(0, lr=sc.lr, warmup_steps=4, total_steps=10, min_lr_ratio=0.1) != sc.lr


def test_nonfinite_steps_skipped_counted_then_error(tmp_path):
    bad_steps = {2, 4, 5, 6}  # one isolated bad step, then three in a row

    calls = {"n": 0}

    def loss_fn(model, batch):
        loss, m, n = lm_loss(model, batch)
        step = calls["n"] // 2  # 2 micro-batches per step
        calls["n"] += 1
        if step in bad_steps:
            loss = loss * float("nan")
        return loss, m, n

    sc = stage(steps=20, save_every=1, keep_last=10)
    tr = make_trainer(sc, loss_fn=loss_fn, run_dir=tmp_path, optim=OptimConfig(max_consecutive_nonfinite=3))
    snapshots = []
    with pytest.raises(ckpt.NonFiniteError, match="3 consecutive"):
        for _ in range(20):
            before = [p.detach().clone() for p in tr.model.parameters()]
            res = tr.train_step()
            snapshots.append((res["finite"], before, [p.detach().clone() for p in tr.model.parameters()]))
            tr.save()
    assert tr.skipped_steps == 4 and tr.step == 7
    for finite, before, after in snapshots:
        changed = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert changed == finite  # a skipped step leaves the weights untouched
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "nonfinite"] == [3, 5, 6, 7]
    # every checkpoint on disk is finite and loadable; the newest is from before the failure
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "pretrain")
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_save_refuses_nan_weights(tmp_path):
    tr = make_trainer(stage(steps=2), run_dir=tmp_path)
    tr.train_step()
    good = tr.save()
    with torch.no_grad():
        next(tr.model.parameters())[0, 0] = float("nan")
    tr.train_step()
    with pytest.raises(ckpt.NonFiniteError, match="NaN"):
        tr.save()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints" / "pretrain") == good
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints" / "pretrain")) == 1


def test_range_names_in_profiler_trace(tmp_path):
    """The five ranges show up in a CPU torch.profiler trace, both around a plain step and via --profile."""
    tr = make_trainer(stage(steps=4), run_dir=tmp_path, profile=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tr.train_step()
    names = {e.name for e in prof.events()}
    assert set(RANGE_NAMES) <= names
    tr.fit()  # profile=True: wait 1, warm-up 1, record 3 (cut short at the end)
    trace = tmp_path / "profile" / "pretrain_rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert set(RANGE_NAMES) <= {e.get("name") for e in events}


def test_config_errors(tmp_path):
    src = RowBatchSource(TokenWindows(stream(), 16), batch_size=8, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size.*micro_batch_size=3"):
        Trainer(tiny_model(), lm_loss, src, stage(batch_size=8, micro_batch_size=3), OptimConfig())
    with pytest.raises(ConfigError, match="micro_batch_size"):
        Trainer(tiny_model(), lm_loss, src, stage(micro_batch_size=4), OptimConfig())
    with pytest.raises(ConfigError, match="max_consecutive_nonfinite"):
        make_trainer(optim=OptimConfig(max_consecutive_nonfinite=0))
    with pytest.raises(ConfigError, match="sft.lr"):
        Trainer(tiny_model(), lm_loss, src, stage(micro_batch_size=2, lr=0.0), OptimConfig(), stage="sft")
    with pytest.raises(ValueError, match="fewer than one batch"):
        RowBatchSource(TokenWindows(stream(100), 16), batch_size=8, micro_batch_size=4)

    from mllm.stages import get_stage
    from mllm.training.runner import main

    with pytest.raises(ConfigError, match="valid stages are.*pretrain"):
        get_stage("nope")
    assert main(["--config", "local-smoke", "--stage", "nope"]) == 2
    assert main(["--config", "local-smoke", "--stage", "pretrain", "--set", "pretrain.nosuch=1"]) == 2
    # a batch that cannot split over the ranks is refused before any data loading, naming the key
    from mllm.config import load_config
    from mllm.training.runner import check_batch_sizes

    cfg = load_config("local-smoke")
    with pytest.raises(ConfigError, match=r"'dpo\.batch_size'.*world_size=3"):
        check_batch_sizes(cfg, "dpo", 3)
    with pytest.raises(ConfigError, match=r"'pretrain\.batch_size'"):
        check_batch_sizes(cfg, "all", 3)
    check_batch_sizes(cfg, "eval", 3)  # eval trains nothing
    check_batch_sizes(cfg, "all", 1)


def test_config_error_is_printed_by_rank_0_only(capsys, monkeypatch):
    """Under torchrun a config error comes before the process group: each rank used to print it."""
    from mllm.training.runner import main

    bad = ["--stage", "pretrain", "--set", "pretrain.nosuch=1"]
    monkeypatch.setenv("RANK", "1")
    assert main(bad) == 2
    assert "pretrain.nosuch" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert main(bad) == 2
    assert "error: " in capsys.readouterr().err


def test_cli_takes_an_existing_runs_own_config(tmp_path, capsys, monkeypatch):
    """Without --config, ``--run-name R`` of an existing run uses R's config.json (the local-smoke preset would
    evaluate a gpu-full run at smoke sizes on the CPU, and overwrite its config.json); missing data files are one
    ``error:`` line, not a traceback."""
    from mllm.config import load_config
    from mllm.training.runner import main

    import mllm.training.runner as runner_mod

    devices = []  # the process group must be set up for the run's device, not the preset's
    real_init = runner_mod.init_distributed
    monkeypatch.setattr(runner_mod, "init_distributed", lambda device: devices.append(device) or real_init("cpu"))
    monkeypatch.delenv("MLLM_DATA_DIR", raising=False)
    run = tmp_path / "R"
    run.mkdir()
    mine = load_config("local-smoke", ["pretrain.steps=7", "model.n_layers=3", "name=mine", "device=auto"]).to_dict()
    (run / "config.json").write_text(json.dumps(mine))
    missing = tmp_path / "no-data"
    rc = main(["--stage", "pretrain", "--run-name", "R", "--no-progress", "--set", f"run_root={tmp_path}",
               "--set", f"data.data_dir={missing}"])
    err = capsys.readouterr().err
    assert rc == 2 and "the run's own" in err and err.strip().splitlines()[-1].startswith("error:")
    assert str(missing) in err and "Traceback" not in err
    # --set applied on top (the error names the missing folder), and the failed command left config.json as it was
    assert json.loads((run / "config.json").read_text()) == mine and "note: restored" in err
    assert devices == ["auto"]


def test_metrics_mfu_and_writer(tmp_path):
    assert mfu(6e9, 1000.0, 989.4e12, world_size=2) == pytest.approx(6e12 / (2 * 989.4e12))
    assert mfu(None, 1000.0, 989.4e12) is None and mfu(1e9, 1000.0, None) is None
    assert device_peak_flops("cpu")[0] is None
    w = MetricsWriter(tmp_path / "m.jsonl")
    for s in range(1, 6):
        w.write({"stage": "pretrain", "step": s, "kind": "train", "loss": 5.0 - s, "t": torch.tensor(1.5)})
    w.write({"stage": "pretrain", "step": 5, "kind": "val", "val_loss": float("nan")})
    assert w.truncate_after("pretrain", 3) == 3
    recs = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["t"] == 1.5
    assert plot_loss_curve(recs, tmp_path / "f" / "loss.png").stat().st_size > 1000


def test_count_tokens_may_be_any_callable():
    """The start record names the token counter: a callable object without a docstring or __name__ works too."""
    class Counter:
        def __call__(self, batch):
            return int(batch["input_ids"].numel())

    t = make_trainer(count_tokens=Counter())
    assert t.count_tokens_doc == "Counter" and t.train_step()["tokens"] == 8 * 16


def test_mfu_peak_matches_the_card_variant(monkeypatch):
    """PCIe / NVL cards share the SXM name's prefix but not its peak: the first, longer match must win."""
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756.5e12),
                       ("NVIDIA H100 NVL", 835.5e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA H200", 989.4e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        got, note = device_peak_flops("cuda")
        assert got == peak, name
        assert name in note


def test_metrics_writer_cuts_a_torn_last_line(tmp_path):
    """A writer killed mid-line leaves a fragment; the next writer must not glue its record onto it."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"stage": "pretrain", "step": 1, "kind": "train", "loss": 2.0}\n{"stage": "pretrain", "st')
    w = MetricsWriter(path)
    w.write({"stage": "pretrain", "step": 2, "kind": "train", "loss": 1.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_fresh_restart_replaces_the_earlier_attempts_records(tmp_path):
    """A stage that dies before its first checkpoint starts over at step 0 (no checkpoint to resume): the earlier
    attempt's train/val records are dropped, not kept next to the new ones; other stages' records stay."""
    MetricsWriter(tmp_path / "metrics.jsonl").write({"stage": "sft", "step": 3, "kind": "train", "loss": 1.0})
    sc = stage(steps=3, save_every=100)
    first = make_trainer(sc, run_dir=tmp_path)
    first.train_step(), first.train_step()
    first.log({"kind": "train", "loss": 9.0})  # what fit() logs at step 2, before the "crash"
    first.close()
    second = make_trainer(sc, run_dir=tmp_path)
    assert not second.resume()  # nothing saved yet
    second.log({"kind": "data", "rows": 1})  # the stage's data record, logged after the trainer is built
    second.fit()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if r["stage"] == "pretrain" and r["kind"] == "train"] == [1, 2, 3]
    assert sum(r["kind"] == "data" for r in recs) == 1
    assert [(r["stage"], r["step"]) for r in recs if r["stage"] == "sft"] == [("sft", 3)]


def test_collate_cu_seqlens_offsets_rows():
    rows = [{"input_ids": np.arange(4), "cu_seqlens": np.array([0, 1, 4])},
            {"input_ids": np.arange(4), "cu_seqlens": np.array([0, 4])}]
    b = collate_rows(rows)
    assert b["input_ids"].shape == (2, 4) and b["cu_seqlens"].tolist() == [0, 1, 4, 8]
    with pytest.raises(ValueError, match="row 0 cu_seqlens"):
        collate_rows([{"input_ids": np.arange(4), "cu_seqlens": np.array([0, 3])}])


def test_batch_to_device_routes_document_bounds_through_host_validation(monkeypatch):
    """On the way to a GPU, cu_seqlens goes through ``cu_seqlens_to_device`` with B and T from input_ids (checked on
    the host, so attention needs no read-back sync); other keys are plain copies, order and non-tensors kept. The
    meta device stands in for a GPU here: it takes the non-CPU branch without one."""
    import mllm_kernels.attention  # noqa: F401 - the module batch_to_device imports lazily

    A = sys.modules["mllm_kernels.attention"]
    calls = []
    monkeypatch.setattr(A, "cu_seqlens_to_device", lambda cu, B, T, dev: calls.append((cu.device.type, B, T)) or cu.to(dev))
    rows = [{"input_ids": np.arange(4), "labels": np.arange(4), "cu_seqlens": np.array([0, 1, 4])}] * 3
    batch = {"n": 7, **collate_rows(rows)}
    out = batch_to_device(batch, "meta")
    assert list(out) == list(batch) and out["n"] == 7 and calls == [("cpu", 3, 4)]
    assert all(out[k].device.type == "meta" for k in ("input_ids", "labels", "cu_seqlens"))
    calls.clear()
    on_cpu = batch_to_device(batch, "cpu")  # CPU: attention validates CPU bounds itself, for free
    assert calls == [] and on_cpu["cu_seqlens"] is batch["cu_seqlens"]
    assert batch_to_device({"input_ids": batch["input_ids"], "cu_seqlens": None}, "meta")["cu_seqlens"] is None


def test_pad_cu_seqlens_repeats_the_end_to_a_fixed_length():
    from mllm.training.batches import pad_cu_seqlens

    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert pad_cu_seqlens(cu, 6).tolist() == [0, 3, 4, 8, 8, 8] and pad_cu_seqlens(cu, 6).dtype == torch.int32
    assert pad_cu_seqlens(cu, 4) is cu
    with pytest.raises(ValueError, match="more than the padded length 3"):
        pad_cu_seqlens(cu, 3)
    rows = [{"input_ids": np.arange(4), "cu_seqlens": np.array([0, 1, 4])}] * 2
    out = batch_to_device(collate_rows(rows), "cpu", fixed_cu_seqlens=True)
    assert out["cu_seqlens"].tolist() == [0, 1, 4, 5, 8] + [8] * 4  # B·T + 1 = 9 values


def test_batches_disjoint_and_world_invariant():
    data = [{"input_ids": np.array([i])} for i in range(187)]  # an example is its own index
    one = RowBatchSource(data, batch_size=8, micro_batch_size=2, seed=3)
    two = [RowBatchSource(data, batch_size=8, micro_batch_size=2, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for _ in range(30):  # spans an epoch boundary (23 steps per epoch)
        a = torch.cat([one.next_batch()["input_ids"] for _ in range(4)])
        per_rank = [torch.cat([s.next_batch()["input_ids"] for _ in range(2)]) for s in two]
        assert torch.equal(a, torch.cat(per_rank))  # same step batch; rank 0 holds the first half
        assert a.unique().numel() == 8  # no example twice in a step
    assert one.epoch == 1 and one.state_dict() == two[0].state_dict()
    ev = [list(EvalBatches(data, micro_batch_size=4, rank=r, world_size=2, max_examples=22)) for r in (0, 1)]
    seen = torch.cat([b["input_ids"] for e in ev for b in e]).flatten()
    assert [len(e) for e in ev] == [3, 3] and sorted(seen.tolist()) == list(range(22))  # last batch short
    assert [len(b["input_ids"]) for b in ev[1]] == [4, 4, 2]


# ----------------------------------------------------------------------------------------------------
def _smoke_args(root, name, *extra):
    sets = ["data.tokenizer=byte", "model.vocab_size=257", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64", "model.max_seq_len=128",
            "data.max_docs=30", "pretrain.seq_len=64", "pretrain.steps=12", "pretrain.batch_size=8",
            "pretrain.micro_batch_size=4", "pretrain.lr=5e-3", "pretrain.warmup_steps=2",
            "pretrain.eval_every=6", "pretrain.eval_batches=2", "pretrain.save_every=6", "pretrain.log_every=3",
            f"run_root={root}", f"data.cache_dir={root}/cache"] + list(extra)
    args = ["--config", "local-smoke", "--stage", "pretrain", "--run-name", name, "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


def test_pretrain_stage_end_to_end_loss_decreases(data_dir, tmp_path):
    from mllm.training.runner import main

    assert main(_smoke_args(tmp_path, "r1")) == 0
    run = tmp_path / "r1"
    summary = json.loads((run / "summary.json").read_text())["pretrain"]
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0
    assert summary["final_val_loss"] < summary["first_val_loss"] - 1.0  # from ln(257) = 5.55 down
    recs = read_metrics(run / "metrics.jsonl", "pretrain")
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    assert train[-1] < train[0] and all(r["tokens_per_s"] > 0 for r in recs if r["kind"] == "train")
    assert json.loads((run / "config.json").read_text())["pretrain"]["steps"] == 12
    assert (run / "figures" / "pretrain_loss.png").is_file()
    assert ckpt.require_stage_output(run, "pretrain", "sft").name == "step_00000012.pt"
    # not overwritten without --resume; --resume on a finished stage is a no-op that succeeds
    assert main(_smoke_args(tmp_path, "r1")) == 2
    assert main(_smoke_args(tmp_path, "r1") + ["--resume"]) == 0
    assert not summary["data"]["cache_hit"]
    assert json.loads((run / "summary.json").read_text())["pretrain"]["data"]["cache_hit"]  # tokenised once
    # packed rows (position_ids + cu_seqlens into the model)
    assert main(_smoke_args(tmp_path, "p1", "data.packing=true", "pretrain.steps=3")) == 0
    s = json.loads((tmp_path / "p1" / "summary.json").read_text())["pretrain"]
    assert s["data"]["packing"] and 0.5 < s["data"]["packing_efficiency"] <= 1.0
    assert math.isfinite(s["final_val_loss"])


def test_loss_curve_y_label_names_the_stage_loss(tmp_path, monkeypatch):
    import matplotlib.axes

    from mllm.training.metrics import LOSS_LABELS

    seen = []
    orig = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, label, *a, **k: (seen.append(label), orig(self, label, *a, **k))[1])
    recs = [{"kind": "train", "step": s, "loss": 0.7 - 0.01 * s} for s in range(1, 5)]
    plot_loss_curve(recs, tmp_path / "dpo.png", ylabel=LOSS_LABELS["dpo"])
    plot_loss_curve(recs, tmp_path / "pre.png")
    assert seen == [LOSS_LABELS["dpo"], "cross-entropy (nats/token)"] and "DPO" in seen[0]


def test_perplexity_only_for_token_cross_entropy_losses():
    toks = torch.from_numpy(stream(n=80)[:68].copy())
    val = [{"input_ids": toks.view(4, 17)[:, :16], "labels": toks.view(4, 17)[:, 1:]}]
    with_ppl = make_trainer(val_data=val).evaluate()
    without = make_trainer(val_data=val, perplexity=False).evaluate()  # e.g. the DPO and verifier losses
    assert "val_ppl" in with_ppl and abs(with_ppl["val_ppl"] - math.exp(with_ppl["val_loss"])) < 1e-6
    assert "val_ppl" not in without and without["val_loss"] == with_ppl["val_loss"]


class PackedRows:
    """Rows of T tokens cut into 1-4 documents (a different count per row, as packed pretraining has), with
    positions restarting per document and per-row ``cu_seqlens``; a learnable stream as tokens."""

    def __init__(self, n=32, T=16, V=64, seed=0):
        rng = np.random.default_rng(seed)
        toks = stream(20 * (n * (T + 1) // 20 + 1), V, seed)  # stream() takes a multiple of 20
        self.rows = []
        for i in range(n):
            row = toks[i * (T + 1): (i + 1) * (T + 1)]
            cuts = np.sort(rng.choice(np.arange(1, T), size=int(rng.integers(0, 4)), replace=False))
            cu = np.concatenate([[0], cuts, [T]]).astype(np.int64)
            pos = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
            self.rows.append({"input_ids": row[:-1], "labels": row[1:], "position_ids": pos, "cu_seqlens": cu})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_cuda_graph_mode_pads_document_bounds_and_keeps_gradients(monkeypatch):
    """compile_mode="reduce-overhead" (CUDA graphs) trains like the plain loop: the same losses and weights over 3
    steps of packed rows with 1-4 documents each, while every micro-batch's cu_seqlens reaches the model padded to
    one length (B·T + 1: one graph for every document count), gradients are allocated up front and zeroed in place
    (never None between steps), and every forward opens a new CUDA-graph step. On a CPU inductor records no graph, but
    the trainer's bookkeeping is the same code (the CUDA run of it is the next test)."""
    import mllm.training.trainer as trainer_mod

    sc = stage(steps=3, batch_size=8, micro_batch_size=4)
    seen, marks = [], []
    real_move = trainer_mod.batch_to_device

    def move(batch, device, fixed_cu_seqlens=False):
        out = real_move(batch, device, fixed_cu_seqlens=fixed_cu_seqlens)
        seen.append((int(batch["cu_seqlens"].numel()), int(out["cu_seqlens"].numel())))
        return out

    monkeypatch.setattr(trainer_mod, "batch_to_device", move)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    runs = {}
    for mode in (None, "reduce-overhead"):
        seen.clear()
        tr = make_trainer(sc, data=PackedRows(), compile=mode is not None, compile_mode=mode)
        assert tr.cudagraphs == (mode is not None)
        losses = [tr.train_step()["loss"] for _ in range(3)]
        grads_kept = all(p.grad is not None and not p.grad.any() for p in tr.model.parameters())
        runs[mode] = (losses, [p.detach().clone() for p in tr.model.parameters()], list(seen), grads_kept)
    plain, graphs = runs[None], runs["reduce-overhead"]
    assert len({n for n, _ in plain[2]}) > 1, "the test data must hold different document counts"
    assert all(a == b for a, b in plain[2])  # without CUDA graphs: unpadded
    assert {b for _, b in graphs[2]} == {4 * 16 + 1}
    assert not plain[3] and graphs[3]  # set_to_none vs allocated once and zeroed in place
    assert len(marks) == 3 * 2  # one per micro-batch forward
    assert graphs[0] == pytest.approx(plain[0], rel=1e-5)
    for a, b in zip(plain[1], graphs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="compile_mode"):
        make_trainer(sc, compile_mode="reduce-overhead")


def test_cuda_graph_mode_warns_once_about_many_batch_shapes():
    """Stages that pad each batch to its own length record one CUDA graph per length: past MAX_GRAPH_SHAPES distinct
    shapes the trainer says so, once, naming the setting and the fix; repeated shapes and non-graph modes stay quiet."""
    import warnings

    from mllm.training.trainer import MAX_GRAPH_SHAPES

    def batch(T):
        return {"input_ids": torch.zeros(4, T, dtype=torch.long), "labels": torch.zeros(4, T, dtype=torch.long)}

    for mode, expect in (("default", 0), ("reduce-overhead", 1)):
        tr = make_trainer(compile=True, compile_mode=mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for T in list(range(2, 2 + MAX_GRAPH_SHAPES)) * 2 + [40, 41, 42]:  # repeats count once
                tr._note_graph_shape(batch(T))
        hits = [w for w in caught if "different shapes" in str(w.message)]
        assert len(hits) == expect, [str(w.message) for w in caught]
    assert "compile_mode='reduce-overhead'" in str(hits[0].message) and "seq_len" in str(hits[0].message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_cuda_graphs_train_packed_rows_on_the_gpu(monkeypatch):
    """The Triton model under torch.compile mode="reduce-overhead" on packed rows with varying document counts:
    no CUDA-graph-tree error (a document-bound tensor cached inside the graph pool was one), CUDA graphs really used
    (inductor skips them with only a log line when something in the graph prevents them), one padded cu_seqlens
    length, and losses that follow the non-graph compiled run (bf16 autocast: loose tolerance)."""
    import mllm.training.trainer as trainer_mod
    from torch._dynamo.utils import counters

    lengths = []
    real_move = trainer_mod.batch_to_device

    def move(batch, device, fixed_cu_seqlens=False):
        out = real_move(batch, device, fixed_cu_seqlens=fixed_cu_seqlens)
        lengths.append((fixed_cu_seqlens, int(out["cu_seqlens"].numel())))
        return out

    sc = stage(steps=4, batch_size=8, micro_batch_size=4, seq_len=16)
    cfg = dict(d_model=128, n_heads=2, n_kv_heads=1, ffn_dim=256, kernel_backend="triton")
    val_rows = PackedRows(8, seed=1).rows
    val = [collate_rows(val_rows[i:i + 4]) for i in (0, 4)]
    runs = {}
    counters.clear()
    monkeypatch.setattr(trainer_mod, "batch_to_device", move)
    for mode in ("default", "reduce-overhead"):
        runs[mode] = _train_eval_train(sc, cfg, mode, val)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert {n for fixed, n in lengths if fixed} == {4 * 16 + 1} and any(not fixed for fixed, _ in lengths)
    assert runs["reduce-overhead"] == pytest.approx(runs["default"], rel=2e-2)


def _train_eval_train(sc, cfg, mode, val):
    tr = make_trainer(sc, model=tiny_model(**cfg), data=PackedRows(), device="cuda", compile=True, compile_mode=mode,
                      val_data=val)
    losses = [tr.train_step()["loss"] for _ in range(2)]
    losses.append(tr.evaluate()["val_loss"])  # a no-grad graph between training steps
    losses += [tr.train_step()["loss"] for _ in range(2)]
    tr.close()
    assert all(math.isfinite(x) for x in losses)
    return losses


def test_start_record_names_the_throughput_and_mfu_formulas(tmp_path):
    t = make_trainer(stage(steps=1, batch_size=4), run_dir=tmp_path)
    t.fit()
    start = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "start")
    assert start["tokens_per_s_formula"].startswith("tokens / seconds inside train_step")
    assert start["mfu_formula"].startswith("flops_per_token * tokens_per_s / (peak_flops_per_device * world_size)")
    assert start["peak_flops_note"] and start["tokens"].startswith("Tokens processed")


def test_flops_per_token_is_evaluated_once_per_row_length():
    """MFU's FLOPs per token are a function of the row length only: the trainer evaluates ``model.flops_per_token``
    once per distinct length, not on every micro-batch (it sums the model's parameter sizes: 0.1-0.5 ms of host time
    per call for the gpu-full model, inside the timed training step)."""
    model = tiny_model()
    calls = []
    real = model.flops_per_token

    def counting(T):
        calls.append(T)
        return real(T)

    model.flops_per_token = counting
    t = make_trainer(stage(steps=3), model=model)  # 3 steps x 2 micro-batches of 16-token rows
    t.fit()
    assert calls == [16]
    assert t.last_train["flops"] == pytest.approx(2 * 4 * 16 * real(16))
