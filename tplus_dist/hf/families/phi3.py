"""Phi3ForCausalLM (model_type 'phi3'): Phi-3 (HF modeling_phi3.py): Llama with q, k, v fused into qkv_proj and gate,
up into gate_up_proj; partial rotary"""

from __future__ import annotations

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import _ATTN_DROPOUT, Family, Keys, Rule, Spec, _fused, _rotary_factor, _Rules


def _phi3_rules(cfg: ModelConfig) -> list[Rule]:
    r = _Rules(cfg)
    r.vocab("model.embed_tokens.weight", "embed.weight")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        r.qkv(f"{h}.self_attn.qkv_proj", o, lambda n, ours, w: _fused(n, ours, [r.q_out, r.kv_out, r.kv_out]), False)
        r.linear(f"{h}.self_attn.o_proj", f"{o}.attn.wo", cfg.d_model, hf_bias=False)
        r.add(_fused(f"{h}.mlp.gate_up_proj.weight", (f"{o}.mlp.w_gate.weight", f"{o}.mlp.w_up.weight"), [r.ffn] * 2))
        r.linear(f"{h}.mlp.down_proj", f"{o}.mlp.w_down", cfg.d_model, hf_bias=False)
        r.norm(f"{h}.input_layernorm", f"{o}.norm1")
        r.norm(f"{h}.post_attention_layernorm", f"{o}.norm2")
    r.norm("model.norm", "final_norm")
    r.head("lm_head.weight")
    return r.out


PHI3 = Family(
    model_type="phi3",
    arch="Phi3ForCausalLM",
    spec=Spec(norm="rmsnorm", partial_rope=True, free_head_dim=False),
    keys=Keys(head_dim=None),
    to_hf=lambda cfg: {
        "partial_rotary_factor": _rotary_factor(cfg.rope_dim, cfg.dim_head),
        "rope_scaling": None,
        "sliding_window": None,
    },
    from_hf=lambda hf: {"rope_fraction": hf.partial_rotary_factor},
    rules=_phi3_rules,
    dropout={"embd_pdrop": ("embed_dropout",), "resid_pdrop": ("resid_dropout",), **_ATTN_DROPOUT},
)
