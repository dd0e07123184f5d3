"""Plain-PyTorch layers: the default provider on CPU and GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from tplus_dist.backends.base import LinearRole
from tplus_dist.model.attention import AttentionCore
from tplus_dist.model.norms import build_norm

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig, NormKind


class TorchProvider:
    name = "torch"

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def norm(self, kind: NormKind, dim: int, *, eps: float, bias: bool, unit_offset: bool) -> nn.Module:
        return build_norm(kind, dim, eps=eps, bias=bias, unit_offset=unit_offset)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return AttentionCore(cfg, layer)
