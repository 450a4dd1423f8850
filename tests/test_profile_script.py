"""scripts/profile.sh without Nsight: it says so and falls back to a torch.profiler Chrome trace that carries
the training-step range names of mllm/training/profiling.py."""
import json
import os
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
