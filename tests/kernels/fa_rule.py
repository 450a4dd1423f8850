"""FlashAttention's accuracy rule, shared by the kernel tests.

For an output or gradient of the kernel, with ``eager`` the reference at the same dtype and ``oracle`` the same
formula in float64:
    max|kernel − oracle| ≤ 2 · max|eager − oracle| + atol · max(1, max|oracle|)
``atol`` comes from each test file's per-dtype table (the slack a correctly rounded result may need on top).
"""
import torch


def assert_fa(name: str, kern: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, atol: float, ctx: str) -> None:
    assert kern.shape == oracle.shape and kern.dtype == eager.dtype, f"{name}: {kern.shape}/{kern.dtype} ({ctx})"
    assert torch.isfinite(kern).all(), f"{name}: non-finite values ({ctx})"
    k_err = (kern.double() - oracle).abs().max().item()
    e_err = (eager.double() - oracle).abs().max().item()
    bound = 2 * e_err + atol * max(1.0, oracle.abs().max().item())
    assert k_err <= bound, f"{name}: kernel err {k_err:.3e} > 2 x eager err {e_err:.3e} + atol = {bound:.3e} ({ctx})"
