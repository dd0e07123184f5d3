"""Transformer Engine's layers behind the decoder's provider seam (model.provider: te).

Written against Transformer Engine 2.20.2 (the release the GPU kit installs), read from its source
(transformer_engine/pytorch/); every non-obvious argument cites the file. Not yet run on a GPU.

What TE builds: the linears (te.Linear, column/row parallel over the tensor-parallel group), the block, final and
embedding norms (te.RMSNorm / te.LayerNorm) and the attention core (te.DotProductAttention: GQA, causal mask,
sliding windows, ALiBi, soft-capping, the off-by-one softmax, T5's learned bias, attention dropout). What it
cannot express exactly runs the torch implementation for that piece (:func:`te_plan` is the table, printed by
`tplus config --provider te` and logged once per fallback piece at model build). The embedding, the output
logits and the loss are the torch provider's (one process) or megatron-core's vocabulary-parallel ones (tensor
parallelism): TE has neither an embedding nor a vocabulary-parallel loss.

Parameter names and shapes are the torch provider's: te.Linear registers ``weight`` [out, in] and ``bias`` [out]
(module/linear.py: ``parameters_split=None`` -> weight_names ["weight"], bias_names ["bias"]), te.RMSNorm
``weight`` [dim] (ops/basic/rmsnorm.py), te.LayerNorm ``weight`` and ``bias`` [dim] (ops/basic/layer_norm.py), so
checkpoints and HF export move between providers. TE adds one ``_extra_state`` entry per TE module to the state
dict (FP8 scaling state; an empty tensor without FP8: module/base.py get_extra_state, ops/op.py get_extra_state):
a state dict without them loads into a te model (each TE module here fills the missing entry with TE's own empty
value), and :func:`strip_extra_state` drops them for the torch provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tplus_dist.backends.base import LinearRole, WholeSequence
from tplus_dist.model.init import SHARD_ATTR, Shard
from tplus_dist.model.positions import alibi_slopes

if TYPE_CHECKING:
    import torch.distributed as dist

    from tplus_dist.backends.base import LayerProvider
    from tplus_dist.config.model import ModelConfig, NormKind
    from tplus_dist.model.positions import ShawRelative, T5RelativeBias

EXTRA_STATE = "_extra_state"
"""The state-dict suffix torch gives a module's get_extra_state (TE's FP8 metadata lives there)."""

TE_VERSION = "2.20.2"
"""The Transformer Engine release this provider is written against."""


# ---------------------------------------------------------------------------------------------- the plan (pure data)
@dataclass(frozen=True)
class PiecePlan:
    """How one piece of the decoder is implemented under the te provider.

    ``piece``: what it is ("linears", "norms", "attention core", ...); ``implementation``: the TE class
    ("te.Linear") or "torch"; ``reason``: why (for TE: the settings that express our choice; for torch: what TE
    lacks); ``fallback``: a piece TE could have run that runs in torch because of a model choice (logged at build).
    """

    piece: str
    implementation: str
    reason: str
    fallback: bool = False


def norm_choice(kind: NormKind, *, bias: bool, per_head: bool = False, split: bool = False) -> tuple[str, str]:
    """(implementation, reason) for one norm: "te.RMSNorm", "te.LayerNorm" or "torch"."""
    if per_head or split:
        return "torch", (
            "QK-norm normalizes within heads (or the whole projection split over TP ranks) between the projection "
            "and the core; the torch norm keeps its gradient sum / cross-rank statistics under tensor parallelism, "
            "which TE's norms lack"
        )
    if kind == "rmsnorm":
        # TE 2.20.2 ops/basic/rmsnorm.py: zero_centered_gamma stores the gain as (1 + weight), weight initialised 0:
        # our norm_unit_offset
        return "te.RMSNorm", "y = x / rms(x) * g (zero_centered_gamma for norm_unit_offset)"
    if kind == "layernorm" and bias:
        return "te.LayerNorm", "y = (x - mean) / std * g + b (zero_centered_gamma for norm_unit_offset)"
    if kind == "layernorm":
        # TE 2.20.2 ops/basic/layer_norm.py: __init__ registers both "weight" and "bias", with no option to omit it
        return "torch", "LayerNorm without bias: TE's LayerNorm always has a bias parameter"
    return "torch", f"{kind}: TE has no BiasNorm (Zipformer's x / RMS(x - b) * exp(s))"


def attention_core_choice(cfg: ModelConfig) -> tuple[str, str]:
    """(implementation, reason) for the attention core: "te.DotProductAttention" or "torch"."""
    if cfg.position == "shaw":
        return "torch", (
            "Shaw positions add learned embeddings of the distance to the keys and the values inside attention; "
            "TE's DotProductAttention takes only additive biases on the logits"
        )
    parts = [f"causal, scale {cfg.attn_scale:g}"]
    kv = cfg.kv_heads
    if kv != cfg.n_heads:
        parts.append(f"{'MQA' if kv == 1 else 'GQA'} num_gqa_groups={kv}")
    if cfg.sliding_window is not None:
        parts.append(f"window_size=({cfg.sliding_window - 1}, 0) on local layers")
    if cfg.position == "alibi":
        parts.append("ALiBi slopes (alibi_slopes)")
    if cfg.position == "t5_bias":
        parts.append("T5 bias as post_scale_bias [1, h, s, s]")
    if cfg.attn_softcap is not None:
        # TE 2.20.2 attention/dot_product_attention/utils.py "Filter: softcap" (l. 838-866): FusedAttention (cuDNN)
        # cannot cap, so TE runs flash-attn >= 2.6 (not in the GPU kit) or its unfused PyTorch path, which
        # materialises the [b, h, s, s] scores: exact, but slow and memory-hungry at long sequences
        parts.append(
            f"softcap={cfg.attn_softcap:g} (capped before the bias, as Gemma 2; TE's unfused path without flash-attn)"
        )
    if cfg.softmax_off_by_one:
        parts.append("softmax_type='off-by-one'")
    if cfg.attn_dropout > 0:
        parts.append(f"dropout {cfg.attn_dropout:g} (same distribution, TE kernels' own RNG stream)")
    return "te.DotProductAttention", ", ".join(parts)


def te_plan(cfg: ModelConfig, tp: int = 1) -> list[PiecePlan]:
    """The te provider's implementation of each piece of ``cfg``'s decoder under ``tp`` tensor-parallel ranks.

    Pure: reads the config only (no TE import), so `tplus config --provider te` prints it on any machine. The
    rows whose ``fallback`` is set are the pieces logged at model build."""
    rows = [PiecePlan("linears", "te.Linear", "q, k, v, o and MLP projections (parallel_mode column / row under TP)")]
    if tp > 1 and cfg.kv_heads % tp:
        rows.append(
            PiecePlan(
                "kv projections",
                "torch",
                f"fewer kv heads ({cfg.kv_heads}) than tensor-parallel ranks ({tp}): whole on every rank with the "
                "gradient summed over the ranks (megatron's replication), which te.Linear has no mode for",
                fallback=True,
            )
        )
    impl, why = norm_choice(cfg.norm, bias=cfg.norm_bias)
    rows.append(PiecePlan(f"norms ({cfg.norm})", impl, why, fallback=impl == "torch"))
    if cfg.embed_norm:
        impl, why = norm_choice("layernorm", bias=True)
        rows.append(PiecePlan("embedding norm (layernorm)", impl, why, fallback=impl == "torch"))
    if cfg.qk_norm != "none":
        impl, why = norm_choice(cfg.qk_norm, bias=cfg.norm_bias, per_head=True)
        rows.append(PiecePlan(f"QK-norm ({cfg.qk_norm}, {cfg.qk_norm_scope})", impl, why, fallback=True))
    impl, why = attention_core_choice(cfg)
    rows.append(PiecePlan("attention core", impl, why, fallback=impl == "torch"))
    if cfg.activation in ("swooshr", "swooshl"):
        rows.append(
            PiecePlan(
                f"activation ({cfg.activation})",
                "torch",
                "TE has no Zipformer Swoosh activations (its fused MLP offers gelu, relu, silu and their GLUs)",
                fallback=True,
            )
        )
    else:
        rows.append(PiecePlan(f"activation ({cfg.activation})", "torch", "pointwise, between the te.Linear GEMMs"))
    if cfg.adaln != "none":
        rows.append(
            PiecePlan(
                f"adaLN modulation ({cfg.adaln})",
                "torch",
                "TE has no adaLN: the modulation linear and norm(x) * (1 + scale) + shift run in torch",
                fallback=True,
            )
        )
    rows.append(
        PiecePlan(
            "embedding, logits, loss",
            "torch" if tp == 1 else "megatron-core",
            "TE has no embedding or vocabulary-parallel loss"
            + ("" if tp == 1 else ": vocabulary-parallel embedding and cross entropy"),
        )
    )
    return rows


def format_plan(rows: list[PiecePlan]) -> str:
    """The plan as aligned text lines (piece, implementation, fallback mark, reason)."""
    w1 = max(len(r.piece) for r in rows)
    w2 = max(len(r.implementation) for r in rows)
    lines = []
    for r in rows:
        mark = "fallback" if r.fallback else ""
        lines.append(f"{r.piece:<{w1}}  {r.implementation:<{w2}}  {mark:<8}  {r.reason}".rstrip())
    return "\n".join(lines)


def fallback_notices(cfg: ModelConfig, tp: int = 1) -> list[str]:
    """One line per piece that runs in torch under the te provider (what model build logs)."""
    return [f"te provider: {r.piece} runs in torch ({r.reason})" for r in te_plan(cfg, tp) if r.fallback]


# ------------------------------------------------------------------------------------------------ availability
def te_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the te provider cannot run on ``device`` (one sentence), or None when Transformer Engine imports and
    the device is CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"model.provider te needs a CUDA device (Transformer Engine's kernels are CUDA only), and this run's "
            f"device is {device.type}"
        )
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or TE's own error loading its CUDA library
        return f"model.provider te needs Transformer Engine {TE_VERSION}, which does not import here ({e})"
    return None


class TEUnavailableError(RuntimeError):
    """The te provider was asked for where Transformer Engine cannot run (see te_unavailable_reason)."""


def strip_extra_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without TE's ``_extra_state`` entries: a te model's state dict as the torch provider loads it."""
    return {k: v for k, v in state.items() if not (k == EXTRA_STATE or k.endswith("." + EXTRA_STATE))}


def _fill_extra_state(module: nn.Module) -> None:
    """Let a state dict saved without TE (the torch provider's) load strictly into ``module``: a missing
    ``_extra_state`` entry becomes TE's own empty one (module/base.py and ops/op.py set_extra_state return early
    on an empty tensor, and get_extra_state writes one when there is no FP8 state)."""

    def hook(state: dict[str, Any], prefix: str, *args: Any) -> None:
        state.setdefault(prefix + EXTRA_STATE, torch.empty(0, dtype=torch.uint8))

    module._register_load_state_dict_pre_hook(hook)


def _shard(p: torch.Tensor | None, dim: int, rank: int, parts: int) -> None:
    """Mark a split parameter for model/init.py (draw whole, keep the slice) and full-state gathering."""
    if p is not None and parts > 1:
        setattr(p, SHARD_ATTR, Shard(dim, rank, parts))


# ------------------------------------------------------------------------------------------------------ provider
class TEProvider(WholeSequence):
    """LayerProvider of Transformer Engine's modules (see the module docstring).

    ``tp_group``: the tensor-parallel process group (None: one process). ``device``: where parameters are allocated
    (CUDA). ``params_dtype``: the parameters' dtype (fp32 master weights under bf16 autocast).
    Raises TEUnavailableError (one sentence) where TE cannot run: not CUDA, or TE not importable."""

    name = "te"

    def __init__(
        self,
        tp_group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | str,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        reason = te_unavailable_reason(self.device)
        if reason is not None:
            raise TEUnavailableError(reason)
        import torch.distributed as dist

        self.params_dtype = params_dtype
        self.group = tp_group
        self.tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        # the embedding, logits, loss and the torch fallbacks: the torch provider, or megatron-core's tensor-parallel
        # pieces (vocabulary-parallel embedding and loss, QK-norm gradient sums, replicated kv projections)
        self.base: LayerProvider
        if self.tp_size > 1:
            from tplus_dist.backends.megatron_provider import MegatronProvider

            assert tp_group is not None
            self.base = MegatronProvider(tp_group, device=self.device, params_dtype=params_dtype)
        else:
            from tplus_dist.backends.torch_provider import TorchProvider

            self.base = TorchProvider()
        self._announced = False

    @staticmethod
    def _te() -> Any:
        import transformer_engine.pytorch as te

        return te

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        if role == "vocab" or role == "replicated":
            # the head's weight is only read by logits() (never called as a module); a replicated kv projection is
            # megatron's (te_plan's "kv projections" row)
            return self.base.linear(in_features, out_features, bias=bias, role=role)
        te, n, r = self._te(), self.tp_size, self.tp_rank
        m = te.Linear(
            in_features,
            out_features,
            bias=bias,
            # TE 2.20.2 module/linear.py l. 2062-2065: "column" divides out_features by tp_size, "row" in_features;
            # a row linear all-reduces its output and adds the bias after the reduction (gemm_bias_unfused_add,
            # l. 2247); None (one process) does no communication. tp_size is read from tp_group when one is given
            # (l. 2048-2054). Without bias, .bias is an empty tensor, not a parameter (l. 2236)
            parallel_mode=role if n > 1 else None,
            tp_group=self.group,
            tp_size=n,
            params_dtype=self.params_dtype,
            device=self.device,
        )
        _shard(m.weight, 0 if role == "column" else 1, r, n)
        if bias and role == "column":  # a row linear's bias is whole on every rank
            _shard(m.bias, 0, r, n)
        _fill_extra_state(m)
        return m

    def norm(
        self,
        kind: NormKind,
        dim: int,
        *,
        eps: float,
        bias: bool,
        unit_offset: bool,
        per_head: bool = False,
        split: bool = False,
    ) -> nn.Module:
        impl, _ = norm_choice(kind, bias=bias, per_head=per_head, split=split)
        if impl == "torch":
            return self.base.norm(
                kind, dim, eps=eps, bias=bias, unit_offset=unit_offset, per_head=per_head, split=split
            )
        te = self._te()
        cls = te.RMSNorm if impl == "te.RMSNorm" else te.LayerNorm
        # TE 2.20.2 module/rmsnorm.py, module/layernorm.py: normalized_shape, eps, zero_centered_gamma (the gain is
        # 1 + weight, weight initialised to 0, ops/basic/rmsnorm.py l. 148-151: our unit_offset); device and dtype
        # go to the op through **kwargs (ops/basic/rmsnorm.py l. 73-82, ops/basic/layer_norm.py l. 74-83). The op
        # normalises in the autocast dtype (ops/basic/rmsnorm.py l. 188: maybe_autocast_dtype), so under bf16
        # autocast its output is bf16. The norm is replicated over TP ranks, like the torch provider's.
        m = cls(dim, eps=eps, zero_centered_gamma=unit_offset, device=self.device, dtype=self.params_dtype)
        _fill_extra_state(m)
        return m

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return self.base.embedding(num_embeddings, dim)

    def head_table(self, rows: int, n_heads: int) -> nn.Parameter:
        return self.base.head_table(rows, n_heads)

    def across_heads(self) -> nn.Module | None:
        return self.base.across_heads()

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        self._announce(cfg)
        impl, _ = attention_core_choice(cfg)
        if impl == "torch":
            return self.base.attention_core(cfg, layer)
        per = cfg.n_heads // self.tp_size
        return TEAttentionCore(
            cfg, layer, heads=range(self.tp_rank * per, (self.tp_rank + 1) * per), device=self.device
        )

    def logits(self, x: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return self.base.logits(x, weight, vocab_size)

    def lm_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, z_loss: float, ignore_index: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.base.lm_loss(logits, targets, vocab_size=vocab_size, z_loss=z_loss, ignore_index=ignore_index)

    def _announce(self, cfg: ModelConfig) -> None:
        """The fallback pieces, one line each, once per provider (rank 0 only: console.notice_once)."""
        if self._announced:
            return
        self._announced = True
        from tplus_dist.console import notice_once

        for line in fallback_notices(cfg, self.tp_size):
            notice_once(line)


class TEAttentionCore(nn.Module):
    """softmax(scale * q k^T (+ bias), masked) v by te.DotProductAttention over this rank's heads: q [b, h, s, d],
    k/v [b, kv, s, d] -> [b, h, s, d], as model/attention.py's AttentionCore (the same choices, computed by TE).

    ``heads``: the global indices of this rank's query heads (ALiBi's slopes depend on them). T5's per-layer
    learned bias (``rel_bias``, set by Attention) is computed in torch and handed to TE as a post-scale bias."""

    slopes: torch.Tensor

    def __init__(self, cfg: ModelConfig, layer: int, *, heads: range, device: torch.device) -> None:
        super().__init__()
        import transformer_engine.pytorch as te

        h = len(heads)
        tp = cfg.n_heads // h
        kv = cfg.kv_heads // tp if cfg.kv_heads % tp == 0 else 1  # replicated kv: this rank reads one kv head
        self.window = cfg.sliding_window if cfg.layer_is_local(layer) else None
        self.alibi = cfg.position == "alibi"
        if self.alibi:
            # utils.py get_alibi (l. 2154): custom slopes are "FP32, CUDA tensor, of shape [num_heads]" (this rank's
            # heads); made on the device here so a model whose torch pieces are not moved yet still runs
            slopes = alibi_slopes(cfg.n_heads)[heads.start : heads.stop].float().contiguous().to(device)
            self.register_buffer("slopes", slopes, persistent=False)
        self.rel_bias: T5RelativeBias | None = None
        self.shaw: ShawRelative | None = None  # never set: Shaw positions run the torch core (te_plan)
        self.dpa = te.DotProductAttention(
            # this rank's head counts with tp_size 1: DotProductAttention's own TP only divides the counts by tp_size
            # (TE 2.20.2 attention/dot_product_attention/dot_product_attention.py l. 925-926, and forward asserts k's
            # heads == num_gqa_groups // tp_size, l. 2379), so a replicated kv head (kv < tp) would divide to 0
            h,
            cfg.dim_head,  # kv_channels: the head size of q, k and v
            num_gqa_groups=kv,
            # applied in training mode only, as our core (backends.py l. 1167, 2603: "if self.training else 0.0";
            # the unfused path's torch.nn.Dropout, l. 412)
            attention_dropout=cfg.attn_dropout,
            # [b, s, h, d] in, [b, s, h * d] out (backends.py l. 792: view(batch_size, max_seqlen_q, -1))
            qkv_format="bshd",
            # top-left causal: with s_q == s_kv the same as bottom-right; forward forces bottom_right_diagonal False
            # for "causal" (dot_product_attention.py l. 2400-2401), which also aligns the ALiBi bias top-left
            attn_mask_type="causal",
            # query i sees keys j with i - w0 <= j <= i + w1, inclusive (dot_product_attention.py docstring l. 748;
            # utils.py get_full_mask l. 2103, 2115: visible iff (i - j) - w0 <= 0); ours (model/attention.py
            # attention_mask) sees i - j < window, so w0 = window - 1 (as Hugging Face's and flash-attn's
            # sliding_window - 1); (-1, 0) is the plain causal mask (utils.py check_set_window_size l. 2992)
            window_size=(self.window - 1, 0) if self.window is not None else (-1, 0),
            # backends.py l. 697-699 (UnfusedDotProductAttention): cap * tanh(scores / cap) on the scaled logits
            # before post_scale_bias / ALiBi are added (Gemma 2's order, ours); utils.py l. 838-866 leaves only
            # backends that honour it (never FusedAttention)
            softcap=cfg.attn_softcap or 0.0,
            softmax_scale=cfg.attn_scale,
            # dot_product_attention.py docstring l. 795-798: "off-by-one" is exp(S_i) / (1 + sum_j exp(S_j)), a zero
            # sink (l. 963-966: a zeros tensor, no parameter; backends.py l. 719-730 appends it as a column)
            softmax_type="off-by-one" if cfg.softmax_off_by_one else "vanilla",
            layer_number=layer + 1,  # (1-based in TE; used for its logs and qk-layer-scaling, which is off)
        )
        _fill_extra_state(self.dpa)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``bias``: a relative bias [h, s, s] shared by every layer (T5), added to the scaled logits."""
        b, h, s, d = q.shape
        # TE's kernels take q, k, v in one dtype: the autocast dtype under autocast (the projections' output)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
        q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # [b, s, heads, d]
        learned = self.rel_bias(s, q.device, dtype) if self.rel_bias is not None else bias
        kwargs: dict[str, Any] = {}
        if learned is not None:
            # dot_product_attention.py forward: core_attention_bias_type "post_scale_bias" adds the bias after the
            # scale (and after softcap: backends.py deferred_bias); shape [1, h, s, s] ("1hss", which
            # FusedAttention can differentiate, utils.py Filter: Attention bias)
            kwargs.update(core_attention_bias_type="post_scale_bias", core_attention_bias=learned.to(dtype)[None])
        elif self.alibi:
            # utils.py get_alibi l. 2218-2219: -|i - j| * slope, FP32 slopes of shape [h]; bottom_right_diagonal
            # False for the causal mask aligns it top-left, i.e. -(i - j) * slope on the visible keys, as ours
            # (model/positions.py alibi_bias). TE caches the bias in a module-level dict (_alibi_cache,
            # dot_product_attention.py l. 2680-2701), refreshed when layer_number is 1 or the shape changes
            kwargs.update(core_attention_bias_type="alibi", alibi_slopes=self.slopes.float())
        out = self.dpa(q, k, v, **kwargs)  # [b, s, h * d]
        return out.view(b, s, h, d).transpose(1, 2)
