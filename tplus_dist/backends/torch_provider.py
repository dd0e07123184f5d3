"""Plain-PyTorch layers: the default provider on CPU and GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tplus_dist.backends.base import LinearRole, WholeSequence
from tplus_dist.model.attention import AttentionCore
from tplus_dist.model.loss import lm_loss
from tplus_dist.model.norms import build_norm

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig, NormKind


class TorchProvider(WholeSequence):
    name = "torch"
    tp_size = 1
    tp_rank = 0

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def norm(
        self,
        kind: NormKind,
        dim: int,
        *,
        eps: float,
        bias: bool,
        unit_offset: bool,
        per_head: bool = False,
        split: bool = False,
    ) -> nn.Module:
        return build_norm(kind, dim, eps=eps, bias=bias, unit_offset=unit_offset)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def head_table(self, rows: int, n_heads: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(rows, n_heads))

    def across_heads(self) -> nn.Module | None:
        return None

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return AttentionCore(cfg, layer)

    def logits(self, x: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        # the padding rows exist for matmul shapes and tensor-parallel splits; slicing the weight (a
        # contiguous view) rather than the logits skips their compute and a copy of the logits
        return F.linear(x, weight[:vocab_size])

    def lm_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, z_loss: float, ignore_index: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss(logits, targets, z_loss=z_loss, ignore_index=ignore_index)
