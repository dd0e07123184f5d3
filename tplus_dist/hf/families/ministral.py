"""MinistralForCausalLM (model_type 'ministral'): Llama with per-layer sliding windows (layer_types)."""

from __future__ import annotations

from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _layer_types, _llama_like_rules, _windows_from_hf

MINISTRAL = Family(
    model_type="ministral",
    arch="MinistralForCausalLM",
    spec=Spec(norm="rmsnorm", sliding="any"),
    keys=Keys(),
    to_hf=_layer_types,
    from_hf=lambda hf: _windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
)
