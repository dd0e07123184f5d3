"""The decoder's architecture: every Transformer++ choice is one field here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from tplus_dist.config.base import check, check_unused

NormKind = Literal["layernorm", "rmsnorm", "biasnorm"]
NormPlacement = Literal["pre", "post", "sandwich", "reordered"]
PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "t5_bias", "shaw", "none"]
RELATIVE_POSITION_FIELDS = {
    "rope_theta": "rope",
    "rope_fraction": "rope",
    "t5_bias_buckets": "t5_bias",
    "t5_bias_max_distance": "t5_bias",
    "t5_bias_shared": "t5_bias",
    "shaw_max_distance": "shaw",
}
"""The settings of each position choice (refused with another position, which would ignore them)."""
QKNormKind = Literal["none", "rmsnorm", "layernorm"]
QKNormScope = Literal["head", "projection"]
Activation = Literal[
    "gelu", "gelu_tanh", "relu", "silu", "swooshr", "swooshl", "swiglu", "geglu", "geglu_tanh", "reglu"
]
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "reglu")
BlockKind = Literal["serial", "parallel"]
InitKind = Literal["gpt2", "t5", "mup"]
AdaLNKind = Literal["none", "adaln", "adaln_zero"]
LayerAttention = Literal["global", "local"]
ProviderKind = Literal["torch", "te"]


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Transformer++.

    Defaults are a small Llama-style model. ``None`` means "derived" (see the properties below).
    """

    # -- sizes
    vocab_size: int = 32000
    """Tokenizer vocabulary; the embedding is padded up to ``pad_vocab_multiple``."""
    pad_vocab_multiple: int = 64
    """Pad the embedding rows to a multiple of this (64/128 keep matmuls tensor-core shaped)."""
    n_layers: int = 12
    """Decoder layers (blocks)."""
    d_model: int = 768
    """Residual stream width."""
    n_heads: int = 12
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads: = n_heads is MHA, a divisor is GQA, 1 is MQA. None: n_heads."""
    head_dim: int | None = None
    """None: d_model // n_heads."""
    d_ff: int | None = None
    """None: 4 * d_model, or 8/3 * d_model rounded up to ``d_ff_multiple`` for gated MLPs."""
    d_ff_multiple: int = 256
    """Derived gated d_ff is rounded up to a multiple of this (hardware-friendly shapes)."""
    seq_len: int = 2048
    """Longest context the model is built for (learned/sinusoidal tables, masks)."""

    # -- normalization
    norm: NormKind = "rmsnorm"
    """rmsnorm (Llama, Gemma: no mean, cheaper), layernorm (GPT-2), or biasnorm (Zipformer: x / RMS(x - b) * exp(s),
    a learned channel bias b and one learned log-scale s)."""
    norm_eps: float = 1e-5
    """Added to the variance inside every norm."""
    norm_bias: bool = False
    """LayerNorm bias; RMSNorm never has one."""
    norm_placement: NormPlacement = "pre"
    """pre: x + f(norm(x)) (GPT-2, Llama). post: norm(x + f(x)) (original Transformer).
    sandwich: x + norm(f(norm(x))) (Gemma 2). reordered: x + norm(f(x)), the sublayer's output normed before the
    residual add and no pre-norm (OLMo 2, arXiv 2501.00656 section 3.2; HF modeling_olmo2.py Olmo2DecoderLayer;
    Swin Transformer V2's res-post-norm)."""
    embed_norm: bool = False
    """LayerNorm right after the embedding (BLOOM)."""
    final_norm: bool = True
    """Norm before the output head (needed with pre-norm, where the residual stream is never normed)."""
    norm_unit_offset: bool = False
    """Store the norm gain as (weight - 1), i.e. scale by (1 + w), as Gemma does; same function."""

    # -- positions
    position: PositionKind = "rope"
    """learned (GPT-2), sinusoidal (Vaswani), rope (Su; Llama), alibi (Press; BLOOM), t5_bias (T5's learned
    per-head bias over log-spaced distance buckets, causal), shaw (Shaw et al. 2018: learned embeddings of the
    clipped distance added to the keys and the values inside attention, per layer), or none (NoPE)."""
    rope_theta: float = 10000.0
    """RoPE base: wavelengths span 2*pi .. 2*pi*theta."""
    rope_fraction: float = 1.0
    """Fraction of head_dim rotated by RoPE (GPT-NeoX, Phi use partial rotary)."""
    t5_bias_buckets: int = 32
    """t5_bias: distance buckets; the first half are exact distances 0 .. buckets/2 - 1."""
    t5_bias_max_distance: int = 128
    """t5_bias: the rest are log-spaced up to this distance; farther keys share the last bucket."""
    t5_bias_shared: bool = True
    """t5_bias: one table for all layers (T5) or one per layer."""
    shaw_max_distance: int = 16
    """shaw: distances are clipped to this (Shaw et al.'s k); each layer learns k + 1 key and k + 1 value
    embeddings of head_dim (causal: distances 0 .. k)."""

    # -- attention
    qk_norm: QKNormKind = "none"
    """Normalize queries and keys before the dot product (OLMo 2, Qwen 3, Gemma 3); see qk_norm_scope."""
    qk_norm_scope: QKNormScope = "head"
    """What QK-norm normalizes: head (each head's head_dim features, one gain of head_dim shared by the heads: Qwen 3,
    Gemma 3; HF modeling_qwen3.py) or projection (the whole query projection, n_heads * head_dim, and the whole key
    projection, n_kv_heads * head_dim, each with its own gain of that size: OLMo 2, arXiv 2501.00656; HF
    modeling_olmo2.py Olmo2Attention). Under tensor parallelism a projection norm reduces its statistics over the
    ranks."""
    softmax_scale: float | None = None
    """None: 1/sqrt(head_dim), or 1 under T5 init, or 1/head_dim under muP."""
    attn_softcap: float | None = None
    """Soft-cap attention logits: cap * tanh(x / cap) (Gemma 2: 50)."""
    softmax_off_by_one: bool = False
    """exp(x_i) / (1 + sum_j exp(x_j)): heads may attend to nothing (Miller 2023)."""
    sliding_window: int | None = None
    """Window (tokens, including the current one) of the layers marked "local"."""
    layer_pattern: list[LayerAttention] = field(default_factory=lambda: ["global"])
    """Repeated over the layers: ["local"] is all-local (Mistral), ["local", "global"] alternates (Gemma 2)."""

    # -- feed-forward
    activation: Activation = "swiglu"
    """gelu, gelu_tanh, relu, silu, swooshr, swooshl (ungated; the Swoosh pair is Zipformer's:
    log(1 + e^(x-1)) - 0.08x - 0.313261687 and log(1 + e^(x-4)) - 0.08x - 0.035), or the gated swiglu, geglu,
    geglu_tanh, reglu (Shazeer 2020)."""

    # -- conditioning
    adaln: AdaLNKind = "none"
    """Adaptive LayerNorm (DiT, Peebles & Xie 2023) from a per-sequence label: adaln predicts each pre-norm's scale
    and shift from the label's embedding, norm(x) * (1 + scale) + shift; adaln_zero also a gate on each residual
    branch, (1 + gate) * branch. The predicting linears start at zero, so at initialisation (and for any sequence
    given no label) the model is exactly the plain one. Needs norm_placement pre and n_conditions."""
    n_conditions: int = 0
    """adaln: the number of labels (0 .. n_conditions - 1), each with a learned d_model embedding."""

    # -- biases
    linear_bias: bool = False
    """Biases on every linear (GPT-2 has them; no bias is a bit better and faster)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections only, none on the attention output or the MLP (Qwen2; HF
    modeling_qwen2.py Qwen2Attention). Implied by linear_bias, so the two are not set together."""

    # -- block
    block: BlockKind = "serial"
    """parallel: x + attn(norm(x)) + mlp(norm(x)) with one norm (GPT-J, PaLM)."""

    # -- embeddings
    tie_embeddings: bool = False
    """Share the input embedding with the output head (GPT-2, Gemma; saves vocab*d parameters)."""
    embed_scale: bool = False
    """Multiply embeddings by sqrt(d_model) (ESPnet, Gemma)."""
    output_logit_scale: bool = False
    """Multiply logits by 1/sqrt(d_model); needs tie_embeddings (PaLM)."""

    # -- initialization
    init: InitKind = "gpt2"
    """gpt2, t5 (Mesh-TensorFlow) or mup (maximal update parametrization); see the README."""
    init_std: float = 0.02
    """Standard deviation of the gpt2 and mup schemes (at the muP base width)."""
    mup_base_d_model: int = 256
    """muP: the width the hyper-parameters were tuned at; width_mult = d_model / this."""
    mup_output_mult: float = 1.0
    """muP: output logits are multiplied by mup_output_mult / width_mult."""

    # -- loss
    z_loss: float = 0.0
    """Coefficient of log(Z)^2 (PaLM: 1e-4); keeps the softmax normalizer near 1."""
    final_logit_softcap: float | None = None
    """Soft-cap the output logits: cap * tanh(x / cap) (Gemma 2: 30)."""
    ignore_index: int = -100
    """Targets equal to this are left out of the loss."""

    # -- dropout (0: pretraining on deduplicated data does not need it)
    embed_dropout: float = 0.0
    """Dropout on the embedding output."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities."""
    resid_dropout: float = 0.0
    """Dropout on each sublayer output before the residual add."""

    # -- implementation (not architecture: checkpoints and exports move between providers)
    provider: ProviderKind = "torch"
    """Layer implementation. torch: plain PyTorch (megatron-core's tensor-parallel layers under tensor
    parallelism); te: Transformer Engine's fused layers and FP8 (CUDA only; a piece it cannot express runs in
    torch, one logged line per piece: `tplus config --provider te` prints the table). Megatron-LM's
    --transformer-impl."""

    # ---------------------------------------------------------------- derived
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.gated:  # 8/3 keeps the parameter count of a 4x ungated MLP (Shazeer 2020)
            m = self.d_ff_multiple
            return m * math.ceil(8 * self.d_model / 3 / m)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    @property
    def rope_dim(self) -> int:
        """Rotated dimensions per head (even)."""
        return 2 * int(self.dim_head * self.rope_fraction // 2)

    @property
    def width_mult(self) -> float:
        return self.d_model / self.mup_base_d_model if self.init == "mup" else 1.0

    @property
    def attn_scale(self) -> float:
        if self.softmax_scale is not None:
            return self.softmax_scale
        if self.init == "t5":  # Mesh-TF folds 1/sqrt(d_k) into the q initialization
            return 1.0
        if self.init == "mup":  # muP: 1/d keeps attention logits O(1) as width grows
            return 1.0 / self.dim_head
        return 1.0 / math.sqrt(self.dim_head)

    def resolved(self) -> ModelConfig:
        """A copy with every derived field (None in the config) set to the value the model is built with: n_kv_heads,
        head_dim, d_ff and softmax_scale, from the properties above (the one place they are computed)."""
        return dataclasses.replace(
            self, n_kv_heads=self.kv_heads, head_dim=self.dim_head, d_ff=self.ffn_dim, softmax_scale=self.attn_scale
        )

    def layer_is_local(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_pattern[layer % len(self.layer_pattern)] == "local"

    # ------------------------------------------------------------- validation
    def validate(self, prefix: str = "model") -> None:
        p = prefix + "."
        for name in ("vocab_size", "pad_vocab_multiple", "n_layers", "d_model", "n_heads", "seq_len", "d_ff_multiple"):
            check(getattr(self, name) > 0, p + name, f"must be positive, got {getattr(self, name)}")
        check(
            self.n_kv_heads is None or self.n_kv_heads > 0, p + "n_kv_heads", f"must be positive, got {self.n_kv_heads}"
        )
        check(
            self.n_heads % self.kv_heads == 0,
            p + "n_kv_heads",
            f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})",
        )
        if self.head_dim is None:
            check(
                self.d_model % self.n_heads == 0,
                p + "n_heads",
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim",
            )
        else:
            check(self.head_dim > 0, p + "head_dim", f"must be positive, got {self.head_dim}")
        check(self.d_ff is None or self.d_ff > 0, p + "d_ff", f"must be positive, got {self.d_ff}")
        check(self.norm_eps > 0, p + "norm_eps", f"must be positive, got {self.norm_eps}")
        if self.position == "rope":
            check(0 < self.rope_fraction <= 1, p + "rope_fraction", f"must be in (0, 1], got {self.rope_fraction}")
            check(self.rope_theta > 0, p + "rope_theta", f"must be positive, got {self.rope_theta}")
            check(
                self.dim_head % 2 == 0,
                p + "head_dim",
                f"RoPE rotates pairs of dimensions, so head_dim must be even, got {self.dim_head}",
            )
            check(self.rope_dim > 0, p + "rope_fraction", "rotates no dimension of head_dim")
        # A position setting belongs to its choice: given with another position it would be ignored silently
        # (ALiBi plus T5 buckets, RoPE plus a Shaw clip, learned positions plus a RoPE base), so it is named instead.
        defaults = ModelConfig.__dataclass_fields__
        for name, owner in RELATIVE_POSITION_FIELDS.items():
            value = getattr(self, name)
            check(
                self.position == owner or value == defaults[name].default,
                p + name,
                f"({value}) has no effect: it is a setting of position {owner}, and model.position is "
                f"{self.position!r} (one position choice at a time); remove {name}, or set position: {owner}",
            )
        if self.position == "t5_bias":
            check(self.t5_bias_buckets >= 2, p + "t5_bias_buckets", f"must be at least 2, got {self.t5_bias_buckets}")
            check(
                self.t5_bias_max_distance > self.t5_bias_buckets // 2,
                p + "t5_bias_max_distance",
                f"({self.t5_bias_max_distance}) must exceed t5_bias_buckets / 2 ({self.t5_bias_buckets // 2}), "
                "where the log-spaced buckets begin",
            )
        if self.adaln != "none":
            check(self.n_conditions >= 1, p + "n_conditions", f"must be at least 1 with adaln {self.adaln!r}, got 0")
            check(
                self.norm_placement == "pre",
                p + "norm_placement",
                f"adaln modulates the pre-norms; {self.norm_placement!r} is not supported with it",
            )
        check(
            self.qk_norm != "none" or self.qk_norm_scope == "head",
            p + "qk_norm_scope",
            f"({self.qk_norm_scope}) chooses what QK-norm normalizes, but model.qk_norm is none; set qk_norm, or "
            "remove qk_norm_scope",
        )
        check(
            not (self.qkv_bias and self.linear_bias),
            p + "qkv_bias",
            "puts biases on the query, key and value projections, which linear_bias (true) already does for every "
            "linear; set one of them",
        )
        if self.position == "shaw":
            check(
                self.shaw_max_distance >= 1,
                p + "shaw_max_distance",
                f"must be at least 1, got {self.shaw_max_distance}",
            )
        if self.position == "sinusoidal":
            check(self.d_model % 2 == 0, p + "d_model", "sinusoidal positions need an even d_model")
        check(self.softmax_scale is None or self.softmax_scale > 0, p + "softmax_scale", "must be positive")
        for name in ("attn_softcap", "final_logit_softcap"):
            v = getattr(self, name)
            check(v is None or v > 0, p + name, f"must be positive (or null to disable), got {v}")
        check(len(self.layer_pattern) > 0, p + "layer_pattern", "must name at least one layer kind")
        if self.sliding_window is not None:
            check(self.sliding_window > 0, p + "sliding_window", f"must be positive, got {self.sliding_window}")
            check(
                self.sliding_window <= self.seq_len,
                p + "sliding_window",
                f"window ({self.sliding_window}) is longer than the context seq_len ({self.seq_len})",
            )
            check(
                "local" in self.layer_pattern,
                p + "layer_pattern",
                "sliding_window is set but no layer is marked 'local'",
            )
        else:
            check(
                "local" not in self.layer_pattern,
                p + "sliding_window",
                "layer_pattern marks layers 'local' but sliding_window is not set",
            )
        check(
            not self.output_logit_scale or self.tie_embeddings,
            p + "output_logit_scale",
            "the 1/sqrt(d_model) logit scale is for tied embeddings; set tie_embeddings: true",
        )
        check(self.init_std > 0, p + "init_std", f"must be positive, got {self.init_std}")
        if self.init == "mup":
            check(self.mup_base_d_model > 0, p + "mup_base_d_model", "must be positive")
        check(self.z_loss >= 0, p + "z_loss", f"must be >= 0, got {self.z_loss}")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout"):
            v = getattr(self, name)
            check(0 <= v < 1, p + name, f"must be in [0, 1), got {v}")
        self._check_unused(prefix)

    def _check_unused(self, prefix: str) -> None:
        """Settings that another choice makes dead are refused, naming what takes effect instead."""
        kinds = {self.norm} | ({self.qk_norm} if self.qk_norm != "none" else set())
        if "layernorm" not in kinds:
            check_unused(
                self, prefix, ("norm_bias",),
                f"only a layernorm has a bias, and model.norm is {self.norm!r} with qk_norm {self.qk_norm!r} (the "
                "embed_norm LayerNorm always has one)",
            )  # fmt: skip
        if kinds == {"biasnorm"}:
            check_unused(
                self, prefix, ("norm_unit_offset",),
                "biasnorm has no gain to offset (its scale is exp(s)), and no other norm is used",
            )  # fmt: skip
        if self.d_ff is not None:
            check_unused(
                self, prefix, ("d_ff_multiple",), f"it rounds a derived d_ff, but model.d_ff is set ({self.d_ff})"
            )
        elif not self.gated:
            check_unused(
                self, prefix, ("d_ff_multiple",),
                f"it rounds the derived d_ff of gated activations, and {self.activation!r} is not gated (d_ff = 4 * "
                "d_model)",
            )  # fmt: skip
        if self.adaln == "none":
            check_unused(
                self, prefix, ("n_conditions",), "model.adaln is 'none'; set adaln (or adaln_zero) to use labels"
            )
        if self.init == "t5":
            check_unused(
                self, prefix, ("init_std",), "init t5 derives every scale from the shapes (Mesh-TensorFlow's scheme)"
            )
        if self.init != "mup":
            check_unused(
                self,
                prefix,
                ("mup_base_d_model", "mup_output_mult"),
                f"it is a muP setting, and model.init is {self.init!r}",
            )
