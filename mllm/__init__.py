"""mllm: model, data, trainer, pipeline stages and evaluation on top of ``mllm_kernels``."""
__version__ = "0.1.0"
