"""benchmarks/bench_rms_norm.py's backward launch-config sweep, on CPU under the interpreter (timings meaningless
there): every config gives a row per shape and variant (plain, dh, dh+copy), an unlaunchable config gives a row with its error, and
``--sweep`` writes the JSON and Markdown tables."""
import json

import torch

from benchmarks import bench_rms_norm as B


def test_sweep_rows_and_errors():
    bad = dict(block_rows=3, num_warps=4, per_sm=2)  # tl.arange needs a power of two: the launch fails
    rows = B.sweep("cpu", shapes=[(20, 96)], configs=[None, B.SWEEP_CONFIGS[1], bad], dtype=torch.float32)
    assert [(r["variant"], r["config"] == "shipped") for r in rows] == [
        (v, shipped) for v in ("plain", "dh", "dh+copy") for shipped in (True, False, False)]
    for r in rows:
        if r["config"] is bad:
            assert r["error"] and r["gbps"] is None
        else:
            assert r["error"] is None and r["ms"] > 0 and r["gbps"] > 0
    md = B.sweep_markdown(rows, {"card": "cpu"})
    assert "| 20x96 | plain | shipped | shipped | shipped |" in md and "| 20x96 | dh | 3 | 4 | 2 | nan | n/a |" in md
    assert "| 20x96 | dh+copy | 3 | 4 | 2 | nan | n/a |" in md


def test_sweep_cli_writes_results(tmp_path):
    rows = B.main_sweep(["--sweep", "--device", "cpu", "--out", str(tmp_path)])
    assert len(rows) == 9
    (js,) = tmp_path.glob("bench_rms_norm_sweep_*_cpu.json")
    assert json.loads(js.read_text())["rows"][0]["config"] == "shipped"
    assert js.with_suffix(".md").read_text().startswith("# RMSNorm backward launch-config sweep")
