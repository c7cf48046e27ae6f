"""One typed, validated configuration for the whole experiment: the schema (`schema.py`) and how
a configuration is resolved from presets, overrides, files and `--set` assignments
(`loading.py`). Everything is validated before any compute."""

from monolm.config.loading import (
    OVERRIDES_DIR,
    PRESETS_DIR,
    available_overrides,
    available_presets,
    build_config,
    check_output_folders,
    config_to_yaml,
    deep_merge,
    load_config,
    parse_set,
)
from monolm.config.schema import (
    VARIANTS,
    ArmConfig,
    ArmOverride,
    AttackConfig,
    ConfigError,
    ConstraintConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    HotFlipConfig,
    ModelConfig,
    PathsConfig,
    RunnerConfig,
    SlurmConfig,
    Switch,
    TinyModelConfig,
    TrainingConfig,
    UATConfig,
    Variant,
)

__all__ = [
    "OVERRIDES_DIR", "PRESETS_DIR", "VARIANTS", "ArmConfig", "ArmOverride", "AttackConfig", "ConfigError",
    "ConstraintConfig", "DataConfig", "EvalConfig", "ExperimentConfig", "HotFlipConfig", "ModelConfig",
    "PathsConfig", "RunnerConfig", "SlurmConfig", "Switch", "TinyModelConfig", "TrainingConfig", "UATConfig", "Variant",
    "available_overrides", "available_presets", "build_config", "check_output_folders", "config_to_yaml",
    "deep_merge", "load_config", "parse_set",
]
