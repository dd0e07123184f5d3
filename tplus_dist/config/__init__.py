"""Configuration: sectioned dataclasses, YAML files plus ``--section.key=value`` overrides."""

from tplus_dist.config.base import ConfigError, from_dict, to_dict
from tplus_dist.config.model import ModelConfig
from tplus_dist.config.run import RunConfig, load_config, parse_overrides
from tplus_dist.config.sections import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
]
