"""GPT2LMHeadModel (model_type 'gpt2'): GPT-2"""

from __future__ import annotations

import math
from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import PLAIN_ACTS, Family, HFLoadError, Keys, Rule, Spec, _fused, _hf_act, _Rules


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "activation_function": _hf_act(cfg),
        "scale_attn_weights": not math.isclose(cfg.attn_scale, 1.0),
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    }


def _gpt2_from_hf(hf: Any) -> dict[str, Any]:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise HFLoadError("gpt2 scale_attn_by_inverse_layer_idx=true: tplus_dist scales every layer alike")
    return {
        "position": "learned",
        "linear_bias": True,
        "norm_bias": True,
        "d_ff": hf.n_inner or 4 * hf.n_embd,
        "softmax_scale": None if hf.scale_attn_weights else 1.0,
    }


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    d = cfg.d_model
    r.vocab("transformer.wte.weight", "embed.weight")
    r.positions("transformer.wpe.weight")
    for i in range(cfg.n_layers):
        h, o = f"transformer.h.{i}", f"layers.{i}"
        r.norm(f"{h}.ln_1", f"{o}.norm1")
        r.qkv(f"{h}.attn.c_attn", o, lambda n, ours, w: _fused(n, ours, [d, d, d], transpose=w), hf_bias=True)
        r.linear(f"{h}.attn.c_proj", f"{o}.attn.wo", d, hf_bias=True, conv1d=True)
        r.norm(f"{h}.ln_2", f"{o}.norm2")
        r.linear(f"{h}.mlp.c_fc", f"{o}.mlp.w_up", r.ffn, hf_bias=True, conv1d=True)
        r.linear(f"{h}.mlp.c_proj", f"{o}.mlp.w_down", d, hf_bias=True, conv1d=True)
    r.norm("transformer.ln_f", "final_norm")
    r.head("lm_head.weight")
    return r.out


GPT2 = Family(
    model_type="gpt2",
    arch="GPT2LMHeadModel",
    spec=Spec(
        norm="layernorm",
        position=("learned", "none"),
        activation=PLAIN_ACTS,
        linear_bias=(False, True),
        gqa=False,
        free_head_dim=False,
        attn_scale="default_or_one",
    ),
    keys=Keys(
        d_model="n_embd",
        n_layers="n_layer",
        n_heads="n_head",
        kv_heads=None,
        head_dim=None,
        d_ff="n_inner",
        seq_len="n_positions",
        norm_eps="layer_norm_epsilon",
        rope_theta=None,
        activation="activation_function",
    ),
    to_hf=_gpt2_to_hf,
    from_hf=_gpt2_from_hf,
    rules=_gpt2_rules,
    dropout={"embd_pdrop": ("embed_dropout",), "attn_pdrop": ("attn_dropout",), "resid_pdrop": ("resid_dropout",)},
    ignore=(r"\.attn\.(masked_)?bias$",),
)
