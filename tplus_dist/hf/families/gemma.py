"""GemmaForCausalLM (model_type 'gemma', HF modeling_gemma.py): Llama with the embeddings scaled by sqrt(d_model),
(1 + w) norm gains and a gated GELU."""

from __future__ import annotations

from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _llama_like_rules

GEMMA = Family(
    model_type="gemma",
    arch="GemmaForCausalLM",
    spec=Spec(norm="rmsnorm", embed_scale=True),
    keys=Keys(),
    to_hf=lambda cfg: {"attention_bias": False, "rope_scaling": None},
    from_hf=lambda hf: {"norm_unit_offset": True, "embed_scale": True},
    rules=lambda cfg: _llama_like_rules(cfg, unit_offset=True),
    dropout=_ATTN_DROPOUT,
)
