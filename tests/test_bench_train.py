"""scripts/bench_train.py on CPU with a tiny config, eager backend only (the triton backend would run the
Triton interpreter here; its code path is exercised on the GPU)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "local-smoke", "--set", "model.vocab_size=512", "--micro-batch", "2", "--seq-len", "32",
        "--threads", "1", "--device", "cpu", "--grad-accum", "1"]
HEAD64 = ["--set", "model.d_model=128", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1"]  # a kernel's D


@pytest.fixture(scope="module")
def bt():
    spec = importlib.util.spec_from_file_location("bench_train_under_test", REPO / "scripts" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _report(out: Path):
    (path,) = out.glob("bench_train_*_cpu.json")
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_eager_cpu_throughput_and_report(bt, tmp_path):
    rc = bt.main(TINY + ["--backends", "eager", "--steps", "3", "--warmup", "1", "--grad-accum", "2",
                         "--out", str(tmp_path)])
    assert rc == 0
    rep, md = _report(tmp_path)
    (r,) = rep["results"]
    assert r["backend"] == "eager" and "error" not in r
    assert r["tokens_per_s"] > 0
    # tokens/s is the timed tokens (steps x accumulation x B x T) over the timed wall time
    assert math.isclose(r["tokens_per_s"], 3 * 2 * 2 * 32 / r["wall_s"], rel_tol=1e-9)
    # and over the median timed step (not moved by an unsettled first step)
    assert math.isclose(r["tokens_per_s_median_step"], 2 * 2 * 32 / (r["step_ms_median"] / 1e3), rel_tol=1e-9)
    assert r["mfu"] is None and rep["peak_flops"] is None  # CPU: no peak, MFU n/a
    assert r["peak_mem_mb"] is None
    # the CPU's peak memory: the process's resident-set high-water mark, not "n/a" (the issue asks for peak memory)
    assert r["peak_rss_mb"] > 10 and f"{r['peak_rss_mb']:,.0f} (RSS)" in md
    # the phases tile each step exactly (data/forward/backward summed over the 2 micro-batches)
    ph = r["phase_ms_all"]
    assert len(ph["step"]) == 3
    for i in range(3):
        parts = sum(ph[p][i] for p in ("data", "forward", "backward", "optimizer"))
        assert math.isclose(parts, ph["step"][i], rel_tol=1e-6)
        assert ph["forward"][i] > 0 and ph["backward"][i] > 0 and ph["optimizer"][i] > 0
    # MFU numerator uses the model's own 6N + 12·L·H·Q·T
    from mllm.config.pipeline_config import load_config
    from mllm.models.transformer import Transformer

    model = Transformer(load_config("local-smoke", ["model.vocab_size=512"]).model)
    assert r["flops_per_token"] == model.flops_per_token(32)
    assert math.isfinite(r["loss_first"]) and abs(r["loss_first"] - math.log(512)) < 1.0  # ~uniform at init
    env = rep["environment"]
    assert env["card"] == "cpu" and env["torch"] == torch.__version__ and env["git_commit"]
    assert "| eager | " in md and "n/a" in md
    # the stage's tokens over the measured rate: local-smoke pretrains 60 steps x 16 x 128, but this run used T=32
    proj = rep["pretrain_projection"]
    assert proj["tokens"] == 60 * 16 * 128 and proj["same_seq_len"] is False and proj["hours"] == {}
    assert "Pretraining of" not in md
    assert r["attention_bwd_dq"] is None and "Attention backward dq" not in md  # eager: no attention kernel
    atomic = {**rep, "results": [{**r, "attention_bwd_dq": "atomic"}]}  # a triton row run with MLLM_ATTN_DQ=atomic
    assert "Attention backward dq: atomic (MLLM_ATTN_DQ)." in bt.markdown(atomic)
    assert r["attention_tiles"] is None and "Attention tiles" not in md
    tuned = {**rep, "results": [{**r, "attention_tiles": "/x/attention_tiles.json"}]}  # run with MLLM_ATTN_TILES
    assert "Attention tiles: /x/attention_tiles.json (MLLM_ATTN_TILES)" in bt.markdown(tuned)


def test_trainer_loop_times_the_real_train_step(bt, tmp_path):
    """``--loop trainer`` runs Trainer.train_step on the same model and batches: the same first loss as the script's
    own loop (one document per row, so every micro-batch has the same number of targets and the token-weighted mean is
    the plain mean), tokens/s over the same token count, and no per-range breakdown."""
    common = TINY + ["--backends", "eager", "--steps", "2", "--warmup", "1", "--grad-accum", "2"]
    firsts = {}
    for loop in ("bench", "trainer"):
        out = tmp_path / loop
        assert bt.main(common + ["--loop", loop, "--out", str(out)]) == 0
        rep, md = _report(out)
        (r,) = rep["results"]
        assert "error" not in r and r["tokens_per_s"] > 0
        firsts[loop] = r["loss_first"]
    assert r["loop"] == "trainer" and r["cudagraphs"] is False
    assert math.isclose(r["tokens_per_s"], 2 * 2 * 2 * 32 / r["wall_s"], rel_tol=1e-9)
    assert len(r["phase_ms_all"]["step"]) == 2 and r["phase_ms_median"]["forward"] is None
    assert math.isclose(r["tokens_per_s_median_step"], 2 * 2 * 32 / (r["step_ms_median"] / 1e3), rel_tol=1e-9)
    assert "Timed loop: `Trainer.train_step`" in md
    assert firsts["trainer"] == pytest.approx(firsts["bench"], rel=1e-5)


def test_trainer_loop_under_the_cuda_graph_mode_with_packed_rows(bt, tmp_path):
    """The trainer's CUDA-graph bookkeeping (padded cu_seqlens, preallocated gradients) through ``--loop trainer``
    with packed rows; on CPU inductor records no graph, on a GPU this is gpu_check's trainer throughput."""
    rc = bt.main(TINY + ["--backends", "eager+compile", "--compile-mode", "reduce-overhead", "--loop", "trainer",
                         "--docs-per-row", "3", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    (r,) = _report(tmp_path)[0]["results"]
    assert r["cudagraphs"] is True and math.isfinite(r["loss_last"])


def test_pretraining_projection(bt):
    from mllm.config.pipeline_config import load_config

    cfg = load_config("gpu-full")
    res = [{"backend": "triton", "tokens_per_s": 250_596.0}, {"backend": "eager", "error": "boom"}]
    proj = bt.pretrain_projection(res, cfg, 1024)
    assert proj["tokens"] == 40_000 * 128 * 1024 and list(proj["hours"]) == ["triton"]
    assert math.isclose(proj["hours"]["triton"], 40_000 * 128 * 1024 / 250_596 / 3600)  # 5.81 h
    line = bt.projection_line(proj, "gpu-full")
    assert "40,000 steps × 128 × 1,024 = 5.24 B tokens" in line and "triton 5.8 h" in line
    # gpu-full pretrains packed rows: a one-document-per-row rate is only a lower bound on the hours
    assert proj["packed_mismatch"] is True and "lower bound" in line
    packed = bt.pretrain_projection(res, cfg, 1024, docs_per_row=4)
    assert packed["packed_mismatch"] is False and "lower bound" not in bt.projection_line(packed, "gpu-full")
    # a smoke config's projection is minutes and a count, not "0.00 B tokens ... 0.0 h"
    small = {"steps": 60, "batch_size": 16, "seq_len": 128, "tokens": 60 * 16 * 128,
             "hours": {"eager": 60 * 16 * 128 / 1_174 / 3600, "triton": 3 / 3600}}
    line = bt.projection_line(small, "local-smoke")
    assert "= 122,880 tokens)" in line and "eager 1.7 min" in line and "triton 3 s" in line


def test_failing_backend_is_recorded_and_others_run(bt, tmp_path, monkeypatch):
    real = bt.build_model

    def build(cfg, kernel_backend, device, seed):
        if kernel_backend == "triton":
            raise RuntimeError("no kernels for you")
        return real(cfg, kernel_backend, device, seed)

    monkeypatch.setattr(bt, "build_model", build)
    rc = bt.main(TINY + HEAD64 + ["--backends", "triton,eager", "--steps", "2", "--warmup", "0", "--out",
                                  str(tmp_path)])
    assert rc == 1
    rep, md = _report(tmp_path)
    tri, eag = rep["results"]
    assert tri["backend"] == "triton" and "no kernels for you" in tri["error"]
    assert eag["backend"] == "eager" and eag["tokens_per_s"] > 0
    assert "| triton | error: RuntimeError: no kernels for you" in md


def test_packed_batches_are_valid_documents(bt):
    (b,) = bt.make_batches(1, batch=3, seq_len=16, vocab=50, docs_per_row=4, seed=1, pin=False)
    cu = b["cu_seqlens"].long()
    assert cu[0] == 0 and cu[-1] == 48 and len(cu) == 3 * 4 + 1 and bool((cu[1:] > cu[:-1]).all())
    assert set(range(0, 48, 16)) <= set(cu.tolist())  # no document crosses a row
    flat_pos = b["position_ids"].reshape(-1)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert flat_pos[s:e].tolist() == list(range(e - s))  # RoPE positions restart per document
        assert b["labels"].reshape(-1)[e - 1] == -100  # no prediction across a document boundary
    assert torch.equal(b["labels"][:, :-1][b["labels"][:, :-1] != -100],
                       b["input_ids"][:, 1:][b["labels"][:, :-1] != -100])


def test_packed_run_uses_cu_seqlens(bt, tmp_path):
    rc = bt.main(TINY + ["--backends", "eager", "--steps", "1", "--warmup", "0", "--docs-per-row", "3",
                         "--out", str(tmp_path)])
    assert rc == 0
    rep, _ = _report(tmp_path)
    assert rep["args"]["docs_per_row"] == 3 and rep["results"][0]["tokens_per_s"] > 0



def test_packed_bench_loss_is_the_per_document_loss(bt, tmp_path, monkeypatch):
    """The script's own loop with ``--docs-per-row 3`` must run the varlen path: the model receives the batch's
    ``cu_seqlens`` and ``position_ids``, and the first step's loss equals the mean next-token loss of every document
    run on its own (no attention across a document boundary, RoPE positions restarting). A loop that dropped them
    would time the plain causal path while reporting a packed run."""
    import copy

    from mllm.models.transformer import causal_lm_loss

    built, calls, made = [], [], []
    real_build, real_batches = bt.build_model, bt.make_batches

    def build(cfg, kernel_backend, device, seed):
        model = real_build(cfg, kernel_backend, device, seed)
        built.append(copy.deepcopy(model))  # the weights the first step's loss is computed with
        forward = model.forward

        def recording(input_ids, *args, **kw):
            calls.append(kw)
            return forward(input_ids, *args, **kw)

        model.forward = recording
        return model

    def batches(*args, **kw):
        made.extend(real_batches(*args, **kw))
        return made

    monkeypatch.setattr(bt, "build_model", build)
    monkeypatch.setattr(bt, "make_batches", batches)
    assert bt.main(TINY + ["--backends", "eager", "--steps", "1", "--warmup", "0", "--docs-per-row", "3",
                           "--out", str(tmp_path)]) == 0
    (r,) = _report(tmp_path)[0]["results"]
    b = made[0]
    assert calls[0].get("cu_seqlens") is not None and torch.equal(calls[0]["cu_seqlens"].cpu(), b["cu_seqlens"])
    assert torch.equal(calls[0]["position_ids"].cpu(), b["position_ids"])
    ids, labels, cu = b["input_ids"].reshape(-1), b["labels"].reshape(-1), b["cu_seqlens"].tolist()
    total, count = 0.0, 0
    with torch.no_grad():
        for s, e in zip(cu[:-1], cu[1:]):
            logits = built[0](ids[s:e][None])
            total += causal_lm_loss(logits, labels[s:e][None], reduction="sum").item()
            count += int((labels[s:e] != -100).sum())
    assert r["loss_first"] == pytest.approx(total / count, rel=1e-5)

def test_unknown_compile_mode_is_refused(bt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's choices: exit 2 with the valid modes listed
        bt.main(TINY + ["--compile-mode", "bogus", "--out", str(tmp_path)])
    assert e.value.code == 2 and "reduce-overhead" in capsys.readouterr().err


@pytest.mark.parametrize("extra, msg", [
    (["--backends", "eager,flash"], "unknown backend 'flash'"),
    (["--seq-len", "4096"], "model.max_seq_len=128"),
    (["--backends", "eager+compile", "--warmup", "0"], "compilation would be timed"),
    (["--set", "model.n_heads=3"], "model.d_model"),
    (["--loop", "trainer", "--dtype", "bf16"], "trainer's autocast"),
    (["--backends", "eager", "--compiled-autograd"], "needs a +compile backend"),
    # an explicit 0 is an error, not "use the config's default"
    (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len 0 must be in [2,"),
    # the triton backend is swapped into the config after its check: local-smoke's head dim 16 has no kernel
    (["--backends", "eager,triton"], "--backends triton: config key 'model.kernel_backend'"),
])
def test_bad_arguments_name_the_problem(bt, tmp_path, capsys, extra, msg):
    assert bt.main(TINY + extra + ["--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_isolate_runs_each_backend_in_its_own_process(bt, tmp_path):
    """--isolate: one child process per backend with the same arguments; the parent writes one report."""
    rc = bt.main(TINY + HEAD64 + ["--backends", "eager,triton", "--steps", "2", "--warmup", "1", "--isolate",
                                  "--out", str(tmp_path)])
    assert rc == 0
    rep, md = _report(tmp_path)
    assert [r["backend"] for r in rep["results"]] == ["eager", "triton"]
    assert all(r["isolated"] and r["tokens_per_s"] > 0 for r in rep["results"])
    assert rep["results"][1]["kernel_paths"]["attention"] == "interpreter"
    assert "process of its own (--isolate)" in md and "| triton |" in md
    assert len(list(tmp_path.glob("bench_train_*.json"))) == 1  # the children wrote no reports of their own


def test_strip_args(bt):
    argv = ["--backends", "a,b", "--isolate", "--steps=3", "--result-json=x", "--out", "d"]
    assert bt._strip_args(argv, ["--isolate"], ["--backends", "--result-json"]) == ["--steps=3", "--out", "d"]


def test_compiled_autograd_backward_trains_identically(bt, tmp_path):
    """``--compiled-autograd`` runs each backward through compiled autograd (the AccumulateGrad nodes inside the
    inductor graph, the fused cast + accumulate of NOTES step 20): the same losses step after step as the plain
    compiled backward, with gradient accumulation over 2 micro-batches, under the CUDA-graph mode's bookkeeping
    (preallocated .grad: every micro-batch accumulates in place)."""
    from torch._dynamo.utils import counters

    losses = {}
    for flag in ([], ["--compiled-autograd"]):
        out = tmp_path / ("ca" if flag else "plain")
        counters.clear()
        rc = bt.main(TINY + ["--backends", "eager+compile", "--compile-mode", "reduce-overhead", "--steps", "2",
                             "--warmup", "1", "--grad-accum", "2", "--out", str(out)] + flag)
        assert rc == 0
        rep, md = _report(out)
        (r,) = rep["results"]
        assert r["compiled_autograd"] is bool(flag)
        assert ("compiled autograd" in md) is bool(flag)
        assert (counters["compiled_autograd"]["captures"] > 0) is bool(flag)
        losses[bool(flag)] = (r["loss_first"], r["loss_last"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_weight_cache_run_trains_like_the_plain_run(bt, tmp_path):
    """``--set model.weight_cache=true`` (gpu_check train_weight_cache / train_goal_wcache) under a bf16 autocast:
    bench_train syncs the copies before each step and the optimizer hook recasts after it, so the run's losses over
    3 optimizer steps (the last one after two updates) are those of the plain run."""
    common = TINY + ["--backends", "eager", "--steps", "2", "--warmup", "1", "--grad-accum", "2", "--dtype", "bf16"]
    losses = []
    for wc in ("false", "true"):
        out = tmp_path / wc
        assert bt.main(common + ["--set", f"model.weight_cache={wc}", "--out", str(out)]) == 0
        rep, _md = _report(out)
        (r,) = rep["results"]
        assert "error" not in r
        losses.append((r["loss_first"], r["loss_last"]))
    assert losses[0] == losses[1]


def test_two_runs_in_the_same_second_keep_both_reports(bt, tmp_path, monkeypatch):
    """The report is named by the run's UTC second and card: a second run within that second (a quick failing run, two
    runs side by side) used to overwrite the first one's JSON and Markdown; it gets a ``-2`` suffix instead."""
    import datetime as dt

    fixed = dt.datetime(2026, 11, 27, 12, 0, 0, tzinfo=dt.timezone.utc)

    class _Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    env = bt.environment
    monkeypatch.setattr(bt, "environment", lambda device: {**env(device), "date_utc": fixed.isoformat()})
    if hasattr(bt, "_dt"):
        monkeypatch.setattr(bt._dt, "datetime", _Frozen)
    for _ in range(2):
        assert bt.main(TINY + ["--backends", "eager", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("bench_train_*.json")) == [
        "bench_train_20261127-120000_cpu-2.json", "bench_train_20261127-120000_cpu.json"]
    assert len(list(tmp_path.glob("bench_train_*.md"))) == 2


@pytest.mark.parametrize("clear_refs", ["refused", "works"])
def test_cpu_peak_rss_says_what_it_covers(bt, tmp_path, monkeypatch, clear_refs):
    """peak_rss_mb is "since this backend started" only when /proc/self/clear_refs reset the high-water mark. Where
    the write is refused (a container or sandbox without it) the value is the process's lifetime peak (set-up and
    earlier backends included): the result and the table say so instead of claiming a per-backend peak."""
    import builtins

    if clear_refs == "refused":
        real_open = builtins.open

        def guarded(file, *a, **k):
            if str(file).endswith("clear_refs"):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", guarded)
    elif not bt.reset_rss_peak():
        pytest.skip("this machine refuses /proc/self/clear_refs")
    assert bt.main(TINY + ["--backends", "eager", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    rep, md = _report(tmp_path)
    (r,) = rep["results"]
    assert r["peak_rss_mb"] > 10
    if clear_refs == "refused":
        assert r["peak_rss_scope"] == "process" and f"{r['peak_rss_mb']:,.0f} (RSS, process peak)" in md
    else:
        assert r["peak_rss_scope"] == "backend" and f"{r['peak_rss_mb']:,.0f} (RSS)" in md


def test_ru_maxrss_fallback_is_in_mib_on_macos(bt, monkeypatch):
    """Without /proc (macOS), ru_maxrss is the fallback; macOS reports it in bytes, Linux in KiB."""
    import resource
    import sys
    import types

    monkeypatch.setattr(bt, "Path", lambda p: Path("/nonexistent/status") if str(p) == "/proc/self/status" else Path(p))
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=512 * 2**20))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert bt.rss_peak_mb() == pytest.approx(512)
