"""Qwen3ForCausalLM (model_type 'qwen3', HF modeling_qwen3.py): Llama with per-head RMSNorm QK-norm, and layer
patterns whose full-attention layers all come first (Qwen3Config's max_window_layers, as Qwen2's: layers from that
index on slide)."""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import (
    _ATTN_DROPOUT,
    Family,
    Keys,
    Spec,
    _fmt,
    _layer_types,
    _llama_like_rules,
    _local,
    _windows_from_hf,
)
from tplus_dist.hf.families.qwen2 import _max_window_layers


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = {"attention_bias": False, "rope_scaling": None, "use_sliding_window": any(_local(cfg)), **_layer_types(cfg)}
    k = _max_window_layers(cfg)
    if k is not None:  # it must say what layer_types says (another pattern is refused by _qwen3_check)
        out["max_window_layers"] = k
    return out


def _qwen3_check(cfg: ModelConfig) -> list[str]:
    if _max_window_layers(cfg) is not None:
        return []
    return [
        f"model.layer_pattern={_fmt(cfg.layer_pattern)}: qwen3 slides the layers from max_window_layers on, so its "
        "full-attention layers must all come first"
    ]


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
    check=_qwen3_check,
    # without sliding layers max_window_layers means nothing
    skip_compare=lambda cfg: set() if any(_local(cfg)) else {"max_window_layers"},
)
