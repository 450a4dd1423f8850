# The README's two commands: `make smoke` (main job: local-smoke pipeline on CPU) and `make test`.
# Both create/reuse .venv and install what they need; re-running is cheap (stamp file).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.mllm-installed
DATA_DIR ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
TEST_ENV := TRITON_INTERPRET=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 MLLM_DATA_DIR=$(DATA_DIR)
# smoke: the local files when ../shared/data exists (offline, as these machines are); else the Hugging Face hub
SMOKE_ENV := $(if $(DATA_DIR),HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 MLLM_DATA_DIR=$(DATA_DIR))
PYTEST_ARGS ?=
# make test: one pytest worker per core (pytest-xdist, a dev extra). The interpreter-bound kernel tests and the
# compile-bound AOT check are single-threaded, so a serial run leaves the second of CI's two cores idle; on a
# 2-core AVX2 EPYC the serial suite took 29.8 minutes (1,098 tests at 2b6fad5+). XDIST= runs it serially.
# The runner's nested pytest-benchmark runs drop the workers' PYTEST_XDIST_* (benchmarks/pytest_cpu.py).
XDIST ?= -n 2

.PHONY: setup smoke test test-gpu bench aot-check build-ext clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@[ -x $(VPY) ] || $(PY) -m venv $(VENV)
	@# torch: the pinned CPU build on this machine's disk when none is importable; never an unpinned torch
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q setuptools wheel pybind11
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(VPY) setup.py -q build_ext --inplace
	@touch $(STAMP)

build-ext: setup
	$(VPY) setup.py -q build_ext --inplace

smoke: setup
	$(SMOKE_ENV) TRITON_INTERPRET=0 $(VPY) scripts/run_pipeline.py --config local-smoke --stage all $(SMOKE_ARGS)

test: setup
	$(TEST_ENV) $(VPY) -m pytest $(XDIST) $(PYTEST_ARGS)

# on a CUDA machine from the source tree (no installs): kernels compiled, not interpreted
test-gpu:
	PYTHONPATH=. HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest tests/kernels $(PYTEST_ARGS)

bench: setup
	$(VPY) -m benchmarks.run

# no GPU needed: every Triton kernel compiled for sm_90 (AOT_ARGS="--arch 80", "--quick"), ptxas resources reported
aot-check: setup
	$(VPY) -m benchmarks.aot_check $(AOT_ARGS)

clean:
	rm -rf build *.egg-info mllm/_C*.so .pytest_cache
