"""Gemma2ForCausalLM (model_type 'gemma2', HF modeling_gemma2.py): sandwich norms, attention and final logit
soft-caps, any softmax scale (query_pre_attn_scalar), per-layer sliding windows."""

from __future__ import annotations

import math
from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _layer_types, _llama_like_rules, _windows_from_hf


def _gemma2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "attention_bias": False,
        # scaling = query_pre_attn_scalar ** -0.5, so any softmax scale s is query_pre_attn_scalar = 1 / s^2
        "query_pre_attn_scalar": 1.0 / cfg.attn_scale**2,
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
        **_layer_types(cfg),
    }


def _gemma2_from_hf(hf: Any) -> dict[str, Any]:
    scale = hf.query_pre_attn_scalar**-0.5
    return {
        "norm_unit_offset": True,
        "embed_scale": True,
        "norm_placement": "sandwich",
        "softmax_scale": None if math.isclose(scale, hf.head_dim**-0.5, rel_tol=1e-12) else scale,
        "attn_softcap": getattr(hf, "attn_logit_softcapping", None),
        "final_logit_softcap": hf.final_logit_softcapping,
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    }


_GEMMA2_SPEC = Spec(
    norm="rmsnorm",
    norm_placement=("sandwich",),
    sliding="any",
    attn_scale="any",
    attn_softcap=True,
    final_logit_softcap=True,
    embed_scale=True,
)

GEMMA2 = Family(
    model_type="gemma2",
    arch="Gemma2ForCausalLM",
    spec=_GEMMA2_SPEC,
    keys=Keys(activation="hidden_activation"),
    to_hf=_gemma2_to_hf,
    from_hf=_gemma2_from_hf,
    rules=lambda cfg: _llama_like_rules(cfg, unit_offset=True, sandwich=True),
    dropout=_ATTN_DROPOUT,
)
