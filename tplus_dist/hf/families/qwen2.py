"""Qwen2ForCausalLM (model_type 'qwen2', HF modeling_qwen2.py): Llama with biases on q, k and v only, any layer
pattern."""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import (
    _ATTN_DROPOUT,
    Family,
    Keys,
    Spec,
    _layer_types,
    _llama_like_rules,
    _local,
    _windows_from_hf,
)


def _qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"rope_scaling": None, "use_sliding_window": any(_local(cfg)), **_layer_types(cfg)}


# Qwen2 (HF modeling_qwen2.py): Llama with biases on q, k and v only (none on o or the MLP), tied or untied
QWEN2 = Family(
    model_type="qwen2",
    arch="Qwen2ForCausalLM",
    spec=Spec(norm="rmsnorm", qkv_bias=(True, False), sliding="any"),
    keys=Keys(),
    to_hf=_qwen2_to_hf,
    from_hf=lambda hf: {
        "qkv_bias": True,
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    },
    rules=lambda cfg: _llama_like_rules(cfg, qkv_bias=True),
    dropout=_ATTN_DROPOUT,
)
