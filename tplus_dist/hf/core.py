"""The rules core of the HF interop: tensor rules (`Rule`, `_Rules`), what a family can represent (`Spec`), its config
keys (`Keys`), the `Family` entry itself, helpers several families share, and `blockers`: why a family cannot
represent a config. Nothing here knows a particular family."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tplus_dist.config.model import ModelConfig

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
    "provider": "implementation only: both providers hold the same parameters under the same names (TE's extra "
    "state is not exported)",
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


# -- shared by the Llama-shaped families: Llama, Mistral, Ministral, Qwen2, Qwen 3, Gemma 1-3, OLMo 2-3, Granite
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
