"""benchmarks/bench_lm_loss.py credits each provider with the work it does in each mode: the fused kernel takes the
gradient in its forward, so its ``bwd`` row (two element-wise scalings) gets no GEMM FLOPs and no speed-up; the
runner flags any row whose TFLOP/s exceeds the card's peak."""
import pytest
import torch

from benchmarks import bench_lm_loss as B
from benchmarks import common as C
from benchmarks import run as R

SHAPE = (8192, 1024, 50304, 50257)  # the committed H200 run
GEMM = 2 * 8192 * 1024 * 50304


@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
def test_flops_per_provider_and_mode(provider):
    assert B.work(SHAPE, 2, "fwd", provider)[1] == GEMM
    assert B.work(SHAPE, 2, "fwd+bwd", provider)[1] == 3 * GEMM
    bwd_bytes, bwd_flops = B.work(SHAPE, 2, "bwd", provider)
    if provider == "triton":  # lm_loss._backward: dh * g, dW * g
        assert bwd_flops is None and bwd_bytes == 2 * 2 * (8192 + 50304) * 1024
    else:
        assert bwd_flops == 2 * GEMM


def test_the_triton_backward_is_timed_for_what_it_does():
    """Run the triton provider's bwd step on CPU (interpreter) and count the GEMMs in it: none, as credited."""
    (case,) = B._cases((64, 32, 128, 100), torch.float32, "cpu")
    step = C._step(B._providers(case.op)["triton"], case, "bwd")
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    mm = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::matmul"))
    assert mm == 0 and case.work("bwd", "triton")[1] is None
    assert case.notes[("bwd", "triton")] == B.TRITON_BWD_NOTE


def test_committed_h200_times_stay_under_the_peak():
    """With the measured times of the committed H200 run, no provider/mode exceeds the card's 989 TFLOP/s."""
    ms = {("fwd", "triton"): 1.6536, ("fwd", "eager"): 11.4581, ("fwd", "compile"): 1.9086,
          ("bwd", "triton"): 0.2495, ("bwd", "eager"): 14.4313, ("bwd", "compile"): 3.3591,
          ("fwd+bwd", "triton"): 4.5648, ("fwd+bwd", "eager"): 25.9568, ("fwd+bwd", "compile"): 5.5094}
    peak = R.peak_tflops("NVIDIA H200")
    assert peak == pytest.approx(989.4)
    for (mode, provider), t in ms.items():
        flops = B.work(SHAPE, 2, mode, provider)[1]
        assert flops is None or flops / (t * 1e-3) / 1e12 < peak, (mode, provider)


def test_runner_flags_tflops_above_the_peak_and_skips_the_speedup():
    rows = [dict(op="lce", shape=(1,), dtype="bfloat16", mode="bwd", provider="eager", ms=14.43, tflops=117.0),
            dict(op="lce", shape=(1,), dtype="bfloat16", mode="bwd", provider="triton", ms=0.2495, tflops=6765.1),
            dict(op="lce", shape=(1,), dtype="bfloat16", mode="bwd", provider="compile", ms=3.36, tflops=502.0),
            dict(op="lce", shape=(1,), dtype="bfloat16", mode="bwd", provider="late", ms=0.25,
                 not_comparable="gradients taken in the forward")]
    assert R.flag_implausible(rows, {"card": "NVIDIA H200"}) == 1
    assert "6765 TFLOP/s is above the NVIDIA H200 dense bf16 peak of 989" in rows[1]["implausible"]
    assert R.flag_implausible([dict(rows[1])], {"card": "cpu"}) == 0  # no peak known: nothing to compare with
    spd = R.speedups(rows)
    assert spd[2] == pytest.approx(14.43 / 3.36) and spd[3] is None
    md = R.markdown_report({"card": "NVIDIA H200"}, [{**r, "bench": "lce"} for r in rows], {}, {})
    assert "**implausible** `lce` 1 bfloat16 bwd triton" in md
    assert "not comparable: gradients taken in the forward" in md


def test_a_module_above_the_peak_fails_the_run(tmp_path):
    (tmp_path / "bench_fast.py").write_text(
        "def run(device, quick=False):\n"
        "    return [dict(op='o', provider='eager', ms=1.0, tflops=5000.0)]\n")
    rows, summary = R.run_all(R.discover(tmp_path), R.resolve_device("cpu"), progress=False,
                              env={"card": "NVIDIA H100 80GB HBM3"})
    assert summary["fast"]["status"] == "implausible_rows" and rows[0]["implausible"]


def test_no_committed_result_is_above_its_cards_peak():
    """Every committed results file that reports TFLOP/s on a card with a known peak stays under it."""
    import json
    from pathlib import Path

    checked = 0
    for path in sorted((Path(R.__file__).parent / "results").glob("*.json")):
        data = json.loads(path.read_text())
        env = data.get("environment") or data.get("env") if isinstance(data, dict) else None
        if not isinstance(env, dict) or not R.peak_tflops(env.get("card")):
            continue
        rows = [dict(r) for key in ("rows", "sweep") for r in data.get(key) or [] if isinstance(r, dict)]
        assert R.flag_implausible(rows, env) == 0, [(path.name, r) for r in rows if r.get("implausible")]
        checked += sum("tflops" in r for r in rows)
    assert checked >= 8  # the LM-loss, DPO and attention files at least
