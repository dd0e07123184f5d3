"""tplus-dist: distributed pretraining of decoder-only Transformer++ language models.

The public names are imported on first use, so that light entry points (`tplus prepare` and its worker
processes, `tplus config`) do not pay for importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "tplus_dist.config",
    "ModelConfig": "tplus_dist.config",
    "RunConfig": "tplus_dist.config",
    "load_config": "tplus_dist.config",
    "Decoder": "tplus_dist.model",
    "build_model": "tplus_dist.model",
}

if TYPE_CHECKING:
    from tplus_dist.config import ConfigError, ModelConfig, RunConfig, load_config
    from tplus_dist.model import Decoder, build_model

__all__ = ["ConfigError", "Decoder", "ModelConfig", "RunConfig", "__version__", "build_model", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tplus_dist' has no attribute {name!r}")
