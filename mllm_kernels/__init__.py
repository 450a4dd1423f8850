"""mllm_kernels: fused Triton kernels with eager references (``mllm_kernels.reference``).

Depends on torch + triton only; never imports ``mllm``. Functional API::

    sequence_logprobs(hidden, weight, labels)     # chunked LM-head log-probs per sequence (DPO)
    linear_cross_entropy(hidden, weight, labels)  # fused LM head + cross-entropy (training loss, summed)
    dpo_loss(pc, pr, rc, rr, beta)

Dispatch: CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels under the Triton
interpreter when TRITON_INTERPRET=1, else the eager reference (``_common.last_path(op)`` tells which ran).
"""
from . import reference  # noqa: F401
from ._common import last_path  # noqa: F401
from .dpo_logprobs import SequenceLogprobs, dpo_loss, sequence_logprobs  # noqa: F401
from .lm_loss import LinearCrossEntropy, linear_cross_entropy  # noqa: F401

__version__ = "0.1.0"
from .attention import Attention, attention  # noqa: F401,E402
from .rms_norm import RMSNorm, fused_add_rms_norm, rms_norm  # noqa: F401,E402
from .rope import RotaryEmbedding, apply_rope  # noqa: F401,E402
from .swiglu import SwiGLU, swiglu  # noqa: F401,E402
