"""One decoder layer: attention and MLP, serial or parallel, with pre/post/sandwich/reordered norms."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tplus_dist.model.attention import Attention
from tplus_dist.model.mlp import MLP
from tplus_dist.model.norms import make_norm

if TYPE_CHECKING:
    from tplus_dist.backends.base import LayerProvider
    from tplus_dist.config.model import ModelConfig
    from tplus_dist.model.positions import Rotary


class Block(nn.Module):
    """serial:   pre       h = x + A(n1(x));        y = h + M(n2(h))
                 post      h = n1(x + A(x));        y = n2(h + M(h))
                 sandwich  h = x + p1(A(n1(x)));    y = h + p2(M(n2(h)))
                 reordered h = x + p1(A(x));        y = h + p2(M(h))        (OLMo 2: no pre-norm)
    parallel:    pre       y = x + A(n1(x)) + M(n1(x))          (one norm: GPT-J, PaLM)
                 post      y = n1(x + A(x) + M(x))
                 sandwich  y = x + p1(A(n1(x))) + p2(M(n1(x)))
                 reordered y = x + p1(A(x)) + p2(M(x))"""

    def __init__(self, cfg: ModelConfig, layer: int, provider: LayerProvider, rotary: Rotary | None) -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.parallel = cfg.block == "parallel"

        def norm() -> nn.Module:
            return make_norm(provider, cfg, cfg.d_model)

        self.attn = Attention(cfg, layer, provider, rotary)
        self.mlp = MLP(cfg, provider)
        reordered = self.placement == "reordered"
        self.norm1 = None if reordered else norm()
        self.norm2 = None if reordered or (self.parallel and self.placement != "sandwich") else norm()
        if self.placement in ("sandwich", "reordered"):
            self.post_attn_norm, self.post_mlp_norm = norm(), norm()
            if self.parallel:  # the MLP reads norm1's output, so norm2 is its post-norm
                self.norm2 = None
        self.dropout = cfg.resid_dropout
        self.provider = provider  # (its sequence-parallel pieces: the residual stream's dropout and adaLN's gradient)
        # adaLN: shift and scale per pre-norm (one norm for a parallel block), plus a gate per branch (adaln_zero)
        self.gated = cfg.adaln == "adaln_zero"
        n_mod = 0
        if cfg.adaln != "none":
            n_mod = (2 if self.parallel else 4) + (2 if self.gated else 0)
        # whole on every rank: its input (the condition) and its uses (the whole hidden state) are replicated
        self.ada = nn.Linear(cfg.d_model, n_mod * cfg.d_model) if n_mod else None

    def _modulated(self, x: torch.Tensor, cond: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Pre-norm blocks under adaLN: norm(x) * (1 + scale) + shift, (1 + gate) * branch."""
        assert self.ada is not None and self.norm1 is not None  # adaLN: pre-norm only (ModelConfig.validate)
        m = (
            self.provider.shared_by_sequence(self.ada(F.silu(cond)))
            .unsqueeze(1)
            .chunk(self.ada.out_features // x.shape[-1], dim=-1)
        )
        if self.parallel:
            shift, scale, *gates = m
            h = self.norm1(x) * (1 + scale) + shift
            a, f = self._drop(self.attn(h, bias)), self._drop(self.mlp(h))
            if gates:
                a, f = a * (1 + gates[0]), f * (1 + gates[1])
            return x + a + f
        assert self.norm2 is not None
        shift1, scale1, shift2, scale2, *gates = m
        a = self._drop(self.attn(self.norm1(x) * (1 + scale1) + shift1, bias))
        x = x + (a * (1 + gates[0]) if gates else a)
        f = self._drop(self.mlp(self.norm2(x) * (1 + scale2) + shift2))
        return x + (f * (1 + gates[1]) if gates else f)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.provider.sequence_dropout(x, self.dropout, self.training)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``bias``: a relative bias shared by every layer (T5), passed to attention. ``cond``: the sequence's
        condition embedding [b, d] (adaLN); None runs the plain block."""
        if cond is not None and self.ada is not None:
            return self._modulated(x, cond, bias)
        if self.norm1 is None:  # reordered: each sublayer reads the residual stream, its output is normed
            a = self._drop(self.post_attn_norm(self.attn(x, bias)))
            if self.parallel:
                return x + a + self._drop(self.post_mlp_norm(self.mlp(x)))
            x = x + a
            return x + self._drop(self.post_mlp_norm(self.mlp(x)))
        if self.parallel:
            if self.placement == "pre":
                h = self.norm1(x)
                return x + self._drop(self.attn(h, bias)) + self._drop(self.mlp(h))
            if self.placement == "post":
                return self.norm1(x + self._drop(self.attn(x, bias)) + self._drop(self.mlp(x)))
            h = self.norm1(x)
            return x + self._drop(self.post_attn_norm(self.attn(h, bias))) + self._drop(self.post_mlp_norm(self.mlp(h)))
        assert self.norm2 is not None
        if self.placement == "pre":
            x = x + self._drop(self.attn(self.norm1(x), bias))
            return x + self._drop(self.mlp(self.norm2(x)))
        if self.placement == "post":
            x = self.norm1(x + self._drop(self.attn(x, bias)))
            return self.norm2(x + self._drop(self.mlp(x)))
        x = x + self._drop(self.post_attn_norm(self.attn(self.norm1(x), bias)))
        return x + self._drop(self.post_mlp_norm(self.mlp(self.norm2(x))))
