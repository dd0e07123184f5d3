"""Olmo2ForCausalLM (model_type 'olmo2'): OLMo 2 (arXiv 2501.00656; HF modeling_olmo2.py): RMSNorm after each
sublayer, before the residual add, and no input norms (norm_placement reordered); QK-norm over the whole q and k
projections (qk_norm_scope projection)"""

from __future__ import annotations

from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _llama_like_rules

OLMO2 = Family(
    model_type="olmo2",
    arch="Olmo2ForCausalLM",
    spec=Spec(norm="rmsnorm", norm_placement=("reordered",), qk_norm=("rmsnorm",), qk_norm_scope=("projection",)),
    keys=Keys(),
    to_hf=lambda cfg: {"attention_bias": False, "rope_scaling": None},
    from_hf=lambda hf: {},
    rules=lambda cfg: _llama_like_rules(cfg, qk_norm=True, reordered=True),
    dropout=_ATTN_DROPOUT,
)
