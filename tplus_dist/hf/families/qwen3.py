"""Qwen3ForCausalLM (model_type 'qwen3', HF modeling_qwen3.py): Llama with per-head RMSNorm QK-norm, any layer
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


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "rope_scaling": None, "use_sliding_window": any(_local(cfg)), **_layer_types(cfg)}


QWEN3 = Family(
    model_type="qwen3",
    arch="Qwen3ForCausalLM",
    spec=Spec(norm="rmsnorm", qk_norm=("rmsnorm",), sliding="any"),
    keys=Keys(),
    to_hf=_qwen3_to_hf,
    from_hf=lambda hf: {
        "qk_norm": "rmsnorm",
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    },
    rules=lambda cfg: _llama_like_rules(cfg, qk_norm=True),
    dropout=_ATTN_DROPOUT,
)
