"""LlamaForCausalLM (model_type 'llama', HF modeling_llama.py): RMSNorm, RoPE, gated MLPs, GQA/MQA, free head_dim,
biases on every linear or none."""

from __future__ import annotations

from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _llama_from_hf, _llama_like_rules, _llama_to_hf

LLAMA = Family(
    model_type="llama",
    arch="LlamaForCausalLM",
    spec=Spec(norm="rmsnorm", linear_bias=(False, True)),
    keys=Keys(),
    to_hf=_llama_to_hf,
    from_hf=_llama_from_hf,
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
    ignore=(r"rotary_emb\.inv_freq$",),
)
