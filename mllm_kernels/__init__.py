"""mllm_kernels: fused Triton kernels with eager references (``mllm_kernels.reference``).

Depends on torch + triton only; never imports ``mllm``.
"""
from . import reference  # noqa: F401

__version__ = "0.1.0"
