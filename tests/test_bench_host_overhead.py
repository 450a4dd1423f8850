"""benchmarks/bench_host_overhead.py: the rows it reports, and that the launches it skips under the interpreter
are restored afterwards (a leaked stub would leave every later kernel call silently uncomputed)."""
import importlib

import pytest
import torch

from mllm_kernels._common import interpreting

B = importlib.import_module("benchmarks.bench_host_overhead")
SW = importlib.import_module("mllm_kernels.swiglu")


@pytest.mark.skipif(not interpreting() or torch.cuda.is_available(), reason="the CPU form needs TRITON_INTERPRET=1")
def test_rows_for_both_providers_and_launches_restored():
    rows = B.run(torch.device("cpu"), quick=True, progress=False)
    ops = {r["op"] for r in rows}
    assert ops == {"model_fwd_bwd", "rms_norm_fwd_bwd", "swiglu_fwd_bwd", "attention_fwd_bwd"}
    for op in ops:
        by = {r["provider"]: r for r in rows if r["op"] == op}
        assert set(by) == {"dispatcher", "function"}
        assert all(r["ms"] > 0 and r["launches"] == "skipped" for r in by.values())
    # kernels run again: a real swiglu output, not an uninitialised buffer
    a, b = torch.randn(4, 40), torch.randn(4, 40)
    torch.testing.assert_close(SW.swiglu(a, b), torch.nn.functional.silu(a) * b)


def test_skipped_without_kernel_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = B.run(torch.device("cpu"), quick=True, progress=False)
    assert rows and all("skipped" in r for r in rows)
