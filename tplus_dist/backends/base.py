"""The seam between the single-device decoder and the parallel/fused layer implementations.

The decoder asks a provider for its linears, norms, embedding and attention core, saying what
each one is for (``role``). A tensor-parallel provider splits "column" linears by output features
and "row" linears by input features (Megatron's pairing), and the vocabulary of "vocab" ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

from torch import nn

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig, NormKind

LinearRole = Literal["column", "row", "vocab"]


class LayerProvider(Protocol):
    name: str

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        """A linear map [..., in] -> [..., out]."""
        ...

    def norm(self, kind: NormKind, dim: int, *, eps: float, bias: bool, unit_offset: bool) -> nn.Module: ...

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Token embedding; ``.weight`` is [num_embeddings, dim] (shared with a tied head)."""
        ...

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """softmax(q k^T) v for q [b, h, s, d], k/v [b, kv_h, s, d] -> [b, h, s, d]."""
        ...
