"""PhiForCausalLM (model_type 'phi'): Phi (1, 1.5, 2): parallel block with one LayerNorm, partial rotary, optional
per-head LayerNorm qk-norm"""

from __future__ import annotations

from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, PLAIN_ACTS, Family, Keys, Rule, Spec, _rotary_factor, _Rules, _zeros


def _phi_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "partial_rotary_factor": _rotary_factor(cfg.rope_dim, cfg.dim_head),
        "qk_layernorm": cfg.qk_norm == "layernorm",
        "rope_scaling": None,
    }


def _phi_from_hf(hf: Any) -> dict[str, Any]:
    return {
        "rope_fraction": hf.partial_rotary_factor,
        "qk_norm": "layernorm" if hf.qk_layernorm else "none",
        "linear_bias": True,
        "norm_bias": True,
    }


def _phi_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    r.vocab("model.embed_tokens.weight", "embed.weight")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        r.attention(f"{h}.self_attn", o, ("q_proj", "k_proj", "v_proj", "dense"), hf_bias=True)
        if cfg.qk_norm == "layernorm":
            r.norm(f"{h}.self_attn.q_layernorm", f"{o}.attn.q_norm", "qk")
            r.norm(f"{h}.self_attn.k_layernorm", f"{o}.attn.k_norm", "qk")
        r.linear(f"{h}.mlp.fc1", f"{o}.mlp.w_up", r.ffn, hf_bias=True)
        r.linear(f"{h}.mlp.fc2", f"{o}.mlp.w_down", cfg.d_model, hf_bias=True)
        r.norm(f"{h}.input_layernorm", f"{o}.norm1")
    r.norm("model.final_layernorm", "final_norm")
    r.head("lm_head.weight")
    r.add(_zeros("lm_head.bias", (cfg.vocab_size,), "tplus_dist's output head has no bias"))
    return r.out


PHI = Family(
    model_type="phi",
    arch="PhiForCausalLM",
    spec=Spec(
        norm="layernorm",
        block=("parallel",),
        partial_rope=True,
        activation=PLAIN_ACTS,
        qk_norm=("none", "layernorm"),
        linear_bias=(False, True),
        free_head_dim=False,
    ),
    keys=Keys(head_dim=None, norm_eps="layer_norm_eps"),
    to_hf=_phi_to_hf,
    from_hf=_phi_from_hf,
    rules=_phi_rules,
    dropout={"embd_pdrop": ("embed_dropout",), "resid_pdrop": ("resid_dropout",), **_ATTN_DROPOUT},
)
