#!/usr/bin/env bash
# Profile the training step of scripts/bench_train.py.
#
#   scripts/profile.sh [--tool auto|nsys|ncu|torch] [--out DIR] [--backend NAME] [--steps N] [--warmup N]
#                      [--kernels REGEX] [--ncu-count N] [--dry-run] [-- extra scripts/bench_train.py arguments]
#
#   nsys : Nsight Systems timeline of the timed steps only: the capture starts when the NVTX range
#          "timed_steps" opens (after warm-up, compilation and autotuning) and stops when it closes
#          (--capture-range=nvtx --nvtx-capture=timed_steps --capture-range-end=stop). Writes
#          OUT/nsys_<backend>.nsys-rep and OUT/nsys_<backend>_stats.txt (kernel and NVTX-range summaries).
#   ncu  : Nsight Compute "--set full" of the kernels whose names match --kernels, launched inside the
#          "timed_steps" range of ONE training step of one micro-batch (--steps 1 --grad-accum 1; a --grad-accum
#          after "--" overrides it): forward, backward and the LM-loss kernel alike. Default --kernels: every
#          Triton kernel that mllm_kernels launches (read from its source: the @triton.jit functions called as
#          kernel[grid](...), e.g. _rms_norm_fwd_kernel, _attn_bwd_dkdv_kernel, _ce_rows_kernel). Every matching
#          launch of that step is profiled (159 in one gpu-full micro-batch, each replayed once per metric pass, so
#          this takes minutes); --ncu-count N stops after the first N. Writes OUT/ncu_<backend>.ncu-rep.
#   torch: torch.profiler Chrome trace of a few steps, with the same range names (step, data, forward,
#          backward, optimizer from mllm/training/profiling.py). Writes OUT/torch/bench_train_<backend>_rank0.json
#          and OUT/torch_summary.txt. Open the trace in https://ui.perfetto.dev or chrome://tracing.
#   auto (default): nsys and ncu where installed and a GPU is present; where nsys is absent (or there is no
#          GPU) it says so and falls back to the torch.profiler trace.
#   --dry-run: print the commands the chosen tool would run, and exit (no GPU or Nsight tool needed).
#
# Defaults: backend triton on CUDA, eager on CPU (bench_train's CPU default config is local-smoke);
# steps 5, warm-up 3. See benchmarks/NOTES.md ("Profiling") for what to look at.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TOOL=auto
OUT="$ROOT/benchmarks/results/profile"
BACKEND=""
STEPS=5
WARMUP=3
NCU_COUNT=""  # empty: every matching launch of the one profiled step
RANGE=timed_steps
KERNELS=""    # empty: derived from mllm_kernels' source below
DRY_RUN=0
EXTRA=()

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tool) TOOL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --backend) BACKEND="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --kernels) KERNELS="$2"; shift 2 ;;
    --ncu-count) NCU_COUNT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "profile.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

case "$TOOL" in auto|nsys|ncu|torch) ;; *) echo "profile.sh: --tool must be auto, nsys, ncu or torch, got '$TOOL'" >&2; exit 2 ;; esac
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -ge 2 ]] || { echo "profile.sh: --steps must be an integer >= 2, got '$STEPS'" >&2; exit 2; }
[[ "$WARMUP" =~ ^[0-9]+$ && "$WARMUP" -ge 1 ]] || { echo "profile.sh: --warmup must be an integer >= 1, got '$WARMUP'" >&2; exit 2; }
[[ -z "$NCU_COUNT" || ( "$NCU_COUNT" =~ ^[0-9]+$ && "$NCU_COUNT" -ge 1 ) ]] \
  || { echo "profile.sh: --ncu-count must be an integer >= 1, got '$NCU_COUNT'" >&2; exit 2; }

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

have() { command -v "$1" >/dev/null 2>&1; }
# a missing Nsight tool is reported before anything slow (importing torch) runs
if [[ "$DRY_RUN" == 0 && ( "$TOOL" == nsys || "$TOOL" == ncu ) ]] && ! have "$TOOL"; then
  echo "profile.sh: $TOOL not found on PATH (use --tool torch for a torch.profiler trace)" >&2; exit 1
fi

# One probe for what this machine has. The NVTX ranges come from mllm/training/profiling.py: the `nvtx`
# package puts them in domain "mllm", torch.cuda.nvtx in the default domain; nsys names a range
# "range@domain", ncu "domain@range/".
# The kernel names come from the source, so a kernel added to mllm_kernels is profiled without editing this file:
# the @triton.jit functions that are launched as name[grid](...) (the others are inlined helpers).
read -r HAS_CUDA NVTX_BACKEND KERNEL_NAMES < <("$PY" -c '
import ast, pathlib, torch
from mllm.training.profiling import NVTX_BACKEND
jit, launched = set(), set()
for f in sorted(pathlib.Path("mllm_kernels").glob("*.py")):
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            jit.add(node.name)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
            launched.add(node.func.value.id)
print(int(torch.cuda.is_available()), NVTX_BACKEND, "|".join(sorted(jit & launched)) or "-")')
[[ -n "${HAS_CUDA:-}" ]] || { echo "profile.sh: '$PY' cannot import torch and mllm (set PYTHON=...)" >&2; exit 1; }
if [[ -z "$KERNELS" ]]; then
  [[ "$KERNEL_NAMES" != - ]] || { echo "profile.sh: found no launched Triton kernel in $ROOT/mllm_kernels (pass --kernels)" >&2; exit 1; }
  KERNELS="($KERNEL_NAMES)"
fi
if [[ -z "$BACKEND" ]]; then
  if [[ "$HAS_CUDA" == 1 ]]; then BACKEND=triton; else BACKEND=eager; fi
fi
TAG="${BACKEND//+/_}"
mkdir -p "$OUT"
if [[ "$NVTX_BACKEND" == nvtx ]]; then NSYS_RANGE="$RANGE@mllm"; NCU_RANGE="mllm@$RANGE/"
else NSYS_RANGE="$RANGE"; NCU_RANGE="$RANGE/"; fi

BENCH=("$PY" scripts/bench_train.py --backends "$BACKEND" --warmup "$WARMUP" --out "$OUT")
NCU_LIMIT=()
[[ -z "$NCU_COUNT" ]] || NCU_LIMIT=(--launch-count "$NCU_COUNT")
# --dry-run: print each command instead of running it
maybe() { if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

run_nsys() {
  echo "profile.sh: nsys: capture range NVTX '$NSYS_RANGE' ($BACKEND, $STEPS timed steps)"
  # torch.cuda.nvtx pushes unregistered strings, which nsys only matches with this set to 0
  maybe env NSYS_NVTX_PROFILER_REGISTER_ONLY=0 nsys profile \
    --trace=cuda,nvtx,osrt,cublas --cuda-memory-usage=true \
    --capture-range=nvtx --nvtx-capture="$NSYS_RANGE" --capture-range-end=stop \
    --force-overwrite=true -o "$OUT/nsys_$TAG" \
    "${BENCH[@]}" --steps "$STEPS" "${EXTRA[@]}"
  [[ "$DRY_RUN" == 0 ]] || return 0
  local rep="$OUT/nsys_$TAG.nsys-rep"
  if [[ -f "$rep" ]]; then
    # report names changed in nsys 2023.x (gpukernsum -> cuda_gpu_kern_sum); try the new ones first
    { nsys stats --report cuda_gpu_kern_sum,nvtx_sum,cuda_api_sum "$rep" 2>/dev/null \
        || nsys stats --report gpukernsum,nvtxppsum,cudaapisum "$rep"; } > "$OUT/nsys_${TAG}_stats.txt" \
      || echo "profile.sh: nsys stats failed; open $rep in the Nsight Systems GUI" >&2
    echo "profile.sh: wrote $rep and $OUT/nsys_${TAG}_stats.txt"
  else
    echo "profile.sh: nsys wrote no report (did the '$NSYS_RANGE' range open? see the output above)" >&2
    return 1
  fi
}

run_ncu() {
  echo "profile.sh: ncu: kernels matching regex '$KERNELS' inside NVTX '$NCU_RANGE', one training step" \
    "(${NCU_COUNT:+first $NCU_COUNT launches}${NCU_COUNT:-every launch})"
  # one step of one micro-batch holds every kernel once per layer, forward and backward; more steps repeat them
  maybe ncu --nvtx --nvtx-include "$NCU_RANGE" --kernel-name "regex:$KERNELS" "${NCU_LIMIT[@]}" \
    --set full --import-source yes --force-overwrite -o "$OUT/ncu_$TAG" \
    "${BENCH[@]}" --steps 1 --grad-accum 1 "${EXTRA[@]}"
  [[ "$DRY_RUN" == 0 ]] || return 0
  echo "profile.sh: wrote $OUT/ncu_$TAG.ncu-rep (ncu --import $OUT/ncu_$TAG.ncu-rep --page details | less)"
}

run_torch() {
  echo "profile.sh: torch.profiler: Chrome trace of the timed steps ($BACKEND) with the mllm range names"
  maybe "${BENCH[@]}" --steps "$STEPS" --torch-profile "$OUT/torch" "${EXTRA[@]}"
  [[ "$DRY_RUN" == 0 ]] || return 0
  local trace="$OUT/torch/bench_train_${TAG}_rank0.json"
  [[ -f "$trace" ]] || { echo "profile.sh: torch.profiler wrote no trace at $trace" >&2; return 1; }
  # per-range totals (the breakdown the Nsight timeline shows under the NVTX rows), GPU busy/idle, top kernels
  "$PY" -m mllm.training.trace_summary "$trace" > "$OUT/torch_summary.txt"
  cat "$OUT/torch_summary.txt"
  echo "profile.sh: wrote $trace (open in https://ui.perfetto.dev) and $OUT/torch_summary.txt"
}

case "$TOOL" in
  nsys)
    [[ "$HAS_CUDA" == 1 || "$DRY_RUN" == 1 ]] || { echo "profile.sh: nsys needs a CUDA device (none visible)" >&2; exit 1; }
    run_nsys ;;
  ncu)
    [[ "$HAS_CUDA" == 1 || "$DRY_RUN" == 1 ]] || { echo "profile.sh: ncu needs a CUDA device (none visible)" >&2; exit 1; }
    run_ncu ;;
  torch) run_torch ;;
  auto)
    if [[ "$HAS_CUDA" != 1 ]]; then
      echo "profile.sh: no CUDA device: Nsight Systems/Compute not used; falling back to torch.profiler"
      run_torch
    else
      if have nsys; then run_nsys
      else echo "profile.sh: nsys not found on PATH: falling back to a torch.profiler trace"; run_torch; fi
      if have ncu; then run_ncu
      else echo "profile.sh: ncu not found on PATH: no per-kernel Nsight Compute report (kernel times are in the trace above)"; fi
    fi ;;
esac
