"""Feed-forward: plain (act(x W_up) W_down) or gated (act(x W_gate) * x W_up) W_down."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tplus_dist.backends.base import LayerProvider
    from tplus_dist.config.model import ModelConfig


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def swoosh_r(x: torch.Tensor) -> torch.Tensor:
    """Zipformer's SwooshR: log(1 + exp(x - 1)) - 0.08 x - 0.313261687 (zero at x = 0)."""
    return F.softplus(x - 1.0) - 0.08 * x - 0.313261687


def swoosh_l(x: torch.Tensor) -> torch.Tensor:
    """Zipformer's SwooshL: log(1 + exp(x - 4)) - 0.08 x - 0.035."""
    return F.softplus(x - 4.0) - 0.08 * x - 0.035


# the one place an activation name becomes code
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swooshr": swoosh_r,
    "swooshl": swoosh_l,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": _gelu_tanh,
    "reglu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, provider: LayerProvider) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.gated
        d, f, bias = cfg.d_model, cfg.ffn_dim, cfg.linear_bias
        self.w_gate = provider.linear(d, f, bias=bias, role="column") if self.gated else None
        self.w_up = provider.linear(d, f, bias=bias, role="column")
        self.w_down = provider.linear(f, d, bias=bias, role="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is not None:
            return self.w_down(self.activation(self.w_gate(x), self.w_up(x)))
        return self.w_down(self.activation(self.w_up(x)))

    def activation(self, h: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        """act(h), times ``up`` for a GLU ([..., ffn_dim] each): the piece selective recompute's mlp_act recomputes
        (train/recompute.py)."""
        a = self.act(h)
        return a * up if up is not None else a
