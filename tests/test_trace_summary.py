"""mllm.training.trace_summary on a hand-made Chrome trace whose busy time, gaps and range totals are known."""
import json

import pytest

from mllm.training.trace_summary import gpu_busy, main, summarize


def _trace(tmp_path):
    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}
    events = [
        k("gemm", 0, 100), k("norm", 50, 100),        # overlap: union [0, 150)
        k("gemm", 153, 47),                           # gap 3 us -> busy [153, 200)
        k("swiglu", 250, 50),                         # gap 50 us
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 2300, "dur": 100},  # gap 2,000 us
        {"ph": "X", "cat": "user_annotation", "name": "forward", "ts": 0, "dur": 1500},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "forward", "ts": 0, "dur": 300},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10},  # ignored
    ]
    p = tmp_path / "trace.json"
    p.write_text(json.dumps({"traceEvents": events}))
    return p, events


def test_gpu_busy_merges_overlaps_and_bins_gaps(tmp_path):
    _, events = _trace(tmp_path)
    b = gpu_busy(events)
    assert b["window_us"] == 2400 and b["busy_us"] == 150 + 47 + 50 + 100
    assert b["busy_frac"] == pytest.approx(347 / 2400)
    assert b["n_kernels"] == 5
    assert b["gaps"]["0-5 us"] == (1, 3.0)
    assert b["gaps"]["20-100 us"] == (1, 50.0)
    assert b["gaps"][">=1000 us"] == (1, 2000.0)
    assert b["gaps"]["5-20 us"] == (0, 0.0)


def test_gpu_busy_without_kernels():
    assert gpu_busy([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}])["n_kernels"] == 0


def test_summary_lists_ranges_busy_fraction_and_top_kernels(tmp_path, capsys):
    p, _ = _trace(tmp_path)
    text = summarize(p)
    assert "forward    cpu        1       1.50      1.50" in text
    assert "forward    gpu        1       0.30      0.30" in text
    assert "busy 0.35 ms (14.5%)" in text
    lines = text.splitlines()
    top = lines[lines.index("top GPU kernels by total time (ms, launches)") + 1]
    assert top.split() == ["0.15", "2", "gemm"]
    main([str(p), "--top", "1"])
    assert "swiglu" not in capsys.readouterr().out.split("top GPU kernels")[1]


def test_cli_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main([str(tmp_path / "nope.json")])
