"""scripts/profile.sh without Nsight: it says so and falls back to a torch.profiler Chrome trace that carries
the training-step range names of mllm/training/profiling.py."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mllm.training.profiling import RANGE_NAMES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "profile.sh"
TINY = ["--", "--set", "model.vocab_size=512", "--micro-batch", "2", "--seq-len", "32", "--threads", "1", "--grad-accum", "1"]


def _env():
    # no GPU visible, so `auto` must take the fallback even on a CUDA machine
    return {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def test_fallback_writes_trace_with_range_names(tmp_path):
    out = tmp_path / "prof"
    res = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--steps", "3", "--warmup", "1", *TINY],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "falling back to torch.profiler" in res.stdout
    trace = out / "torch" / "bench_train_eager_rank0.json"
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e.get("name") for e in events if e.get("cat") == "user_annotation"}
    for r in ("step", "data", "forward", "backward", "optimizer"):
        assert r in RANGE_NAMES and r in names, f"range {r!r} missing from the trace"
    summary = (out / "torch_summary.txt").read_text()
    for r in ("step", "forward", "backward", "optimizer"):
        assert any(line.split()[:2] == [r, "cpu"] for line in summary.splitlines()), summary
    assert list(out.glob("bench_train_*_cpu.json"))  # the benchmark's own report is kept too


@pytest.mark.skipif(shutil.which("nsys") is not None, reason="nsys is installed here")
def test_explicit_nsys_without_nsys_is_a_clear_error(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--tool", "nsys", "--out", str(tmp_path)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "nsys not found on PATH" in res.stderr


def test_bad_arguments(tmp_path):
    for args, msg in ((["--tool", "vtune"], "--tool must be auto, nsys, ncu or torch"),
                      (["--steps", "1"], "--steps must be an integer >= 2"),
                      (["--bogus"], "unknown argument '--bogus'")):
        res = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path)], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)


def _ncu_command(tmp_path, *args):
    res = subprocess.run(["bash", str(SCRIPT), "--tool", "ncu", "--dry-run", "--out", str(tmp_path), *args], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("ncu ")]
    return shlex.split(line)


def _launched_kernels():
    """Every Triton kernel object of mllm_kernels (the launched ones are named *_kernel; helpers are not)."""
    import importlib
    import pkgutil

    import mllm_kernels

    names = set()
    for m in pkgutil.iter_modules(mllm_kernels.__path__):
        mod = importlib.import_module(f"mllm_kernels.{m.name}")
        names |= {k for k, v in vars(mod).items() if k.endswith("_kernel") and hasattr(v, "fn")}
    return names


def test_ncu_defaults_cover_one_whole_step_backward_and_lm_loss_included(tmp_path):
    """The default kernel regex matches every kernel the package launches (the backward kernels and the LM loss's
    _ce_rows_kernel too), and no launch count cuts the step short: the profiled range is one step of one
    micro-batch."""
    cmd = _ncu_command(tmp_path)
    regex = re.compile(cmd[cmd.index("--kernel-name") + 1].removeprefix("regex:"))
    kernels = _launched_kernels()
    assert {"_ce_rows_kernel", "_rms_norm_bwd_kernel", "_swiglu_bwd_kernel", "_attn_bwd_dkdv_kernel",
            "_attn_bwd_dq_kernel", "_attn_bwd_preprocess_kernel"} <= kernels
    assert [k for k in sorted(kernels) if not regex.search(k)] == []
    # inductor's and ATen's kernels are not this package's
    assert not regex.search("triton_poi_fused_add_0") and not regex.search("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_NNT")
    assert "--launch-count" not in cmd
    bench = cmd[cmd.index("scripts/bench_train.py"):]
    assert bench[bench.index("--steps") + 1] == "1" and bench[bench.index("--grad-accum") + 1] == "1"


def test_ncu_count_and_extra_arguments(tmp_path):
    cmd = _ncu_command(tmp_path, "--ncu-count", "7", "--kernels", "_ce_rows", "--", "--grad-accum", "2")
    assert cmd[cmd.index("--launch-count") + 1] == "7"
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:_ce_rows"
    assert cmd[-2:] == ["--grad-accum", "2"]  # after the default: bench_train's argparse takes the last one
    res = subprocess.run(["bash", str(SCRIPT), "--ncu-count", "0", "--out", str(tmp_path)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--ncu-count must be an integer >= 1" in res.stderr
