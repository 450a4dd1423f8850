"""benchmarks/aot_check.py: every Triton kernel compiled for sm_90 on this GPU-less machine, with ptxas's resources.

The check runs in subprocesses: it needs @triton.jit kernels that are JITFunctions, and this test session imported
them interpreted (TRITON_INTERPRET=1 in conftest). The compile-error and shared-memory tests use small kernels
made to fail, so that a check which could never fail would be caught."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the kernels one gpu-full training step launches (forward and backward)
MODEL_KERNELS = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                 "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                 "_ce_rows_kernel"}
ATTENTION_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
SPILL_BUDGET = 64  # bytes per thread; measured 0-32 with triton 3.6 and 3.9 (results/aot_check_20261126-*)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _python(tmp_path: Path, code: str, timeout: int = 300):
    script = tmp_path / "snippet.py"  # @triton.jit needs its source in a file
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_parse_ptxas_and_occupancy():
    # importing the module sets no environment variable (only running it as a script does); pure helpers
    from benchmarks.aot_check import ctas_per_sm, parse_ptxas

    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    48 bytes stack frame, 48 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size\n")
    assert parse_ptxas(log) == {"registers": 255, "spill_stores": 48, "spill_loads": 40}
    assert parse_ptxas("nothing") == {}
    # 255 regs -> 8,192 per warp (256-register granules): 65,536 / (4 warps x 8,192) = 2 CTAs
    assert ctas_per_sm(255, 4, 4096, 90) == (2, "registers")
    # 32 regs x 4 warps: the 64-warp limit allows 16
    assert ctas_per_sm(32, 4, 0, 90) == (16, "warps")
    # 100 KiB of shared memory: 233,472 / (102,400 + 1,024) = 2 on sm_90, 1 on sm_80
    assert ctas_per_sm(32, 4, 102400, 90) == (2, "shared")
    assert ctas_per_sm(32, 4, 102400, 80) == (1, "shared")
    assert ctas_per_sm(16, 1, 0, 90) == (32, "max")


@pytest.mark.parametrize("arch, warps4, ctas1", [(80, 16, 32), (86, 12, 16), (89, 12, 24), (90, 16, 32)])
def test_occupancy_limits_are_per_arch(arch, warps4, ctas1):
    """Resident warps per SM: 64 on sm_80/sm_90, 48 on sm_86/sm_89; resident CTAs per SM: 32, 16 (sm_86), 24 (sm_89)
    (CUDA C++ Programming Guide, technical specifications per compute capability)."""
    from benchmarks.aot_check import ctas_per_sm

    assert ctas_per_sm(32, 4, 0, arch) == (warps4, "warps")  # 4-warp CTAs, few registers, no shared memory
    assert ctas_per_sm(16, 1, 0, arch) == (ctas1, "max")      # 1-warp CTAs: the CTA limit binds first


def test_quick_is_the_training_step_and_the_full_run_has_every_kernel_family():
    from benchmarks.aot_check import cases

    assert list(cases(quick=True)) == ["model gpu-full bf16 packed"]
    full = list(cases(quick=False))
    for family in ("attention bf16 D=128", "attention fp32 D=64", "rms_norm fp32 C=40000", "swiglu", "rope",
                   "lm_loss", "dpo_logprobs", "model gpu-full fp32"):
        assert any(name.startswith(family) for name in full), family


def test_every_case_compiles_for_sm90(tmp_path):
    """The full check (about 3 minutes on the 2-core machines of earlier sessions, 7 on a 2-core AVX2 EPYC, almost
    all of it Triton + ptxas compile time): every kernel specialisation of every case compiles with this triton for
    sm_90 and fits its shared memory; the gpu-full step uses the GPU tiles."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.aot_check", "--out", str(tmp_path)], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = list(tmp_path.glob("aot_check_*_sm90_triton*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").exists()
    report = json.loads(reports[0].read_text())
    recs = report["records"]
    assert report["meta"]["arch"] == 90 and report["meta"]["n_errors"] == 0
    from benchmarks.aot_check import cases

    assert report["meta"]["n_cases"] == len(cases(quick=False))
    step = [r for r in recs if r["case"] == "model gpu-full bf16 packed"]
    assert MODEL_KERNELS <= {r["kernel"] for r in step}
    for r in recs:
        assert r["error"] is None, r
        assert 0 < r["registers"] <= 255 and r["shared"] >= 0 and r["ctas_per_sm"] >= 1, r
        assert r["spill_stores"] is not None, r
    # register budgets as tuned (benchmarks/NOTES.md, tuning step 12): the training step and every fp32 attention
    # tile stay (nearly) spill-free; kilobytes here mean a tile or a triton upgrade broke the register allocation
    guarded = step + [r for r in recs if r["case"].startswith("attention fp32") and r["kernel"] in ATTENTION_KERNELS]
    spilled = [(r["case"], r["kernel"], r["spill_stores"]) for r in guarded if r["spill_stores"] > SPILL_BUDGET]
    assert not spilled, spilled
    # the GPU tiles, not the interpreter's single config (64 x 64): gpu-full attention is D = 64, bf16
    fwd = next(r for r in step if r["kernel"] == "_attn_fwd_kernel")
    from mllm_kernels.attention import GPU_CONFIGS

    cfg = GPU_CONFIGS[("fwd", 64, 2)]
    assert (fwd["constexprs"]["BLOCK_M"], fwd["constexprs"]["BLOCK_N"]) == (cfg["BLOCK_M"], cfg["BLOCK_N"])
    assert fwd["num_warps"] == cfg["num_warps"] and fwd["constexprs"]["HAS_DOCS"] is True
    md = reports[0].with_suffix(".md").read_text()
    assert "| model gpu-full bf16 packed | _attn_bwd_dkdv_kernel |" in md


@pytest.mark.parametrize("arch", [90, 80])
def test_compile_errors_and_shared_memory_overflow_are_reported(arch, tmp_path):
    res = _python(tmp_path, f"""
        import json, torch
        from benchmarks.aot_check import Compiler
        import triton, triton.language as tl

        @triton.jit
        def branch_dtypes(X, Y, n, FLAG: tl.constexpr):
            # fp32 in one branch, bf16 in the other: the error that cost the first GPU run
            offs = tl.arange(0, 16)
            x = tl.load(X + offs)
            if n > 3:
                v = x.to(tl.float32)
            else:
                v = x
            tl.store(Y + offs, v)

        @triton.jit
        def big_tiles(A, B, C, M: tl.constexpr):
            r = tl.arange(0, M)
            a = tl.load(A + r[:, None] * M + r[None, :])
            b = tl.load(B + r[:, None] * M + r[None, :])
            tl.store(C + r[:, None] * M + r[None, :], tl.dot(a, b))

        @triton.jit
        def fine(X, Y, n):
            offs = tl.arange(0, 128)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

        x = torch.zeros(4096, dtype=torch.bfloat16)
        a = torch.zeros(256 * 256, dtype=torch.float32)
        with Compiler({arch}) as c:
            c.case = "t"
            branch_dtypes[(1,)](x, x, 5, FLAG=True)
            big_tiles[(1,)](a, a, a, M=256, num_stages=1)
            fine[(1,)](x, x, 100)
            fine[(2,)](x, x, 100)  # same specialisation: compiled once
        print(json.dumps([dict(k=r.kernel, e=r.error, regs=r.registers, shared=r.shared) for r in c.records]))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["k"] for r in recs] == ["branch_dtypes", "big_tiles", "fine"]
    assert recs[0]["e"] and ("CompilationError" in recs[0]["e"] or "type" in recs[0]["e"].lower()), recs[0]
    assert recs[1]["e"] and ("shared memory" in recs[1]["e"] or "OutOfResources" in recs[1]["e"]
                             or "resource" in recs[1]["e"].lower()), recs[1]
    assert recs[2]["e"] is None and recs[2]["regs"] > 0


def test_main_exits_nonzero_on_a_failure(tmp_path):
    # main() on a report with one failed kernel: exit status 1 and the failure named on stderr
    res = _python(tmp_path, """
        import sys
        import benchmarks.aot_check as a
        a.run = lambda arch, quick, only, progress: {"meta": dict(arch=90, card="H100", triton="x", torch="y",
            git_commit="c", date="d", host="h", command="cmd", n_cases=1, n_kernels=1, n_errors=1, n_spilling=0,
            wall_s=0.0), "records": [dict(case="c", kernel="_k", constexprs={}, num_warps=4, num_stages=3,
            compile_s=0.1, shared=None, registers=None, spill_stores=None, spill_loads=None, ctas_per_sm=None,
            limit=None, error="CompilationError: boom")]}
        sys.exit(a.main(["--no-write"]))
    """)
    assert res.returncode == 1 and "FAILED c / _k: CompilationError: boom" in res.stderr
    assert "**failed**: CompilationError: boom" in res.stdout


def test_attention_sweep_writes_one_row_per_kernel_and_tile(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.aot_check", "--sweep-attention", "64,fp32", "--sizes", "16",
                          "--warps", "4", "--stages", "1", "--out", str(tmp_path)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (path,) = tmp_path.glob("aot_sweep_attention_*_D64_fp32_sm90_triton*.md")
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ") and " x " in line
            and not line.startswith("| kernel")]
    assert sorted(r.split("|")[1].strip() for r in rows) == ["dkdv", "dq", "fwd"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[1] == "16 x 16" and cells[2] == "4" and cells[3] == "1" and 0 < int(cells[4]) <= 255, r


@pytest.mark.parametrize("arch", [80, 89])
def test_quick_check_for_ampere_and_ada(arch):
    """The training step's kernels also compile for A100 (sm_80: mma instead of wgmma) and L4 / RTX 40xx (sm_89:
    99 KiB of shared memory per CTA instead of 227)."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.aot_check", "--quick", "--arch", str(arch), "--no-write"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"sm_{arch}" in res.stdout and "0 failed" in res.stdout


def test_compare_reports():
    from benchmarks.aot_check import compare

    def rec(kernel, regs, spill, tile=64, error=None):
        return dict(case="c", kernel=kernel, constexprs={"BLOCK_M": tile}, num_warps=4, num_stages=3, compile_s=0.1,
                    shared=1024, registers=regs, spill_stores=spill, spill_loads=spill, ctas_per_sm=2,
                    limit="registers", error=error)

    meta = lambda commit: dict(git_commit=commit, triton="3.6.0", arch=90)  # noqa: E731
    before = {"meta": meta("aaa"), "records": [rec("_same", 100, 0), rec("_spills", 255, 4096), rec("_retiled", 90, 0)]}
    after = {"meta": meta("bbb"), "records": [rec("_same", 100, 0), rec("_spills", 200, 0),
                                              rec("_retiled", 80, 0, tile=32)]}
    md = compare(before, after)
    assert md.startswith("# AOT report diff: aaa triton 3.6.0 sm_90 → bbb triton 3.6.0 sm_90")
    assert "3 of 4 specialisations differ" in md
    assert "| c | _spills | M=64 | 4 | 3 | 255 → 200 | 4096 → 0 | 1024 | 2 |  |" in md
    assert "| c | _retiled | M=64 | 4 | 3 | only in the first report |" in md
    assert "| c | _retiled | M=32 | 4 | 3 | only in the second report |" in md
    assert "_same" not in md
