"""RoPE kernel (``mllm_kernels.rope``) vs the eager reference.

Accuracy rule (FlashAttention's): for q_rot, k_rot and both gradients,
    max|kernel − oracle64| ≤ 2 · max|eager − oracle64| + ATOL[dtype] · max(1, max|oracle64|)
where ``eager`` is ``reference.apply_rope`` at the same dtype and ``oracle64`` evaluates angles, cos/sin and the
rotation in float64. The kernel computes cos/sin itself in fp32 from a 64-bit fixed-point angle (see the module
docstring), so its angle error stays ~2e-7 rad at any |position| < 2⁴⁰; a naive fp32 angle would miss the fp32
bound at the "large" positions used below. Positions from 2²⁴ up to that limit (where the reference's own fp64
angle is no longer exact) are checked against angles reduced in 40-digit arithmetic (mpmath), and positions
beyond it must be refused (ValueError) or, where refusing would need a device sync, come out NaN.

Shape grid (B, T, Hq, Hkv, D): D ∈ {2, 6, 64, 80, 128} covers the smallest head, half-dims that are not powers
of two (3, 40: masked lanes) and the usual 64/128; Hq ≠ Hkv (GQA, including Hkv = 1) and Hq = Hkv; T up to 129
tokens so several token tiles run. Positions are either packed documents restarting at 0 (what the trainer
feeds) or random large values up to 60,000. Under the interpreter the file runs in ~20 s; on CUDA compiled.
"""
import math
import os

import pytest
import torch
from fa_rule import assert_fa
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_kernels import reference as R
K = __import__("importlib").import_module("mllm_kernels.rope")  # the package root exports a function of the same name
from mllm_kernels._common import last_path

# absolute slack added to the 2x rule, in units of max(1, max|oracle|) (see test_rms_norm.py for the reasoning)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [  # (B, T, Hq, Hkv, D)
    (1, 1, 1, 1, 2),
    (2, 7, 3, 1, 6),
    (2, 64, 8, 2, 64),
    (1, 33, 4, 4, 128),
    (3, 129, 6, 2, 80),
]
THETA = 10000.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_PATH = "triton" if DEVICE == "cuda" else "interpreter"


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _positions(B, T, mode, g):
    if mode == "large":
        return torch.randint(0, 60000, (B, T), generator=g)
    # packed documents: positions restart at 0 at every document boundary
    pos = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        t = 0
        while t < T:
            n = int(torch.randint(1, max(2, T // 2 + 1), (1,), generator=g))
            pos[b, t:t + n] = torch.arange(min(n, T - t))
            t += n
    return pos


def _inputs(shape, dtype, seed, mode="packed", device=DEVICE):
    B, T, Hq, Hkv, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    dq = torch.randn(B, T, Hq, D, generator=g)
    dk = torch.randn(B, T, Hkv, D, generator=g)
    pos = _positions(B, T, mode, g).to(device)
    return [t.to(device=device, dtype=dtype) for t in (q, k, dq, dk)] + [pos]


def _oracle(q, k, pos, theta):
    D = q.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=q.device) / D)
    ang = pos.double()[..., None] * inv
    c, s = torch.cos(ang)[:, :, None], torch.sin(ang)[:, :, None]

    def rot(x):
        x1, x2 = x.double()[..., : D // 2], x.double()[..., D // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    return rot(q), rot(k)


def _run(fn, q, k, pos, dq, dk):
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(ql, kl, pos, THETA)
    gq, gk = torch.autograd.grad((qo, ko), (ql, kl), (dq, dk))
    return [qo.detach(), ko.detach(), gq, gk]


def _assert_fa(name, kern, eager, oracle, dtype, ctx):
    assert_fa(name, kern, eager, oracle, ATOL[dtype], ctx)


def _check(shape, dtype, seed, mode):
    q, k, dq, dk, pos = _inputs(shape, dtype, seed, mode)
    ctx = f"shape={shape} dtype={dtype} seed={seed} positions={mode}"
    kern = _run(K.apply_rope, q, k, pos, dq, dk)
    assert last_path("apply_rope") == KERNEL_PATH
    eager = _run(R.apply_rope, q, k, pos, dq, dk)
    oracle = _run(_oracle, q.double(), k.double(), pos, dq.double(), dk.double())
    for name, a, e, o in zip(("q_rot", "k_rot", "dq", "dk"), kern, eager, oracle):
        _assert_fa(name, a, e, o, dtype, ctx)


@pytest.mark.parametrize("mode", ["packed", "large"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_apply_rope_matches_reference(shape, dtype, mode):
    _check(shape, dtype, _seed(), mode)


def test_backward_is_inverse_rotation():
    q, k, _, _, pos = _inputs((2, 17, 4, 2, 64), torch.float32, _seed(), "large")
    qo, ko = K.rope_fwd(q, k, pos, THETA)
    qb, kb = K.rope_bwd(qo, ko, pos, THETA)
    torch.testing.assert_close(qb, q, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(kb, k, atol=2e-6, rtol=1e-5)


def test_turn_table_is_inv_freq_in_fixed_point_turns():
    D, theta = 96, 500000.0
    t = K.rope_turn_table(D, theta, "cpu")
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    assert t.dtype == torch.int64 and t.shape == (D // 2,)
    assert (t > 0).all() and (t < 2**62).all()  # a positive int64 with room: pos · F wraps only on purpose
    # F = round(2^64 · inv / 2π): off by at most 1/2 in units of 2π / 2^64, on top of fp64's own rounding here
    torch.testing.assert_close(t.double() * (2 * math.pi / 2**64), inv, atol=2 * math.pi / 2**64, rtol=2**-50)


def test_theta_is_used():
    q, k, _, _, pos = _inputs((1, 9, 2, 1, 32), torch.float32, _seed(), "packed")
    for theta in (0.01, 100.0, 1e6):  # θ = 0.01: turn rates above 2^63 / 2^64 (inv_freq > π), stored modulo 2^64
        qo, ko = K.apply_rope(q, k, pos, theta)
        qr, kr = _oracle(q, k, pos, theta)
        torch.testing.assert_close(qo.double(), qr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ko.double(), kr, atol=1e-5, rtol=1e-5)


def test_empty():
    q = torch.randn(2, 0, 4, 8, device=DEVICE)
    pos = torch.zeros(2, 0, dtype=torch.int64, device=DEVICE)
    qo, ko = K.apply_rope(q, q, pos)
    assert qo.shape == q.shape and ko.shape == q.shape


@pytest.mark.parametrize("hq,hkv", [(0, 2), (3, 0), (0, 0)])
def test_zero_heads(hq, hkv):
    """q or k (or both) without heads: empty rotated tensors and gradients of the right shape, the other tensor
    rotated and differentiated as usual (the launcher used to divide by zero, or run a head loop of step 0)."""
    seed = _seed()
    q, k, dq, dk, pos = _inputs((2, 5, hq, hkv, 8), torch.float32, seed, "large")
    kern = _run(K.apply_rope, q, k, pos, dq, dk)
    assert last_path("apply_rope") == KERNEL_PATH
    eager = _run(R.apply_rope, q, k, pos, dq, dk)
    for name, a, e in zip(("q_rot", "k_rot", "dq", "dk"), kern, eager):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}: {a.shape} vs {e.shape} (seed {seed})"
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=f"{name} (seed {seed})")


def _exact_cos_sin(pos: torch.Tensor, D: int, theta: float):
    """cos, sin [B, T, D/2] fp64 of pos · inv_freq (the reference's fp64 inv_freq), evaluated in 40-digit arithmetic:
    correct to ~1e-16 at any position, unlike the reference's fp64 angle (error |angle| · 2^-53)."""
    mpmath = pytest.importorskip("mpmath")
    inv = (theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)).tolist()
    with mpmath.workdps(40):
        rows = [[(float(mpmath.cos(a)), float(mpmath.sin(a))) for a in (mpmath.mpf(p) * mpmath.mpf(f) for f in inv)]
                for p in pos.reshape(-1).tolist()]
    cs = torch.tensor(rows, dtype=torch.float64).reshape(*pos.shape, D // 2, 2)
    return cs[..., 0], cs[..., 1]


def _large_positions(B, T, limit, g):
    """|position| log-uniform in [2^24, limit), random signs, with the extremes ±(limit − 1) and ±2^24 included."""
    e = 24 + torch.rand(B, T, generator=g, dtype=torch.float64) * (math.log2(limit) - 24)
    pos = torch.exp2(e).floor().clamp(max=limit - 1).long()
    pos = torch.where(torch.rand(B, T, generator=g) < 0.5, -pos, pos)
    pos.view(-1)[:4] = torch.tensor([limit - 1, -(limit - 1), 2**24, -(2**24)])
    return pos


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_positions_beyond_2_24(dtype, pos_dtype):
    """|position| from 2^24 up to the largest the kernel supports (all of int32; 2^40 − 1 for int64): the rotation
    and its gradients by the FlashAttention rule, with angles reduced in 40-digit arithmetic for the oracle (fp64) and
    for the eager path (the reference's fp32 rotation given those angles rounded to fp32). The former 12-bit position
    split was exact only below 2^24 and was off by O(1) here."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    B, T, Hq, Hkv, D = 2, 17, 2, 1, 64
    limit = 2**31 if pos_dtype == torch.int32 else K.MAX_POSITION
    pos = _large_positions(B, T, limit, g).to(pos_dtype)
    q, k, dq, dk, _ = _inputs((B, T, Hq, Hkv, D), dtype, seed)
    pos = pos.to(DEVICE)
    ctx = f"dtype={dtype} positions={pos_dtype} seed={seed}"
    cos, sin = _exact_cos_sin(pos.cpu(), D, THETA)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)

    def exact_angles(ct):
        return lambda a, b, p, theta: (R.rope_rotate(a, cos.to(ct), sin.to(ct)), R.rope_rotate(b, cos.to(ct), sin.to(ct)))

    kern = _run(K.apply_rope, q, k, pos, dq, dk)
    assert last_path("apply_rope") == KERNEL_PATH
    eager = _run(exact_angles(torch.float32), q, k, pos, dq, dk)
    oracle = _run(exact_angles(torch.float64), q.double(), k.double(), pos, dq.double(), dk.double())
    for name, a, e, o in zip(("q_rot", "k_rot", "dq", "dk"), kern, eager, oracle):
        _assert_fa(name, a, e, o, dtype, ctx)


def test_positions_outside_the_supported_range():
    """|position| >= 2^40: a ValueError naming the limit where the positions can be read without a device sync (int64
    on the CPU); the launchers (what CUDA positions reach unchecked) give NaN exactly for those tokens."""
    seed = _seed()
    q, k, dq, dk, _ = _inputs((1, 6, 2, 1, 16), torch.float32, seed)
    lim = K.MAX_POSITION
    pos = torch.tensor([[0, lim - 1, lim, -lim, 2**62, 5]])
    bad = torch.tensor([False, False, True, True, True, False])
    with pytest.raises(ValueError, match=r"position_ids hold 1099511627776, outside .*\|position\| < 2\*\*40"):
        K.apply_rope(q.cpu(), k.cpu(), pos)
    K.apply_rope(q.cpu(), k.cpu(), pos.clamp(-(lim - 1), lim - 1))  # the largest allowed magnitudes pass
    p = pos.to(DEVICE)
    for out in K.rope_fwd(q, k, p, THETA) + K.rope_bwd(dq, dk, p, THETA):
        assert out[0, bad].isnan().all() and out[0, ~bad].isfinite().all(), f"seed {seed}"
    if DEVICE == "cuda":  # not read back on the GPU: NaN, no error
        assert K.apply_rope(q, k, p)[0][0, bad].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    q, k, dq, dk, pos = _inputs((2, 5, 4, 2, 16), dtype, _seed())
    torch.library.opcheck(torch.ops.mllm.apply_rope.default, (q.requires_grad_(), k.requires_grad_(), pos, THETA))
    torch.library.opcheck(torch.ops.mllm.apply_rope_backward.default, (dq, dk, pos, THETA))


@pytest.mark.parametrize("case,match", [
    ("q_rank", "q must have 4 dimensions"),
    ("k_shape", "k has shape"),
    ("odd_dim", "must be even"),
    ("pos_shape", "position_ids has shape"),
    ("pos_dtype", "position_ids has dtype float32"),
    ("dtype_mismatch", "k has dtype"),
    ("mixed_device", "k is on meta"),
    ("theta", "theta must be"),
])
def test_validation_errors(case, match):
    q = torch.randn(2, 5, 4, 8, device=DEVICE)
    k = torch.randn(2, 5, 2, 8, device=DEVICE)
    pos = torch.arange(5, device=DEVICE).expand(2, 5)
    theta = THETA
    if case == "q_rank":
        q = q[0]
    elif case == "k_shape":
        k = torch.randn(2, 5, 2, 10, device=DEVICE)
    elif case == "odd_dim":
        q, k = q[..., :7], k[..., :7]
    elif case == "pos_shape":
        pos = torch.arange(6, device=DEVICE)[None]
    elif case == "pos_dtype":
        pos = pos.float()
    elif case == "dtype_mismatch":
        k = k.double()
    elif case == "mixed_device":
        k = torch.randn(2, 5, 2, 8, device="meta")
    elif case == "theta":
        theta = 0.0
    with pytest.raises(ValueError, match=match):
        K.apply_rope(q, k, pos, theta)


@pytest.mark.parametrize("layout", ["fused_qkv", "heads_first", "d_strided", "int32_expanded_positions"])
def test_non_contiguous_inputs(layout):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    B, T, Hq, Hkv, D = 2, 11, 4, 2, 16
    pos = _positions(B, T, "packed", g)
    if layout == "fused_qkv":          # q and k sliced from one [B, T, (Hq + 2 Hkv) · D] projection: read in place
        base = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(DEVICE)
        views = lambda t: (t[..., : Hq * D].unflatten(-1, (Hq, D)), t[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D)))
    elif layout == "heads_first":      # [B, H, T, D] storage seen as [B, T, H, D]
        base = torch.randn(B, Hq + Hkv, T, D, generator=g).to(DEVICE)
        views = lambda t: (t[:, :Hq].transpose(1, 2), t[:, Hq:].transpose(1, 2))
    elif layout == "d_strided":        # D is not the unit-stride axis: copied before the launch
        base = torch.randn(B, T, D, Hq + Hkv, generator=g).to(DEVICE)
        views = lambda t: (t[..., :Hq].transpose(-1, -2), t[..., Hq:].transpose(-1, -2))
    else:                              # int32 positions broadcast over the batch (stride 0)
        base = torch.randn(B, T, Hq + Hkv, D, generator=g).to(DEVICE)
        views = lambda t: (t[:, :, :Hq], t[:, :, Hq:])
        pos = torch.arange(T, dtype=torch.int32)[None].expand(B, T)
    pos = pos.to(DEVICE)
    qv, kv = views(base)
    assert not qv.is_contiguous()
    dq = torch.randn(qv.shape, generator=g).to(DEVICE)
    dk = torch.randn(kv.shape, generator=g).to(DEVICE)
    b1 = base.clone().requires_grad_()
    qo, ko = K.apply_rope(*views(b1), pos, THETA)
    (gb,) = torch.autograd.grad((qo, ko), b1, (dq, dk))
    b2 = base.clone().requires_grad_()
    qr, kr = R.apply_rope(*views(b2), pos, THETA)
    (gb_ref,) = torch.autograd.grad((qr, kr), b2, (dq, dk))
    for a, b in ((qo, qr), (ko, kr), (gb, gb_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")


def test_only_q_used():
    # k_rot unused: its gradient arrives as None/zeros
    q, k, dq, _, pos = _inputs((1, 5, 2, 1, 8), torch.float32, _seed())
    q.requires_grad_()
    qo, _ = K.apply_rope(q, k, pos)
    (g,) = torch.autograd.grad(qo, q, dq)
    q2 = q.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(R.apply_rope(q2, k, pos)[0], q2, dq)
    torch.testing.assert_close(g, g2, atol=1e-5, rtol=1e-5)


def test_module_and_dispatch_path():
    q, k, _, _, _ = _inputs((2, 6, 4, 2, 32), torch.float32, _seed())
    qo, ko = K.RotaryEmbedding(32)(q, k)
    assert last_path("apply_rope") == KERNEL_PATH
    pos = torch.arange(6, device=DEVICE)[None].expand(2, 6)
    qr, kr = R.apply_rope(q, k, pos)
    torch.testing.assert_close(qo, qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, kr, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), Hq=st.integers(1, 8), Hkv=st.integers(1, 4),
    half=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    mode=st.sampled_from(["packed", "large"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes(B, T, Hq, Hkv, half, dtype, mode, seed):
    _check((B, T, Hq, Hkv, 2 * half), dtype, seed, mode)
