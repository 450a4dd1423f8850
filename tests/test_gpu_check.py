"""benchmarks/gpu_check.sh, the one-call GPU session, on CPU: sections run under their own limits, one that fails or
overruns is recorded and the next still runs, the exit status says whether any failed, and everything (Nsight reports
included, up to a size cap) is packed into bundle.tgz next to summary.txt (the device tool brings back at most 8
files)."""
import json
import os
import re
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
    assert res.returncode == 1, res.stdout + res.stderr  # the unknown section is a failure; the rest still ran
    summary = (out / "summary.txt").read_text()
    assert "dpo_tests rc=0" in summary and "passed" in summary
    assert "unknown section nonsense" in summary
    assert "stages skipped: MLLM_DATA_DIR unset" in summary
    assert "failed sections: nonsense\n" in summary
    assert sorted(p.name for p in out.iterdir()) == ["bundle.tgz", "summary.txt"]
    with tarfile.open(out / "bundle.tgz") as tar:
        names = tar.getnames()
    assert "./dpo_tests.log" in names and "./summary.txt" in names


def test_a_section_over_its_limit_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "dpo_tests env", T_DPO_TESTS="1", BUNDLE="0")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("dpo_tests rc=124") and lines[1].startswith("env rc=")
    assert lines[-1].startswith("failed sections: dpo_tests")
    assert (out / "dpo_tests.log").exists() and not (out / "bundle.tgz").exists()


def test_attention_tune_section_finds_its_candidates_and_needs_cuda(tmp_path):
    """The section reads the committed AOT sweep (the glob must match a file) and, without a GPU, stops with the
    reason instead of a traceback."""
    out = tmp_path / "out"
    res = _run(out, "attention_tune", BUNDLE="0")
    assert res.returncode == 1, res.stdout + res.stderr
    assert (out / "summary.txt").read_text().startswith("attention_tune rc=1")
    log = (out / "attention_tune.log").read_text()
    assert "needs CUDA" in log and "ls: cannot access" not in log


def test_train_tuned_tiles_needs_a_winning_tile(tmp_path):
    """train_tuned_tiles runs the training step on attention_tune's tile table; with no table (or no winner in it)
    it says so and does not run bench_train with the shipped tiles under a misleading name."""
    out = tmp_path / "out"
    res = _run(out, "train_tuned_tiles", BUNDLE="0")
    assert res.returncode == 0, res.stdout + res.stderr  # a skipped section is not a failure
    assert (out / "summary.txt").read_text().startswith("train_tuned_tiles skipped: no winning tile")
    assert "failed sections: none" in (out / "summary.txt").read_text()
    (out / "results" / "attention_tiles.json").write_text('{"tiles": []}')
    _run(out, "train_tuned_tiles", BUNDLE="0")
    assert (out / "summary.txt").read_text().count("train_tuned_tiles skipped") == 2


def _reports(out, nbytes):
    (out / "profile").mkdir(parents=True)
    (out / "profile" / "ncu_triton.ncu-rep").write_bytes(b"n" * nbytes)
    (out / "profile" / "nsys_triton.nsys-rep").write_bytes(b"s" * nbytes)


def test_nsight_reports_go_into_the_bundle(tmp_path):
    out = tmp_path / "out"
    _reports(out, 1000)
    res = _run(out, "train_tuned_tiles")
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bundle.tgz", "summary.txt"]
    with tarfile.open(out / "bundle.tgz") as tar:
        names = tar.getnames()
        assert tar.extractfile("./profile/ncu_triton.ncu-rep").read() == b"n" * 1000
    assert "./profile/nsys_triton.nsys-rep" in names
    assert "Nsight reports bundled" in (out / "summary.txt").read_text()


def test_nsight_reports_over_the_cap_stay_on_disk(tmp_path):
    out = tmp_path / "out"
    _reports(out, 600 * 1024)  # 1.2 MiB together, over a 1 MiB cap
    res = _run(out, "train_tuned_tiles", BUNDLE_REPORTS_MB="1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "profile" / "ncu_triton.ncu-rep").stat().st_size == 600 * 1024
    assert (out / "profile" / "nsys_triton.nsys-rep").exists()
    with tarfile.open(out / "bundle.tgz") as tar:
        names = tar.getnames()
    assert "./summary.txt" in names and not any(n.endswith("-rep") for n in names)
    summary = (out / "summary.txt").read_text()
    assert "Nsight reports not bundled (1200 KiB > BUNDLE_REPORTS_MB=1 MiB), kept on disk" in summary
    assert "profile/ncu_triton.ncu-rep" in summary


def test_results_record_the_commit_and_whether_the_tree_was_dirty(tmp_path):
    """The script names the commit for the results; the dirty state travels with it (it used to be lost: the runner
    saw only MLLM_GIT_COMMIT and recorded git_dirty null)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                            text=True).stdout
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MLLM_GIT_COMMIT", "MLLM_GIT_DIRTY")}
    e = {**env, "PY": sys.executable, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "SECTIONS": "bench_lm_loss",
         "BUNDLE": "0"}
    res = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr + (out / "bench_lm_loss.log").read_text()
    (path,) = (out / "results").glob("bench_lm_loss_*.json")
    recorded = json.loads(path.read_text())["environment"]
    assert recorded["git_commit"] == head and recorded["git_dirty"] is bool(status.strip())


def _fake_python(tmp_path, body):
    """A stand-in for the interpreter (PY=...), so that the script's own bookkeeping is tested without the minutes a
    real section takes."""
    py = tmp_path / "fake_python"
    py.write_text("#!/usr/bin/env bash\n" + body + "\n")
    py.chmod(0o755)
    return str(py)


def test_budget_cuts_a_section_and_skips_what_no_longer_fits(tmp_path):
    """BUDGET_S: the run ends with its summary and bundle inside the budget. In session 10 a device call's own limit
    killed the script in its 12th section, before the bundle was written, and every result file was lost."""
    out = tmp_path / "out"
    res = _run(out, "dpo_tests env bench_rope", T_DPO_TESTS="120", BUDGET_S="8", RESERVE_S="2", MIN_SECTION_S="3",
               PY=_fake_python(tmp_path, "sleep 30"), MLLM_GIT_COMMIT="test")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    # 8 - 2 = 6 s left at the start; a slow start-up on a loaded machine may have used a second or two of it
    assert lines[0].startswith("dpo_tests rc=124") and re.search(r"\(limit 120s cut to [4-6]s by BUDGET_S\)", lines[0])
    assert lines[1].startswith("env skipped: out of budget") and lines[2].startswith("bench_rope skipped: out of budget")
    assert "failed sections: dpo_tests env bench_rope" in lines
    assert (out / "bundle.tgz").exists()


def test_budget_must_be_a_number(tmp_path):
    res = _run(tmp_path / "out", "env", BUDGET_S="8m")
    assert res.returncode == 2 and "BUDGET_S must be a whole number of seconds, got '8m'" in res.stderr


def test_summary_carries_the_training_numbers(tmp_path):
    """bench_train's per-backend lines and the goal line are copied into summary.txt (and printed), so a device call
    whose files do not come back still returns its tokens/s in the printed output."""
    out = tmp_path / "out"
    fake = _fake_python(tmp_path, "\n".join([
        "echo 'bench_train: gpu-full on NVIDIA H100: B=8 T=1024 bf16, backends triton+compile, 4+6 steps'",
        "echo 'bench_train: note: on CPU the triton backend runs the interpreter'",
        "echo 'bench_train: triton+compile: 251,234 tokens/s, MFU 42.4%'",
        "echo 'bench_train: eager (own process): 120,000 tokens/s'",
        "echo 'Goal (issue 9, one H100): triton >= 260,000 tokens/s and >= 1.3x eager. Measured: 251,234.'",
        "echo 'bench_train: wrote results/x.json and x.md'"]))
    res = _run(out, "train_goal", PY=fake, BUNDLE="0")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("train_goal rc=0")
    assert summary[1:4] == ["    bench_train: triton+compile: 251,234 tokens/s, MFU 42.4%",
                            "    bench_train: eager (own process): 120,000 tokens/s",
                            "    Goal (issue 9, one H100): triton >= 260,000 tokens/s and >= 1.3x eager. Measured: 251,234."]
    assert summary[4] == "failed sections: none"
    assert "251,234 tokens/s" in res.stdout
