"""benchmarks/run.py against fake bench modules written to tmp_path: discovery, JSON/Markdown/plots,
a failing module recorded as an error row while the others still run, and the exit code."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import run as R

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
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["broken", "good", "second"]
    res = subprocess.run([sys.executable, "-m", "benchmarks.run", "--bench-dir", str(bench_dir), "--only", "zzz"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
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
