"""GPTNeoXForCausalLM (model_type 'gpt_neox'): GPT-NeoX (Pythia): partial rotary, serial or parallel; our parallel
block's one norm is written twice"""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, PLAIN_ACTS, Family, Keys, Rule, Spec, _per_head, _rotary_factor, _Rules


def _neox_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    f = _rotary_factor(cfg.rope_dim, cfg.dim_head)
    return {
        "use_parallel_residual": cfg.block == "parallel",
        "attention_bias": cfg.linear_bias,
        "rotary_pct": f,
        "partial_rotary_factor": f,
        "rope_scaling": None,
    }


def _neox_from_hf(hf: Any) -> dict[str, Any]:
    return {
        "block": "parallel" if hf.use_parallel_residual else "serial",
        "rope_fraction": hf.rotary_pct,
        "linear_bias": hf.attention_bias,
        "norm_bias": True,
    }


def _neox_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.dim_head
    r.vocab("gpt_neox.embed_in.weight", "embed.weight")
    for i in range(cfg.n_layers):
        p, o = f"gpt_neox.layers.{i}", f"layers.{i}"
        r.norm(f"{p}.input_layernorm", f"{o}.norm1")
        # GPT-NeoX's parallel block normalizes the MLP input with its own LayerNorm; ours shares norm1
        r.norm(f"{p}.post_attention_layernorm", f"{o}.norm1" if cfg.block == "parallel" else f"{o}.norm2")
        r.qkv(f"{p}.attention.query_key_value", o, lambda n, ours, w: _per_head(n, ours, h, hd), cfg.linear_bias)
        r.linear(f"{p}.attention.dense", f"{o}.attn.wo", d, hf_bias=cfg.linear_bias)
        # the MLP always has biases, whatever attention_bias says
        r.linear(f"{p}.mlp.dense_h_to_4h", f"{o}.mlp.w_up", r.ffn, hf_bias=True)
        r.linear(f"{p}.mlp.dense_4h_to_h", f"{o}.mlp.w_down", d, hf_bias=True)
    r.norm("gpt_neox.final_layer_norm", "final_norm")
    r.head("embed_out.weight")
    return r.out


GPT_NEOX = Family(
    model_type="gpt_neox",
    arch="GPTNeoXForCausalLM",
    spec=Spec(
        norm="layernorm",
        block=("serial", "parallel"),
        partial_rope=True,
        activation=PLAIN_ACTS,
        linear_bias=(False, True),
        gqa=False,
        free_head_dim=False,
    ),
    keys=Keys(kv_heads=None, head_dim=None, norm_eps="layer_norm_eps", rope_theta="rotary_emb_base"),
    to_hf=_neox_to_hf,
    from_hf=_neox_from_hf,
    rules=_neox_rules,
    tied_head="embed_out.weight",
    dropout={"hidden_dropout": ("embed_dropout", "resid_dropout"), **_ATTN_DROPOUT},
    ignore=(r"\.attention\.(masked_)?bias$", r"rotary_emb\.inv_freq$"),
)
