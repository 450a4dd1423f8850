"""Benchmark: host (CPU) time of the triton backend's Python launch path, eager calls through the registered
``torch.library`` custom ops vs through ``autograd.Function`` (``mllm_kernels._common.eager_function``).

Why it matters: without torch.compile the triton training step is host-bound (H200 profile, benchmarks/NOTES.md
tuning step 6: GPU busy 64.8%), so every µs the host spends per op call is step time. The custom-op path pays
the dispatcher and ``torch.library``'s Python autograd wrapper on every forward and backward call
(pytorch/pytorch#176592, #177109); the Function path runs the same implementations and kernels without them.

What is timed: ``steps`` forward + backward passes of a small model (12 layers of the gpu-full structure, d=128,
two heads of D=64, T=16, V=256, triton backend) and single ops at tiny shapes, wall clock per pass, for providers
``dispatcher`` (``_common.dispatcher_in_eager()``) and ``function`` (the default eager path).
  * CUDA: real kernels; at these shapes the kernels take a few µs each, so the time is the host's (the Python
    launch path including Triton's launcher), which is what a host-bound step pays per micro-batch.
  * CPU with ``TRITON_INTERPRET=1``: every Triton launch is skipped (``InterpretedFunction.run`` replaced by a
    no-op for the measurement, so no output is computed): what is left is the Python and dispatcher cost around
    the launches, the part the two providers differ in. Without the interpreter the rows are skipped.
``ms`` is the median over repeats of the mean per pass; the runner's ``x base`` = dispatcher ms / function ms.

Timer: this module's own loop (``_time_per_call``; rows say ``timer = "bench_host_overhead._time_per_call"``), on CPU
too, where the runner times the kernel modules with pytest-benchmark. The quantity is a difference of a few µs per
call between two providers: the loop alternates them within every repeat so that drift in the machine's load hits
both alike, whereas pytest-benchmark times one test (one provider) to the end before the next starts. The launch stub
and the provider switch must also stay in force around exactly the timed calls, and one sync per repeat (not per call)
keeps the CUDA form host-bound, as in a training step.

    python -m benchmarks.run --only host_overhead [--out benchmarks/results/]   (or this file, same arguments)
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROVIDERS = ("dispatcher", "function")
MODEL = dict(vocab_size=256, d_model=128, n_layers=12, n_heads=2, n_kv_heads=2, ffn_dim=256, max_seq_len=16)
SEQ = 16
TIMER = "bench_host_overhead._time_per_call"


@contextlib.contextmanager
def _launches_skipped():
    """Under the interpreter: Triton launches return at once (outputs stay uninitialised)."""
    from triton.runtime import interpreter

    saved = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = saved


def _time_per_call(fn, device, calls: int, repeats: int) -> dict:
    """provider -> median over ``repeats`` of the mean wall time (ms) of ``calls`` back-to-back calls (one sync
    per repeat). The providers alternate within each repeat, so drift in the machine's load hits both alike."""
    from mllm_kernels._common import dispatcher_in_eager

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    means = {p: [] for p in PROVIDERS}
    for rep in range(repeats + 1):  # repeat 0 warms both paths up and is not recorded
        for provider in PROVIDERS:
            with dispatcher_in_eager(provider == "dispatcher"):
                sync()
                t0 = time.perf_counter()
                for _ in range(calls if rep else 3):
                    fn()
                sync()
                if rep:
                    means[provider].append((time.perf_counter() - t0) * 1e3 / calls)
    return {p: statistics.median(v) for p, v in means.items()}


def _dtype(device) -> torch.dtype:
    """bf16 (autocast for the model) on CUDA, as in training; fp32 under the interpreter."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _cases(device):
    """(op, shape label, size for the plot, closure running one forward + backward)."""
    from mllm.config.pipeline_config import ModelConfig
    from mllm.models.transformer import build_model
    # the submodules by path: the package root exports functions of the same names
    from mllm_kernels.attention import attention
    from mllm_kernels.rms_norm import rms_norm
    from mllm_kernels.swiglu import swiglu

    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = _dtype(device)
    cfg = ModelConfig(kernel_backend="triton", **MODEL)
    model = build_model(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=g).to(device)
    pos = torch.arange(SEQ, device=device)[None]

    def model_step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(ids, position_ids=pos, labels=ids)
        loss.backward()

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_()

    x, w = leaf(SEQ, 128), leaf(128)
    gate, up = leaf(SEQ, 256), leaf(SEQ, 256)
    q, k, v = leaf(1, SEQ, 2, 64), leaf(1, SEQ, 2, 64), leaf(1, SEQ, 2, 64)

    def rms():
        rms_norm(x, w).sum().backward()

    def glu():
        swiglu(gate, up).sum().backward()

    def attn():
        attention(q, k, v, pos).sum().backward()

    L = MODEL["n_layers"]
    return [
        ("model_fwd_bwd", f"L{L}xT{SEQ}xd{MODEL['d_model']}", L * SEQ * MODEL["d_model"], model_step),
        ("rms_norm_fwd_bwd", f"{SEQ}x128", SEQ * 128, rms),
        ("swiglu_fwd_bwd", f"{SEQ}x256", SEQ * 256, glu),
        ("attention_fwd_bwd", f"B1xT{SEQ}xH2xD64", SEQ * 2 * 64, attn),
    ]


def run(device=None, quick: bool = False, progress: bool = True):
    """Rows: op, shape, size, dtype, mode, provider, ms, launches ("real" on CUDA, "skipped" under the interpreter)."""
    from mllm_kernels._common import interpreting

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not interpreting():
        return [dict(op="model_fwd_bwd", provider=p, skipped="needs CUDA, or TRITON_INTERPRET=1 on CPU")
                for p in PROVIDERS]
    calls, repeats = (10, 3) if quick else (40, 9)
    skip = _launches_skipped() if device.type != "cuda" else contextlib.nullcontext()
    rows = []
    with skip:
        for op, shape, size, fn in _cases(device):
            ms = _time_per_call(fn, device, calls, repeats)
            for provider in PROVIDERS:
                rows.append(dict(op=op, shape=shape, size=size, dtype=str(_dtype(device)).replace("torch.", ""),
                                 mode="fwd+bwd", provider=provider, ms=ms[provider], timer=TIMER,
                                 launches="real" if device.type == "cuda" else "skipped"))
    return rows


if __name__ == "__main__":  # the runner's report (JSON, Markdown with the x base column, plot) for this module only
    from benchmarks.run import main

    sys.exit(main(["--only", "host_overhead", *sys.argv[1:]]))
