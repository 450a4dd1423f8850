"""benchmarks/gpu_check.sh, the one-call GPU session, on CPU: sections run under their own limits, one that fails or
overruns is recorded and the next still runs, and everything is packed into bundle.tgz next to summary.txt (the
device tool brings back at most 8 files)."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(out, sections, **env):
    e = {**os.environ, "PY": sys.executable, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
         "MLLM_DATA_DIR": "", "SECTIONS": sections, **env}
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def test_sections_summary_and_bundle(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "dpo_tests nonsense stages", T_DPO_TESTS="120")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (out / "summary.txt").read_text()
    assert "dpo_tests rc=0" in summary and "passed" in summary
    assert "unknown section nonsense" in summary
    assert "stages skipped: MLLM_DATA_DIR unset" in summary
    assert sorted(p.name for p in out.iterdir()) == ["bundle.tgz", "summary.txt"]
    with tarfile.open(out / "bundle.tgz") as tar:
        names = tar.getnames()
    assert "./dpo_tests.log" in names and "./summary.txt" in names


def test_a_section_over_its_limit_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "dpo_tests env", T_DPO_TESTS="1", BUNDLE="0")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("dpo_tests rc=124") and lines[1].startswith("env rc=")
    assert (out / "dpo_tests.log").exists() and not (out / "bundle.tgz").exists()


def test_attention_tune_section_finds_its_candidates_and_needs_cuda(tmp_path):
    """The section reads the committed AOT sweep (the glob must match a file) and, without a GPU, stops with the
    reason instead of a traceback."""
    out = tmp_path / "out"
    res = _run(out, "attention_tune", BUNDLE="0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "summary.txt").read_text().startswith("attention_tune rc=1")
    log = (out / "attention_tune.log").read_text()
    assert "needs CUDA" in log and "ls: cannot access" not in log


def test_train_tuned_tiles_needs_a_winning_tile(tmp_path):
    """train_tuned_tiles runs the training step on attention_tune's tile table; with no table (or no winner in it)
    it says so and does not run bench_train with the shipped tiles under a misleading name."""
    out = tmp_path / "out"
    res = _run(out, "train_tuned_tiles", BUNDLE="0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "summary.txt").read_text().startswith("train_tuned_tiles skipped: no winning tile")
    (out / "results" / "attention_tiles.json").write_text('{"tiles": []}')
    _run(out, "train_tuned_tiles", BUNDLE="0")
    assert (out / "summary.txt").read_text().count("train_tuned_tiles skipped") == 2
