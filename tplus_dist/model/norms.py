"""LayerNorm and RMSNorm, computed in fp32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * g. With unit_offset the stored weight is g - 1 (Gemma), initialised to 0."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() + 1.0 if self.unit_offset else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), w, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)


class LayerNorm(nn.Module):
    """(x - mean) / std * g (+ b); the bias is optional (OLMo, PaLM drop it)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() + 1.0 if self.unit_offset else self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def build_norm(kind: str, dim: int, *, eps: float, bias: bool, unit_offset: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, unit_offset)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias, unit_offset)
    raise ValueError(f"unknown norm {kind!r}")
