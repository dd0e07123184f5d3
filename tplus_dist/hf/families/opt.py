"""OPTForCausalLM (model_type 'opt'): OPT: GPT-2's choices plus post-norm (OPT-350m), no final norm and bias-free
linears"""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import PLAIN_ACTS, Family, Keys, Rule, Spec, _hf_act, _Rules


def _opt_check(cfg: ModelConfig) -> list[str]:
    if cfg.norm_placement == "post" and cfg.final_norm:
        return ["model.final_norm=true: opt's post-norm layers (do_layer_norm_before=false) have no final norm"]
    return []


def _opt_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    pre = cfg.norm_placement == "pre"
    return {
        "activation_function": _hf_act(cfg),
        "do_layer_norm_before": pre,
        "_remove_final_layer_norm": pre and not cfg.final_norm,
        "enable_bias": cfg.linear_bias,
        "word_embed_proj_dim": cfg.d_model,
        "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0,
    }


def _opt_from_hf(hf: Any) -> dict[str, Any]:
    pre = hf.do_layer_norm_before
    return {
        "position": "learned",
        "norm_placement": "pre" if pre else "post",
        "final_norm": pre and not getattr(hf, "_remove_final_layer_norm", False),
        "linear_bias": hf.enable_bias,
        "norm_bias": True,
        "norm_eps": 1e-5,
    }


def _opt_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    d, b = cfg.d_model, cfg.linear_bias
    p = "model.decoder"
    r.vocab(f"{p}.embed_tokens.weight", "embed.weight")
    r.positions(f"{p}.embed_positions.weight", offset=2)
    for i in range(cfg.n_layers):
        h, o = f"{p}.layers.{i}", f"layers.{i}"
        r.attention(f"{h}.self_attn", o, ("q_proj", "k_proj", "v_proj", "out_proj"), hf_bias=b)
        r.norm(f"{h}.self_attn_layer_norm", f"{o}.norm1")
        r.linear(f"{h}.fc1", f"{o}.mlp.w_up", r.ffn, hf_bias=b)
        r.linear(f"{h}.fc2", f"{o}.mlp.w_down", d, hf_bias=b)
        r.norm(f"{h}.final_layer_norm", f"{o}.norm2")
    if cfg.final_norm:
        r.norm(f"{p}.final_layer_norm", "final_norm")
    r.head("lm_head.weight")
    return r.out


OPT = Family(
    model_type="opt",
    arch="OPTForCausalLM",
    spec=Spec(
        norm="layernorm",
        norm_placement=("pre", "post"),
        position=("learned", "none"),
        activation=PLAIN_ACTS,
        linear_bias=(False, True),
        gqa=False,
        free_head_dim=False,
        final_norm=(True, False),
        norm_eps=1e-5,
    ),
    keys=Keys(
        kv_heads=None, head_dim=None, d_ff="ffn_dim", norm_eps=None, rope_theta=None, activation="activation_function"
    ),
    to_hf=_opt_to_hf,
    from_hf=_opt_from_hf,
    rules=_opt_rules,
    dropout={"dropout": ("resid_dropout",), "attention_dropout": ("attn_dropout",)},
    check=_opt_check,
)
