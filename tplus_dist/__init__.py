"""tplus-dist: distributed pretraining of decoder-only Transformer++ language models."""

from tplus_dist.config import ConfigError, ModelConfig, RunConfig, load_config
from tplus_dist.model import Decoder, build_model

__version__ = "0.1.0"

__all__ = ["ConfigError", "Decoder", "ModelConfig", "RunConfig", "__version__", "build_model", "load_config"]
