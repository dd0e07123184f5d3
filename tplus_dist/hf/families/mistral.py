"""MistralForCausalLM (model_type 'mistral'): Llama with a sliding window on every layer."""

from __future__ import annotations

from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Spec, _llama_like_rules, _windows_from_hf

MISTRAL = Family(
    model_type="mistral",
    arch="MistralForCausalLM",
    spec=Spec(norm="rmsnorm", sliding="all"),
    keys=Keys(),
    to_hf=lambda cfg: {"sliding_window": cfg.sliding_window},
    from_hf=lambda hf: _windows_from_hf(hf, [True] * hf.num_hidden_layers),
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
    ignore=(r"rotary_emb\.inv_freq$",),
)
