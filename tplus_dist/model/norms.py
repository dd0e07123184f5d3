"""LayerNorm, RMSNorm and BiasNorm, computed in fp32 whatever the activation dtype (fp64 stays fp64)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tplus_dist.backends.base import LayerProvider
    from tplus_dist.config.model import ModelConfig, NormKind


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (``.float()`` would round fp64 down)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # applied to the gain and bias before use (a tensor-parallel provider sets one that sums their
        # gradients over the ranks, for norms that see only this rank's heads)
        self.param_map: nn.Module | None = None

    def _p(self, t: torch.Tensor) -> torch.Tensor:
        return _upcast(self.param_map(t) if self.param_map is not None else t)


class RMSNorm(_Norm):
    """x / rms(x) * g. With unit_offset the stored weight is g - 1 (Gemma), initialised to 0."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._p(self.weight) + 1.0 if self.unit_offset else self._p(self.weight)
        return F.rms_norm(_upcast(x), (x.shape[-1],), w, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)


class LayerNorm(_Norm):
    """(x - mean) / std * g (+ b); the bias is optional (OLMo, PaLM drop it)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._p(self.weight) + 1.0 if self.unit_offset else self._p(self.weight)
        b = self._p(self.bias) if self.bias is not None else None
        return F.layer_norm(_upcast(x), (x.shape[-1],), w, b, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class BiasNorm(_Norm):
    """Zipformer's BiasNorm (Yao et al. 2023): x / RMS(x - b) * exp(s), with a learned per-channel bias b (zeros)
    and one learned log-scale s (zero). The bias keeps the length information LayerNorm's centring removes; eps is
    added under the square root, as in the other norms. (unit_offset does not apply: the scale is exp(s).)"""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(1))  # (not 0-d: DeepSpeed broadcasts parameters as bytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _upcast(x)
        ms = (xf - self._p(self.bias)).pow(2).mean(-1, keepdim=True)
        return (xf * torch.rsqrt(ms + self.eps) * self._p(self.log_scale).exp()).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.log_scale)


def make_norm(
    provider: LayerProvider,
    cfg: ModelConfig,
    dim: int,
    kind: NormKind | None = None,
    *,
    per_head: bool = False,
    split: bool = False,
) -> nn.Module:
    """A norm of the model's kind (or ``kind``) with the model's eps, bias and gain convention; ``per_head``
    for QK-norm, which normalizes each of this rank's heads; ``split`` for QK-norm over a whole projection of
    ``dim`` features that tensor parallelism splits over the ranks (see LayerProvider.norm)."""
    return provider.norm(
        kind or cfg.norm,
        dim,
        eps=cfg.norm_eps,
        bias=cfg.norm_bias,
        unit_offset=cfg.norm_unit_offset,
        per_head=per_head,
        split=split,
    )


def build_norm(kind: str, dim: int, *, eps: float, bias: bool, unit_offset: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, unit_offset)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias, unit_offset)
    if kind == "biasnorm":
        return BiasNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}")
