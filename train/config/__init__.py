"""Typed configuration: one YAML per experiment in configs/, dotted overrides, everything checked at parse time.

One YAML describes an experiment for both stages. Its top-level sections (data, model, ...) are shared;
a `pretraining:` block and a `finetuning:` block hold what differs per stage (optim, train, and the
stage's own sections), so `--config demo` means the same data and network to both scripts.

Precedence: dataclass defaults < the YAML's shared sections < its block for this stage < stable flags
(--lr ...) and --section.key=value overrides. A key that no dataclass declares is an error that names it,
in either stage's block. Every value is checked when the config is parsed, before anything is written.

    schema.py        the sections (dataclasses), their allowed values, how the methods' sections join them
    loading.py       YAML + overrides -> a checked config; the default config; keys that moved
    checks.py        what several keys must satisfy together (cuda_graph and precision, ...)
    command_line.py  --config, the stable flags and --section.key=value -> a config
    yaml_strict.py   the YAML reader (no duplicate keys, no aliases)
"""

from train.config.loading import (
    DEMO_ENV,
    SYSTEM_FASHION_MNIST,
    check_values,
    config_from,
    default_config_name,
    load_config,
    move_old_keys,
    moved_key_renames,
    nest,
    read_yaml,
    resolve_config_path,
    to_dict,
)
from train.config.schema import (
    COMPILE_MODES,
    CONFIG_DIR,
    GRAPHING_COMPILE_MODES,
    C,
    CheckpointSection,
    ConfigError,
    DataSection,
    DistributedSection,
    FinetuneConfig,
    FinetuneSection,
    LogSection,
    ModelSection,
    MonitorSection,
    OptimSection,
    Plugins,
    PretrainConfig,
    SpeedSection,
    StageConfig,
    TrainSection,
    allowed_values,
    base_stage,
    checked,
    choice,
    compute_dtype,
    with_plugins,
)

__all__ = [
    "COMPILE_MODES",
    "CONFIG_DIR",
    "DEMO_ENV",
    "GRAPHING_COMPILE_MODES",
    "SYSTEM_FASHION_MNIST",
    "C",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DistributedSection",
    "LogSection",
    "FinetuneConfig",
    "FinetuneSection",
    "ModelSection",
    "MonitorSection",
    "OptimSection",
    "Plugins",
    "PretrainConfig",
    "SpeedSection",
    "TrainSection",
    "StageConfig",
    "allowed_values",
    "base_stage",
    "check_values",
    "checked",
    "choice",
    "compute_dtype",
    "config_from",
    "default_config_name",
    "load_config",
    "move_old_keys",
    "moved_key_renames",
    "nest",
    "read_yaml",
    "resolve_config_path",
    "with_plugins",
    "to_dict",
]
