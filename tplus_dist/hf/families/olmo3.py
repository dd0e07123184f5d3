"""Olmo3ForCausalLM (model_type 'olmo3'): OLMo 3 (HF modeling_olmo3.py): OLMo 2 with per-layer sliding windows"""

from __future__ import annotations

from dataclasses import replace

from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, _layer_types, _llama_like_rules, _windows_from_hf
from tplus_dist.hf.families.olmo2 import OLMO2

OLMO3 = Family(
    model_type="olmo3",
    arch="Olmo3ForCausalLM",
    spec=replace(OLMO2.spec, sliding="any"),
    keys=Keys(),
    to_hf=lambda cfg: {"attention_bias": False, "rope_scaling": None, **_layer_types(cfg)},
    from_hf=lambda hf: _windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    rules=lambda cfg: _llama_like_rules(cfg, qk_norm=True, reordered=True),
    dropout=_ATTN_DROPOUT,
)
