"""The decoder, top to bottom: embed -> (embed norm) -> blocks -> final norm -> head -> logits."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tplus_dist.backends import LayerProvider, get_provider
from tplus_dist.config.model import ModelConfig
from tplus_dist.model.attention import softcap
from tplus_dist.model.block import Block
from tplus_dist.model.init import init_weights, module_weight
from tplus_dist.model.norms import make_norm
from tplus_dist.model.positions import Rotary, sinusoidal_table

ParamKind = Literal["embedding", "hidden", "head", "vector"]


class Decoder(nn.Module):
    pos_table: torch.Tensor

    def __init__(self, cfg: ModelConfig, provider: LayerProvider | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        provider = provider or get_provider("torch")
        self.provider_name = provider.name
        d = cfg.d_model
        self.embed = provider.embedding(cfg.padded_vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.seq_len, d) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.seq_len, d), persistent=False)
        rotary = Rotary(cfg.dim_head, cfg.rope_dim, cfg.rope_theta, cfg.seq_len) if cfg.position == "rope" else None
        # BLOOM's embedding norm is a LayerNorm with bias whatever the model's norm choice
        self.embed_norm = (
            provider.norm("layernorm", d, eps=cfg.norm_eps, bias=True, unit_offset=False) if cfg.embed_norm else None
        )
        # one Rotary shared by every layer: its tables are buffers, not parameters
        self.layers = nn.ModuleList(Block(cfg, i, provider, rotary) for i in range(cfg.n_layers))
        self.final_norm = make_norm(provider, cfg, d) if cfg.final_norm else None
        self.head = None if cfg.tie_embeddings else provider.linear(d, cfg.padded_vocab_size, bias=False, role="vocab")
        self.logit_mult = 1.0
        if cfg.output_logit_scale:
            self.logit_mult /= math.sqrt(d)
        if cfg.init == "mup":
            self.logit_mult *= cfg.mup_output_mult / cfg.width_mult
        init_weights(self, cfg)

    # ------------------------------------------------------------------ forward
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.embed(tokens)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.d_model)
        s = tokens.shape[1]
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(s, device=tokens.device))
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[:s].to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if cfg.embed_dropout > 0:
            x = F.dropout(x, cfg.embed_dropout, self.training)
        return x

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        weight = module_weight(self.head if self.head is not None else self.embed)
        # the padding rows exist for matmul shapes and tensor-parallel splits; slicing the weight (a
        # contiguous view) rather than the logits skips their compute and a copy of the logits
        logits = F.linear(x, weight[: self.cfg.vocab_size])
        if self.logit_mult != 1.0:
            logits = logits * self.logit_mult
        if self.cfg.final_logit_softcap is not None:
            logits = softcap(logits, self.cfg.final_logit_softcap)
        return logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, vocab_size] logits."""
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output_logits(x)

    # ------------------------------------------------------------- bookkeeping
    def parameter_kinds(self) -> Iterator[tuple[str, nn.Parameter, ParamKind]]:
        """Each parameter with its role for weight decay and muP:
        embedding (input lookups), head (output projection), hidden (other matrices), vector (norms, biases)."""
        for name, p in self.named_parameters():
            if name.startswith(("embed.", "pos_embed.")):
                yield name, p, "embedding"
            elif name.startswith("head."):
                yield name, p, "head"
            elif p.ndim >= 2:
                yield name, p, "hidden"
            else:
                yield name, p, "vector"

    def blocks(self) -> list[Block]:
        return [typing.cast(Block, layer) for layer in self.layers]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_matmul_params(self) -> int:
        """Parameters that take part in matrix multiplies (the N of 6N): every matrix except input
        lookups, plus the output projection (the tied embedding counts once, as the head)."""
        n = sum(p.numel() for _, p, kind in self.parameter_kinds() if kind == "hidden")
        return n + self.cfg.vocab_size * self.cfg.d_model  # the head computes the real vocabulary only

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 * n_layers * d_model * seq_len (PaLM appendix B);
        the second term is attention's QK^T and AV, forward and backward, counted without causal savings."""
        cfg = self.cfg
        return 6.0 * self.num_matmul_params() + 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_head * seq_len
