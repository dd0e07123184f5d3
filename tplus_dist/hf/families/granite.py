"""GraniteForCausalLM (model_type 'granite'): Granite (HF modeling_granite.py): Llama with multipliers: on the
embeddings, inside the softmax, on the logits (and on each residual branch, which ours does not have: 1). muP
models export as Granite."""

from __future__ import annotations

import math
from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import (
    _ATTN_DROPOUT,
    Family,
    HFLoadError,
    Keys,
    Spec,
    _llama_from_hf,
    _llama_like_rules,
    _llama_to_hf,
    _logit_mult,
)


def _granite_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_llama_to_hf(cfg),
        "embedding_multiplier": math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0,
        "attention_multiplier": cfg.attn_scale,
        "logits_scaling": 1.0 / _logit_mult(cfg),  # HF divides the logits by it
        "residual_multiplier": 1.0,
    }


def _granite_from_hf(hf: Any) -> dict[str, Any]:
    d, h = hf.hidden_size, hf.num_attention_heads
    hd = getattr(hf, "head_dim", None) or d // h
    if not math.isclose(hf.residual_multiplier, 1.0):
        raise HFLoadError(f"granite residual_multiplier={hf.residual_multiplier}: tplus_dist's branches are unscaled")
    out = _llama_from_hf(hf)
    if math.isclose(hf.embedding_multiplier, math.sqrt(d), rel_tol=1e-9):
        out["embed_scale"] = True
    scale = hf.attention_multiplier
    out["softmax_scale"] = None if math.isclose(scale, hd**-0.5, rel_tol=1e-12) else scale
    if not math.isclose(hf.logits_scaling, 1.0) and math.isclose(hf.logits_scaling, math.sqrt(d), rel_tol=1e-9):
        out["output_logit_scale"] = True  # valid only tied: ModelConfig.validate says so otherwise
    return out


GRANITE = Family(
    model_type="granite",
    arch="GraniteForCausalLM",
    spec=Spec(norm="rmsnorm", linear_bias=(False, True), attn_scale="any", free_embed_scale=True, logit_mult=True),
    keys=Keys(),
    to_hf=_granite_to_hf,
    from_hf=_granite_from_hf,
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
)
