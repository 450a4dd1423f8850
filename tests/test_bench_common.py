"""benchmarks/common.py: one provider's failure at one shape is an error row for that provider and shape (with the
exception's type and message) while the other rows are still measured, in process and through the runner's
pytest-benchmark path; the in-process CPU timer is a median after a warm-up; per-provider work overrides and the
not-comparable note reach the rows (in process and as CPU cases) and the Markdown table."""
import textwrap

import pytest
import torch

from benchmarks import common as C
from benchmarks import run as R


def _case(n, **kw):
    x = torch.randn(4, n)
    return C.Case("fake_op", (4, n), torch.float32, (x,), diff=(0,), bytes={m: 8 * n for m in C.MODES}, **kw)


def _fails_at(bad_n):
    def fn(x):
        if x.shape[1] == bad_n:
            raise ValueError(f"cannot handle width {bad_n}")
        return x * 2

    return fn


def test_a_failing_provider_is_an_error_row_and_the_rest_is_measured():
    rows = C.run_cases([_case(8), _case(16), _case(32)], {"eager": _fails_at(16)}, torch.device("cpu"),
                       modes=("fwd", "fwd+bwd"), progress=False)
    assert len(rows) == 6
    bad = [r for r in rows if "error" in r]
    assert [(r["shape"], r["mode"]) for r in bad] == [((4, 16), "fwd"), ((4, 16), "fwd+bwd")]
    assert all(r["error"] == "ValueError: cannot handle width 16" and r["provider"] == "eager" for r in bad)
    good = [r for r in rows if "error" not in r]
    assert {r["shape"] for r in good} == {(4, 8), (4, 32)} and all(r["ms"] > 0 for r in good)


def test_a_module_with_one_failing_provider_keeps_its_other_rows(tmp_path):
    """Through the runner on CPU (pytest-benchmark in a subprocess): the failing shape's cases are error rows with the
    exception's type and message, the module's status is row_errors, and the other shapes are still timed."""
    (tmp_path / "bench_partial.py").write_text(textwrap.dedent('''
        import torch
        from benchmarks.common import Case, shape_cpu_cases

        def _cases(shape, dtype, device):
            x = torch.randn(*shape, dtype=dtype, device=device)
            return [Case("partial", shape, dtype, (x,), diff=(0,), bytes={"fwd": 8, "bwd": 16, "fwd+bwd": 24})]

        def _eager(x):
            if x.shape[0] == 3:
                raise RuntimeError("shape 3 is not supported")
            return x + 1

        def cpu_cases(quick=False):
            return shape_cpu_cases(_cases, lambda op: {"eager": _eager, "triton": _eager}, [(2, 4), (3, 4), (5, 4)])

        def run(device, quick=False):
            raise AssertionError("on CPU the runner times cpu_cases, not run")
    '''))
    rows, summary = R.run_all(R.discover(tmp_path), R.resolve_device("cpu"), quick=True, progress=False)
    assert summary["partial"]["status"] == "row_errors" and summary["partial"]["n_row_errors"] == 3
    timed = [r for r in rows if "ms" in r]
    assert len(timed) == 6 and {r["shape"] for r in timed} == {(2, 4), (5, 4)}  # 2 good shapes x 3 modes
    assert all(r["timer"] == C.TIMER_PYTEST_BENCHMARK and r["rounds"] >= 3 for r in timed)
    # GB/s = the case's bwd bytes over the median: 16 B / (ms 1e-3 s) / 1e9
    assert [r["gbps"] * r["ms"] * 1e6 for r in timed if r["mode"] == "bwd"] == pytest.approx([16.0, 16.0])
    errors = [r for r in rows if "error" in r]
    assert {(r["shape"], r["mode"], r["provider"]) for r in errors} == {((3, 4), m, "eager") for m in C.MODES}
    assert {r["error"] for r in errors} == {"RuntimeError: shape 3 is not supported"}
    assert sum(r.get("skipped") == "needs CUDA" and r["provider"] == "triton" for r in rows) == 9


def test_run_shapes_on_cpu_needs_the_module_file():
    with pytest.raises(ValueError, match="module_file=__file__"):
        C.run_shapes(lambda *a: [], lambda op: {}, "cpu", gpu_shapes=[], quick_gpu_shapes=[])


def test_cpu_median_ms_warms_up_and_takes_the_median(monkeypatch):
    clock = [0.0]
    durations = iter([0.100, 0.001, 0.001, 0.050, 0.001, 0.002])  # the first call is the slow warm-up

    def fn():
        clock[0] += next(durations)

    monkeypatch.setattr(C.time, "perf_counter", lambda: clock[0])
    assert C.cpu_median_ms(fn) == pytest.approx(1.0)


def test_per_provider_work_and_not_comparable_note(monkeypatch):
    monkeypatch.setattr(C, "cpu_median_ms", lambda step, reps=5: 2.0)
    case = _case(8, flops={"fwd": 4e9, ("fwd", "eager"): None}, notes={("fwd", "eager"): "different work"})
    case.bytes[("fwd", "eager")] = 2e6
    (row,) = C.run_cases([case], {"eager": lambda x: x * 2}, torch.device("cpu"), modes=("fwd",), progress=False)
    assert row["bytes"] == 2e6 and row["gbps"] == pytest.approx(1.0) and "tflops" not in row
    assert row["not_comparable"] == "different work" and row["timer"] == C.TIMER_CPU_MEDIAN
    md = C.markdown_table([row, {**row, "provider": "other", "not_comparable": None, "tflops": 2.0}])
    assert "not comparable †" in md and "† fake_op 4x8 fwd eager: different work" in md
    assert "| TFLOP/s |" in md


def test_case_work_falls_back_to_the_mode():
    case = _case(8, flops={"fwd": 10, ("bwd", "triton"): None, "bwd": 20})
    assert case.work("fwd", "triton") == (64, 10)
    assert case.work("bwd", "eager") == (64, 20)
    assert case.work("bwd", "triton") == (64, None)


def test_shape_cpu_cases_carry_the_work_and_note_of_each_provider_and_mode():
    case = _case(8, flops={"fwd": 4e9, ("fwd", "eager"): None, "bwd": 6e9}, notes={("fwd", "eager"): "different work"})
    case.bytes[("fwd", "eager")] = 2e6
    providers = {"triton": None, "eager": lambda x: x * 2}
    cases = C.shape_cpu_cases(lambda shape, dtype, device: [case], lambda op: providers, [(4, 8)])
    assert [(c.row["mode"], c.row["provider"]) for c in cases] == [(m, p) for m in C.MODES for p in ("triton", "eager")]
    by = {(c.row["mode"], c.row["provider"]): c for c in cases}
    assert all(by[m, "triton"].skipped == "needs CUDA" and by[m, "triton"].prepare is None for m in C.MODES)
    fwd, bwd = by["fwd", "eager"], by["bwd", "eager"]
    assert (fwd.bytes, fwd.flops, fwd.row["not_comparable"]) == (2e6, None, "different work")
    assert (bwd.bytes, bwd.flops, "not_comparable" in bwd.row) == (64, 6e9, False)
    assert fwd.id == "fake_op-4x8-float32-fwd-eager" and by["fwd+bwd", "eager"].id.endswith("-fwd+bwd-eager")
    step = bwd.prepare()  # the closure the GPU path times: autograd.grad through a retained graph, callable again
    first, again = step(), step()
    assert first[0].shape == (4, 8) and torch.equal(first[0], again[0])


def test_cli_results_are_timestamped_and_never_overwritten(tmp_path, capsys, monkeypatch):
    """Two runs of a module's CLI in the same second (a fixed clock here) leave two result files, each with its own
    rows."""
    import json

    env = {"date_utc": "2026-11-26T14:42:49+00:00", "card": "cpu", "torch": torch.__version__}
    monkeypatch.setattr(C, "environment", lambda device: dict(env))

    def fake_run(ms):
        return lambda device, quick=False: [dict(op="fake_op", shape=(4, 8), dtype="float32", mode="fwd",
                                                 provider="eager", ms=ms, gbps=1.0, timer="test")]

    for ms in (1.5, 2.5):
        C.cli("fake", fake_run(ms), ["--out", str(tmp_path), "--device", "cpu"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bench_fake_20261126-144249_cpu-2.json", "bench_fake_20261126-144249_cpu-2.md",
                     "bench_fake_20261126-144249_cpu.json", "bench_fake_20261126-144249_cpu.md"]
    first, second = (json.loads((tmp_path / n).read_text()) for n in (names[2], names[0]))
    assert (first["rows"][0]["ms"], second["rows"][0]["ms"]) == (1.5, 2.5) and first["environment"] == env
    with pytest.raises(SystemExit):
        C.cli("fake", fake_run(1.0), ["--device", "tpu"])
    assert "device='tpu'" in capsys.readouterr().err
