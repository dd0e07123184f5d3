"""A whole run: the sections, loaded from YAML with ``--section.key=value`` overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tplus_dist.config.base import ConfigError, check, from_dict, to_dict
from tplus_dist.config.model import ModelConfig
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

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` (an exponent without a dot) as a float, as YAML 1.2 does;
    PyYAML's YAML 1.1 resolver would make it the string '3e-4'."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.seq_len

    def validate(self) -> RunConfig:
        for name in ("model", "data", "optim", "schedule", "train", "precision", "parallel", "checkpoint", "log"):
            getattr(self, name).validate(name)
        # The layout against the model; the world size is only known at launch (ParallelDims.validate).
        self.parallel.check_fits(self.model)
        check(
            not (self.parallel.sequence_parallel and self.train.device == "cpu"),
            "parallel.sequence_parallel",
            "is GPU only (Megatron's sequence-parallel layers need CUDA); set it to false for train.device cpu",
        )
        check(
            self.seq_len <= self.model.seq_len,
            "train.seq_len",
            f"({self.seq_len}) is longer than the model's context model.seq_len ({self.model.seq_len})",
        )
        check(
            self.train.batch_size_start is None
            or self.train.batch_size_start == self.train.micro_batch_size * self.train.grad_accum
            or self.schedule.unit == "tokens",
            "schedule.unit",
            "a growing batch (train.batch_size_start) needs the token clock: set schedule.unit: tokens "
            "(with warmup_tokens), so warmup and decay stay right as the batch grows",
        )
        check(
            self.schedule.decay_steps is None or self.schedule.decay_steps >= self.schedule.warmup_steps,
            "schedule.decay_steps",
            f"({self.schedule.decay_steps}) ends before warmup_steps ({self.schedule.warmup_steps})",
        )
        check(
            self.schedule.min_lr <= self.optim.lr,
            "schedule.min_lr",
            f"({self.schedule.min_lr}) is above the peak optim.lr ({self.optim.lr})",
        )
        check(
            self.data.labels is not True or self.model.adaln != "none",
            "data.labels",
            "is true, but the model takes no label: set model.adaln (adaln or adaln_zero) and model.n_conditions",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; ``defaults: [files]`` (relative to it, or to configs/) are merged first."""
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    if path in seen:
        raise ConfigError("defaults", f"{path} includes itself (through {' -> '.join(map(str, seen))})")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    for d in defaults:
        candidate = (path.parent / d) if (path.parent / d).is_file() else CONFIGS_DIR / d
        merged = _deep_merge(merged, _read_yaml(candidate.resolve(), (*seen, path)))
    return _deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``--model.n_layers=4`` / ``model.n_layers=4`` -> {"model": {"n_layers": 4}} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(text, "override must look like --section.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(key, "override key must be section.key (for example --model.n_layers=4)")
        try:
            value = _yaml_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a run config. Raises ConfigError naming the field on bad input."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and (CONFIGS_DIR / p).is_file():
            p = CONFIGS_DIR / p
        data = _read_yaml(p.resolve())
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data)
    return cfg.validate()
