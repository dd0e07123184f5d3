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
