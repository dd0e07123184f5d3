"""The decoder, written once for a single device; parallel and fused layers enter through a provider."""

from __future__ import annotations

from tplus_dist.backends import LayerProvider
from tplus_dist.config.model import ModelConfig
from tplus_dist.model.decoder import Decoder
from tplus_dist.model.loss import lm_loss


def build_model(cfg: ModelConfig, provider: LayerProvider | None = None) -> Decoder:
    """Validate ``cfg`` and build the decoder (on the current default device, fp32)."""
    cfg.validate()
    return Decoder(cfg, provider)


__all__ = ["Decoder", "build_model", "lm_loss"]
