"""benchmarks/bench_attention.py and bench_dpo.py outside the runner: their CPU rows are pytest-benchmark medians (the
runner's timer), the attention CLI runs as a plain script (``python benchmarks/bench_attention.py``, no PYTHONPATH)
and its results name the whole environment in a file that a later run does not overwrite."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_dpo as D

REPO = Path(__file__).resolve().parents[1]


def test_dpo_cpu_rows_come_from_pytest_benchmark():
    """On CPU ``run`` returns the rows of its ``cpu_cases`` as pytest-benchmark timed them (the runner's rows):
    the median of several rounds, TFLOP/s = 2·N·T·d·V over it."""
    (row,) = D.run("cpu", quick=True)
    N, T, d, V = D.CPU_SHAPES[0]
    assert row["timer"] == "pytest-benchmark" and row["rounds"] >= 3 and row["provider"] == "eager"
    assert row["ms_min"] <= row["ms"] <= row["ms_max"] and row["shape"] == f"N{N}xT{T}xd{d}xV{V}"
    assert row["tflops"] == pytest.approx(2 * N * T * d * V / (row["ms"] * 1e-3) / 1e12)


def _script_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


def test_tune_as_a_script_without_pythonpath_says_it_needs_cuda(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--tune"], cwd=tmp_path,
                         env=_script_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "needs CUDA" in res.stderr and "ModuleNotFoundError" not in res.stderr


def test_out_writes_a_timestamped_file_with_the_runner_environment(tmp_path):
    out = tmp_path / "res"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--out", str(out)],
                         cwd=tmp_path, env=_script_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = out.glob("*.json")
    assert re.fullmatch(r"bench_attention_\d{8}-\d{6}_cpu\.json", path.name), path.name
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("card", "driver", "cuda_runtime", "torch", "triton", "git_commit", "git_dirty", "date_utc", "host"):
        assert key in env, key
    rows = data["rows"]
    from benchmarks import bench_attention as A

    assert [r["size"] for r in rows] == [T for _, T, _, _ in A.CPU_SHAPES]  # a time-vs-T plot on CPU too
    for row in rows:
        assert row["provider"] == "eager-sinks" and row["ms"] > 0 and row["timer"] == "pytest-benchmark"
    md = path.with_suffix(".md").read_text()
    assert env["date_utc"] in md and "commit" in md and "| eager-sinks |" in md


def test_dpo_error_rows_are_reported_not_fatal():
    """A provider that raises on the GPU becomes an error row; the table and the goals read the other rows."""
    shape = "N16xT1024xd1024xV50257"
    rows = [dict(op="dpo_logprobs", shape=shape, dtype="bfloat16", mode="fwd", provider="triton",
                 error="RuntimeError: Triton Error [CUDA]: an illegal memory access"),
            dict(op="dpo_logprobs", shape=shape, dtype="bfloat16", mode="fwd", provider="eager", ms=38.5, tflops=44.0,
                 peak_mem_mb=6284.0)]
    md = D.to_markdown(rows)
    assert "| triton | RuntimeError: Triton Error [CUDA]: an illegal memory access |" in md and "| 38.500 |" in md
    assert D.goals(rows) == {}


def test_masked_providers_get_no_speedup_against_sdpa_flash(monkeypatch):
    """The runner's speed-up baseline for attention is sdpa-flash (full causal). mllm-all and flex-all skip most of the
    causal triangle (window T/4 + packed documents): a ratio of theirs against sdpa-flash reads as a kernel speed-up
    but is mostly less work, so their rows carry ``not_comparable`` and get no ``× base``. Timing is faked (no GPU)."""
    from benchmarks import bench_attention as A
    from benchmarks import run as R

    names = ["sdpa-flash", "mllm", "mllm-all", "flex-all"]
    monkeypatch.setattr(A, "PROVIDERS", {n: (lambda B, H, T, D, device, g: ((), None)) for n in names})
    monkeypatch.setattr(A, "_measure", lambda fn, inputs, mode: (1.0, None))
    monkeypatch.setattr(A, "_max_diff", lambda *a: 0.0)
    import torch

    cpu_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: cpu_generator())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = A.run(device="cuda", providers=names, seq_lens=[1024], head_dims=[64])
    spd = dict(((r["provider"], r["mode"]), s) for r, s in zip(rows, R.speedups(rows)))
    for mode in A.MODES:
        assert spd[("mllm", mode)] == pytest.approx(1.0)
        assert spd[("mllm-all", mode)] is None and spd[("flex-all", mode)] is None, spd
