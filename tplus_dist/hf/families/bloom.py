"""BloomForCausalLM (model_type 'bloom'): BLOOM: ALiBi and the embedding LayerNorm"""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import Family, Keys, Rule, Spec, _per_head, _Rules


def _bloom_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"apply_residual_connection_post_layernorm": False}


def _bloom_from_hf(hf: Any) -> dict[str, Any]:
    return {"activation": "gelu_tanh", "linear_bias": True, "norm_bias": True, "d_ff": 4 * hf.hidden_size}


def _bloom_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.dim_head
    r.vocab("transformer.word_embeddings.weight", "embed.weight")
    r.norm("transformer.word_embeddings_layernorm", "embed_norm", "embed")
    for i in range(cfg.n_layers):
        p, o = f"transformer.h.{i}", f"layers.{i}"
        r.norm(f"{p}.input_layernorm", f"{o}.norm1")
        r.qkv(f"{p}.self_attention.query_key_value", o, lambda n, ours, w: _per_head(n, ours, h, hd), hf_bias=True)
        r.linear(f"{p}.self_attention.dense", f"{o}.attn.wo", d, hf_bias=True)
        r.norm(f"{p}.post_attention_layernorm", f"{o}.norm2")
        r.linear(f"{p}.mlp.dense_h_to_4h", f"{o}.mlp.w_up", r.ffn, hf_bias=True)
        r.linear(f"{p}.mlp.dense_4h_to_h", f"{o}.mlp.w_down", d, hf_bias=True)
    r.norm("transformer.ln_f", "final_norm")
    r.head("lm_head.weight")
    return r.out


BLOOM = Family(
    model_type="bloom",
    arch="BloomForCausalLM",
    spec=Spec(
        norm="layernorm",
        position=("alibi",),
        activation=("gelu_tanh",),
        linear_bias=(False, True),
        gqa=False,
        free_head_dim=False,
        embed_norm=True,
        ffn_4x=True,
    ),
    keys=Keys(
        n_layers="n_layer",
        n_heads="n_head",
        kv_heads=None,
        head_dim=None,
        d_ff=None,
        seq_len=None,
        norm_eps="layer_norm_epsilon",
        rope_theta=None,
        activation=None,
    ),
    to_hf=_bloom_to_hf,
    from_hf=_bloom_from_hf,
    rules=_bloom_rules,
    dropout={"hidden_dropout": ("resid_dropout",), "attention_dropout": ("attn_dropout",)},
)
