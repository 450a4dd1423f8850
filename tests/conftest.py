"""Test-session set-up. TRITON_INTERPRET must be set before any @triton.jit module is imported, so it is
the first thing here (the Makefile sets it too). On a CUDA machine it is left unset, so the compiled
kernels are tested."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy BLAS threads slow the Triton interpreter 3x on 2 cores

import torch  # importing torch does not import triton kernels, so the check below is still in time

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _data_dir():
    d = os.environ.get("MLLM_DATA_DIR")
    return Path(d) if d and Path(d).is_dir() else None


@pytest.fixture
def data_dir():
    """The real data folder (../shared/data layout); skips the test when MLLM_DATA_DIR is unset."""
    d = _data_dir()
    if d is None:
        pytest.skip("MLLM_DATA_DIR is not set (or not a folder): real-data test skipped")
    return d


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
