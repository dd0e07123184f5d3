"""Initialization schemes: GPT-2, T5 / Mesh-TensorFlow, muP."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig
    from tplus_dist.model.decoder import Decoder


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, typed: providers return plain nn.Modules."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight


def _normal(module: nn.Module | None, std: float) -> None:
    if module is not None:
        nn.init.normal_(module_weight(module), mean=0.0, std=std)


def init_weights(model: Decoder, cfg: ModelConfig) -> None:
    """GPT-2: N(0, 0.02) everywhere, residual output projections N(0, 0.02 / sqrt(2 n_layers)).
    T5: q ~ (d_model d_kv)^-1/2, k, v ~ d_model^-1/2, o ~ (n_heads d_kv)^-1/2, MLP in ~ d_model^-1/2,
        out ~ d_ff^-1/2, embedding ~ 1 (and no 1/sqrt(d_k) in the softmax: see attn_scale).
    muP: hidden matrices N(0, std / sqrt(width_mult)) (fan-in scaling relative to the base width),
        embeddings and head N(0, std) (their multipliers carry the width dependence).
    Biases are zero; norm gains one (zero when stored with a unit offset)."""
    std = cfg.init_std
    depth = 1.0 / math.sqrt(2 * cfg.n_layers)  # each layer adds two residual branches
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset) and not list(module.children()):
            reset()  # norms: ones / zeros; linears: replaced below
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and not hasattr(module, "eps"):
            nn.init.zeros_(bias)
    if cfg.init == "t5":
        d, dkv, h = cfg.d_model, cfg.dim_head, cfg.n_heads
        _normal(model.embed, 1.0)
        if model.pos_embed is not None:
            _normal(model.pos_embed, 1.0)
        for layer in model.blocks():
            a, m = layer.attn, layer.mlp
            _normal(a.wq, (d * dkv) ** -0.5)
            _normal(a.wk, d**-0.5)
            _normal(a.wv, d**-0.5)
            _normal(a.wo, (h * dkv) ** -0.5)
            for lin in (m.w_gate, m.w_up):
                if lin is not None:
                    _normal(lin, d**-0.5)
            _normal(m.w_down, cfg.ffn_dim**-0.5)
        if model.head is not None:
            _normal(model.head, d**-0.5)
        return
    hidden_std = std / math.sqrt(cfg.width_mult) if cfg.init == "mup" else std
    _normal(model.embed, std)
    if model.pos_embed is not None:
        _normal(model.pos_embed, std)
    for layer in model.blocks():
        a, m = layer.attn, layer.mlp
        for lin in (a.wq, a.wk, a.wv, m.w_gate, m.w_up):
            if lin is not None:
                _normal(lin, hidden_std)
        _normal(a.wo, hidden_std * depth)
        _normal(m.w_down, hidden_std * depth)
    if model.head is not None:
        _normal(model.head, std)
