"""Position information: learned and sinusoidal tables, rotary embeddings, ALiBi biases."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The original Transformer's table: sin on even, cos on odd dimensions, [n_positions, dim]."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table.float()


class Rotary(nn.Module):
    """RoPE (Su et al.) in the half-split layout Llama and GPT-NeoX use; rotates the first ``rot_dim``
    dimensions of each head (partial rotary) and leaves the rest."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, rot_dim: int, theta: float, max_len: int) -> None:
        super().__init__()
        self.rot_dim = rot_dim
        self.head_dim = head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
        t = torch.arange(max_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [s, rot_dim]
        # non-persistent: derived from the config, so never stored in checkpoints
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, h, s, head_dim] -> same shape, positions 0..s-1."""
        s = x.shape[-2]
        cos = self.cos[:s].to(x.dtype)
        sin = self.sin[:s].to(x.dtype)
        if self.rot_dim == self.head_dim:
            return x * cos + self._rotate_half(x) * sin
        xr, xp = x[..., : self.rot_dim], x[..., self.rot_dim :]
        return torch.cat((xr * cos + self._rotate_half(xr) * sin, xp), dim=-1)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s head slopes: a geometric sequence 2^(-8/n); non-powers of two interleave
    the slopes of the next power of two, as the reference implementation does."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_2(closest) + extra)


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[h, s, s] additive bias -slope * (i - j) (zero on the diagonal; the causal mask is separate)."""
    pos = torch.arange(seq_len)
    dist = (pos[:, None] - pos[None, :]).float()
    return -slopes[:, None, None].float() * dist


def t5_relative_buckets(
    seq_len: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """[s, s] long: T5's causal bucket of the distance n = i - j (query i, key j; 0 for j > i, masked anyway):
    n itself below num_buckets / 2, then log-spaced up to max_distance, then the last bucket (Raffel et al. 2020,
    ``_relative_position_bucket`` with bidirectional=False)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    n = (i - j).clamp(min=0)
    exact = num_buckets // 2
    far = (
        exact
        + (
            torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    return torch.where(n < exact, n, far.clamp(max=num_buckets - 1))


class T5RelativeBias(nn.Module):
    """A learned bias per (distance bucket, head), added to the attention logits: [buckets, heads] (this rank's
    heads under tensor parallelism), one per layer or one for all layers (T5)."""

    def __init__(self, weight: nn.Parameter, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.weight = weight
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[heads, s, s] additive bias."""
        buckets = t5_relative_buckets(seq_len, self.num_buckets, self.max_distance, device)
        return self.weight.to(dtype)[buckets].permute(2, 0, 1)


class ShawRelative(nn.Module):
    """Shaw, Uszkoreit and Vaswani (2018): learned embeddings a^K, a^V of the clipped distance i - j (0 .. k, causal),
    added to the keys and the values inside attention:
        e_ij = scale * q_i . (k_j + a^K_(i-j)),     z_i = sum_j p_ij (v_j + a^V_(i-j)).
    Computed without [s, s, head_dim] tensors: q a^K^T gathered by distance, and p summed per distance then times
    a^V. One pair per layer, shared by the heads (``param_map`` sums their gradient over tensor-parallel ranks)."""

    def __init__(self, max_distance: int, head_dim: int, param_map: nn.Module | None = None) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.keys = nn.Parameter(torch.empty(max_distance + 1, head_dim))
        self.values = nn.Parameter(torch.empty(max_distance + 1, head_dim))
        self.param_map = param_map

    def _p(self, t: torch.Tensor) -> torch.Tensor:
        return self.param_map(t) if self.param_map is not None else t

    def distances(self, s: int, device: torch.device) -> torch.Tensor:
        i = torch.arange(s, device=device)[:, None]
        j = torch.arange(s, device=device)[None, :]
        return (i - j).clamp(0, self.max_distance)

    def key_logits(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """q [b, h, s, d] -> q_i . a^K_(i-j) as [b, h, s, s]."""
        qa = q @ self._p(self.keys).to(q.dtype).t()  # [b, h, s, k + 1]
        return qa.gather(-1, idx.expand(*q.shape[:2], -1, -1))

    def value_sum(self, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """probs [b, h, s, s] -> sum_j p_ij a^V_(i-j) as [b, h, s, d]."""
        per = torch.zeros(*probs.shape[:-1], self.max_distance + 1, dtype=probs.dtype, device=probs.device)
        per = per.scatter_add(-1, idx.expand(*probs.shape[:2], -1, -1), probs)
        return per @ self._p(self.values).to(probs.dtype)
