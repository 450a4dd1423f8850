"""benchmarks/run.py against fake bench modules written to tmp_path: discovery, JSON/Markdown/plots,
a failing module recorded as an error row while the others still run, and the exit code; on CPU a real module's rows
come from pytest-benchmark (checked against the JSON it wrote), every timed row names its timer, and no two runs
share a file name."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import run as R

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.fixture(autouse=True)
def _thread_env_unchanged():
    """``main(["--threads", N])`` exports OMP/MKL_NUM_THREADS for its subprocess: a test must leave them as it found
    them (torn down after ``monkeypatch``'s undo), or every later test's subprocesses run with that thread count."""
    import os

    before = {v: os.environ.get(v) for v in THREAD_VARS}
    yield
    assert {v: os.environ.get(v) for v in THREAD_VARS} == before

REPO = Path(__file__).resolve().parents[1]

GOOD = textwrap.dedent('''
    import torch

    def run(device, quick=False):
        assert isinstance(device, torch.device)
        sizes = [256, 1024] if quick else [256, 1024, 4096]
        rows = []
        for n in sizes:
            for prov, ms in (("eager", n / 1000.0), ("triton", n / 4000.0)):
                rows.append(dict(op="fake_norm", shape=(4, n), dtype="bfloat16", mode="fwd", provider=prov,
                                 ms=ms, gbps=8 * n / ms / 1e6, peak_mem_mb=1.5))
        rows.append(dict(op="fake_norm", shape=(4, 8192), dtype="bfloat16", mode="fwd", provider="triton",
                         skipped="needs CUDA"))
        return rows
''')

SECOND = textwrap.dedent('''
    def run(device, quick=False):
        return [dict(op="fake_pack", shape="n=1000", provider="cpp", ms=0.25),
                dict(op="fake_pack", shape="n=1000", provider="python", ms=2.5)]
''')

BROKEN = textwrap.dedent('''
    def run(device, quick=False):
        raise RuntimeError("kernel exploded at shape (7, 7)")
''')

BAD_ROWS = textwrap.dedent('''
    def run(device, quick=False):
        return [dict(op="x", provider="eager")]  # no ms, no error, no skipped
''')


@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "benches"
    d.mkdir()
    (d / "bench_good.py").write_text(GOOD)
    (d / "bench_second.py").write_text(SECOND)
    (d / "bench_broken.py").write_text(BROKEN)
    (d / "not_a_bench.py").write_text("raise SystemExit('must not be imported')\n")
    return d


def test_discover_and_only(bench_dir):
    assert [n for n, _ in R.discover(bench_dir)] == ["broken", "good", "second"]
    assert [n for n, _ in R.discover(bench_dir, ["bench_second.py", "good,second"])] == ["second", "good"]
    with pytest.raises(ValueError, match="no benchmarks/bench_nope.py.*available: broken, good, second"):
        R.discover(bench_dir, ["nope"])


def test_main_writes_json_markdown_plots_and_records_failure(bench_dir, tmp_path, capsys):
    out = tmp_path / "results"
    rc = R.main(["--bench-dir", str(bench_dir), "--out", str(out), "--quick", "--device", "cpu", "--no-progress"])
    assert rc == 1  # bench_broken failed; the others ran
    (json_path,) = out.glob("*.json")
    assert json_path.name.endswith("_cpu.json")
    data = json.loads(json_path.read_text())

    env = data["environment"]
    for key in ("card", "driver", "cuda_runtime", "torch", "triton", "git_commit", "date_utc", "host"):
        assert key in env
    assert env["card"] == "cpu" and env["git_commit"] and len(env["git_commit"]) == 40

    rows = data["rows"]
    good = [r for r in rows if r["bench"] == "good" and "ms" in r]
    assert len(good) == 4  # quick: 2 sizes x 2 providers
    assert {tuple(r["shape"]) for r in good} == {(4, 256), (4, 1024)}
    assert any(r.get("skipped") == "needs CUDA" for r in rows)
    assert sorted(r["provider"] for r in rows if r["bench"] == "second") == ["cpp", "python"]
    (err,) = [r for r in rows if "error" in r]
    assert err["bench"] == "broken" and "kernel exploded at shape (7, 7)" in err["error"]
    assert "RuntimeError" in err["traceback"]
    assert data["modules"]["broken"]["status"] == "error"
    assert data["modules"]["good"]["status"] == "ok" and data["modules"]["good"]["n_rows"] == 5

    md = (out / json_path.name.replace(".json", ".md")).read_text()
    assert "## bench_good" in md and "## bench_second" in md and "## bench_broken (error" in md
    assert "| fake_norm | 4x1024 | bfloat16 | fwd | triton | 0.256 |" in md
    assert "4.00" in md  # triton speed-up over the eager baseline: (1024/1000) / (1024/4000)
    assert "**error** `broken`" in md and "kernel exploded" in md
    assert "- skipped (needs CUDA): `fake_norm/triton` ×1" in md

    plots = sorted(p.name for p in (out / json_path.name.replace(".json", "_plots")).glob("*.png"))
    assert plots == ["fake_norm.png", "fake_pack.png"]
    for p in (out / json_path.name.replace(".json", "_plots")).glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert data["plots"]["fake_norm"].endswith("fake_norm.png")
    assert "bench_broken FAILED" in capsys.readouterr().out


def test_all_good_exit_zero_and_only(bench_dir, tmp_path):
    out = tmp_path / "r"
    rc = R.main(["--bench-dir", str(bench_dir), "--out", str(out), "--only", "second", "--device", "cpu",
                 "--no-progress", "--no-plots"])
    assert rc == 0
    (json_path,) = out.glob("*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"second"}
    assert not list(out.glob("*_plots"))


def test_contract_violations_become_error_rows(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "bench_badrows.py").write_text(BAD_ROWS)
    (d / "bench_norun.py").write_text("x = 1\n")
    (d / "bench_syntax.py").write_text("def run(:\n")
    (d / "bench_nan.py").write_text(
        "def run(device, quick=False):\n"
        "    return [dict(op='o', provider='a', ms=float('nan')), dict(op='o', provider='b', ms=1.0)]\n")
    rows, summary = R.run_all(R.discover(d), R.resolve_device("cpu"), progress=False)
    by = {r["bench"]: r for r in rows if "error" in r}
    assert "row 0: 'ms' must be a number" in by["badrows"]["error"]
    assert "no run(device, quick=False)" in by["norun"]["error"]
    assert "SyntaxError" in by["syntax"]["error"]
    # a NaN time (how modules report OOM) is a failed row; the module's good rows are kept
    assert by["nan"]["provider"] == "a" and "no valid time" in by["nan"]["error"]
    assert [r["ms"] for r in rows if r["bench"] == "nan" and "error" not in r] == [1.0]
    assert summary["nan"]["status"] == "row_errors" and R.any_failed(rows)


def test_bad_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device='tpu'"):
        R.resolve_device("tpu")


def test_cli_module_entry_point(bench_dir, tmp_path):
    """`python -m benchmarks.run` from the repo root: --list works without running anything."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.run", "--bench-dir", str(bench_dir), "--list"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # torch import on a loaded 2-core machine
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["broken", "good", "second"]
    res = subprocess.run([sys.executable, "-m", "benchmarks.run", "--bench-dir", str(bench_dir), "--only", "zzz"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # torch import on a loaded 2-core machine
    assert res.returncode == 2 and "available: broken, good, second" in res.stderr


def test_describe_exception_reaches_the_root_cause():
    try:
        try:
            raise TypeError("Inconsistent return types: fp32 and bf16")
        except TypeError as inner:
            raise RuntimeError("at 20:13:\n    q1, q2 = _load_rows(...)\n             ^") from inner
    except RuntimeError as e:
        msg = R.describe_exception(e)
    assert msg == "RuntimeError: at 20:13: (caused by TypeError: Inconsistent return types: fp32 and bf16)"


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def test_git_state_keeps_the_dirty_flag_of_a_named_commit(monkeypatch):
    """gpu_check.sh names the commit (MLLM_GIT_COMMIT) and its state (MLLM_GIT_DIRTY); the runner records both, and
    reads the state from git itself when only the hash of this tree's HEAD is named."""
    head, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    monkeypatch.delenv("MLLM_GIT_DIRTY", raising=False)
    monkeypatch.setenv("MLLM_GIT_COMMIT", head)
    assert R.git_state() == (head, dirty)
    monkeypatch.setenv("MLLM_GIT_COMMIT", "0123abc")  # a copied tree: another commit, state not given
    assert R.git_state() == ("0123abc", None)
    monkeypatch.setenv("MLLM_GIT_DIRTY", "1")
    assert R.git_state() == ("0123abc", True)
    monkeypatch.setenv("MLLM_GIT_DIRTY", "0")
    assert R.environment("cpu")["git_dirty"] is False
    monkeypatch.setenv("MLLM_GIT_DIRTY", "maybe")
    with pytest.raises(ValueError, match="MLLM_GIT_DIRTY='maybe'"):
        R.git_state()


def test_extrapolated_rows_are_marked_and_checked(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "bench_ext.py").write_text(
        "def run(device, quick=False):\n"
        "    return [dict(op='pack', shape='n=10', provider='cpp', ms=1.0),\n"
        "            dict(op='pack', shape='n=10', provider='python', ms=250.0, extrapolated='from n=1')]\n")
    (d / "bench_badext.py").write_text(
        "def run(device, quick=False):\n"
        "    return [dict(op='pack', provider='python', ms=2.0, extrapolated=10)]\n")
    rows, summary = R.run_all(R.discover(d), R.resolve_device("cpu"), progress=False)
    assert summary["ext"]["status"] == "ok"
    assert "'extrapolated' must be a bool or a str" in summary["badext"]["error"]
    md = R.markdown_report({"card": "cpu"}, rows, summary, {})
    assert "| pack | n=10 | python | 250.0* | extrapolated (from n=1) |" in md
    assert "| pack | n=10 | cpp | 1 |  |" in md


def test_cpu_rows_of_a_real_module_come_from_pytest_benchmark(tmp_path):
    """``--only swiglu --quick`` on CPU: the eager rows are pytest-benchmark's numbers (checked against the JSON it
    wrote, which the run keeps), GB/s is the module's minimal bytes over that median, the GPU providers are skipped,
    and the Markdown and the plot still come out."""
    out = tmp_path / "res"
    rc = R.main(["--only", "swiglu", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    (json_path,) = out.glob("*_cpu.json")
    data = json.loads(json_path.read_text())
    info = data["modules"]["swiglu"]["cpu_timing"]
    raw = json.loads((out / info["json"]).read_text())
    assert info["json"] == f"{json_path.stem}_pytest_benchmark/bench_swiglu.json"
    stats = {json.dumps(e["extra_info"]["row"], sort_keys=True): e["stats"] for e in raw["benchmarks"]}
    timed = [r for r in data["rows"] if "ms" in r]
    assert sorted(r["mode"] for r in timed) == ["bwd", "fwd", "fwd+bwd"] and {r["provider"] for r in timed} == {"eager"}
    N, F = 256, 1024
    for r in timed:
        key = {k: r[k] for k in ("op", "shape", "dtype", "mode", "provider")}
        st = stats[json.dumps(key, sort_keys=True)]
        assert r["timer"] == "pytest-benchmark"
        assert (r["ms"], r["ms_min"], r["ms_max"]) == (st["median"] * 1e3, st["min"] * 1e3, st["max"] * 1e3)
        assert r["rounds"] == st["rounds"] >= 3 and r["iterations"] == st["iterations"]
        nbytes = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[r["mode"]] * N * F * 4  # fp32 on CPU
        assert r["bytes"] == nbytes and r["gbps"] == pytest.approx(nbytes / (r["ms"] * 1e-3) / 1e9)
    assert sorted((r["provider"], r["skipped"]) for r in data["rows"] if "skipped" in r) == (
        [("compile", "needs CUDA")] * 3 + [("triton", "needs CUDA")] * 3)
    assert data["modules"]["swiglu"]["timers"] == ["pytest-benchmark"]
    md = json_path.with_suffix(".md").read_text()
    assert "timer: pytest-benchmark (pytest-benchmark " in md and "| swiglu | 256x1024 | float32 | fwd | eager |" in md
    plot = out / data["plots"]["swiglu"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_without_a_timer_are_labelled_and_cpu_case_problems_are_module_errors(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "bench_own.py").write_text("def run(device, quick=False):\n"
                                    "    return [dict(op='o', provider='a', ms=1.0), dict(op='o', provider='b', ms=2.0,"
                                    " timer='perf_counter loop')]\n")
    (d / "bench_badcases.py").write_text("def cpu_cases(quick=False):\n    raise KeyError('no such shape')\n")
    (d / "bench_dupcases.py").write_text(textwrap.dedent('''
        from benchmarks.common import CpuCase

        def cpu_cases(quick=False):
            return [CpuCase(dict(op="o", provider="p"), skipped="x"), CpuCase(dict(op="o", provider="p"), skipped="y")]
    '''))
    rows, summary = R.run_all(R.discover(d), R.resolve_device("cpu"), progress=False)
    own = [r for r in rows if r["bench"] == "own"]
    assert [r["timer"] for r in own] == ["not stated by bench_own.run", "perf_counter loop"]
    assert summary["badcases"]["status"] == "error" and "KeyError: 'no such shape'" in summary["badcases"]["error"]
    assert summary["dupcases"]["status"] == "error" and "have the same id 'o-p'" in summary["dupcases"]["error"]


def test_result_stem_never_reuses_a_name(tmp_path):
    env = {"date_utc": "2026-11-26T14:42:49+00:00", "card": "NVIDIA H100 80GB HBM3"}
    assert R.result_stem(tmp_path, env) == "20261126-144249_nvidia-h100-80gb-hbm3"
    assert R.result_stem(tmp_path, env, prefix="bench_x") == "bench_x_20261126-144249_nvidia-h100-80gb-hbm3"
    (tmp_path / "bench_x_20261126-144249_nvidia-h100-80gb-hbm3.md").write_text("")
    assert R.result_stem(tmp_path, env, prefix="bench_x") == "bench_x_20261126-144249_nvidia-h100-80gb-hbm3-2"
    (tmp_path / "20261126-144249_nvidia-h100-80gb-hbm3_plots").mkdir()
    assert R.result_stem(tmp_path, env) == "20261126-144249_nvidia-h100-80gb-hbm3-2"


def test_attention_rows_get_a_speedup_against_pytorch_sdpa():
    """bench_attention has no "eager" provider: its PyTorch baseline is sdpa-flash (eager-sinks is skipped at long T),
    so the runner's table used to carry no ratio at all for attention."""
    base = dict(op="attention_d64", shape="B4xT4096xH32xD64", size=4096, dtype="bfloat16", mode="fwd", bench="attention")
    rows = [dict(base, provider="mllm", ms=0.94), dict(base, provider="sdpa-flash", ms=0.94 * 1.2),
            dict(base, provider="eager-sinks", ms=72.0)]
    spd = R.speedups(rows)
    assert spd[0] == pytest.approx(1.2) and spd[1] is None and spd[2] == pytest.approx(0.94 * 1.2 / 72.0)
    md = R.markdown_report({"card": "x"}, rows, {"attention": {"status": "ok"}}, {})
    assert "× base" in md and "| mllm | 0.94 |" in md and "| 1.20 |" in md


def test_threads_reach_the_pytest_benchmark_process(tmp_path, monkeypatch):
    """On a shared CPU, torch's OpenMP threads stall at every parallel region when a core is taken (CPU medians came out
    as multiples of ~24 ms: swiglu 256x1024 fwd 24.0 ms, bwd 48.0 ms, against 0.3 ms with one thread). ``--threads N``
    sets the thread count here and in the pytest-benchmark subprocess that times the CPU cases, and records it."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        # set first, so that monkeypatch records the variable even when it was absent: delenv alone records nothing
        # then, and the OMP_NUM_THREADS=1 that main() exports for its subprocess stayed set for every later test
        monkeypatch.setenv(var, "1")
        monkeypatch.delenv(var)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this process keeps its threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    d = tmp_path / "b"
    d.mkdir()
    (d / "bench_thr.py").write_text(textwrap.dedent('''
        import torch
        from benchmarks.common import CpuCase

        def _prepare():
            n = torch.get_num_threads()
            if n != 1:
                raise RuntimeError(f"{n} threads in the timing process")
            return lambda: None

        def cpu_cases(quick=False):
            return [CpuCase(dict(op="thr", provider="eager"), prepare=_prepare)]
    '''))
    out = tmp_path / "res"
    rc = R.main(["--bench-dir", str(d), "--out", str(out), "--device", "cpu", "--quick", "--no-plots", "--no-progress",
                 "--threads", "1"])
    (js,) = out.glob("*.json")
    data = json.loads(js.read_text())
    assert rc == 0, data["rows"]
    assert data["environment"]["torch_threads"] == 1 and data["args"]["threads"] == 1


def test_a_plotting_failure_keeps_the_json_and_markdown(tmp_path, monkeypatch, capsys):
    """Plots are drawn before the JSON is written: a matplotlib that fails (too old on a GPU image) used to lose the
    run's measured rows; now the rows are written and the failure is named in the JSON, the Markdown and on stderr."""
    import benchmarks.plotting as P

    def broken(*a, **k):
        raise TypeError("subplots() got an unexpected keyword argument 'layout'")

    monkeypatch.setattr(P, "plot_rows", broken)
    rows = [dict(op="x", shape="4", size=4, dtype="float32", mode="fwd", provider="eager", ms=1.0)]
    out = R.write_results(tmp_path, {"card": "cpu", "date_utc": "2026-11-27T00:00:00+00:00"}, rows, {}, {})
    data = json.loads(out["json"].read_text())
    assert data["rows"][0]["ms"] == 1.0 and "unexpected keyword argument 'layout'" in data["plot_error"]
    assert "Plots not written" in out["markdown"].read_text() and out["plots"] == {}
    assert "plots not written" in capsys.readouterr().err
