"""benchmarks/bench_packing.py: the p20/p80 of a few timed calls stay within the measured range, and the Python rows,
whose times are scaled up from a subset, are marked extrapolated in the runner's table."""
import statistics

import pytest

from benchmarks import bench_packing as B
from benchmarks import run as R


@pytest.mark.parametrize("samples", [[63.0, 320.8], [63.0, 132.2, 320.8], [5.0, 1.0, 9.0, 2.0, 3.0], [7.0]])
def test_spread_stays_within_the_samples(samples):
    p20, p80 = B.spread(samples)
    assert min(samples) <= p20 <= statistics.median(samples) <= p80 <= max(samples)


def test_spread_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        B.spread([])


def test_time_reports_percentiles_of_its_own_samples(monkeypatch):
    clock = [0.0]
    durations = iter([0.500, 0.010, 0.030])  # warm-up, then 2 timed calls (numpy-next-fit's count)

    def fn():
        clock[0] += next(durations)
        return "plan"

    monkeypatch.setattr(B.time, "perf_counter", lambda: clock[0])
    t = B._time(fn, repeats=2)
    assert t["cold_ms"] == pytest.approx(500.0) and t["ms"] == pytest.approx(20.0)
    assert 10.0 <= t["ms_p20"] <= t["ms_p80"] <= 30.0  # 'exclusive' gave 2.0 and 38.0


def test_python_rows_are_extrapolated_and_the_runner_marks_them(monkeypatch):
    monkeypatch.setattr(B, "QUICK", dict(n_docs=4000, py_subset=400, repeats=2))
    rows = R.validate_rows("packing", B.run(quick=True))
    py = [r for r in rows if r["provider"].startswith("python-")]
    if B.P._C is None:
        pytest.skip("mllm._C not built: no Python rows without the C++ ones to compare with")
    assert len(py) == 2 and all(r["extrapolated"] == "linearly from 400 documents" for r in py)
    assert not any(r.get("extrapolated") for r in rows if not r["provider"].startswith("python-"))
    for r in rows:
        r["bench"] = "packing"
    md = R.markdown_report({"card": "cpu"}, rows, {"packing": {"status": "ok", "seconds": 1}}, {})
    line = next(ln for ln in md.splitlines() if "| python-bfd |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[cells.index("python-bfd") + 1].endswith("*")
    assert "extrapolated (linearly from 400 documents)" in line
    cpp = next(ln for ln in md.splitlines() if "| cpp-bfd |" in ln)
    assert "extrapolated" not in cpp and "*" not in cpp
