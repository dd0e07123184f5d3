"""Hugging Face ``transformers`` interop: export a `Decoder` as a transformers model family, load one back.

Every family is one table entry (`Family`): what it can represent (`Spec`), the config translation both ways
(``to_hf`` / ``from_hf``) and the parameter mapping (``rules``: one `Rule` per HF tensor, both ways). Export picks
the first family whose spec admits every architecture choice of the ``ModelConfig``, writes config.json and
safetensors weights, then reloads the folder with ``AutoModelForCausalLM`` and checks the logits. A choice that no
family computes is an `HFExportError` naming the field; nothing is exported "approximately".

Conventions worth knowing:

* Weights are written in fp32 (exact for fp32 and bf16 models); the check runs in fp32.
* Vocabulary: only the ``vocab_size`` real rows are written (HF ``vocab_size`` = ours); `load` pads the embedding
  back to ``padded_vocab_size`` with zero rows, which `Decoder.forward` never returns.
* Biases a family always has (GPT-2's Conv1D, LayerNorm biases, Phi's head bias, ...) are written as zeros when our
  model has none: the same function. `load` reads them back as biases, unless the config that `export` stores
  next to the HF one (key ``tplus_dist_model``) says there were none and they are still all zero.
* Gemma's ``(1 + w)`` norm gain is storage only: ``norm_unit_offset`` converts to and from every family.
* Dropout never changes the exported function (inference); it maps to the family's dropout keys where they exist
  and is otherwise dropped with a warning.
* transformers is imported lazily, inside the functions: importing tplus_dist must not import it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tplus_dist.config.base import ConfigError, from_dict, to_dict
from tplus_dist.config.model import ModelConfig
from tplus_dist.fsutil import respect_umask
from tplus_dist.model import Decoder, build_model

STASH_KEY = "tplus_dist_model"
"""config.json key under which `export` stores our full ModelConfig (training-only fields included)."""

VERIFY_TOL = 1e-4
"""`export` refuses a folder whose logits differ from ours by more than this, relative to max(1, max |logit|)."""


class HFExportError(ValueError):
    """The model cannot be written as any transformers family without changing its function."""


class HFLoadError(ValueError):
    """An HF folder uses something tplus_dist's decoder does not compute."""


# --------------------------------------------------------------------------------------------- field accounting
# Every ModelConfig field, and how export treats it. tests/parity checks this covers the dataclass exactly, so a new
# architecture field cannot be silently ignored by the export.
_ARCHITECTURE_FIELDS = [
    "vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "seq_len", "norm", "norm_eps",
    "norm_bias", "norm_placement", "embed_norm", "final_norm", "position", "rope_theta", "rope_fraction", "qk_norm",
    "qk_norm_scope", "qkv_bias", "softmax_scale", "attn_softcap", "softmax_off_by_one", "sliding_window",
    "layer_pattern", "activation", "linear_bias", "block", "tie_embeddings", "embed_scale", "output_logit_scale",
    "final_logit_softcap",
]  # fmt: skip
FIELD_HANDLING: dict[str, str] = {
    **dict.fromkeys(_ARCHITECTURE_FIELDS, "architecture: checked against each family's Spec and translated"),
    "norm_unit_offset": "storage only: norm gains are converted to the family's convention",
    "pad_vocab_multiple": "storage only: the padding rows are not exported",
    "d_ff_multiple": "only through d_ff (ffn_dim), which is checked",
    "init": "training-only, except through the attention scale and logit multiplier it implies (checked)",
    "mup_base_d_model": "training-only, except through the muP logit multiplier (checked)",
    "mup_output_mult": "training-only, except through the muP logit multiplier (checked)",
    "init_std": "training-only",
    "t5_bias_buckets": "only with position t5_bias, which no supported family computes (refused)",
    "t5_bias_max_distance": "only with position t5_bias, which no supported family computes (refused)",
    "t5_bias_shared": "only with position t5_bias, which no supported family computes (refused)",
    "shaw_max_distance": "only with position shaw, which no supported family computes (refused)",
    "adaln": "refused unless none: no supported family conditions its norms on a label",
    "n_conditions": "only with adaln (refused)",
    "z_loss": "training-only (loss)",
    "ignore_index": "training-only (loss)",
    "embed_dropout": "training-only: mapped to the family's dropout key where there is one",
    "attn_dropout": "training-only: mapped to the family's dropout key where there is one",
    "resid_dropout": "training-only: mapped to the family's dropout key where there is one",
}


# ----------------------------------------------------------------------------------------------------- tensor rules
@dataclass(frozen=True)
class Rule:
    """One HF tensor and the tensor(s) of ours it is made of, both ways. ``ours`` empty: an HF-only tensor, written
    as zeros and read back only while it is still zero."""

    hf: str
    ours: tuple[str, ...]
    to_hf: Callable[..., torch.Tensor]
    """our tensors (in ``ours`` order) -> the HF tensor"""
    from_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    """the HF tensor -> our tensors; raises HFLoadError where ours cannot hold it"""


def _same(hf: str, ours: str) -> Rule:
    return Rule(hf, (ours,), lambda t: t, lambda t: (t,))


def _transposed(hf: str, ours: str) -> Rule:
    """GPT-2's Conv1D stores [in, out]: x @ W + b."""
    return Rule(hf, (ours,), lambda t: t.t(), lambda t: (t.t(),))


def _zeros(hf: str, shape: Sequence[int], why: str) -> Rule:
    def back(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.count_nonzero(t):
            raise HFLoadError(f"{hf} is nonzero, but {why}")
        return ()

    return Rule(hf, (), lambda: torch.zeros(*shape), back)


def _rows(hf: str, ours: str, n: int, padded: int) -> Rule:
    """Vocabulary matrices: export the n real rows, load back padded with zero rows."""

    def back(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])]),)

    return Rule(hf, (ours,), lambda t: t[:n], back)


def _offset_rows(hf: str, ours: str, offset: int) -> Rule:
    """OPT's position table starts at row 2 (rows 0-1 serve left padding, which our decoder never sees)."""
    return Rule(hf, (ours,), lambda t: torch.cat([t.new_zeros(offset, t.shape[1]), t]), lambda t: (t[offset:],))


def _fused(hf: str, ours: tuple[str, ...], sizes: list[int], transpose: bool = False) -> Rule:
    """[q; k; v] concatenated along the output dimension (GPT-2's c_attn, a Conv1D when ``transpose``)."""

    def to(*ts: torch.Tensor) -> torch.Tensor:
        t = torch.cat(ts)
        return t.t() if transpose else t

    def back(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.contiguous() for p in (t.t() if transpose else t).split(sizes))

    return Rule(hf, ours, to, back)


def _per_head(hf: str, ours: tuple[str, ...], n_heads: int, head_dim: int) -> Rule:
    """GPT-NeoX / BLOOM query_key_value: output rows ordered [head, (q, k, v), head_dim]."""

    def to(*qkv: torch.Tensor) -> torch.Tensor:
        rest = qkv[0].shape[1:]
        parts = [t.reshape(n_heads, head_dim, *rest) for t in qkv]
        return torch.stack(parts, dim=1).reshape(3 * n_heads * head_dim, *rest)

    def back(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = t.shape[1:]
        t = t.reshape(n_heads, 3, head_dim, *rest)
        return tuple(t[:, i].reshape(n_heads * head_dim, *rest).contiguous() for i in range(3))

    return Rule(hf, ours, to, back)


def _gain(hf: str, ours: str, ours_offset: bool, hf_offset: bool) -> Rule:
    """A norm gain g, stored as g by most families and ours by default, as g - 1 by Gemma and ours with
    norm_unit_offset. Same-convention copies stay bit-exact."""
    if ours_offset == hf_offset:
        return _same(hf, ours)
    if ours_offset:  # ours g - 1 -> HF g
        return Rule(hf, (ours,), lambda t: t + 1.0, lambda t: (t - 1.0,))
    return Rule(hf, (ours,), lambda t: t - 1.0, lambda t: (t + 1.0,))


class _Rules:
    """Builds a family's rule list with the cfg-dependent cases (biases present or zero, norm conventions)."""

    def __init__(self, cfg: ModelConfig, hf_unit_offset: bool = False) -> None:
        self.cfg = cfg
        self.hf_unit_offset = hf_unit_offset
        self.out: list[Rule] = []
        hd = cfg.dim_head
        self.q_out, self.kv_out, self.ffn = cfg.n_heads * hd, cfg.kv_heads * hd, cfg.ffn_dim

    def add(self, *rules: Rule) -> None:
        self.out.extend(rules)

    def linear(
        self, hf: str, ours: str, n_out: int, hf_bias: bool, conv1d: bool = False, ours_bias: bool | None = None
    ) -> None:
        """``ours_bias``: whether our linear has a bias (default: linear_bias)."""
        self.add((_transposed if conv1d else _same)(f"{hf}.weight", f"{ours}.weight"))
        if self.cfg.linear_bias if ours_bias is None else ours_bias:
            self.add(_same(f"{hf}.bias", f"{ours}.bias"))
        elif hf_bias:
            self.add(_zeros(f"{hf}.bias", (n_out,), "the model has no bias there (linear_bias / qkv_bias false)"))

    def attention(
        self, hf: str, layer: str, names: tuple[str, str, str, str], hf_bias: bool, hf_out_bias: bool | None = None
    ) -> None:
        """Separate q, k, v, o projections, named ``names`` under ``hf``; ``hf_bias``: HF's q, k, v (and, unless
        ``hf_out_bias`` says otherwise, o) have biases. Ours has them on q, k, v with linear_bias or qkv_bias."""
        cfg = self.cfg
        outs = (self.q_out, self.kv_out, self.kv_out, cfg.d_model)
        hf_biases = (hf_bias, hf_bias, hf_bias, hf_bias if hf_out_bias is None else hf_out_bias)
        ours_biases = (*(cfg.linear_bias or cfg.qkv_bias,) * 3, cfg.linear_bias)
        for name, ours, n, hb, ob in zip(names, ("wq", "wk", "wv", "wo"), outs, hf_biases, ours_biases, strict=True):
            self.linear(f"{hf}.{name}", f"{layer}.attn.{ours}", n, hb, ours_bias=ob)

    def qkv(self, hf: str, layer: str, fuse: Callable[[str, tuple[str, ...], bool], Rule], hf_bias: bool) -> None:
        """q, k, v fused into the one HF linear ``hf``; ``fuse(name, ours, is_weight)`` makes the layout's rule."""
        ours = tuple(f"{layer}.attn.{w}" for w in ("wq", "wk", "wv"))
        self.add(fuse(f"{hf}.weight", tuple(f"{o}.weight" for o in ours), True))
        if self.cfg.linear_bias or self.cfg.qkv_bias:
            self.add(fuse(f"{hf}.bias", tuple(f"{o}.bias" for o in ours), False))
        elif hf_bias:
            self.add(_zeros(f"{hf}.bias", (self.q_out + 2 * self.kv_out,), "the model has linear_bias=false"))

    def norm(self, hf: str, ours: str, kind: str = "main", dim: int | None = None) -> None:
        """kind main / qk: as cfg says (norm or qk_norm, norm_bias, unit offset); embed: BLOOM's embedding norm,
        always a biased LayerNorm. HF LayerNorms always have a bias, written as zeros when ours has none. ``dim``:
        the features (default d_model, or head_dim for qk)."""
        cfg = self.cfg
        embed = kind == "embed"
        self.add(_gain(f"{hf}.weight", f"{ours}.weight", cfg.norm_unit_offset and not embed, self.hf_unit_offset))
        if not embed and (cfg.qk_norm if kind == "qk" else cfg.norm) == "rmsnorm":
            return  # no bias on either side
        if embed or cfg.norm_bias:
            self.add(_same(f"{hf}.bias", f"{ours}.bias"))
        else:
            dim = dim or (cfg.dim_head if kind == "qk" else cfg.d_model)
            self.add(_zeros(f"{hf}.bias", (dim,), "the model has norm_bias=false"))

    def vocab(self, hf: str, ours: str) -> None:
        self.add(_rows(hf, ours, self.cfg.vocab_size, self.cfg.padded_vocab_size))

    def head(self, hf: str) -> None:
        if not self.cfg.tie_embeddings:
            self.vocab(hf, "head.weight")

    def positions(self, hf: str, offset: int = 0) -> None:
        """Learned table, or an all-zero one for position='none' (adding zeros is no position information)."""
        cfg = self.cfg
        if cfg.position == "learned":
            self.add(_offset_rows(hf, "pos_embed.weight", offset) if offset else _same(hf, "pos_embed.weight"))
        else:
            self.add(_zeros(hf, (cfg.seq_len + offset, cfg.d_model), "the model has position=none"))


# ---------------------------------------------------------------------------------------------------- family table
@dataclass(frozen=True)
class Spec:
    """What a family can represent. Tuples list the admitted values of the ModelConfig field of that name."""

    norm: str
    norm_placement: tuple[str, ...] = ("pre",)
    block: tuple[str, ...] = ("serial",)
    position: tuple[str, ...] = ("rope",)
    partial_rope: bool = False
    activation: tuple[str, ...] = ("swiglu", "geglu", "geglu_tanh", "reglu")
    qk_norm: tuple[str, ...] = ("none",)
    qk_norm_scope: tuple[str, ...] = ("head",)
    linear_bias: tuple[bool, ...] = (False,)
    qkv_bias: tuple[bool, ...] = (False,)
    gqa: bool = True
    free_head_dim: bool = True
    sliding: str = "none"
    """none: no local layers; all: every layer local (Mistral); any: per-layer types."""
    attn_scale: str = "default"
    """default: 1/sqrt(head_dim); default_or_one: or unscaled (GPT-2); any (Gemma 2's query_pre_attn_scalar)."""
    attn_softcap: bool = False
    final_logit_softcap: bool = False
    embed_scale: bool = False
    free_embed_scale: bool = False
    """Either embed_scale (Granite's embedding_multiplier); otherwise exactly ``embed_scale``."""
    logit_mult: bool = False
    """Any output-logit multiplier (output_logit_scale, muP's): Granite's logits_scaling."""
    embed_norm: bool = False
    final_norm: tuple[bool, ...] = (True,)
    ffn_4x: bool = False
    norm_eps: float | None = None
    """A family that hard-codes the eps (OPT's nn.LayerNorm default)."""


@dataclass(frozen=True)
class Keys:
    """HF config key of each size / scalar field (None: the family has none)."""

    d_model: str = "hidden_size"
    n_layers: str = "num_hidden_layers"
    n_heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    head_dim: str | None = "head_dim"
    d_ff: str | None = "intermediate_size"
    seq_len: str | None = "max_position_embeddings"
    norm_eps: str | None = "rms_norm_eps"
    rope_theta: str | None = "rope_theta"
    activation: str | None = "hidden_act"


@dataclass(frozen=True)
class Family:
    model_type: str
    arch: str
    spec: Spec
    keys: Keys
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    """Family-specific HF config entries (sizes come from ``keys``)."""
    from_hf: Callable[[Any], dict[str, Any]]
    """Family-specific ModelConfig entries from an HF config (sizes come from ``keys``)."""
    rules: Callable[[ModelConfig], list[Rule]]
    tied_head: str = "lm_head.weight"
    """The output matrix, absent from checkpoints of tied models."""
    dropout: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """HF dropout key -> the fields of ours it stands for."""
    check: Callable[[ModelConfig], list[str]] = lambda cfg: []
    """Blockers the Spec cannot express."""
    skip_compare: Callable[[ModelConfig], set[str]] = lambda cfg: set()
    """HF keys that do not matter for this cfg (see `_check_roundtrip`)."""
    ignore: tuple[str, ...] = ()
    """Regexes of HF checkpoint keys with no meaning for the function (old buffers)."""


# activations: ours -> HF name (exact: gelu_pytorch_tanh is F.gelu(approximate="tanh")), and HF aliases -> ours
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
_GATE_OF = {"geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu", "swiglu": "silu"}
_ACT_FROM_HF = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
}  # fmt: skip
PLAIN_ACTS = ("gelu", "gelu_tanh", "relu", "silu")


def _hf_act(cfg: ModelConfig) -> str:
    return _ACT_TO_HF[_GATE_OF.get(cfg.activation, cfg.activation)]


def _local(cfg: ModelConfig) -> list[bool]:
    return [cfg.layer_is_local(i) for i in range(cfg.n_layers)]


def _layer_types(cfg: ModelConfig) -> dict[str, Any]:
    """HF's per-layer attention types; the window only when some layer slides (else the family default stays)."""
    local = _local(cfg)
    out: dict[str, Any] = {"layer_types": ["sliding_attention" if x else "full_attention" for x in local]}
    if any(local):
        out["sliding_window"] = cfg.sliding_window
    return out


def _pattern(local: list[bool]) -> list[str]:
    """The shortest layer_pattern that repeats to ``local``."""
    kinds = ["local" if x else "global" for x in local]
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return kinds[:p]
    return ["global"]


def _windows_from_hf(hf: Any, local: list[bool]) -> dict[str, Any]:
    window = getattr(hf, "sliding_window", None)
    if window is None or not any(local):
        return {"sliding_window": None, "layer_pattern": ["global"]}
    # a window at least the context long hides nothing; ours must not exceed seq_len
    seq_len = getattr(hf, "max_position_embeddings", None) or window
    return {"sliding_window": min(window, seq_len), "layer_pattern": _pattern(local)}


def _rotary_factor(rot: int, hd: int) -> float:
    """HF rotates int(head_dim * factor) dims: pick the factor whose float product does not round below ``rot``."""
    f = rot / hd
    while int(hd * f) < rot:
        f = math.nextafter(f, 2.0)
    return f


# -- GPT-2
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


# -- OPT: GPT-2's choices plus post-norm (OPT-350m), no final norm and bias-free linears
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


# -- BLOOM: ALiBi and the embedding LayerNorm
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


# -- the Llama family: Llama, Mistral, Ministral, Qwen2, Qwen 3, Gemma, Gemma 2, Gemma 3, OLMo 2
def _llama_like_rules(
    cfg: ModelConfig,
    *,
    unit_offset: bool = False,
    qk_norm: bool = False,
    sandwich: bool = False,
    reordered: bool = False,
    qkv_bias: bool = False,
) -> list[Rule]:
    """``qkv_bias``: HF's q, k, v always have biases, o and the MLP none (Qwen2); ``reordered``: OLMo 2's norms
    after each sublayer and no input norms; ``qk_norm`` follows cfg.qk_norm_scope (per head or the projection)."""
    r = _Rules(cfg, hf_unit_offset=unit_offset)
    b = cfg.linear_bias
    r.vocab("model.embed_tokens.weight", "embed.weight")
    whole = cfg.qk_norm_scope == "projection"
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        r.attention(f"{h}.self_attn", o, names, hf_bias=b or qkv_bias, hf_out_bias=b)
        if qk_norm:
            r.norm(f"{h}.self_attn.q_norm", f"{o}.attn.q_norm", "qk", r.q_out if whole else None)
            r.norm(f"{h}.self_attn.k_norm", f"{o}.attn.k_norm", "qk", r.kv_out if whole else None)
        for hw, ow in (("gate_proj", "w_gate"), ("up_proj", "w_up")):
            r.linear(f"{h}.mlp.{hw}", f"{o}.mlp.{ow}", r.ffn, hf_bias=b)
        r.linear(f"{h}.mlp.down_proj", f"{o}.mlp.w_down", cfg.d_model, hf_bias=b)
        if reordered:  # OLMo 2 names: post_attention_layernorm normalizes the attention output
            r.norm(f"{h}.post_attention_layernorm", f"{o}.post_attn_norm")
            r.norm(f"{h}.post_feedforward_layernorm", f"{o}.post_mlp_norm")
            continue
        r.norm(f"{h}.input_layernorm", f"{o}.norm1")
        if sandwich:  # Gemma 2 names: post_attention_layernorm is the post-norm of the attention output
            r.norm(f"{h}.post_attention_layernorm", f"{o}.post_attn_norm")
            r.norm(f"{h}.pre_feedforward_layernorm", f"{o}.norm2")
            r.norm(f"{h}.post_feedforward_layernorm", f"{o}.post_mlp_norm")
        else:
            r.norm(f"{h}.post_attention_layernorm", f"{o}.norm2")
    r.norm("model.norm", "final_norm")
    r.head("lm_head.weight")
    return r.out


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": cfg.linear_bias, "mlp_bias": cfg.linear_bias, "rope_scaling": None}


def _llama_from_hf(hf: Any) -> dict[str, Any]:
    if hf.attention_bias != hf.mlp_bias:
        raise HFLoadError(
            f"llama attention_bias={hf.attention_bias} but mlp_bias={hf.mlp_bias}: tplus_dist's linear_bias "
            "puts biases on every linear or none"
        )
    return {"linear_bias": hf.attention_bias}


_ATTN_DROPOUT = {"attention_dropout": ("attn_dropout",)}

LLAMA = Family(
    model_type="llama",
    arch="LlamaForCausalLM",
    spec=Spec(norm="rmsnorm", linear_bias=(False, True)),
    keys=Keys(),
    to_hf=_llama_to_hf,
    from_hf=_llama_from_hf,
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
    ignore=(r"rotary_emb\.inv_freq$",),
)

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

MINISTRAL = Family(
    model_type="ministral",
    arch="MinistralForCausalLM",
    spec=Spec(norm="rmsnorm", sliding="any"),
    keys=Keys(),
    to_hf=_layer_types,
    from_hf=lambda hf: _windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
)


def _qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"rope_scaling": None, "use_sliding_window": any(_local(cfg)), **_layer_types(cfg)}


# Qwen2 (HF modeling_qwen2.py): Llama with biases on q, k and v only (none on o or the MLP), tied or untied
QWEN2 = Family(
    model_type="qwen2",
    arch="Qwen2ForCausalLM",
    spec=Spec(norm="rmsnorm", qkv_bias=(True, False), sliding="any"),
    keys=Keys(),
    to_hf=_qwen2_to_hf,
    from_hf=lambda hf: {
        "qkv_bias": True,
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    },
    rules=lambda cfg: _llama_like_rules(cfg, qkv_bias=True),
    dropout=_ATTN_DROPOUT,
)


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "rope_scaling": None, "use_sliding_window": any(_local(cfg)), **_layer_types(cfg)}


QWEN3 = Family(
    model_type="qwen3",
    arch="Qwen3ForCausalLM",
    spec=Spec(norm="rmsnorm", qk_norm=("rmsnorm",), sliding="any"),
    keys=Keys(),
    to_hf=_qwen3_to_hf,
    from_hf=lambda hf: {
        "qk_norm": "rmsnorm",
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    },
    rules=lambda cfg: _llama_like_rules(cfg, qk_norm=True),
    dropout=_ATTN_DROPOUT,
)

GEMMA = Family(
    model_type="gemma",
    arch="GemmaForCausalLM",
    spec=Spec(norm="rmsnorm", embed_scale=True),
    keys=Keys(),
    to_hf=lambda cfg: {"attention_bias": False, "rope_scaling": None},
    from_hf=lambda hf: {"norm_unit_offset": True, "embed_scale": True},
    rules=lambda cfg: _llama_like_rules(cfg, unit_offset=True),
    dropout=_ATTN_DROPOUT,
)


def _gemma2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "attention_bias": False,
        # scaling = query_pre_attn_scalar ** -0.5, so any softmax scale s is query_pre_attn_scalar = 1 / s^2
        "query_pre_attn_scalar": 1.0 / cfg.attn_scale**2,
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
        **_layer_types(cfg),
    }


def _gemma2_from_hf(hf: Any) -> dict[str, Any]:
    scale = hf.query_pre_attn_scalar**-0.5
    return {
        "norm_unit_offset": True,
        "embed_scale": True,
        "norm_placement": "sandwich",
        "softmax_scale": None if math.isclose(scale, hf.head_dim**-0.5, rel_tol=1e-12) else scale,
        "attn_softcap": getattr(hf, "attn_logit_softcapping", None),
        "final_logit_softcap": hf.final_logit_softcapping,
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    }


_GEMMA2_SPEC = Spec(
    norm="rmsnorm",
    norm_placement=("sandwich",),
    sliding="any",
    attn_scale="any",
    attn_softcap=True,
    final_logit_softcap=True,
    embed_scale=True,
)

GEMMA2 = Family(
    model_type="gemma2",
    arch="Gemma2ForCausalLM",
    spec=_GEMMA2_SPEC,
    keys=Keys(activation="hidden_activation"),
    to_hf=_gemma2_to_hf,
    from_hf=_gemma2_from_hf,
    rules=lambda cfg: _llama_like_rules(cfg, unit_offset=True, sandwich=True),
    dropout=_ATTN_DROPOUT,
)


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


# OLMo 2 (arXiv 2501.00656; HF modeling_olmo2.py): RMSNorm after each sublayer, before the residual add, and no
# input norms (norm_placement reordered); QK-norm over the whole q and k projections (qk_norm_scope projection)
OLMO2 = Family(
    model_type="olmo2",
    arch="Olmo2ForCausalLM",
    spec=Spec(norm="rmsnorm", norm_placement=("reordered",), qk_norm=("rmsnorm",), qk_norm_scope=("projection",)),
    keys=Keys(),
    to_hf=lambda cfg: {"attention_bias": False, "rope_scaling": None},
    from_hf=lambda hf: {},
    rules=lambda cfg: _llama_like_rules(cfg, qk_norm=True, reordered=True),
    dropout=_ATTN_DROPOUT,
)


# -- Phi (1, 1.5, 2): parallel block with one LayerNorm, partial rotary, optional per-head LayerNorm qk-norm
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


# -- GPT-NeoX (Pythia): partial rotary, serial or parallel; our parallel block's one norm is written twice
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

# -- OLMo 3 (HF modeling_olmo3.py): OLMo 2 with per-layer sliding windows
OLMO3 = Family(
    model_type="olmo3",
    arch="Olmo3ForCausalLM",
    spec=replace(OLMO2.spec, sliding="any"),
    keys=Keys(),
    to_hf=lambda cfg: {"attention_bias": False, "rope_scaling": None, **_layer_types(cfg)},
    from_hf=lambda hf: _windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    rules=lambda cfg: _llama_like_rules(cfg, qk_norm=True, reordered=True),
    dropout=_ATTN_DROPOUT,
)


# -- Phi-3 (HF modeling_phi3.py): Llama with q, k, v fused into qkv_proj and gate, up into gate_up_proj; partial rotary
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


# -- StableLM (HF modeling_stablelm.py): LayerNorm with gated MLPs, partial rotary, optional biases on q, k, v only,
# serial or parallel block (the parallel one with one norm, as ours)
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


# -- Starcoder2 (HF modeling_starcoder2.py): LayerNorm, RoPE, GQA, a plain MLP, biases on every linear or none
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


# -- Granite (HF modeling_granite.py): Llama with multipliers: on the embeddings, inside the softmax, on the logits
# (and on each residual branch, which ours does not have: 1). muP models export as Granite.
def _granite_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_llama_to_hf(cfg),
        "embedding_multiplier": math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0,
        "attention_multiplier": cfg.attn_scale,
        "logits_scaling": 1.0 / _logit_mult(cfg),  # HF divides the logits by it
        "residual_multiplier": 1.0,
    }


def _granite_from_hf(hf: Any) -> dict[str, Any]:
    d, h = hf.hidden_size, hf.num_attention_heads
    hd = getattr(hf, "head_dim", None) or d // h
    if not math.isclose(hf.residual_multiplier, 1.0):
        raise HFLoadError(f"granite residual_multiplier={hf.residual_multiplier}: tplus_dist's branches are unscaled")
    out = _llama_from_hf(hf)
    if math.isclose(hf.embedding_multiplier, math.sqrt(d), rel_tol=1e-9):
        out["embed_scale"] = True
    scale = hf.attention_multiplier
    out["softmax_scale"] = None if math.isclose(scale, hd**-0.5, rel_tol=1e-12) else scale
    if not math.isclose(hf.logits_scaling, 1.0) and math.isclose(hf.logits_scaling, math.sqrt(d), rel_tol=1e-9):
        out["output_logit_scale"] = True  # valid only tied: ModelConfig.validate says so otherwise
    return out


GRANITE = Family(
    model_type="granite",
    arch="GraniteForCausalLM",
    spec=Spec(norm="rmsnorm", linear_bias=(False, True), attn_scale="any", free_embed_scale=True, logit_mult=True),
    keys=Keys(),
    to_hf=_granite_to_hf,
    from_hf=_granite_from_hf,
    rules=_llama_like_rules,
    dropout=_ATTN_DROPOUT,
)

FAMILIES: tuple[Family, ...] = (
    GPT2,
    OPT,
    BLOOM,
    LLAMA,
    MISTRAL,
    MINISTRAL,
    QWEN2,
    QWEN3,
    GEMMA,
    GEMMA2,
    GEMMA3,
    PHI,
    GPT_NEOX,
    OLMO2,
    OLMO3,
    PHI3,
    STABLELM,
    STARCODER2,
    GRANITE,
)
"""Export tries them in this order and takes the first that represents the model exactly."""


# --------------------------------------------------------------------------------------------------- family choice
def _fmt(v: Any) -> str:
    """Values the way YAML / --model.key=value overrides write them."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def _logit_mult(cfg: ModelConfig) -> float:
    """Decoder.logit_mult, from the config."""
    mult = 1.0 / math.sqrt(cfg.d_model) if cfg.output_logit_scale else 1.0
    if cfg.init == "mup":
        mult *= cfg.mup_output_mult / cfg.width_mult
    return mult


def _universal_blockers(cfg: ModelConfig) -> list[str]:
    """Choices no supported family computes at all."""
    out = []
    if cfg.softmax_off_by_one:
        out.append("model.softmax_off_by_one=true: no transformers family computes the off-by-one softmax")
    if cfg.position in ("t5_bias", "shaw"):
        out.append(f"model.position={cfg.position}: no supported transformers decoder family computes it")
    if cfg.adaln != "none":
        out.append(f"model.adaln={cfg.adaln}: no supported transformers family conditions its norms on a label")
    if cfg.position == "sinusoidal":
        out.append(
            "model.position=sinusoidal: no transformers decoder family adds this sinusoidal table "
            "(XGLM's differs in layout and frequencies)"
        )
    return out


def blockers(fam: Family, cfg: ModelConfig) -> list[str]:
    """Why ``fam`` cannot represent ``cfg`` exactly (empty: it can), one message per field."""
    s, n, out = fam.spec, fam.model_type, _universal_blockers(cfg)

    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            out.append(f"model.{name}={_fmt(getattr(cfg, name))}: {n} {why}")

    def one_of(name: str, allowed: tuple[Any, ...], what: str) -> None:
        need(getattr(cfg, name) in allowed, name, f"supports {what} {' / '.join(_fmt(a) for a in allowed)} only")

    one_of("norm", (s.norm,), "norm")
    one_of("norm_placement", s.norm_placement, "norm_placement")
    one_of("block", s.block, "block")
    one_of("position", s.position, "position")
    if cfg.position == "rope" and "rope" in s.position:
        need(s.partial_rope or cfg.rope_dim == cfg.dim_head, "rope_fraction", "rotates the whole head")
    one_of("activation", s.activation, "activation")
    one_of("qk_norm", s.qk_norm, "qk_norm")
    if cfg.qk_norm != "none":
        one_of("qk_norm_scope", s.qk_norm_scope, "qk_norm_scope")
    one_of("linear_bias", s.linear_bias, "linear_bias")
    one_of("qkv_bias", s.qkv_bias, "qkv_bias")
    need(s.gqa or cfg.kv_heads == cfg.n_heads, "n_kv_heads", "has multi-head attention only (n_kv_heads = n_heads)")
    need(s.free_head_dim or cfg.dim_head * cfg.n_heads == cfg.d_model, "head_dim", "fixes head_dim = d_model / n_heads")
    local = _local(cfg)
    if s.sliding == "none":
        need(not any(local), "sliding_window", "has no sliding-window attention")
    elif s.sliding == "all":
        need(all(local), "layer_pattern", "slides the window on every layer (layer_pattern: [local])")
    default_scale = cfg.dim_head**-0.5
    ok_scale = s.attn_scale == "any" or math.isclose(cfg.attn_scale, default_scale, rel_tol=1e-9)
    if s.attn_scale == "default_or_one":
        ok_scale = ok_scale or math.isclose(cfg.attn_scale, 1.0)
    if not ok_scale:
        allowed = "1/sqrt(head_dim) or 1" if s.attn_scale == "default_or_one" else "1/sqrt(head_dim)"
        out.append(
            f"model.softmax_scale={_fmt(cfg.softmax_scale)} (init={cfg.init}: attention scale {cfg.attn_scale:g}): "
            f"{n} scales attention scores by {allowed} only"
        )
    need(s.attn_softcap or cfg.attn_softcap is None, "attn_softcap", "has no attention soft-capping")
    need(s.final_logit_softcap or cfg.final_logit_softcap is None, "final_logit_softcap", "has no logit soft-capping")
    always = {True: "always", False: "never"}
    need(
        s.free_embed_scale or cfg.embed_scale == s.embed_scale,
        "embed_scale",
        f"{always[s.embed_scale]} scales embeddings by sqrt(d_model)",
    )
    need(cfg.embed_norm == s.embed_norm, "embed_norm", f"{always[s.embed_norm]} normalizes the embeddings")
    one_of("final_norm", s.final_norm, "final_norm")
    need(not s.ffn_4x or cfg.ffn_dim == 4 * cfg.d_model, "d_ff", "fixes d_ff = 4 * d_model")
    need(s.norm_eps is None or cfg.norm_eps == s.norm_eps, "norm_eps", f"fixes the norm eps at {s.norm_eps}")
    if not s.logit_mult and not math.isclose(_logit_mult(cfg), 1.0, rel_tol=1e-12):
        why = (
            "model.output_logit_scale=true"
            if cfg.output_logit_scale
            else f"model.init=mup (mup_output_mult={cfg.mup_output_mult}, width_mult={cfg.width_mult:g})"
        )
        out.append(f"{why}: {n} does not multiply the output logits (x{_logit_mult(cfg):g})")
    return out + fam.check(cfg)


def choose_family(cfg: ModelConfig, family: str | None = None) -> Family:
    """The first family of FAMILIES that represents ``cfg`` exactly (or ``family``, by HF model_type, if it does);
    HFExportError naming the blocking fields otherwise."""
    cfg.validate()
    universal = _universal_blockers(cfg)
    if universal:
        raise HFExportError("cannot export to transformers: " + "; ".join(universal))
    if family is not None:
        fam = _family_of(family, HFExportError)
        why = blockers(fam, cfg)
        if why:
            raise HFExportError(f"{fam.model_type} ({fam.arch}) cannot represent this model: " + "; ".join(why))
        return fam
    found = [(fam, blockers(fam, cfg)) for fam in FAMILIES]
    for fam, why in found:
        if not why:
            return fam
    fewest = min(len(why) for _, why in found)
    closest = [f"{fam.model_type} ({fam.arch}) lacks: " + "; ".join(why) for fam, why in found if len(why) == fewest]
    raise HFExportError("no transformers family represents this model exactly; closest: " + " | ".join(closest))


# --------------------------------------------------------------------------------------------- config translation
def _size_values(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head, "d_ff": cfg.ffn_dim, "seq_len": cfg.seq_len, "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }  # fmt: skip


def hf_config_dict(fam: Family, cfg: ModelConfig) -> dict[str, Any]:
    """The HF config entries that define the function (dropout and bookkeeping aside)."""
    out: dict[str, Any] = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    for name, value in _size_values(cfg).items():
        key = getattr(fam.keys, name)
        if key is not None:
            out[key] = value
    if fam.keys.activation is not None:
        out[fam.keys.activation] = _hf_act(cfg)
    out.update(fam.to_hf(cfg))
    return out


def _dropout_to_hf(fam: Family, cfg: ModelConfig) -> dict[str, float]:
    out: dict[str, float] = {}
    covered: set[str] = set()
    for key, fields in fam.dropout.items():
        values = {getattr(cfg, f) for f in fields}
        covered.update(fields)
        out[key] = max(values)
        if len(values) > 1:
            warnings.warn(
                f"{fam.model_type} has one dropout ({key}) for {', '.join(fields)}; writing {max(values)}",
                stacklevel=3,
            )
    for f in ("embed_dropout", "attn_dropout", "resid_dropout"):
        if f not in covered and getattr(cfg, f) > 0:
            warnings.warn(
                f"model.{f}={getattr(cfg, f)}: {fam.model_type} has no such dropout; the exported model will not "
                "apply it in training (inference is unaffected)",
                stacklevel=3,
            )
    return out


def _cfg_from_hf(fam: Family, hf: Any) -> ModelConfig:
    """Our ModelConfig for an HF config, from the size keys, the spec's fixed choices and the family's reader."""
    k, s = fam.keys, fam.spec

    def get(key: str | None, default: Any) -> Any:
        v = getattr(hf, key, None) if key is not None else None
        return default if v is None else v

    d, h = get(k.d_model, None), get(k.n_heads, None)
    kv, hd = get(k.kv_heads, h), get(k.head_dim, d // h)
    kw: dict[str, Any] = {
        "vocab_size": hf.vocab_size, "n_layers": get(k.n_layers, None), "d_model": d, "n_heads": h,
        "n_kv_heads": kv if kv != h else None, "head_dim": hd if hd * h != d else None,
        "d_ff": get(k.d_ff, None), "norm_eps": get(k.norm_eps, ModelConfig.norm_eps),
        "seq_len": get(k.seq_len, ModelConfig.seq_len), "rope_theta": get(k.rope_theta, ModelConfig.rope_theta),
        "tie_embeddings": bool(hf.tie_word_embeddings), "norm": s.norm, "position": s.position[0],
        "embed_norm": s.embed_norm, "embed_scale": s.embed_scale, "norm_placement": s.norm_placement[0],
        "block": s.block[0], "qk_norm": s.qk_norm[0], "final_norm": s.final_norm[0],
        "qk_norm_scope": s.qk_norm_scope[0] if s.qk_norm[0] != "none" else "head",
    }  # fmt: skip
    if k.activation is not None:
        name = getattr(hf, k.activation)
        act = _ACT_FROM_HF.get(name) if isinstance(name, str) else None
        if s.activation[0] in _GATE_OF and act is not None:
            act = {v: g for g, v in _GATE_OF.items()}[act]
        if act is None or act not in s.activation:
            raise HFLoadError(f"{fam.model_type} {k.activation}={name!r}: tplus_dist has no such activation here")
        kw["activation"] = act
    else:
        kw["activation"] = s.activation[0]
    if getattr(hf, "rope_scaling", None) is not None:
        raise HFLoadError(f"{fam.model_type} rope_scaling={hf.rope_scaling}: tplus_dist's RoPE is unscaled")
    kw.update(fam.from_hf(hf))
    for key, fields in fam.dropout.items():
        for f in fields:
            kw[f] = float(getattr(hf, key, 0.0) or 0.0)
    try:
        cfg = ModelConfig(**kw)
        cfg.validate()
    except ConfigError as e:
        raise HFLoadError(f"{fam.model_type} config does not make a valid tplus_dist model: {e}") from e
    # not checked against fam's Spec: a Mistral without a window is a fine model of ours, exported as a Llama
    return cfg


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return bool(a == b)


def _check_roundtrip(fam: Family, hf: Any, cfg: ModelConfig) -> None:
    """Every entry export would write for ``cfg`` must be what the HF config says: whatever an HF option the
    readers did not consider does (scale_attn_by_inverse_layer_idx, word_embed_proj_dim, ...), a value other
    than the one ours implies is refused here instead of being silently dropped."""
    skip = fam.skip_compare(cfg)
    sizes = {getattr(fam.keys, name) for name in _size_values(cfg)}
    for key, ours in hf_config_dict(fam, cfg).items():
        if key in skip:
            continue
        theirs = getattr(hf, key, None)
        if theirs is None and key in sizes:  # head_dim, n_inner: None is the family's default, read as such
            continue
        if key == "sliding_window" and theirs is not None:  # windows longer than the context were clamped
            theirs = min(theirs, cfg.seq_len)
        if key == fam.keys.activation and _ACT_FROM_HF.get(str(theirs)) == _ACT_FROM_HF[ours]:
            continue  # aliases: gelu_new is the tanh GELU we write as gelu_pytorch_tanh
        if not _same_value(ours, theirs):
            raise HFLoadError(f"{fam.model_type} {key}={theirs!r}: tplus_dist can only represent {key}={ours!r} here")


# ------------------------------------------------------------------------------------------------------- weights
def _to_hf_state(fam: Family, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for rule in fam.rules(cfg):
        out[rule.hf] = rule.to_hf(*(state[o].detach().float().cpu() for o in rule.ours)).contiguous()
    return out


def _to_our_state(fam: Family, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rules = fam.rules(cfg)
    names = {r.hf for r in rules}
    # checkpoints saved from the base model lack the CausalLM prefix (old GPT-2 files)
    prefix = rules[0].hf.split(".")[0] + "."
    tensors = {(prefix + k if k not in names and prefix + k in names else k): v for k, v in tensors.items()}
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for rule in rules:
        if rule.hf not in tensors:
            raise HFLoadError(f"{fam.model_type} checkpoint has no tensor {rule.hf}")
        for name, t in zip(rule.ours, rule.from_hf(tensors[rule.hf].float()), strict=True):
            if name in state and not torch.equal(state[name], t):
                raise HFLoadError(
                    f"{source[name]} and {rule.hf} differ, but tplus_dist keeps one tensor for both ({name})"
                    + (": its parallel block has one norm" if "norm" in name else "")
                )
            state[name], source[name] = t.contiguous(), rule.hf
    tied = {fam.tied_head} if cfg.tie_embeddings else set()  # some writers keep the tied copy
    left = sorted(k for k in tensors if k not in names | tied and not any(re.search(p, k) for p in fam.ignore))
    if left:
        raise HFLoadError(f"{fam.model_type} checkpoint has tensors tplus_dist has no place for: {', '.join(left[:8])}")
    return state


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    files = files or ([] if not (folder / "model.safetensors").exists() else ["model.safetensors"])
    if not files:
        raise HFLoadError(f"{folder}: no model.safetensors (or index); only safetensors checkpoints are read")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


# ------------------------------------------------------------------------------------------------------ tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of tokenizers' ByteLevel pre-tokenizer and decoder."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:  # control bytes, space, ...: mapped past 255, to printable characters
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_tokenizer(eos_token: str, eos_id: int) -> Any:
    """ByteTokenizer as a `tokenizers` Tokenizer: id b for byte b (a BPE over the 256 ByteLevel characters with no
    merges) and ``eos_token`` at ``eos_id``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
    assert tok.token_to_id(eos_token) == eos_id
    return tok


def _tiktoken_tokenizer(tok: Any, eos_token: str) -> Any:
    """A TiktokenTokenizer as a `tokenizers` Tokenizer: transformers' TikTokenConverter (ranks -> BPE vocab and
    merges, the pre-tokenization regex, ByteLevel bytes), fed our parsed ranks instead of its cached download."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tplus_dist.data.tokenizers import load_tiktoken_ranks

    ranks = load_tiktoken_ranks(tok.path)

    class _Converter(TikTokenConverter):
        def extract_vocab_merges_from_model(self, tiktoken_url: str) -> Any:
            import tiktoken.load

            real = tiktoken.load.load_tiktoken_bpe
            tiktoken.load.load_tiktoken_bpe = lambda *_a, **_k: ranks
            try:
                return super().extract_vocab_merges_from_model(tiktoken_url)
            finally:
                tiktoken.load.load_tiktoken_bpe = real

    return _Converter(
        vocab_file=str(tok.path), pattern=tok.pat_str, additional_special_tokens={eos_token: tok.eos_id}
    ).converted()


def save_tokenizer(tok: Any, out_dir: str | Path, max_length: int | None = None) -> dict[str, int]:
    """Write our tokenizer (data/tokenizers.py: ByteTokenizer, HFTokenizer from ``train:N`` or a tokenizer.json,
    TiktokenTokenizer) as a transformers fast tokenizer into ``out_dir`` (tokenizer.json with its special tokens,
    tokenizer_config.json, special_tokens_map.json), so that ``AutoTokenizer.from_pretrained(out_dir)`` encodes
    text to the ids ours gives and decodes them back. Returns the special token ids for config.json and
    generation_config.json: eos (the end-of-text token every training document ends with), bos = eos (documents
    are packed, so each one follows an EOS: GPT-2's convention; the tokenizer adds none by itself, as ours does
    not) and pad = eos (no padding token was trained; padded positions are masked by the attention mask).
    ``max_length``: the model's context (the tokenizer's model_max_length).

    Bytes and tiktoken encode a literal "<|endoftext|>" in the text as text (``split_special_tokens``), as ours do;
    a tokenizer.json keeps its own special-token matching."""
    from transformers import PreTrainedTokenizerFast

    from tplus_dist.data.tokenizers import ENDOFTEXT, ByteTokenizer, HFTokenizer, TiktokenTokenizer

    split_special = True
    if isinstance(tok, ByteTokenizer):
        fast, eos_token = _byte_level_tokenizer(ENDOFTEXT, tok.eos_id), ENDOFTEXT
    elif isinstance(tok, TiktokenTokenizer):
        fast, eos_token = _tiktoken_tokenizer(tok, ENDOFTEXT), ENDOFTEXT
    elif isinstance(tok, HFTokenizer):
        fast, split_special = tok.tok, False
        eos_token = fast.id_to_token(tok.eos_id)
    else:
        raise TypeError(f"cannot write a {type(tok).__name__} as a transformers tokenizer")
    if fast.token_to_id(eos_token) != tok.eos_id:
        raise HFExportError(f"tokenizer: {eos_token!r} is id {fast.token_to_id(eos_token)}, ours says {tok.eos_id}")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=fast,
        eos_token=eos_token,
        bos_token=eos_token,
        pad_token=eos_token,
        split_special_tokens=split_special,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": max_length} if max_length is not None else {}),
    )
    wrapped.save_pretrained(str(out_dir))
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}


# --------------------------------------------------------------------------------------------------- export / load
def _family_of(model_type: str, error: type[ValueError] = HFLoadError) -> Family:
    for fam in FAMILIES:
        if fam.model_type == model_type:
            return fam
    names = ", ".join(f.model_type for f in FAMILIES)
    raise error(f"model_type {model_type!r} is not a supported family (supported: {names})")


def _verify(model: Decoder, cfg: ModelConfig, folder: Path) -> float:
    """Reload ``folder`` with AutoModelForCausalLM and compare logits with ``model`` on a few random tokens."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    ref = model
    if any(p.dtype != torch.float32 for p in model.parameters()):  # compare in fp32, not the training dtype
        ref = build_model(cfg)
        ref.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    device = next(ref.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (2, min(cfg.seq_len, 32)), generator=gen)
    was_training = ref.training
    ref.eval()
    try:
        with torch.no_grad():
            ours = ref(tokens.to(device)).float().cpu()
            theirs = hf_model(tokens).logits.float()
    finally:
        ref.train(was_training)
    diff = (ours - theirs).abs().max().item()
    if not diff <= VERIFY_TOL * max(1.0, ours.abs().max().item()):
        raise HFExportError(
            f"exported {hf_model.__class__.__name__} disagrees with the model: max |logit diff| {diff:.3g} "
            f"(tolerance {VERIFY_TOL:g} x max(1, max |logit|)); {folder} is not a faithful export"
        )
    return diff


def _file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime, size) of each file in ``folder``: what an export wrote is what changed."""
    out = {}
    for p in folder.iterdir():
        st = p.stat()
        if p.is_file():
            out[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def export(
    model: Decoder, cfg: ModelConfig, out_dir: str | Path, *, family: str | None = None, tokenizer: Any = None
) -> Path:
    """Write ``model`` to ``out_dir`` as the transformers family that computes the same function, reload it with
    AutoModelForCausalLM and check the logits agree; returns the folder. HFExportError when no family can.

    ``family`` (an HF model_type, e.g. "gpt_neox") asks for that family instead of the first that fits.
    ``tokenizer``: the run's tokenizer (data/tokenizers.py), written beside the weights (`save_tokenizer`) with its
    bos / eos / pad ids in config.json and generation_config.json, so that AutoTokenizer loads the folder and
    ``generate`` stops at the end of text; without one those ids stay unset. Files get the user's umask."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_utils import no_init_weights

    if model.cfg != cfg:
        raise ValueError("cfg differs from model.cfg; pass the config the model was built with")
    fam = choose_family(cfg, family)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size ({cfg.vocab_size})"
        )
    kwargs = hf_config_dict(fam, cfg)
    kwargs.update(_dropout_to_hf(fam, cfg))
    # without a tokenizer leave special tokens unset rather than inherit a family's defaults (OLMo 2's 50279)
    special: dict[str, int | None] = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = _file_stamps(out)
    if tokenizer is not None:
        special.update(save_tokenizer(tokenizer, out, max_length=cfg.seq_len))
    kwargs.update(special, architectures=[fam.arch])
    kwargs[STASH_KEY] = to_dict(cfg)
    hf_cfg = AutoConfig.for_model(fam.model_type, **kwargs)
    state = _to_hf_state(fam, cfg, model.state_dict())
    with no_init_weights():  # skip the random init that load_state_dict overwrites anyway
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # strict, except that a tied head is the embedding itself and so is not a separate tensor of ours
    allowed_missing = {fam.tied_head} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise HFExportError(
            f"{fam.model_type} mapping out of date with transformers: missing "
            f"{sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}"
        )
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(**special)
    hf_model.save_pretrained(out, safe_serialization=True)
    # safetensors writes its files 0600; every file this export wrote gets the mode an open() would give
    after = _file_stamps(out)
    respect_umask(*(out / n for n, stamp in after.items() if before.get(n) != stamp))
    _verify(model, cfg, out)
    return out


def load(folder: str | Path) -> tuple[ModelConfig, Decoder]:
    """Read an HF folder (config.json + safetensors) of a supported family: our ModelConfig and a Decoder with
    its weights, computing the same logits. HFLoadError names what tplus_dist cannot represent."""
    from transformers import AutoConfig

    folder = Path(folder)
    hf = AutoConfig.from_pretrained(folder)
    fam = _family_of(hf.model_type)
    derived = _cfg_from_hf(fam, hf)
    _check_roundtrip(fam, hf, derived)
    candidates = [derived]
    stash = getattr(hf, STASH_KEY, None)
    if isinstance(stash, dict):  # our own export: restore the exact config when it still describes this folder
        try:
            stored = from_dict(ModelConfig, stash, "model")
            stored.validate()
        except ConfigError:
            stored = None
        if stored is not None and not blockers(fam, stored):
            a, b = hf_config_dict(fam, stored), hf_config_dict(fam, derived)
            if a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a):
                candidates.insert(0, stored)
    tensors = _read_tensors(folder)
    for i, cfg in enumerate(candidates):
        try:
            state = _to_our_state(fam, cfg, tensors)
        except HFLoadError:
            if i == len(candidates) - 1:
                raise
            continue  # e.g. biases that were zero at export were trained since: fall back to the HF-only reading
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)
        return cfg, model
    raise AssertionError("unreachable")


__all__ = [
    "FAMILIES",
    "FIELD_HANDLING",
    "Family",
    "HFExportError",
    "HFLoadError",
    "Rule",
    "Spec",
    "blockers",
    "choose_family",
    "export",
    "load",
    "save_tokenizer",
]
