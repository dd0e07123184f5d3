"""Qwen3ForCausalLM (model_type 'qwen3', HF modeling_qwen3.py): Llama with per-head RMSNorm QK-norm, and layer
patterns whose full-attention layers all come first (Qwen3Config's max_window_layers, as Qwen2's: layers from that
index on slide)."""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _llama_like_rules, _windows_from_hf
from tplus_dist.hf.families.qwen2 import skip_unused_max_window_layers, window_check, windows_to_hf


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "rope_scaling": None, **windows_to_hf(cfg)}


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
    check=window_check("qwen3"),
    skip_compare=skip_unused_max_window_layers,
)
