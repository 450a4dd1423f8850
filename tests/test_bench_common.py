"""benchmarks/common.py: one provider's failure at one shape is an error row for that provider and shape (with the
exception's type and message) while the other rows are still measured; the CPU timer is a median after a warm-up;
per-provider work overrides and the not-comparable note reach the rows and the Markdown table."""
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
    """Through the runner: the module's status is row_errors, not one error row replacing everything."""
    (tmp_path / "bench_partial.py").write_text(textwrap.dedent('''
        import torch
        from benchmarks.common import Case, run_shapes

        def _cases(shape, dtype, device):
            x = torch.randn(*shape, dtype=dtype, device=device)
            return [Case("partial", shape, dtype, (x,), diff=(0,), bytes={"fwd": 1, "bwd": 1, "fwd+bwd": 1})]

        def _eager(x):
            if x.shape[0] == 3:
                raise RuntimeError("shape 3 is not supported")
            return x + 1

        def run(device, quick=False):
            return run_shapes(_cases, lambda op: {"eager": _eager}, device, quick, False,
                              gpu_shapes=[], quick_gpu_shapes=[], cpu_shapes=[(2, 4), (3, 4), (5, 4)])
    '''))
    rows, summary = R.run_all(R.discover(tmp_path), R.resolve_device("cpu"), progress=False)
    assert summary["partial"]["status"] == "row_errors" and summary["partial"]["n_row_errors"] == 3
    assert len([r for r in rows if "ms" in r]) == 6  # 2 good shapes x 3 modes
    assert {r["error"] for r in rows if "error" in r} == {"RuntimeError: shape 3 is not supported"}


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
    assert row["not_comparable"] == "different work"
    md = C.markdown_table([row, {**row, "provider": "other", "not_comparable": None, "tflops": 2.0}])
    assert "not comparable †" in md and "† fake_op 4x8 fwd eager: different work" in md
    assert "| TFLOP/s |" in md


def test_case_work_falls_back_to_the_mode():
    case = _case(8, flops={"fwd": 10, ("bwd", "triton"): None, "bwd": 20})
    assert case.work("fwd", "triton") == (64, 10)
    assert case.work("bwd", "eager") == (64, 20)
    assert case.work("bwd", "triton") == (64, None)
