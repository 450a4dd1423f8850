"""mllm.training.trace_summary on a hand-made Chrome trace whose busy time, gaps and range totals are known."""
import json

import pytest

from mllm.training.trace_summary import gpu_busy, main, summarize


def _trace(tmp_path):
    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}
    events = [
        k("gemm", 0, 100), k("norm", 50, 100),        # overlap: union [0, 150)
        k("gemm", 153, 47),                           # gap 3 us -> busy [153, 200)
        k("swiglu", 250, 50),                         # gap 50 us
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 2300, "dur": 100},  # gap 2,000 us
        {"ph": "X", "cat": "user_annotation", "name": "forward", "ts": 0, "dur": 1500},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "forward", "ts": 0, "dur": 300},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10},  # ignored
    ]
    p = tmp_path / "trace.json"
    p.write_text(json.dumps({"traceEvents": events}))
    return p, events


def test_gpu_busy_merges_overlaps_and_bins_gaps(tmp_path):
    _, events = _trace(tmp_path)
    b = gpu_busy(events)
    assert b["window_us"] == 2400 and b["busy_us"] == 150 + 47 + 50 + 100
    assert b["busy_frac"] == pytest.approx(347 / 2400)
    assert b["n_kernels"] == 5
    assert b["gaps"]["0-5 us"] == (1, 3.0)
    assert b["gaps"]["20-100 us"] == (1, 50.0)
    assert b["gaps"][">=1000 us"] == (1, 2000.0)
    assert b["gaps"]["5-20 us"] == (0, 0.0)


def test_gpu_busy_without_kernels():
    assert gpu_busy([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}])["n_kernels"] == 0


def test_summary_lists_ranges_busy_fraction_and_top_kernels(tmp_path, capsys):
    p, _ = _trace(tmp_path)
    text = summarize(p)
    assert "forward    cpu        1       1.50      1.50" in text
    assert "forward    gpu        1       0.30      0.30" in text
    assert "busy 0.35 ms (14.5%)" in text
    lines = text.splitlines()
    top = lines[lines.index("top GPU kernels by total time (ms, launches)") + 1]
    assert top.split() == ["0.15", "2", "gemm"]
    main([str(p), "--top", "1"])
    assert "swiglu" not in capsys.readouterr().out.split("top GPU kernels")[1]


def test_cli_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main([str(tmp_path / "nope.json")])


@pytest.mark.parametrize("name, kind", [
    ("_attn_bwd_dkdv_kernel", "attention (mllm)"),
    ("_rms_norm_bwd_kernel", "rms_norm (mllm)"),
    ("_ce_rows_kernel", "lm loss / dpo (mllm)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM (cuBLAS/CUTLASS)"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_NNT", "GEMM (cuBLAS/CUTLASS)"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(T1::Params)",
     "GEMM (cuBLAS/CUTLASS)"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>, true>(Flash_fwd_params)",
     "attention (PyTorch SDPA)"),
    # the full names of PyTorch's SDPA kernels as a CUDA trace lists them: CUTLASS templates, not GEMMs
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t, "
     "Flash_kernel_traits<64, 128, 64, 4, cutlass::bfloat16_t> >, false, true, false, false, true, true, false, "
     "false>(Flash_fwd_params)", "attention (PyTorch SDPA)"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, "
     "2, false, false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> >, true, false, "
     "false, false, false, false, false>(Flash_bwd_params)", "attention (PyTorch SDPA)"),
    ("void pytorch_flash::flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, 2, false, "
     "false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> > >(Flash_bwd_params)",
     "attention (PyTorch SDPA)"),
    ("void pytorch_flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, 2, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> > >(Flash_bwd_params, int)",
     "attention (PyTorch SDPA)"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention (PyTorch SDPA)"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, "
     "cutlass::bfloat16_t, true, false, true, 64, 64, 64, false>::Params)", "attention (PyTorch SDPA)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
     "attention (PyTorch SDPA)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer / foreach (ATen)"),
    ("triton_poi_fused__to_copy_add_3", "inductor-generated"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copies and casts (ATen)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "other ATen element-wise / reductions"),
    ("some_custom_thing", "other"),
])
def test_kernel_kinds(name, kind):
    from mllm.training.trace_summary import kernel_kind

    assert kernel_kind(name) == kind


def test_summary_splits_gpu_time_by_kind(tmp_path):
    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}
    events = [k("nvjet_tst_128x256", 0, 600), k("_attn_fwd_kernel", 600, 300), k("nvjet_tst_128x256", 900, 200),
              {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 1100, "dur": 100}]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(events))
    lines = summarize(p).splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith("GPU time by kind"))
    assert [line.split() for line in lines[i + 1:i + 4]] == [
        ["0.80", "66.7%", "2", "GEMM", "(cuBLAS/CUTLASS)"], ["0.30", "25.0%", "1", "attention", "(mllm)"],
        ["0.10", "8.3%", "1", "memcpy", "/", "memset"]]
