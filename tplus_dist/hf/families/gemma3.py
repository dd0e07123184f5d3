"""Gemma3ForCausalLM (model_type 'gemma3_text', HF modeling_gemma3.py): Gemma 2 with per-head QK-norm and no
attention soft-cap."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, _llama_like_rules, _local
from tplus_dist.hf.families.gemma2 import _GEMMA2_SPEC, _gemma2_from_hf, _gemma2_to_hf


def _gemma3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    # one theta for both rotary tables; attn_logit_softcapping stays None: Gemma 3's attention never applies it
    out = _gemma2_to_hf(cfg)
    out.update(rope_local_base_freq=cfg.rope_theta, rope_scaling=None, use_bidirectional_attention=False)
    return out


def _gemma3_from_hf(hf: Any) -> dict[str, Any]:
    out = _gemma2_from_hf(hf)
    out["qk_norm"] = "rmsnorm"
    out["attn_softcap"] = None  # Gemma3Attention does not pass attn_logit_softcapping to the kernel
    if all(t == "sliding_attention" for t in hf.layer_types):
        out["rope_theta"] = hf.rope_local_base_freq
    return out


def _gemma3_skip(cfg: ModelConfig) -> set[str]:
    """Gemma 3 has a global and a local rotary base; only the one some layer uses has to equal ours."""
    local = _local(cfg)
    return (
        {"attn_logit_softcapping"}
        | ({"rope_theta"} if all(local) else set())
        | (set() if any(local) else {"rope_local_base_freq"})
    )


GEMMA3 = Family(
    model_type="gemma3_text",
    arch="Gemma3ForCausalLM",
    spec=replace(_GEMMA2_SPEC, qk_norm=("rmsnorm",), attn_softcap=False),
    keys=Keys(activation="hidden_activation"),
    to_hf=_gemma3_to_hf,
    from_hf=_gemma3_from_hf,
    rules=lambda cfg: _llama_like_rules(cfg, unit_offset=True, qk_norm=True, sandwich=True),
    dropout=_ATTN_DROPOUT,
    skip_compare=_gemma3_skip,
)
