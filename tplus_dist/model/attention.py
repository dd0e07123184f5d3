"""Multi-head attention with every choice: GQA/MQA, QK-norm (per head or over the projection), RoPE/ALiBi,
soft-capping, the off-by-one softmax, sliding windows. Flash attention (SDPA) where the choices allow it, an exact
path otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tplus_dist.model.norms import make_norm
from tplus_dist.model.positions import Rotary, ShawRelative, T5RelativeBias, alibi_bias, alibi_slopes

if TYPE_CHECKING:
    from tplus_dist.backends.base import LayerProvider, LinearRole
    from tplus_dist.config.model import ModelConfig


def attention_mask(seq_len: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """[s, s] bool, True where query i may see key j: causal, and within ``window`` tokens if set."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    return mask


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


class AttentionCore(nn.Module):
    """softmax(scale * q k^T + bias, masked) v. q [b, h, s, d], k/v [b, kv, s, d] -> [b, h, s, d].

    ``heads`` are the global indices of the query heads this core computes (all of them in one process;
    a tensor-parallel rank's share otherwise): ALiBi's slopes depend on them."""

    slopes: torch.Tensor

    def __init__(self, cfg: ModelConfig, layer: int, heads: range | None = None) -> None:
        super().__init__()
        heads = heads if heads is not None else range(cfg.n_heads)
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.off_by_one = cfg.softmax_off_by_one
        self.window = cfg.sliding_window if cfg.layer_is_local(layer) else None
        self.dropout = cfg.attn_dropout
        self.alibi = cfg.position == "alibi"
        if self.alibi:
            slopes = alibi_slopes(cfg.n_heads)[heads.start : heads.stop].contiguous()
            self.register_buffer("slopes", slopes, persistent=False)
        # a T5 relative bias of this layer's own (t5_bias_shared false); a shared one comes as forward's ``bias``
        self.rel_bias: T5RelativeBias | None = None
        self.shaw: ShawRelative | None = None  # set by Attention (position shaw)
        # SDPA's kernels cover scale, masks, additive biases and GQA, not softcap, off-by-one or Shaw's values
        self.use_sdpa = self.softcap is None and not self.off_by_one and cfg.position != "shaw"

    def _learned(
        self, s: int, device: torch.device, dtype: torch.dtype, shared: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The learned relative bias [h, s, s] (this layer's own, or the shared one), or None."""
        if self.rel_bias is not None:
            return self.rel_bias(s, device, dtype)
        return shared.to(dtype) if shared is not None else None

    def _bias(
        self, s: int, device: torch.device, dtype: torch.dtype, learned: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Float [h|1, s, s] additive mask (-inf where hidden), or None for the plain causal case."""
        if not self.alibi and self.window is None and learned is None:
            return None
        keep = attention_mask(s, self.window, device)
        bias = torch.zeros(s, s, device=device, dtype=dtype).masked_fill(~keep, float("-inf"))
        if self.alibi:
            bias = bias + alibi_bias(self.slopes, s).to(device=device, dtype=dtype)
        if learned is not None:
            bias = bias + learned
        return bias

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``bias``: a relative bias [h, s, s] shared by every layer (T5), added to the logits."""
        s = q.shape[-2]
        dropout = self.dropout if self.training else 0.0
        learned = self._learned(s, q.device, q.dtype, bias)
        if self.use_sdpa:
            bias = self._bias(s, q.device, q.dtype, learned)
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=bias,
                is_causal=bias is None,
                dropout_p=dropout,
                scale=self.scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        return self.exact(q, k, v, dropout, learned)

    def exact(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dropout: float = 0.0,
        learned: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s = q.shape[-2]
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1)
        idx = self.shaw.distances(s, q.device) if self.shaw is not None else None
        if self.shaw is not None and idx is not None:
            scores = scores + self.shaw.key_logits(q, idx)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scale  # fp64 stays fp64
        if self.softcap is not None:  # Gemma 2 caps before the bias and mask
            scores = softcap(scores, self.softcap)
        if self.alibi:
            scores = scores + alibi_bias(self.slopes, s).to(scores.device)
        if learned is not None:
            scores = scores + learned.to(scores.dtype)
        keep = attention_mask(s, self.window, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        if self.off_by_one:
            # exp(x_i) / (1 + sum_j exp(x_j)), stably: shift by m = max(0, max_j x_j)
            m = scores.amax(dim=-1, keepdim=True).clamp_min(0.0)
            e = torch.exp(scores - m)
            probs = e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))
        else:
            probs = scores.softmax(dim=-1)
        probs = probs.type_as(q)
        if dropout > 0:
            probs = F.dropout(probs, dropout)
        out = probs @ v
        if self.shaw is not None and idx is not None:
            out = out + self.shaw.value_sum(probs, idx)
        return out


class Attention(nn.Module):
    """Under tensor parallelism each rank computes n_heads / tp query heads and the kv heads they read:
    n_kv_heads / tp of them, or, with fewer kv heads than ranks, the one its query heads share (the key and
    value projections are then whole on every rank, and each rank keeps its head: Megatron's replication)."""

    def __init__(self, cfg: ModelConfig, layer: int, provider: LayerProvider, rotary: Rotary | None) -> None:
        super().__init__()
        self.head_dim = cfg.dim_head
        tp, kv, dh = provider.tp_size, cfg.kv_heads, cfg.dim_head
        qkv_bias = cfg.linear_bias or cfg.qkv_bias  # qkv_bias: Qwen2's biases on q, k, v only
        self.wq = provider.linear(cfg.d_model, cfg.n_heads * dh, bias=qkv_bias, role="column")
        kv_role: LinearRole = "column" if kv % tp == 0 else "replicated"
        # the kv head this rank's query heads [r h/tp, (r+1) h/tp) read: head i reads kv head i // (h / kv)
        self.kv_index = None if kv_role == "column" else provider.tp_rank * kv // tp
        self.wk = provider.linear(cfg.d_model, kv * dh, bias=qkv_bias, role=kv_role)
        self.wv = provider.linear(cfg.d_model, kv * dh, bias=qkv_bias, role=kv_role)
        self.wo = provider.linear(cfg.n_heads * cfg.dim_head, cfg.d_model, bias=cfg.linear_bias, role="row")
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.whole_projection_norm = cfg.qk_norm != "none" and cfg.qk_norm_scope == "projection"
        if cfg.qk_norm != "none" and cfg.qk_norm_scope == "projection":
            # OLMo 2: one norm over all of q's n_heads * head_dim features, one over k's; split over the ranks like
            # the projection (statistics reduced across them), or, for a replicated key projection, whole on every
            # rank with its gain's gradient summed (each rank uses its own kv head of the output)
            self.q_norm = make_norm(provider, cfg, cfg.n_heads * dh, cfg.qk_norm, split=True)
            replicated = kv_role == "replicated"
            self.k_norm = make_norm(provider, cfg, kv * dh, cfg.qk_norm, split=not replicated, per_head=replicated)
        elif cfg.qk_norm != "none":
            self.q_norm = make_norm(provider, cfg, cfg.dim_head, cfg.qk_norm, per_head=True)
            self.k_norm = make_norm(provider, cfg, cfg.dim_head, cfg.qk_norm, per_head=True)
        self.rotary = rotary
        self.core = provider.attention_core(cfg, layer)
        if cfg.position == "shaw":
            self.core.shaw = ShawRelative(cfg.shaw_max_distance, cfg.dim_head, provider.across_heads())
        if cfg.position == "t5_bias" and not cfg.t5_bias_shared:
            self.core.rel_bias = T5RelativeBias(
                provider.head_table(cfg.t5_bias_buckets, cfg.n_heads), cfg.t5_bias_buckets, cfg.t5_bias_max_distance
            )

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: the shared relative bias [h, s, s], if the model has one."""
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        b, s = q.shape[:2]  # the whole sequence: under sequence parallelism x holds this rank's part of it
        if self.whole_projection_norm and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        if self.kv_index is not None:
            k, v = k[:, :, self.kv_index : self.kv_index + 1], v[:, :, self.kv_index : self.kv_index + 1]
        if not self.whole_projection_norm and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        out = self.core(q, k, v, bias) if bias is not None else self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))
