"""The decoder, top to bottom: embed -> (embed norm) -> blocks -> final norm -> head -> logits."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from tplus_dist.backends import LayerProvider, get_provider
from tplus_dist.config.model import ModelConfig
from tplus_dist.faults import inject
from tplus_dist.model.attention import softcap
from tplus_dist.model.block import Block
from tplus_dist.model.init import draw_init_seed, init_weights, module_weight
from tplus_dist.model.norms import make_norm
from tplus_dist.model.positions import Rotary, T5RelativeBias, sinusoidal_table

ParamKind = Literal["embedding", "hidden", "head", "vector"]


def parameter_kind(name: str, p: torch.Tensor) -> ParamKind:
    """The role of the decoder's parameter ``name`` (see Decoder.parameter_kinds)."""
    if name.startswith(("embed.", "pos_embed.", "cond_embed.")):
        return "embedding"
    if name.startswith("head."):
        return "head"
    return "hidden" if p.ndim >= 2 else "vector"


class Decoder(nn.Module):
    """The whole decoder, or a part of it for a pipeline stage: ``layers`` (global indices, default all),
    with or without the embedding (``embed``) and the final norm + output projection (``head``); a head part
    of a tied model with ``tied_output`` keeps its own copy of the embedding as the projection (the pipeline
    then sums the two copies' gradients). Parameter
    names are the whole decoder's in every part ("layers.5.attn.wq.weight"), and so are initial values
    (model/init.py draws each parameter from its name)."""

    pos_table: torch.Tensor

    def __init__(
        self,
        cfg: ModelConfig,
        provider: LayerProvider | None = None,
        *,
        layers: Sequence[int] | None = None,
        embed: bool = True,
        head: bool = True,
        tied_output: bool = False,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        # drawn first: building layers may consume the global generator (megatron-core's do)
        seed = draw_init_seed() if init_seed is None else init_seed
        self.cfg = cfg
        provider = provider or get_provider("torch")
        self.provider = provider
        self.provider_name = provider.name
        self.has_embed, self.has_head = embed, head
        d = cfg.d_model
        own_output = head and tied_output and cfg.tie_embeddings
        self.embed = provider.embedding(cfg.padded_vocab_size, d) if embed or own_output else None
        self.pos_embed = nn.Embedding(cfg.seq_len, d) if embed and cfg.position == "learned" else None
        # adaLN's label embeddings (whole on every rank, like the norms)
        self.cond_embed = nn.Embedding(cfg.n_conditions, d) if cfg.adaln != "none" else None
        if embed and cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.seq_len, d), persistent=False)
        rotary = Rotary(cfg.dim_head, cfg.rope_dim, cfg.rope_theta, cfg.seq_len) if cfg.position == "rope" else None
        # BLOOM's embedding norm is a LayerNorm with bias whatever the model's norm choice
        self.embed_norm = (
            provider.norm("layernorm", d, eps=cfg.norm_eps, bias=True, unit_offset=False)
            if embed and cfg.embed_norm
            else None
        )
        # keyed by global index, so that a stage's parameters keep the whole model's names;
        # one Rotary shared by every layer: its tables are buffers, not parameters
        indices = range(cfg.n_layers) if layers is None else layers
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, provider, rotary) for i in indices})
        # T5's relative bias, one table for every layer: computed once per forward and handed to each layer
        self.rel_bias = (
            T5RelativeBias(
                provider.head_table(cfg.t5_bias_buckets, cfg.n_heads), cfg.t5_bias_buckets, cfg.t5_bias_max_distance
            )
            if cfg.position == "t5_bias" and cfg.t5_bias_shared and len(self.layers) > 0
            else None
        )
        self.final_norm = make_norm(provider, cfg, d) if head and cfg.final_norm else None
        self.head = (
            provider.linear(d, cfg.padded_vocab_size, bias=False, role="vocab")
            if head and not cfg.tie_embeddings
            else None
        )
        self.logit_mult = 1.0
        if cfg.output_logit_scale:
            self.logit_mult /= math.sqrt(d)
        if cfg.init == "mup":
            self.logit_mult *= cfg.mup_output_mult / cfg.width_mult
        init_weights(self, cfg, seed)

    # ------------------------------------------------------------------ forward
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        assert self.has_embed and self.embed is not None, "this part of the decoder has no embedding"
        x = self.embed(tokens)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.d_model)
        s = tokens.shape[1]
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(s, device=tokens.device))
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[:s].to(x.dtype)
        # under sequence parallelism the residual stream is this rank's part of the sequence from here on (Megatron
        # scatters after the position embeddings too: LanguageModelEmbedding.forward), and its dropout draws per part
        x = self.provider.scatter_sequence(x)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.provider.sequence_dropout(x, cfg.embed_dropout, self.training)

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, then the output projection (the head, or the tied embedding)."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        out = self.head if self.head is not None else self.embed
        assert out is not None, "this part of the decoder has neither the head nor the (tied) embedding"
        return self.project(x, module_weight(out))

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x times the output rows ``weight``, then the logit multiplier and final soft-cap."""
        logits = self.provider.logits(x, weight, self.cfg.vocab_size)
        if self.logit_mult != 1.0:
            logits = logits * self.logit_mult
        if self.cfg.final_logit_softcap is not None:
            logits = softcap(logits, self.cfg.final_logit_softcap)
        return logits

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, vocab_size] logits (under tensor parallelism: this rank's
        vocabulary slice, padded). A part without the embedding takes hidden states [batch, seq, d_model]; a
        part without the head returns them (as does a tied model's last part, whose projection the pipeline's
        tied embedding applies). ``labels`` [batch]: each sequence's condition (model.adaln); None runs the
        plain model."""
        if not torch.compiler.is_compiling():  # (a compiled graph leaves the failpoint out)
            inject("forward")  # a failpoint (tplus_dist/faults.py): nothing unless TPLUS_FAULT names it
        cond = self.condition(labels) if labels is not None else None
        # the whole sequence's length (a part after the embedding may hold 1/sequence_shards of it)
        s = x.shape[1] if self.has_embed else x.shape[1] * self.provider.sequence_shards
        if self.has_embed:
            if x.shape[1] > self.cfg.seq_len:
                raise ValueError(f"sequence of {x.shape[1]} tokens is longer than model.seq_len={self.cfg.seq_len}")
            x = self.embed_tokens(x)
        bias = self.rel_bias(s, x.device, x.dtype) if self.rel_bias is not None else None
        for layer in self.layers.values():
            x = layer(x, bias, cond) if bias is not None or cond is not None else layer(x)
        if not self.has_head:
            # a pipeline sends it to the next stage as it is laid out (torch.distributed.send needs it contiguous;
            # a sequence-parallel residual stream is a transposed view, see backends/megatron_provider.py)
            return x.contiguous()
        if self.head is None and self.embed is None:
            return self.final_norm(x) if self.final_norm is not None else x
        return self.output_logits(x)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """The label embeddings [batch, d_model]; ValueError for a model without adaLN or a label out of range."""
        if self.cond_embed is None:
            raise ValueError("labels were given, but the model has no conditioning (model.adaln is none)")
        n = self.cfg.n_conditions
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            bad = labels[(labels < 0) | (labels >= n)][0].item()
            raise ValueError(f"condition label {bad} is outside model.n_conditions (0 .. {n - 1})")
        return self.cond_embed(labels)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token loss of ``forward``'s logits (cross entropy + z-loss), across tensor-parallel ranks."""
        c = self.cfg
        return self.provider.lm_loss(
            logits, targets, vocab_size=c.vocab_size, z_loss=c.z_loss, ignore_index=c.ignore_index
        )

    # ------------------------------------------------------------- bookkeeping
    def parameter_kinds(self) -> Iterator[tuple[str, nn.Parameter, ParamKind]]:
        """Each parameter with its role for weight decay and muP:
        embedding (input lookups), head (output projection), hidden (other matrices), vector (norms, biases)."""
        for name, p in self.named_parameters():
            yield name, p, parameter_kind(name, p)

    def blocks(self) -> list[Block]:
        return [typing.cast(Block, layer) for layer in self.layers.values()]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_matmul_params(self) -> int:
        """Parameters that take part in matrix multiplies (the N of 6N) in the whole model: every matrix
        except input lookups, plus the output projection (the tied embedding counts once, as the head)."""
        n = sum(p.numel() for _, p, kind in self.parameter_kinds() if kind == "hidden")
        return n + self.cfg.vocab_size * self.cfg.d_model  # the head computes the real vocabulary only

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the whole model, however it is split (see model_flops_per_token)."""
        return model_flops_per_token(self.cfg, seq_len)


def _shapes_only(cfg: ModelConfig) -> Decoder:
    with torch.device("meta"):
        return Decoder(cfg, init_seed=0)


def model_num_params(cfg: ModelConfig) -> int:
    """Parameters of the whole model (counted on the meta device)."""
    return _shapes_only(cfg).num_params()


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * n_layers * d_model * seq_len (PaLM appendix B); the second term
    is attention's QK^T and AV, forward and backward, counted without causal savings. N is counted on the
    whole single-device model (built on the meta device: shapes, no memory)."""
    whole = _shapes_only(cfg)
    return 6.0 * whole.num_matmul_params() + 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_head * seq_len
