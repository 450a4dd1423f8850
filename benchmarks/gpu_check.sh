#!/usr/bin/env bash
# One prepared GPU session from the source tree (no installs, no network): kernel tests compiled for the card,
# the DPO log-prob benchmark with its launch-config sweep, and the training-step benchmark for all backends.
#   bash benchmarks/gpu_check.sh OUT_DIR   # default sections: env dpo_tests bench_dpo bench_train kernel_tests
#   SECTIONS="dpo_tests bench_train" bash benchmarks/gpu_check.sh OUT_DIR
# Sections: env dpo_tests bench_dpo bench_lm_loss host_overhead bench_train train_triton_alone bench_train_ablation train_fused_qkv
# train_cudagraphs kernel_tests kernel_tests_fast attention_tests rms_norm_sweep train_packed train_packed_cudagraphs
# trainer_loop trainer_cudagraph_tests atomic_dq_tests attention_dq_ab train_atomic_dq train_bf16_residual train_compiled_autograd train_mb16
# train_goal train_goal_wcache train_weight_cache weight_cache_tests attention_tune train_tuned_tiles stages profile
# profile_compiled attn_cache_tests rope_tests bench_rope.
# Section limits (seconds) are environment variables (T_DPO_TESTS, T_BENCH_DPO, T_HOST, T_BENCH_TRAIN, T_ABLATION,
# T_KERNEL_TESTS, T_KERNEL_FAST, T_ATTN_ALL, T_STAGE per stage, T_PROFILE, T_RMS_SWEEP, T_PACKED, T_TRAINER_CG, T_DQ_AB,
# T_CG, T_ATTN_TUNE, T_ROPE, T_BENCH_ROPE, T_WC_TESTS) so
# that a session with a fixed device budget can size them; a section that runs out is recorded as rc=124 and the
# next one starts. BUDGET_S (seconds, unset: no cap) caps the whole run: each section's limit is cut to what is left
# after RESERVE_S (default 20, for the bundle), and a section left with under MIN_SECTION_S (default 20) is skipped
# and counted as failed, so that the run ends with its summary and bundle written inside a device call's time limit
# (set BUDGET_S well under the call's timeout: a call killed from outside returns none of OUT_DIR's files unless OUT_DIR
# is the call's $OUT). Logs: OUT_DIR/<section>.log; results: OUT_DIR/results/; a summary: OUT_DIR/summary.txt, which
# also carries each training benchmark's tokens/s lines and the goal line.
# Everything is then packed into OUT_DIR/bundle.tgz (BUNDLE=0: left as it is), Nsight reports included unless they
# total more than BUNDLE_REPORTS_MB (default 12: the device tool brings back files of up to 16 MiB), in which case
# they stay on disk next to the bundle and summary.txt lists them. Exit status: 0 when every section succeeded, 1
# when any failed, ran out of time or was unknown (or the bundle could not be written); summary and bundle are
# written either way, and summary.txt has a line "failed sections: ..." ("none" when all passed).
# The commit and whether tracked files had uncommitted changes are exported for the results files
# (MLLM_GIT_COMMIT, MLLM_GIT_DIRTY=1/0; set them yourself on a copy of the tree without .git).
set -u
# bench_train sections: ACCUM micro-batches per optimizer step (default 4, the runs so far; gpu-full pretraining
# uses 16 = 128 / 8, where AdamW is a 4x smaller share of the step), 4 warm-up steps, 6 timed. In the H100 run
# of session 6 the non-compiled steps were still settling in the first 1-2 steps after 2 warm-up steps (packed
# forward 86.9, 76.5, 63.8, 64.2 ms).
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT/results"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -z "${MLLM_GIT_COMMIT:-}" ]; then
  if MLLM_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null); then
    # a commit hash alone does not describe a tree with uncommitted changes
    git_status=$(git status --porcelain --untracked-files=no 2>/dev/null) \
      && export MLLM_GIT_DIRTY=$([ -n "$git_status" ] && echo 1 || echo 0)
  else
    MLLM_GIT_COMMIT=unknown
  fi
fi
export MLLM_GIT_COMMIT
PY=${PY:-python}
for v in BUDGET_S RESERVE_S MIN_SECTION_S; do
  case ${!v:-0} in *[!0-9]*) echo "gpu_check.sh: $v must be a whole number of seconds, got '${!v}'" >&2; exit 2 ;; esac
done
SECTIONS=${SECTIONS:-"env dpo_tests bench_dpo bench_train kernel_tests"}
FAILED=""
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
failed() { FAILED="${FAILED:+$FAILED }$1"; }

section() {  # name limit_s command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS note=""
  if [ -n "${BUDGET_S:-}" ]; then
    # the whole run must end (bundle written) inside BUDGET_S: a section gets what is left after RESERVE_S, and
    # one that would get less than MIN_SECTION_S does not start
    local left=$(( BUDGET_S - SECONDS - ${RESERVE_S:-20} ))
    if [ "$left" -lt "${MIN_SECTION_S:-20}" ]; then
      summary "$name skipped: out of budget (${left}s left of BUDGET_S=$BUDGET_S after RESERVE_S=${RESERVE_S:-20})"
      failed "$name"; return
    fi
    if [ "$left" -lt "$limit" ]; then note=" (limit ${limit}s cut to ${left}s by BUDGET_S)"; limit=$left; fi
  fi
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || failed "$name"
  summary "$name rc=$rc ${SECONDS}s-total $((SECONDS - t0))s$note: $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"
  # the numbers themselves, so that summary.txt (and the call's printed output) carry them even when the bundle
  # does not come back: bench_train's per-backend lines and the goal line
  grep -E '^bench_train: [a-z+-]+( \(own process\))?: |^Goal \(issue' "$OUT/$name.log" | grep -v '^bench_train: note:' \
    | cut -c1-300 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  return 0
}

for s in $SECTIONS; do
  case $s in
    env) section env 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'" ;;
    dpo_tests) section dpo_tests "${T_DPO_TESTS:-90}" $PY -m pytest tests/kernels/test_dpo_logprobs.py -q -x -p no:cacheprovider ;;
    bench_dpo) section bench_dpo "${T_BENCH_DPO:-150}" $PY benchmarks/bench_dpo.py --sweep --out "$OUT/results" ;;
    bench_train) section bench_train "${T_BENCH_TRAIN:-240}" $PY scripts/bench_train.py --isolate \
        --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    host_overhead)  # host µs of the launch path: custom-op dispatcher vs autograd.Function (NOTES tuning step 11)
      section host_overhead "${T_HOST:-60}" $PY -m benchmarks.run --only host_overhead --out "$OUT/results" ;;
    train_packed)  # packed documents (HAS_DOCS, as pretraining): cu_seqlens checked on the host, no read-back (NOTES step 13)
      section train_packed "${T_PACKED:-90}" $PY scripts/bench_train.py --backends triton --docs-per-row 4 \
        --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_packed_cudagraphs)  # packed documents under CUDA graphs: cu_seqlens padded to B*T+1, bounds traced (not cached)
      section train_packed_cudagraphs "${T_PACKED:-90}" $PY scripts/bench_train.py --backends triton+compile \
        --docs-per-row 4 --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 \
        --out "$OUT/results" ;;
    trainer_loop)  # the real training loop (Trainer.train_step) on packed rows under CUDA graphs: the pretraining's rate
      section trainer_loop "${T_PACKED:-90}" $PY scripts/bench_train.py --loop trainer --backends triton+compile \
        --docs-per-row 4 --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 \
        --out "$OUT/results" ;;
    trainer_cudagraph_tests)  # the Trainer itself with compile_mode=reduce-overhead on packed rows (tests/test_trainer.py)
      section trainer_cudagraph_tests "${T_TRAINER_CG:-120}" $PY -m pytest tests/test_trainer.py -q -p no:cacheprovider \
        -k "on_the_gpu" ;;
    atomic_dq_tests)  # the atomic-dq backward's accuracy tests compiled for the card (tests/kernels/test_attention.py)
      section atomic_dq_tests "${T_DQ_AB:-120}" $PY -m pytest tests/kernels/test_attention.py -q -p no:cacheprovider \
        -k atomic ;;
    attention_dq_ab)  # the atomic-dq backward against the dq kernel, a gpu-full-like layer and T = 4k (NOTES step 17)
      section attention_dq_ab "${T_DQ_AB:-120}" $PY benchmarks/bench_attention.py --providers mllm mllm-atomicdq \
        --seq-lens 1024 4096 --head-dims 64 128 --out "$OUT/results" ;;
    train_atomic_dq)  # the training step with the atomic-dq backward (compare with train_cudagraphs in the same run)
      section train_atomic_dq "${T_CG:-120}" env MLLM_ATTN_DQ=atomic $PY scripts/bench_train.py --backends triton+compile \
        --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_bf16_residual)  # model.residual_dtype=autocast: bf16 residual stream (NOTES step 18; vs train_cudagraphs, same run)
      section train_bf16_residual "${T_CG:-120}" $PY scripts/bench_train.py --backends ${CG_BACKENDS:-triton+compile} \
        --set model.residual_dtype=autocast --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 \
        --warmup 4 --out "$OUT/results" ;;
    train_compiled_autograd)  # the backward (gradient accumulation included) as one inductor graph (NOTES step 20)
      section train_compiled_autograd "${T_CG:-120}" $PY scripts/bench_train.py --backends triton+compile \
        --compiled-autograd --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 \
        --out "$OUT/results" ;;
    train_mb16)  # micro-batch 16 at half the accumulation (same tokens per optimizer step): GEMMs with M = 16,384
      # instead of 8,192 (NOTES step 21; compare with train_cudagraphs of the same run)
      section train_mb16 "${T_CG:-120}" $PY scripts/bench_train.py --backends triton+compile \
        --micro-batch 16 --grad-accum "$(( ${ACCUM:-4} > 1 ? ${ACCUM:-4} / 2 : 1 ))" --compile-mode reduce-overhead \
        --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_goal)  # issue 9's number: every measured-or-predicted win together at the pretraining's accumulation (16):
      # CUDA graphs, fused q/k/v, bf16 residual stream (NOTES steps 6, 14, 18)
      section train_goal "${T_CG:-120}" $PY scripts/bench_train.py --backends triton+compile \
        --set model.fused_qkv=true --set model.residual_dtype=autocast --compile-mode reduce-overhead \
        --grad-accum "${ACCUM:-16}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_goal_wcache)  # train_goal plus model.weight_cache: weights cast to bf16 once per optimizer step (NOTES step 23)
      section train_goal_wcache "${T_CG:-120}" $PY scripts/bench_train.py --backends triton+compile \
        --set model.fused_qkv=true --set model.residual_dtype=autocast --set model.weight_cache=true \
        --compile-mode reduce-overhead --grad-accum "${ACCUM:-16}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_weight_cache)  # model.weight_cache alone (NOTES step 23; compare with train_cudagraphs of the same run)
      section train_weight_cache "${T_CG:-120}" $PY scripts/bench_train.py --backends triton+compile \
        --set model.weight_cache=true --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 \
        --out "$OUT/results" ;;
    weight_cache_tests)  # the weight cache under CUDA graphs on the card: no skipped graph, losses as without it
      section weight_cache_tests "${T_WC_TESTS:-90}" $PY -m pytest tests/test_weight_cache.py -q -p no:cacheprovider \
        -k "on_the_gpu" ;;
    attention_tune)  # attention tiles at a gpu-full layer, candidates = the spill-free tiles of the AOT sweep (NOTES step 15);
      # the winners (if any) become a tile table for train_tuned_tiles
      section attention_tune "${T_ATTN_TUNE:-200}" $PY benchmarks/bench_attention.py --tune --min-tile 4096 \
        --candidates "$(ls benchmarks/results/aot_sweep_attention_*_D64_bf16_causal_sm90_triton3.6.0.json | tail -n 1)" \
        --write-tiles "$OUT/results/attention_tiles.json" --out "$OUT/results" ;;
    train_tuned_tiles)  # the training step with attention_tune's winning tiles (MLLM_ATTN_TILES; vs train_cudagraphs)
      if ! grep -q '"kernel"' "$OUT/results/attention_tiles.json" 2>/dev/null; then
        summary "train_tuned_tiles skipped: no winning tile in $OUT/results/attention_tiles.json (run attention_tune first)"
        continue
      fi
      section train_tuned_tiles "${T_CG:-120}" env MLLM_ATTN_TILES="$OUT/results/attention_tiles.json" \
        $PY scripts/bench_train.py --backends triton+compile --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" \
        --steps 6 --warmup 4 --out "$OUT/results" ;;
    rms_norm_sweep)  # RMSNorm backward launch configs (NOTES tuning step 12: 255 registers, 8 warps per SM)
      section rms_norm_sweep "${T_RMS_SWEEP:-120}" $PY benchmarks/bench_rms_norm.py --sweep --out "$OUT/results" ;;
    bench_lm_loss) section bench_lm_loss "${T_BENCH_LM:-60}" $PY benchmarks/bench_lm_loss.py --quick --out "$OUT/results" ;;
    train_triton_alone)  # the host-bound triton (no compile) row in a process of its own
      section train_triton_alone "${T_ALONE:-60}" $PY scripts/bench_train.py --backends triton --grad-accum "${ACCUM:-4}" \
        --steps 6 --warmup 4 --out "$OUT/results" ;;
    bench_train_ablation)  # tuning steps 6-8 of benchmarks/NOTES.md: fused LM loss off, RoPE outside attention, CUDA graphs
      section train_unfused "${T_ABLATION:-120}" $PY scripts/bench_train.py --backends ${ABL_BACKENDS:-triton,triton+compile} \
        --set model.fused_lm_loss=false --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results"
      section train_rope_separate "${T_ABLATION:-120}" $PY scripts/bench_train.py --backends ${ABL_BACKENDS:-triton,triton+compile} \
        --set model.rope_in_attention=false --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results"
      section train_cudagraphs "${T_ABLATION:-120}" $PY scripts/bench_train.py --backends ${CG_BACKENDS:-eager+compile,triton+compile} \
        --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_fused_qkv)  # model.fused_qkv (one q/k/v GEMM) on vs the default, both triton backends
      section train_fused_qkv "${T_ABLATION:-120}" $PY scripts/bench_train.py --backends ${ABL_BACKENDS:-triton,triton+compile} \
        --set model.fused_qkv=true --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    train_cudagraphs)  # CUDA graphs alone (the last part of bench_train_ablation)
      section train_cudagraphs "${T_CG:-120}" $PY scripts/bench_train.py --backends ${CG_BACKENDS:-eager+compile,triton+compile} \
        --compile-mode reduce-overhead --grad-accum "${ACCUM:-4}" --steps 6 --warmup 4 --out "$OUT/results" ;;
    kernel_tests) section kernel_tests "${T_KERNEL_TESTS:-180}" $PY -m pytest tests/kernels -q -p no:cacheprovider \
        --deselect tests/kernels/test_dpo_logprobs.py -x ;;
    stages)  # the local-smoke stages on the GPU with the Triton kernels (needs MLLM_DATA_DIR, not on GPU boxes);
      # one head of 64 (and one kv head): the kernel's head dims are 64 and 128, local-smoke's 4 heads give 16
      if [ -z "${MLLM_DATA_DIR:-}" ]; then summary "stages skipped: MLLM_DATA_DIR unset"; continue; fi
      for st in pretrain sft dpo verifier; do
        section "stage_$st" "${T_STAGE:-60}" $PY scripts/run_pipeline.py --config local-smoke --stage $st --no-progress \
          --set device=cuda --set model.kernel_backend=triton --set model.n_heads=1 --set model.n_kv_heads=1 \
          --set run_root="$OUT/runs" --run-name gpu-smoke ${STAGE_SET:-}
      done ;;
    profile)  # where ncu is installed it profiles every kernel launch of one step (minutes); NCU_COUNT=N caps it
      section profile "${T_PROFILE:-120}" bash scripts/profile.sh --backend triton --steps 3 --warmup 2 \
        ${NCU_COUNT:+--ncu-count "$NCU_COUNT"} --out "$OUT/profile" -- --grad-accum 1 ;;
    profile_compiled)  # torch.profiler trace of the compiled triton step: GPU busy %, kernels inductor emits around ours
      section profile_compiled "${T_PROFILE:-120}" bash scripts/profile.sh --tool torch --backend triton+compile \
        --steps 3 --warmup 2 --out "$OUT/profile_compiled" -- --grad-accum 1 ;;
    rope_tests)  # the RoPE kernel's tests compiled for the card (64-bit fixed-point angles, NOTES tuning step 22)
      section rope_tests "${T_ROPE:-90}" $PY -m pytest tests/kernels/test_rope.py -q -x -p no:cacheprovider ;;
    bench_rope)  # the RoPE kernel against eager and torch.compile, through the runner (JSON, Markdown, plot)
      section bench_rope "${T_BENCH_ROPE:-90}" $PY -m benchmarks.run --only rope --out "$OUT/results" ;;
    kernel_tests_fast)  # every kernel file but the long attention grid (which has its own section)
      section kernel_tests_fast "${T_KERNEL_FAST:-150}" $PY -m pytest tests/kernels -q -p no:cacheprovider \
        --ignore tests/kernels/test_attention.py ;;
    attention_tests) section attention_tests "${T_ATTN_ALL:-150}" $PY -m pytest tests/kernels/test_attention.py -q \
        -p no:cacheprovider ;;
    attn_cache_tests) section attn_cache_tests "${T_ATTN:-90}" $PY -m pytest tests/kernels/test_attention.py -q \
        -p no:cacheprovider -k "cache or gpu_long or tracing" ;;
    *) summary "unknown section $s"; failed "$s" ;;
  esac
done
if [ -n "$FAILED" ]; then summary "failed sections: $FAILED"; else summary "failed sections: none"; fi
# The device tool brings back at most 8 files: pack everything but checkpoints (and Nsight's .sqlite exports, which
# the .nsys-rep regenerates) into one archive (BUNDLE=0 keeps the tree as it is). Nsight reports go in the archive
# while they fit under BUNDLE_REPORTS_MB together; otherwise they stay on disk, outside it, and the summary says so.
if [ "${BUNDLE:-1}" = 1 ]; then
  reports=$(find "$OUT" -type f \( -name '*.ncu-rep' -o -name '*.nsys-rep' \) -printf '%P ')
  report_bytes=$(find "$OUT" -type f \( -name '*.ncu-rep' -o -name '*.nsys-rep' \) -printf '%s\n' \
    | awk '{s += $1} END {print s + 0}')
  excl=(--exclude='*.pt' --exclude='*.sqlite')
  keep=(-name summary.txt)
  if [ -n "$reports" ] && [ "$report_bytes" -gt $(( ${BUNDLE_REPORTS_MB:-12} * 1024 * 1024 )) ]; then
    excl+=(--exclude='*.ncu-rep' --exclude='*.nsys-rep')
    keep+=(-o -name '*.ncu-rep' -o -name '*.nsys-rep')
    summary "Nsight reports not bundled ($((report_bytes / 1024)) KiB > BUNDLE_REPORTS_MB=${BUNDLE_REPORTS_MB:-12} MiB), kept on disk in $OUT: $reports"
  elif [ -n "$reports" ]; then
    summary "Nsight reports bundled ($((report_bytes / 1024)) KiB): $reports"
  fi
  # summary.txt goes into the archive as it stands now; its last line (the bundle's path) is added after
  if tar czf "$OUT/../gpu_check_bundle.tgz" "${excl[@]}" -C "$OUT" . \
      && find "$OUT" -mindepth 1 -type f ! \( "${keep[@]}" \) -delete \
      && find "$OUT" -mindepth 1 -depth -type d -empty -delete \
      && mv "$OUT/../gpu_check_bundle.tgz" "$OUT/bundle.tgz"; then
    summary "bundle: $OUT/bundle.tgz"
  else
    summary "bundle: FAILED (the files are left in $OUT)"; failed bundle
  fi
fi
[ -z "$FAILED" ] || exit 1
