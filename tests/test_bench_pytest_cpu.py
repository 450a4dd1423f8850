"""benchmarks/pytest_cpu.py, the runner's CPU timer: cases listed by a bench module are timed by pytest-benchmark in a
subprocess and mapped back to rows (median/min/max/quartiles in ms, rounds, iterations, GB/s and TFLOP/s from the
case's bytes and FLOPs); a case that raises (in its prepare or in the timed call) is an error row with pytest's
message while the others are timed; bad case lists are clear errors."""
import json
import textwrap

import pytest

from benchmarks import common as C
from benchmarks import pytest_cpu as P
from benchmarks import run as R

FAKE = textwrap.dedent('''
    import torch
    from benchmarks.common import CpuCase

    def _good():
        x = torch.ones(64, 64)
        return lambda: x @ x

    def _bad_prepare():
        raise ValueError("cannot build the inputs")

    def _bad_step():
        def step():
            raise RuntimeError("kernel exploded at shape (7, 7)")
        return step

    def cpu_cases(quick=False):
        row = dict(op="fake_mm", dtype="float32", mode="fwd")
        return [CpuCase(dict(row, shape=(64, 64), provider="eager"), prepare=_good, bytes=3 * 64 * 64 * 4,
                        flops=2 * 64 ** 3),
                CpuCase(dict(row, shape=(64, 64), provider="triton"), skipped="needs CUDA"),
                CpuCase(dict(row, shape=(8, 8), provider="eager"), prepare=_bad_prepare),
                CpuCase(dict(row, shape=(7, 7), provider="eager"), prepare=_bad_step)]
''')


def _case(**row):
    return C.CpuCase({**dict(op="o", shape=(2, 3), dtype="float32", mode="fwd", provider="eager"), **row},
                     prepare=lambda: (lambda: None), bytes=4e6, flops=6e9)


def _entry(case, **stats):
    base = dict(median=0.002, min=0.0015, max=0.004, mean=0.0022, stddev=0.0003, q1=0.0018, q3=0.0025, iqr=0.0007,
                rounds=17, iterations=1)
    return {"name": f"test_cpu_case[{case.id}]", "param": case.id, "stats": {**base, **stats},
            "extra_info": {"row": R.jsonable(case.row)}}


def test_row_from_a_pytest_benchmark_entry():
    case = _case(size=6)
    row = P.row_from_benchmark(case, _entry(case))
    assert (row["ms"], row["ms_min"], row["ms_max"], row["ms_mean"]) == pytest.approx((2.0, 1.5, 4.0, 2.2))
    assert (row["ms_q1"], row["ms_q3"], row["ms_iqr"]) == pytest.approx((1.8, 2.5, 0.7))
    assert row["rounds"] == 17 and row["iterations"] == 1 and row["timer"] == "pytest-benchmark"
    assert row["gbps"] == pytest.approx(2.0) and row["tflops"] == pytest.approx(3.0)  # 4 MB, 6 GFLOP in 2 ms
    assert row["shape"] == (2, 3) and row["size"] == 6  # the case's own fields, as listed


def test_results_map_to_rows_in_case_order_with_errors_and_skips():
    good, bad, other = _case(), _case(provider="compile"), _case(provider="triton")
    skipped = C.CpuCase(dict(op="o", provider="x"), skipped="needs CUDA")
    mismatched = _entry(other)
    mismatched["extra_info"]["row"]["shape"] = [9, 9]  # cpu_cases listed something else in the pytest process
    rows = P.rows_from_results([skipped, good, bad, other], {"benchmarks": [mismatched, _entry(good)]},
                               {bad.id: ("failed", "RuntimeError: no kernel\nmore lines")})
    assert rows[0] == {"op": "o", "provider": "x", "skipped": "needs CUDA"}
    assert rows[1]["ms"] == pytest.approx(2.0)
    assert rows[2]["error"] == "RuntimeError: no kernel" and "ms" not in rows[2]
    assert rows[3]["error"].startswith("ValueError: pytest-benchmark entry") and "ms" not in rows[3]
    assert P.rows_from_results([good], None, {})[0]["error"] == "pytest did not report this case"


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase classname="benchmarks.pytest_cpu" name="test_cpu_case[a-fwd]"/>'
                   '<testcase classname="benchmarks.pytest_cpu" name="test_cpu_case[b-fwd+bwd]">'
                   '<failure message="ValueError: bad">trace</failure></testcase>'
                   '<testcase classname="benchmarks.pytest_cpu" name="test_cpu_case[c]"><error message="failed on '
                   'setup">x</error></testcase>'
                   '<testcase classname="other" name="test_other"/></testsuite></testsuites>')
    assert P.junit_outcomes(xml) == {"a-fwd": ("passed", ""), "b-fwd+bwd": ("failed", "ValueError: bad"),
                                     "c": ("error", "failed on setup")}


class _Mod:
    def __init__(self, cases):
        self.cpu_cases = lambda quick=False: cases


@pytest.mark.parametrize("cases, msg", [
    ([], "non-empty list of CpuCase"),
    ([dict(op="o")], "item 0: expected a CpuCase"),
    ([C.CpuCase(dict(op="o"))], "item 0: missing or non-string 'provider'"),
    ([C.CpuCase(dict(op="o", provider="p"))], "needs a callable prepare or a skipped reason"),
    ([C.CpuCase(dict(op="o", provider="p"), prepare=lambda: None, bytes="8")], "bytes must be a number"),
    ([C.CpuCase(dict(op="o", provider="p"), skipped="s"), C.CpuCase(dict(op="o", provider="p"), skipped="t")],
     "items 0 and 1 have the same id 'o-p'"),
])
def test_bad_case_lists_name_the_problem(cases, msg):
    with pytest.raises(ValueError, match=msg):
        P.list_cases("fake", _Mod(cases), quick=False)


def test_a_module_without_cpu_cases_is_an_error():
    with pytest.raises(ValueError, match="bench_fake has no cpu_cases"):
        P.list_cases("fake", object(), quick=False)


def test_case_ids_are_safe_for_pytest():
    case = C.CpuCase(dict(op="pack", shape={"docs": 10, "row_len": 4}, dtype="int64", mode="fwd+bwd", provider="c++"),
                     skipped="s")
    assert case.id == "pack-docs=10_row_len=4-int64-fwd+bwd-c++"


def test_time_module_times_good_cases_and_reports_failing_ones(tmp_path):
    path = tmp_path / "bench_fake.py"
    path.write_text(FAKE)
    kept = tmp_path / "kept" / "bench_fake.json"
    rows, info = P.time_module("fake", path, quick=True, json_out=kept)
    good, skipped, bad_prepare, bad_step = rows
    raw = {e["param"]: e for e in json.loads(kept.read_text())["benchmarks"]}
    assert list(raw) == ["fake_mm-64x64-float32-fwd-eager"]  # only the timed case has an entry
    stats = raw["fake_mm-64x64-float32-fwd-eager"]["stats"]
    assert good["timer"] == "pytest-benchmark" and good["ms"] == stats["median"] * 1e3
    assert (good["ms_min"], good["ms_max"], good["rounds"]) == (stats["min"] * 1e3, stats["max"] * 1e3, stats["rounds"])
    assert good["rounds"] >= P.TIMING["quick"]["min_rounds"]
    assert good["tflops"] == pytest.approx(2 * 64 ** 3 / (good["ms"] * 1e-3) / 1e12)
    assert skipped["skipped"] == "needs CUDA"
    assert bad_prepare["error"] == "ValueError: cannot build the inputs" and "ms" not in bad_prepare
    assert bad_step["error"] == "RuntimeError: kernel exploded at shape (7, 7)" and bad_step["shape"] == (7, 7)
    assert info["returncode"] == 1 and info["options"]["min_rounds"] == P.TIMING["quick"]["min_rounds"]
    assert info["json"] == str(kept)


GOOD_ONLY = textwrap.dedent('''
    import torch
    from benchmarks.common import CpuCase

    def _good():
        x = torch.ones(16, 16)
        return lambda: x @ x

    def cpu_cases(quick=False):
        return [CpuCase(dict(op="fake_mm", shape=(16, 16), dtype="float32", mode="fwd", provider="eager"),
                        prepare=_good, bytes=3 * 16 * 16 * 4, flops=2 * 16 ** 3)]
''')


def test_time_module_inside_a_pytest_xdist_worker(tmp_path, monkeypatch):
    """`make test` may run under pytest-xdist: the worker's PYTEST_XDIST_* variables must not reach the nested
    pytest-benchmark run, which reads PYTEST_XDIST_WORKER as "xdist is on" and refuses --benchmark-only."""
    for k, v in dict(PYTEST_XDIST_WORKER="gw1", PYTEST_XDIST_WORKER_COUNT="2", PYTEST_XDIST_TESTRUNUID="abc",
                     PYTEST_ADDOPTS="-x --benchmark-disable").items():
        monkeypatch.setenv(k, v)
    env = P.nested_pytest_env({"PATH": "/bin", "PYTEST_XDIST_WORKER": "gw1", "PYTEST_CURRENT_TEST": "t.py::t (call)",
                               "PYTEST_ADDOPTS": "-x", "PYTEST_PLUGINS": "keep"})
    assert env == {"PATH": "/bin", "PYTEST_PLUGINS": "keep"}
    path = tmp_path / "bench_fake.py"
    path.write_text(GOOD_ONLY)
    (row,), info = P.time_module("fake", path, quick=True)
    assert info["returncode"] == 0 and row["ms"] > 0 and "error" not in row


def test_cpu_cases_span_sizes_so_the_plots_show_speed_against_size():
    """A CPU run plots time against size per kernel: with one CPU shape per module every plot was a single point.
    The full case list has at least 3 sizes per (op, mode, provider) on a log size axis; --quick keeps one."""
    from benchmarks.plotting import x_positions
    from benchmarks.run import discover, load_module

    checked = 0
    for name, path in discover():
        module = load_module(name, path)
        if not callable(getattr(module, "cpu_cases", None)):
            continue
        groups = {}
        for case in module.cpu_cases(quick=False):
            if case.skipped is None:
                groups.setdefault((case.row["op"], case.row.get("mode"), case.row["provider"]), []).append(case.row)
        assert groups, name
        for key, rows in groups.items():
            pos, log_axis = x_positions(rows)
            assert len(pos) >= 3 and log_axis, (name, key, sorted(pos))
        quick = {str(c.row.get("shape")) for c in module.cpu_cases(quick=True) if c.skipped is None}
        assert len(quick) == 1, (name, quick)
        checked += 1
    assert checked >= 6
