"""Starcoder2ForCausalLM (model_type 'starcoder2'): Starcoder2 (HF modeling_starcoder2.py): LayerNorm, RoPE, GQA, a
plain MLP, biases on every linear or none"""

from __future__ import annotations

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, PLAIN_ACTS, Family, Keys, Rule, Spec, _Rules


def _starcoder2_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    b = cfg.linear_bias
    r.vocab("model.embed_tokens.weight", "embed.weight")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        r.attention(f"{h}.self_attn", o, ("q_proj", "k_proj", "v_proj", "o_proj"), hf_bias=b)
        r.linear(f"{h}.mlp.c_fc", f"{o}.mlp.w_up", r.ffn, hf_bias=b)
        r.linear(f"{h}.mlp.c_proj", f"{o}.mlp.w_down", cfg.d_model, hf_bias=b)
        r.norm(f"{h}.input_layernorm", f"{o}.norm1")
        r.norm(f"{h}.post_attention_layernorm", f"{o}.norm2")
    r.norm("model.norm", "final_norm")
    r.head("lm_head.weight")
    return r.out


STARCODER2 = Family(
    model_type="starcoder2",
    arch="Starcoder2ForCausalLM",
    spec=Spec(norm="layernorm", activation=PLAIN_ACTS, linear_bias=(False, True), free_head_dim=False),
    keys=Keys(head_dim=None, norm_eps="norm_epsilon"),
    to_hf=lambda cfg: {"use_bias": cfg.linear_bias, "rope_scaling": None, "sliding_window": None},
    from_hf=lambda hf: {"linear_bias": bool(hf.use_bias), "norm_bias": True},
    rules=_starcoder2_rules,
    dropout={"embedding_dropout": ("embed_dropout",), "residual_dropout": ("resid_dropout",), **_ATTN_DROPOUT},
)
