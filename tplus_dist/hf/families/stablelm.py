"""StableLmForCausalLM (model_type 'stablelm'): StableLM (HF modeling_stablelm.py): LayerNorm with gated MLPs,
partial rotary, optional biases on q, k, v only, serial or parallel block (the parallel one with one norm, as
ours)"""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, Family, HFLoadError, Keys, Rule, Spec, _rotary_factor, _Rules


def _stablelm_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    r.vocab("model.embed_tokens.weight", "embed.weight")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        r.attention(f"{h}.self_attn", o, names, hf_bias=cfg.qkv_bias, hf_out_bias=False)
        for hw, ow in (("gate_proj", "w_gate"), ("up_proj", "w_up")):
            r.linear(f"{h}.mlp.{hw}", f"{o}.mlp.{ow}", r.ffn, hf_bias=False)
        r.linear(f"{h}.mlp.down_proj", f"{o}.mlp.w_down", cfg.d_model, hf_bias=False)
        r.norm(f"{h}.input_layernorm", f"{o}.norm1")
        if cfg.block == "serial":
            r.norm(f"{h}.post_attention_layernorm", f"{o}.norm2")
    r.norm("model.norm", "final_norm")
    r.head("lm_head.weight")
    return r.out


def _stablelm_from_hf(hf: Any) -> dict[str, Any]:
    if hf.qk_layernorm:
        raise HFLoadError("stablelm qk_layernorm=true: its QK LayerNorm has a gain per head; tplus_dist's is shared")
    return {
        "qkv_bias": bool(hf.use_qkv_bias),
        "block": "parallel" if hf.use_parallel_residual else "serial",
        "rope_fraction": hf.partial_rotary_factor,
        "norm_bias": True,
    }


STABLELM = Family(
    model_type="stablelm",
    arch="StableLmForCausalLM",
    spec=Spec(
        norm="layernorm", block=("serial", "parallel"), partial_rope=True, qkv_bias=(False, True), free_head_dim=False
    ),
    keys=Keys(head_dim=None, norm_eps="layer_norm_eps"),
    to_hf=lambda cfg: {
        "use_qkv_bias": cfg.qkv_bias,
        "qk_layernorm": False,
        "use_parallel_residual": cfg.block == "parallel",
        "partial_rotary_factor": _rotary_factor(cfg.rope_dim, cfg.dim_head),
        "rope_scaling": None,
    },
    from_hf=_stablelm_from_hf,
    rules=_stablelm_rules,
    dropout={"hidden_dropout": ("resid_dropout",), **_ATTN_DROPOUT},
)
