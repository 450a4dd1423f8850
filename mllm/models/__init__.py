"""The decoder-only LM (eager reference path + kernel_backend switch) and its generation loop."""
from .generation import generate  # noqa: F401
from .transformer import KVCache, Transformer, build_model, causal_lm_loss  # noqa: F401
