from .pipeline_config import (  # noqa: F401
    PRESETS, ConfigError, DataConfig, DPOConfig, EvalConfig, ModelConfig, OptimConfig, PipelineConfig,
    PretrainConfig, SFTConfig, StageConfig, VerifierConfig, apply_overrides, config_from_dict, load_config,
    validate,
)
