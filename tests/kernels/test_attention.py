"""Fused attention kernel (``mllm_kernels.attention``) vs the eager reference (``reference.attention``).

Accuracy rule (FlashAttention's): for every output and gradient X in {out, lse, dq, dk, dv, dsinks},
    max|X_kernel − X_fp64| ≤ 2 · max|X_eager(dtype) − X_fp64| + ATOL[dtype] · max(1, max|X_fp64|),
where X_fp64 is the reference run in float64 on the same (dtype-rounded) inputs (``reference.attention`` computes
in fp64 for fp64 inputs, RoPE angles, cos/sin and lse included) and X_eager(dtype) the reference at the test dtype.
The loss is Σ out·g_out + Σ lse·g_lse with random g's, so the lse gradient path (folded into Δ) is checked too.
Every case draws a fresh seed (``_seed``); a failure message names it, and passing it as ``seed=`` to ``_check``
(or ``_make_case``) reruns that case.

Grid (interpreter tiles are 64×64, see ``attention.INTERPRETER_CONFIG``):
  * ``test_grid``: every combination of {packed documents, window + sink tokens, learned sinks} ×
    GQA ratio {1, 2, 4} × head dim {64, 128} × {fp32, bf16}, causal, on one tiny shape B=1, T=80 — two
    query blocks, the second one partial (T not a multiple of the block).
  * ``test_non_causal``: the mask-feature combinations without the causal mask (fp32), and two of them in bf16.
  * ``test_larger``: a few bigger shapes (several documents per row, several kv heads, T = 1, 3, 256).
  * ``test_gpu_tiles_under_the_interpreter``: every GPU launch tile of ``attention.GPU_CONFIGS`` (CPU only).
  * options: no RoPE, custom softmax scale, large explicit positions, strided q/k/v, the in-loop
    ("fused") RoPE of the streamed operand, no lse gradient.
  * bf16 stores round to nearest even under the interpreter too (``test_bf16_stores_round_to_nearest_even``).
  * validation errors, dispatch paths, ``torch.library.opcheck`` and ``torch.compile`` on a tiny shape.
On CUDA the same tests run compiled (bf16 tensor-core operands), plus ``test_gpu_long``.
"""
import math
import os

import pytest
import torch

A = __import__("importlib").import_module("mllm_kernels.attention")  # the package root exports a function of the same name
from mllm_kernels import reference as R
from mllm_kernels._common import last_path

ATOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")


def _make_case(B, T, HQ, HKV, D, *, docs, sinks, seed, positions="doc"):
    """fp32 CPU inputs: q, k, v, position_ids, cu_seqlens (or None), sinks (or None), g_out, g_lse."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, T, HKV, D, generator=g)
    v = torch.randn(B, T, HKV, D, generator=g)
    cu = None
    doc_start = torch.zeros(B, T, dtype=torch.long)
    if docs:
        bounds = [0]
        for b in range(B):
            n_cuts = min(T - 1, int(torch.randint(1, 4, (1,), generator=g)))
            cuts = sorted(set(torch.randint(1, T, (n_cuts,), generator=g).tolist())) if T > 1 else []
            bounds += [b * T + c for c in cuts] + [(b + 1) * T]
        cu = torch.tensor(bounds, dtype=torch.int32)
        doc_start = R.doc_start_from_cu_seqlens(cu, B, T, "cpu").long()
    if positions == "doc":  # positions restart at 0 in every document, as packed rows do
        pos = torch.arange(T)[None].expand(B, T) - doc_start
    else:
        pos = None
    s = (torch.randn(HQ, generator=g) + 1.0) if sinks else None
    g_out = torch.randn(B, T, HQ, D, generator=g)
    g_lse = torch.randn(B, HQ, T, generator=g)
    return q, k, v, pos, cu, s, g_out, g_lse


def _seed() -> int:
    """A fresh seed per call (as in the other kernel test files); every assertion message that depends on the random
    inputs names it, so a failing case can be rerun with ``seed=<that value>``."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _run(fn, q, k, v, pos, cu, s, g_out, g_lse, dtype, device, kw):
    """Forward + backward of fn at ``dtype`` (sinks stay fp32, fp64 for the fp64 run)."""
    leaves = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
    sink = None
    if s is not None:
        sink = s.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    pos_d = pos.to(device) if pos is not None else None
    cu_d = cu.to(device) if cu is not None else None
    out, lse = fn(*leaves, pos_d, cu_seqlens=cu_d, sinks=sink, return_lse=True, **kw)
    loss = (out.double() * g_out.to(device, dtype).double()).sum()
    if g_lse is not None:
        loss = loss + (lse.double() * g_lse.to(device).double()).sum()
    wrt = leaves + ([sink] if sink is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    res = [out, lse] + list(grads) + ([None] if sink is None else [])
    return [None if r is None else r.detach().double().cpu() for r in res]


def _check(B, T, HQ, HKV, D, dtype, *, causal=True, docs=False, window=None, n_sink_tokens=0, sinks=False,
           seed=None, positions="doc", lse_grad=True, **kw):
    seed = _seed() if seed is None else seed
    ctx = (f"B={B} T={T} HQ={HQ} HKV={HKV} D={D} {dtype} causal={causal} docs={docs} window={window} "
           f"n_sink_tokens={n_sink_tokens} sinks={sinks} positions={positions} lse_grad={lse_grad} {kw} seed={seed}")
    q, k, v, pos, cu, s, g_out, g_lse = _make_case(B, T, HQ, HKV, D, docs=docs, sinks=sinks, seed=seed,
                                                   positions=positions)
    if not lse_grad:
        g_lse = None
    # round the inputs to the test dtype once, so that all three runs see identical values
    q, k, v = (x.to(dtype).float() for x in (q, k, v))
    g_out = g_out.to(dtype).float()
    opts = dict(causal=causal, window=window, n_sink_tokens=n_sink_tokens, **kw)
    ref = _run(R.attention, q, k, v, pos, cu, s, g_out, g_lse, torch.float64, "cpu", opts)
    eager = _run(R.attention, q, k, v, pos, cu, s, g_out, g_lse, dtype, "cpu", opts)
    kern = _run(A.attention, q, k, v, pos, cu, s, g_out, g_lse, dtype, DEVICE, opts)
    assert last_path("attention") == ("triton" if DEVICE == "cuda" else "interpreter")
    assert all(r is None or r.dtype == torch.float64 for r in ref)  # a true fp64 oracle, not an fp32 one
    for name, kx, ex, rx in zip(NAMES, kern, eager, ref):
        if rx is None:
            assert kx is None, f"{name} ({ctx})"
            continue
        assert kx.shape == rx.shape, f"{name} ({ctx})"
        assert torch.isfinite(kx).all(), f"{name}: non-finite values ({ctx})"
        k_err = (kx - rx).abs().max().item()
        e_err = (ex - rx).abs().max().item()
        atol = ATOL[dtype] * max(1.0, rx.abs().max().item())
        if name == "dsinks" and dtype != torch.float32:
            # dsinks[h] = -Σ over all B·T query rows of p_sink · delta, with delta = rowsum(dO ∘ O) taken from the
            # output rounded to 16 bits (as FlashAttention's backward does); the eager path differentiates the
            # fp32 sink column through autograd without that rounding. Independent per-row rounding errors add up
            # like √rows, so the absolute floor grows with √(rows / 16) (measured: 1 seed in 30 exceeded the
            # unscaled floor by 5% at B·T = 80, bf16)
            atol *= math.sqrt(B * T / 16)
        bound = 2 * e_err + atol
        assert k_err <= bound, f"{name}: kernel err {k_err:.3e} > {bound:.3e} (eager {dtype} err {e_err:.3e}; {ctx})"


# ----------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("sinks", [False, True], ids=["nosinks", "sinks"])
@pytest.mark.parametrize("window", [None, 16], ids=["nowin", "win16+3sink"])
@pytest.mark.parametrize("docs", [False, True], ids=["1doc", "docs"])
def test_grid(docs, window, sinks, group, D, dtype):
    _check(1, 80, group, 1, D, dtype, docs=docs, window=window, n_sink_tokens=3 if window else 0, sinks=sinks)


@pytest.mark.parametrize("sinks", [False, True], ids=["nosinks", "sinks"])
@pytest.mark.parametrize("window", [None, 20], ids=["nowin", "win20+2sink"])
@pytest.mark.parametrize("docs", [False, True], ids=["1doc", "docs"])
def test_non_causal(docs, window, sinks):
    _check(1, 100, 2, 1, 64, torch.float32, causal=False, docs=docs, window=window,
           n_sink_tokens=2 if window else 0, sinks=sinks)


@pytest.mark.parametrize("opts", [dict(docs=True, sinks=True), dict(window=20, n_sink_tokens=2)],
                         ids=["docs+sinks", "1doc+win20+2sink"])
def test_non_causal_bf16(opts):
    """The non-causal masks through the default ("separate") dq backward in bf16: the only bf16 non-causal case
    before ran the atomic-dq variant. Two query blocks (T = 80), GQA 2."""
    _check(1, 80, 2, 1, 64, torch.bfloat16, causal=False, **opts)


@pytest.mark.parametrize(
    "B,T,HQ,HKV,D,dtype,opts",
    [
        (2, 200, 4, 2, 64, torch.float32, dict(docs=True, window=40, n_sink_tokens=4, sinks=True)),
        (2, 200, 4, 2, 128, torch.bfloat16, dict(docs=True, window=40, n_sink_tokens=4, sinks=True)),
        (1, 256, 2, 2, 64, torch.bfloat16, dict(docs=True, sinks=True)),
        (2, 130, 4, 1, 64, torch.float32, dict(causal=False, docs=True, sinks=True)),
        (1, 100, 4, 2, 64, torch.float16, dict(docs=True, window=30, n_sink_tokens=2, sinks=True)),
        (1, 1, 2, 1, 64, torch.float32, dict(sinks=True)),
        (2, 3, 2, 2, 128, torch.float32, dict(docs=True, window=1, n_sink_tokens=1)),
    ],
    ids=["B2T200-gqa2-all-fp32", "B2T200-d128-all-bf16", "T256-docs-bf16", "T130-noncausal-docs", "T100-all-fp16", "T1",
         "T3-win1"],
)
def test_larger(B, T, HQ, HKV, D, dtype, opts):
    _check(B, T, HQ, HKV, D, dtype, **opts)


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("D,width", sorted({(d, w) for (_, d, w) in A.GPU_CONFIGS}),
                         ids=lambda v: str(v))
def test_gpu_tiles_under_the_interpreter(monkeypatch, D, width):
    """The GPU launch tiles (``GPU_CONFIGS``: 16 to 128 rows, BLOCK_M != BLOCK_N) on the interpreter, whose own
    tile is 64 x 64: the block-range arithmetic (sink, masked and fully allowed kv ranges per query block, q-block
    ranges per kv block) must hold for every tile a GPU launches. fp32 inputs whatever the table's operand width:
    the tiles do not depend on the dtype, and the interpreter's bf16 maths is wrong."""
    monkeypatch.setattr(A, "_config", lambda kernel, head_dim, dtype: dict(A.GPU_CONFIGS[(kernel, D, width)]))
    _check(1, 150, 2, 1, D, torch.float32, docs=True, window=40, n_sink_tokens=3, sinks=True)
    _check(1, 150, 2, 2, D, torch.float32)


def _tile(**kw):
    return {"kernel": "fwd", "head_dim": 64, "dtype": "bf16", "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4,
            "num_stages": 2, **kw}


def test_tile_table_overrides_the_named_gpu_tiles(monkeypatch, tmp_path):
    """``load_tiles`` (MLLM_ATTN_TILES) replaces exactly the GPU_CONFIGS entries a tile table names: bf16 and fp16
    share the 16-bit entry, fp32 has its own; the GPU launch then uses them, the interpreter keeps its own tile, and
    every loaded tile still computes the reference's result (the same block-range arithmetic as above)."""
    import json

    monkeypatch.setattr(A, "GPU_CONFIGS", {k: dict(v) for k, v in A.GPU_CONFIGS.items()})
    monkeypatch.setattr(A, "TILES_SOURCE", "shipped")
    before = {k: dict(v) for k, v in A.GPU_CONFIGS.items()}
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"environment": {"card": "H100"}, "tiles": [
        _tile(), _tile(kernel="dq", head_dim=128, dtype="fp32", BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1,
                       ms=0.1)]}))
    assert A.load_tiles(path) == 2 and A.TILES_SOURCE == str(path)
    assert A.GPU_CONFIGS[("fwd", 64, 2)] == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert A.GPU_CONFIGS[("dq", 128, 4)] == dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)
    assert {k: v for k, v in A.GPU_CONFIGS.items() if k not in {("fwd", 64, 2), ("dq", 128, 4)}} == \
        {k: v for k, v in before.items() if k not in {("fwd", 64, 2), ("dq", 128, 4)}}
    if DEVICE == "cpu":
        assert A._config("fwd", 64, torch.bfloat16) == A.INTERPRETER_CONFIG
    table = dict(A.GPU_CONFIGS)
    monkeypatch.setattr(A, "interpreting", lambda: False)
    assert A._config("fwd", 64, torch.bfloat16) == table[("fwd", 64, 2)]
    assert A._config("dq", 128, torch.float32) == table[("dq", 128, 4)]
    monkeypatch.undo()
    if DEVICE == "cpu":  # the loaded tiles on the interpreter, as test_gpu_tiles_under_the_interpreter does:
        width = {64: 2, 128: 4}  # fwd's loaded tile is a 16-bit entry (D = 64), dq's an fp32 one (D = 128)
        monkeypatch.setattr(A, "_config", lambda kernel, head_dim, dtype: dict(table[(kernel, head_dim, width[head_dim])]))
        _check(1, 150, 2, 1, 64, torch.float32, docs=True, window=40, n_sink_tokens=3, sinks=True)
        _check(1, 150, 2, 1, 128, torch.float32)


@pytest.mark.parametrize("tiles, match", [
    ('{"tiles": [', "tiles.json:1: not valid JSON"),
    ('[1, 2]', "expected an object with a 'tiles' list"),
    ('{"tiles": [7]}', r"tiles\[0\]: expected an object"),
    ('{"tiles": [{"kernel": "fwd"}]}', r"tiles\[0\]: missing head_dim, dtype, BLOCK_M"),
    (_tile(kernel="bwd"), "kernel must be 'fwd', 'dkdv' or 'dq'"),
    (_tile(head_dim=96), "head_dim must be 64 or 128"),
    (_tile(dtype="float32"), "dtype must be 'bf16', 'fp16' or 'fp32'"),
    (_tile(BLOCK_M=48), r"BLOCK_M must be a power of two in \[16, 256\], got 48"),
    (_tile(num_warps=32), r"num_warps must be a power of two in \[1, 16\]"),
    (_tile(num_stages=0), r"num_stages must be an integer in \[1, 8\]"),
])
def test_tile_table_errors_name_the_file_and_entry(tmp_path, tiles, match):
    import json

    path = tmp_path / "tiles.json"
    path.write_text(tiles if isinstance(tiles, str) else json.dumps({"tiles": [tiles]}))
    before = {k: dict(v) for k, v in A.GPU_CONFIGS.items()}
    with pytest.raises(ValueError, match=match) as e:
        A.load_tiles(path)
    assert str(path) in str(e.value) and A.GPU_CONFIGS == before  # nothing half-applied
    with pytest.raises(ValueError, match="cannot read it"):
        A.load_tiles(tmp_path / "missing.json")


def test_tile_table_from_the_environment_at_import(tmp_path):
    """MLLM_ATTN_TILES is read at import: the table applies to every launch, and a bad one fails right there."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"tiles": [_tile(kernel="dkdv", BLOCK_M=16, BLOCK_N=64)]}))
    bad.write_text(json.dumps({"tiles": [_tile(BLOCK_N=3)]}))
    code = ("import importlib; A = importlib.import_module('mllm_kernels.attention'); "
            "print(A.TILES_SOURCE, A.GPU_CONFIGS[('dkdv', 64, 2)]['BLOCK_M'], A.GPU_CONFIGS[('dkdv', 64, 2)]['BLOCK_N'])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MLLM_ATTN_TILES": str(good)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == [str(good), "16", "64"], out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MLLM_ATTN_TILES": str(bad)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "BLOCK_N must be a power of two" in out.stderr


def test_no_rope_and_custom_scale():
    _check(1, 100, 2, 1, 64, torch.float32, docs=True, sinks=True, rope_theta=None, softmax_scale=0.3)


def test_large_positions_rope_theta():
    """Positions far beyond T (e.g. a later chunk of a long document) and another θ: the fp64-turns angle
    reduction must keep fp32 accuracy there."""
    seed = _seed()
    q, k, v, _, _, s, g_out, g_lse = _make_case(1, 70, 2, 1, 64, docs=False, sinks=True, seed=seed)
    pos = torch.arange(70)[None] + 123_457
    opts = dict(rope_theta=500_000.0, window=32, n_sink_tokens=2)
    ref = _run(R.attention, q, k, v, pos, None, s, g_out, g_lse, torch.float64, "cpu", opts)
    kern = _run(A.attention, q, k, v, pos, None, s, g_out, g_lse, torch.float32, DEVICE, opts)
    for name, kx, rx in zip(NAMES, kern, ref):
        assert (kx - rx).abs().max().item() <= 5e-5 * max(1.0, rx.abs().max().item()), f"{name} (seed {seed})"


def test_stream_rope_fused(monkeypatch):
    """The in-loop rotation of the streamed operand (no pre-rotated temporary) gives the same results."""
    monkeypatch.setattr(A, "STREAM_ROPE", "fused")
    _check(2, 100, 4, 2, 64, torch.float32, docs=True, window=24, n_sink_tokens=2, sinks=True)
    _check(1, 80, 2, 1, 128, torch.bfloat16, docs=True, sinks=True)


# The atomic-dq backward (``BWD_DQ = "atomic"``): dq accumulated by the dkdv kernel. The grid covers each mask
# feature once with and without GQA (a kv program adds into several query heads), both head dims and dtypes, the
# in-loop RoPE of the streamed operand, no RoPE, a T with a partial last block and two rows (two b offsets).
ATOMIC_CASES = {
    "docs": dict(docs=True),
    "win+sinks": dict(window=16, n_sink_tokens=3, sinks=True),
    "docs+win": dict(docs=True, window=24, n_sink_tokens=2),
    "noncausal+docs": dict(causal=False, docs=True, sinks=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("case", list(ATOMIC_CASES))
def test_atomic_dq_backward(monkeypatch, case, group, dtype):
    monkeypatch.setattr(A, "BWD_DQ", "atomic")
    _check(2, 75, group, 1, 64, dtype, **ATOMIC_CASES[case])


def test_atomic_dq_backward_options(monkeypatch):
    monkeypatch.setattr(A, "BWD_DQ", "atomic")
    _check(1, 80, 2, 1, 128, torch.bfloat16, docs=True, sinks=True)
    _check(1, 70, 2, 2, 64, torch.float32, docs=True, rope_theta=None)
    monkeypatch.setattr(A, "STREAM_ROPE", "fused")
    _check(2, 90, 4, 2, 64, torch.float32, docs=True, window=24, n_sink_tokens=2, sinks=True)


def test_atomic_dq_matches_the_dq_kernel(monkeypatch):
    """Same dk and dv bit for bit (the dkdv kernel's own sums are untouched), and dq equal up to the order of the
    fp32 additions; a mode other than the two is an error naming the setting."""
    seed = _seed()
    q, k, v, pos, cu, s, g_out, g_lse = _make_case(2, 80, 4, 2, 64, docs=True, sinks=True, seed=seed)
    opts = dict(causal=True, window=None, n_sink_tokens=0)
    runs = {}
    for mode in ("separate", "atomic"):
        monkeypatch.setattr(A, "BWD_DQ", mode)
        runs[mode] = _run(A.attention, q, k, v, pos, cu, s, g_out, g_lse, torch.float32, DEVICE, opts)
    sep, atom = runs["separate"], runs["atomic"]
    for name in ("out", "lse", "dk", "dv", "dsinks"):
        assert torch.equal(sep[NAMES.index(name)], atom[NAMES.index(name)]), f"{name} (seed {seed})"
    torch.testing.assert_close(atom[2], sep[2], rtol=1e-5, atol=1e-6, msg=lambda m: f"{m} (seed {seed})")
    torch.use_deterministic_algorithms(True)  # still "atomic": the reproducible dq kernel runs instead
    try:
        det = _run(A.attention, q, k, v, pos, cu, s, g_out, g_lse, torch.float32, DEVICE, opts)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(det, sep) if a is not None)
    if DEVICE == "cpu":  # the interpreter's atomic order is fixed: its dq differs from the kernel's in the last bits
        assert not torch.equal(atom[2], sep[2]), f"seed {seed}"
    monkeypatch.setattr(A, "BWD_DQ", "fast")
    with pytest.raises(ValueError, match="MLLM_ATTN_DQ"):
        _run(A.attention, q, k, v, pos, cu, s, g_out, g_lse, torch.float32, DEVICE, opts)


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter rounding: compiled, bf16 runs take bf16 tensor-core operands")
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
def test_bf16_stores_round_to_nearest_even(monkeypatch, dq_mode):
    """Under the interpreter the dot operands are fp32 for bf16 inputs too, so on bf16-representable inputs a bf16 run
    computes what an fp32 run computes, up to its final stores: each bf16 output must be the fp32 run's result rounded
    to nearest even (torch's cast). The interpreter's plain ``.to(bf16)`` truncates instead, which made ~half of them
    differ (and biased the error). RoPE rotates the streamed operand in the loop ("fused"), since the pre-rotated
    temporary would be a bf16 rounding of its own (that store is checked by the ``_rope_rows`` part below).
    out and dv with an lse gradient of 0 (dv = Pᵀ dO does not read out); dq and dk with g_out = 0, so that
    Δ = rowsum(dO ∘ out) − dlse = −dlse does not read the bf16-rounded out either."""
    monkeypatch.setattr(A, "STREAM_ROPE", "fused")
    monkeypatch.setattr(A, "BWD_DQ", dq_mode)
    seed = _seed()
    q, k, v, pos, cu, s, g_out, g_lse = _make_case(1, 70, 2, 1, 64, docs=True, sinks=True, seed=seed)
    q, k, v, g_out = (x.bfloat16().float() for x in (q, k, v, g_out))
    opts = dict(causal=True, window=24, n_sink_tokens=2)
    checks = {"out": (g_out, None), "dv": (g_out, None), "dq": (0 * g_out, g_lse), "dk": (0 * g_out, g_lse)}
    for name, (go, gl) in checks.items():
        r16, r32 = (_run(A.attention, q, k, v, pos, cu, s, go, gl, dt, DEVICE, opts)
                    for dt in (torch.bfloat16, torch.float32))
        i = NAMES.index(name)
        want = r32[i].float().bfloat16()
        assert r32[i].abs().max() > 0, name
        differ = (r16[i].float().bfloat16() != want).float().mean().item()
        assert differ == 0, f"{name}: {differ:.1%} of the bf16 values are not the fp32 result rounded to nearest even " \
                            f"(seed {seed})"
    x = q.bfloat16()
    freq = A._rope_turns(64, 10000.0, x.device)
    p32 = pos.to(torch.int32).contiguous()
    y16, y32 = A._rope_rows(x, p32, freq), A._rope_rows(x.float(), p32, freq)
    assert torch.equal(y16, y32.bfloat16()), f"_rope_rows (seed {seed})"


def test_without_lse_grad_and_default_positions():
    _check(2, 90, 2, 1, 64, torch.float32, docs=True, sinks=True, positions=None, lse_grad=False)


def test_strided_inputs():
    """q/k/v as views of one packed projection [B, T, Hq + 2·Hkv, D] (non-contiguous heads)."""
    B, T, HQ, HKV, D = 2, 70, 2, 1, 64
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, HQ + 2 * HKV, D, generator=g).to(DEVICE)
    q, k, v = qkv.split([HQ, HKV, HKV], dim=2)
    assert not q.is_contiguous()
    out = A.attention(q, k, v, window=20, n_sink_tokens=1)
    ref = R.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), window=20, n_sink_tokens=1)
    assert (out.cpu().double() - ref).abs().max().item() < 1e-4, f"seed {seed}"


# ----------------------------------------------------------------------------------------------------
# validation, dispatch, torch.library
# ----------------------------------------------------------------------------------------------------
def _valid_args(D=64):
    q = torch.randn(2, 8, 4, D, device=DEVICE)
    k = torch.randn(2, 8, 2, D, device=DEVICE)
    v = torch.randn(2, 8, 2, D, device=DEVICE)
    return q, k, v


BAD_CASES = [
    (lambda q, k, v: ((q[0], k, v), {}), "q must have 4 dimensions"),
    (lambda q, k, v: ((q, k.half(), v), {}), "share a dtype"),
    (lambda q, k, v: ((q.long(), k, v), {}), "q has dtype int64"),
    (lambda q, k, v: ((q, k, v[:, :, :1]), {}), "same shape"),
    (lambda q, k, v: ((q, k[:, :4], v[:, :4]), {}), r"must be \[B, T, Hkv, D\]"),
    (lambda q, k, v: ((q[:, :, :3], k, v), {}), "multiple of the kv heads"),
    (lambda q, k, v: ((q[..., :32], k[..., :32], v[..., :32]), {}), r"head dim D=32 is not supported.*\(64, 128\)"),
    (lambda q, k, v: ((q, k, v, torch.zeros(2, 7, dtype=torch.long, device=q.device)), {}), "position_ids shape"),
    (lambda q, k, v: ((q, k, v, torch.zeros(2, 8, device=q.device)), {}), "position_ids has dtype float32"),
    (lambda q, k, v: ((q, k, v), dict(cu_seqlens=torch.tensor([0, 8, 16], device=q.device).float())), "cu_seqlens has dtype"),
    (lambda q, k, v: ((q, k, v), dict(cu_seqlens=torch.tensor([[0, 8, 16]], device=q.device))), "cu_seqlens must have 1"),
    (lambda q, k, v: ((q, k, v), dict(cu_seqlens=torch.tensor([1, 8, 16], device=q.device))), "start at 0"),
    (lambda q, k, v: ((q, k, v), dict(cu_seqlens=torch.tensor([0, 8, 15], device=q.device))), "end at B\\*T"),
    (lambda q, k, v: ((q, k, v), dict(cu_seqlens=torch.tensor([0, 5, 5, 8, 16], device=q.device))), "strictly increasing"),
    (lambda q, k, v: ((q, k, v), dict(cu_seqlens=torch.tensor([0, 5, 10, 16], device=q.device))), r"row start.*missing \[8\]"),
    (lambda q, k, v: ((q, k, v), dict(window=0)), "window must be a positive int"),
    (lambda q, k, v: ((q, k, v), dict(window=2.5)), "window must be a positive int"),
    (lambda q, k, v: ((q, k, v), dict(window=4, n_sink_tokens=-1)), "n_sink_tokens must be an int >= 0"),
    (lambda q, k, v: ((q, k, v), dict(sinks=torch.zeros(3, device=q.device))), r"sinks must have shape \[Hq\] = \[4\]"),
    (lambda q, k, v: ((q, k, v), dict(sinks=torch.zeros(4, dtype=torch.long, device=q.device))), "sinks has dtype"),
    (lambda q, k, v: ((q, k, v), dict(rope_theta=-1.0)), "rope_theta must be a positive"),
    (lambda q, k, v: ((q, k, v), dict(softmax_scale=float("nan"))), "softmax_scale must be a finite"),
    (lambda q, k, v: ((q, k, v), dict(causal="no")), "causal must be True or False"),  # a truthy str: silently causal
]


@pytest.mark.parametrize("make,match", BAD_CASES, ids=[m for _, m in BAD_CASES])
def test_validation_errors(make, match):
    args, kw = make(*_valid_args())
    with pytest.raises(ValueError, match=match):
        A.attention(*args, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    q, k, v = _valid_args()
    with pytest.raises(ValueError, match="position_ids is on cpu"):
        A.attention(q, k, v, torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU dispatch rule")
def test_dispatch_eager_without_interpreter(monkeypatch):
    q, k, v = _valid_args(D=32)  # the eager path has no head-dim restriction
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = A.attention(q, k, v, window=3, n_sink_tokens=1)
    assert last_path("attention") == "eager"
    torch.testing.assert_close(out, R.attention(q, k, v, window=3, n_sink_tokens=1), rtol=0, atol=0)


def test_return_probs_is_eager_debug_path():
    q, k, v = _valid_args()
    sinks = torch.zeros(4, device=DEVICE)
    out, probs = A.attention(q, k, v, sinks=sinks, return_probs=True)
    assert last_path("attention") == "eager"
    assert probs.shape == (2, 4, 8, 8)
    # with a sink column the kept probabilities sum to 1 − P_sink < 1
    assert (probs.sum(-1) < 1).all()
    torch.testing.assert_close(out, A.attention(q, k, v, sinks=sinks), rtol=1e-4, atol=1e-5)


def _op_args(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    B, T, HQ, HKV, D = 1, 20, 2, 1, 64
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(DEVICE).requires_grad_(requires_grad) for h in (HQ, HKV, HKV))
    pos = torch.arange(T, device=DEVICE)[None]
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    sinks = torch.randn(HQ, generator=g).to(DEVICE).requires_grad_(requires_grad)
    doc_start, doc_end = A._compute_doc_bounds(cu, B, T, DEVICE)
    return (q, k, v, pos, doc_start, doc_end, sinks, True, 6, 2, 10000.0, 0.125), cu


def test_opcheck():
    torch.library.opcheck(A._attention_op, _op_args()[0])


def test_torch_compile_aot_eager(monkeypatch):
    """Compiled and eager agree. Eagerly the [B, T] document bounds are computed once per cu_seqlens tensor and
    cached (every layer gets the same tensor); under torch.compile they must be traced ops instead: a cached device
    tensor made inside a CUDA graph's memory pool (mode="reduce-overhead") is not a graph output, and CUDA-graph trees
    refuse it ("tensor(s) in the cudagraph pool not tracked as outputs"). The cache is made CPU-capable here so that
    a wrong cache fill shows on this machine too."""
    cache = A._PerTensorCache(cuda_only=False)
    monkeypatch.setattr(A, "_DOC_CACHE", cache)
    args, cu = _op_args()
    q, k, v, pos, sinks = *args[:4], args[6]

    def f(q, k, v, sinks):
        return A.attention(q, k, v, pos, cu_seqlens=cu, window=6, n_sink_tokens=2, sinks=sinks).float().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    assert cache.ref is None, "the compiled call cached its document bounds"
    want = torch.autograd.grad(f(q, k, v, sinks), (q, k, v, sinks))
    assert cache.ref is not None and cache.ref() is cu  # the eager call did
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_module_with_learned_sinks():
    m = A.Attention(4, window=5, n_sink_tokens=1, learned_sinks=True).to(DEVICE)
    q, k, v = _valid_args()
    with torch.no_grad():
        m.sinks.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    m(q, k, v).float().square().sum().backward()
    sinks = m.sinks.detach().clone().requires_grad_()
    R.attention(q, k, v, window=5, n_sink_tokens=1, sinks=sinks).square().sum().backward()
    torch.testing.assert_close(m.sinks.grad, sinks.grad, rtol=1e-4, atol=1e-5)


def test_reference_with_an_infinite_sink_gives_the_limit():
    # sink logit -> +inf takes all the probability mass, so out -> 0. The reference once replaced any infinite lse
    # by 0 (meant for fully masked rows, lse = -inf) and returned exp(s) unnormalised for a +inf sink.
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(3))
    out, lse = R.attention(q, k, v, sinks=torch.tensor([float("inf"), 0.0], dtype=torch.float64), return_lse=True)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])) and torch.isinf(lse[:, 0]).all()
    ref = R.attention(q, k, v, sinks=torch.tensor([0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[:, :, 1], ref[:, :, 1], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# GPU only: realistic lengths
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_long(D):
    _check(2, 1100, 8, 2, D, torch.bfloat16, docs=True, window=300, n_sink_tokens=4, sinks=True)
    _check(1, 2048, 4, 4, D, torch.bfloat16, sinks=True)


def test_per_tensor_cache_hits_and_invalidation():
    cache = A._PerTensorCache(cuda_only=False)
    calls = []

    def compute(t):
        calls.append(1)
        return t.sum().item()

    t = torch.arange(4)
    assert cache.get(t, "k", lambda: compute(t)) == 6
    assert cache.get(t, "k", lambda: compute(t)) == 6 and len(calls) == 1  # same object, same version: hit
    t.add_(1)  # in place: version bump -> recomputed
    assert cache.get(t, "k", lambda: compute(t)) == 10 and len(calls) == 2
    assert cache.get(t, "other key", lambda: compute(t)) == 10 and len(calls) == 3
    u = t.clone()  # equal values, another object: recomputed
    assert cache.get(u, "other key", lambda: compute(u)) == 10 and len(calls) == 4
    assert A._PerTensorCache().get(u, "k", lambda: compute(u)) == 10 and len(calls) == 5  # CPU: never cached


def test_tracing_builds_the_rope_table_outside_any_cuda_graph():
    """torch.compile traces the op through its fake implementation, which builds the cached RoPE table for real
    then (before any CUDA-graph capture could put it in a graph's private pool); positions of either int width
    are read in place."""
    D, theta = 64, 12345.0
    q, k, v = (torch.randn(1, 16, 2, D, device=DEVICE) for _ in range(3))
    key = (D, theta, str(q.device))
    A._FREQ_CACHE.pop(key, None)
    pos = torch.arange(16, device=DEVICE)[None]

    def f(q, k, v, pos):
        return A.attention(q, k, v, pos, rope_theta=theta)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # what tracing runs: the fake implementation only, no kernel
        fq, fk, fv, fpos = (mode.from_tensor(t) for t in (q, k, v, pos))
        torch.ops.mllm.attention(fq, fk, fv, fpos, None, None, None, True, None, 0, theta, D ** -0.5)
    assert key in A._FREQ_CACHE and A._FREQ_CACHE[key].device == q.device
    assert not isinstance(A._FREQ_CACHE[key], torch._subclasses.fake_tensor.FakeTensor)
    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, pos)
    torch.testing.assert_close(out, f(q, k, v, pos.int()), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_per_tensor_caches_follow_in_place_changes():
    """Document bounds and the cu_seqlens validation are cached per CUDA tensor object and version counter
    (positions are read in place, not cached): an in-place change must be seen (new masks, new positions, and a
    new validation)."""
    B, T, HQ, D = 1, 96, 2, 64
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, HQ, D, generator=g).cuda() for _ in range(3))
    cu = torch.tensor([0, 40, 96], dtype=torch.int32, device="cuda")
    pos = torch.arange(T, device="cuda")[None].clone()
    for new_cu, new_pos in [([0, 10, 96], 0), ([0, 70, 96], 500)]:
        A.attention(q, k, v, pos, cu_seqlens=cu)  # fills the caches
        cu.copy_(torch.tensor(new_cu, device="cuda"))
        pos.add_(new_pos)
        got = A.attention(q, k, v, pos, cu_seqlens=cu).double()
        want = R.attention(q.double(), k.double(), v.double(), pos, cu_seqlens=cu)
        assert (got - want).abs().max().item() < 1e-4, f"seed {seed}"
    cu[1] = 0  # now invalid (not strictly increasing): must be re-validated, not served from the cache
    with pytest.raises(ValueError, match="strictly increasing"):
        A.attention(q, k, v, pos, cu_seqlens=cu)


def test_cu_seqlens_to_device_validates_on_the_host_and_attention_trusts_the_copy(monkeypatch):
    """The training loop moves a batch's document bounds with ``cu_seqlens_to_device``: the values are checked on the
    host (bad bounds raise the same ValueError as ``attention``) and ``attention`` does not read the copy back (on a
    GPU that read is a device-to-host sync per micro-batch). Touching the copy in place makes attention check again.
    The validation cache ignores CPU tensors (numpy views can change them unseen); it is made CPU-capable here so
    that the same bookkeeping runs on this machine."""
    if DEVICE == "cpu":
        monkeypatch.setattr(A, "_CU_VALID_CACHE", A._PerTensorCache(cuda_only=False))
    checks = []
    real_check = A._check_cu_values
    monkeypatch.setattr(A, "_check_cu_values", lambda cu, B, T: checks.append(cu.device.type) or real_check(cu, B, T))
    B, T, H, D = 2, 16, 2, 64
    host = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    cu = A.cu_seqlens_to_device(host, B, T, DEVICE)
    assert cu.device.type == DEVICE and torch.equal(cu.cpu(), host) and checks == ["cpu"]
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(DEVICE) for _ in range(3))
    out = A.attention(q, k, v, cu_seqlens=cu)
    assert checks == ["cpu"]  # trusted: no second check, so no read-back of the device copy
    ref = R.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu_seqlens=host)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{m} (seed {seed})")
    cu.add_(0)  # a write bumps the version counter: the copy is no longer known valid
    A.attention(q, k, v, cu_seqlens=cu)
    assert checks == ["cpu", DEVICE]
    with pytest.raises(ValueError, match="every row start"):
        A.cu_seqlens_to_device(torch.tensor([0, 5, 20, 32], dtype=torch.int32), B, T, DEVICE)
    with pytest.raises(ValueError, match="end at B\\*T"):
        A.cu_seqlens_to_device(torch.tensor([0, 16, 30], dtype=torch.int32), B, T, DEVICE)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_trailing_padding_of_cu_seqlens_changes_nothing(causal):
    """Repeats of B·T after the last bound are padding (zero-length documents at the end): they keep cu_seqlens at one
    length for every batch, which a CUDA graph needs (``mllm.training.batches.pad_cu_seqlens``). Kernel and reference
    must give bit-identical outputs and gradients with and without them; a repeat anywhere else stays an error."""
    B, T, HQ, HKV, D = 2, 40, 2, 1, 64
    seed = _seed()
    q, k, v, pos, cu, s, g_out, g_lse = _make_case(B, T, HQ, HKV, D, docs=True, sinks=True, seed=seed)
    padded = torch.cat([cu, cu.new_full((B * T + 1 - cu.numel(),), B * T)])
    assert padded.numel() == B * T + 1 and padded.numel() > cu.numel() + 10
    opts = dict(causal=causal, window=None, n_sink_tokens=0)
    for fn, device in ((A.attention, DEVICE), (R.attention, "cpu")):
        plain = _run(fn, q, k, v, pos, cu, s, g_out, g_lse, torch.float32, device, opts)
        pad = _run(fn, q, k, v, pos, padded, s, g_out, g_lse, torch.float32, device, opts)
        for name, a, b in zip(NAMES, plain, pad):
            assert torch.equal(a, b), f"{fn.__module__}: {name} changed by the padding (seed {seed})"
    x = torch.randn(B, T, HQ, D)
    for bad in ([0, 40, 40, 80, 80], [0, 40, 80, 60, 80]):  # an empty document inside; a step back
        with pytest.raises(ValueError, match="strictly increasing"):
            A.attention(x, x[:, :, :HKV], x[:, :, :HKV], cu_seqlens=torch.tensor(bad, dtype=torch.int32))


def _check_cu_seqlens_in_torch(cu_seqlens, B, T):
    """The torch-op version of ``check_cu_seqlens_values`` it replaced (before dad0edf): the oracle of the NumPy one."""
    cu = cu_seqlens.to(torch.int64)
    if cu.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least [0, B*T] = [0, {B * T}], got {cu.numel()} value(s)")
    rows = torch.arange(B + 1, dtype=torch.int64) * T
    rising = (cu[1:] > cu[:-1]) | ((cu[1:] == cu[:-1]) & (cu[:-1] == B * T))
    first_ok, last_ok, inc_ok, rows_ok = torch.stack([
        cu[0] == 0, cu[-1] == B * T, rising.all(), torch.isin(rows, cu).all(),
    ]).tolist()
    if not first_ok:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if not last_ok:
        raise ValueError(f"cu_seqlens must end at B*T = {B}*{T} = {B * T}, got {int(cu[-1])}")
    if not inc_ok:
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents; only trailing padding may "
                         f"repeat the end B*T = {B * T})")
    if not rows_ok:
        missing = [r for r in rows.tolist() if r not in set(cu.tolist())]
        raise ValueError(f"cu_seqlens must contain every row start b*T (documents cannot cross rows); missing {missing}")


def test_host_cu_seqlens_check_matches_the_device_check():
    """``check_cu_seqlens_values`` (the host check of ``cu_seqlens_to_device``, once per packed micro-batch) runs in
    NumPy; it must accept and reject exactly what the torch-op version did, with the same message."""
    from mllm_kernels import reference as R

    B, T = 3, 8
    cases = [
        [0, 8, 16, 24], [0, 3, 8, 10, 16, 20, 24], [0, 8, 16, 24, 24, 24],  # valid (the last padded)
        [0], [1, 8, 16, 24], [0, 8, 16, 23], [0, 8, 8, 16, 24], [0, 5, 3, 8, 16, 24],  # too short, start, end, empty, falling
        [0, 8, 24], [0, 5, 12, 24], [0, 24, 24], [0, 8, 16, 24, 20, 24],  # missing row starts; padding then a drop
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # random bounds: valid and broken ones
        n = int(torch.randint(1, 8, (1,), generator=g))
        cases.append(sorted(torch.randint(0, B * T + 1, (n,), generator=g).tolist()) + [B * T] * int(torch.randint(0, 3, (1,), generator=g)))
        cases.append(torch.randint(0, B * T + 1, (n,), generator=g).tolist())

    def outcome(fn, cu):
        try:
            fn(cu, B, T)
            return None
        except ValueError as e:
            return str(e)

    n_ok = 0
    for c in cases:
        for dt in (torch.int32, torch.int64):
            cu = torch.tensor(c, dtype=dt)
            want = outcome(_check_cu_seqlens_in_torch, cu)
            assert outcome(R.check_cu_seqlens_values, cu) == want, c
            n_ok += want is None
    assert n_ok >= 6  # the valid cases were exercised too
