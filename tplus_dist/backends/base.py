"""The seam between the single-device decoder and the parallel/fused layer implementations.

The decoder asks a provider for its linears, norms, embedding and attention core, saying what
each one is for (``role``). A tensor-parallel provider splits "column" linears by output features
and "row" linears by input features (Megatron's pairing), and the vocabulary of "vocab" ones;
"replicated" linears are whole on every rank (key/value projections when there are fewer kv heads
than tensor-parallel ranks). It also owns the output projection and the loss, because under tensor
parallelism the logits are split by vocabulary and the loss must be computed across ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig, NormKind

LinearRole = Literal["column", "row", "vocab", "replicated"]


class LayerProvider(Protocol):
    name: str
    tp_size: int
    """Tensor-parallel ranks the layers are split over (1: whole layers)."""
    tp_rank: int

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        """A linear map [..., in] -> [..., out / tp_size] ("column", "vocab"), [..., in / tp_size] -> [..., out]
        ("row"), or [..., in] -> [..., out] ("replicated")."""
        ...

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
        """A norm over the last ``dim`` features. ``per_head``: it normalizes this rank's heads only (QK-norm), so
        under tensor parallelism the gradient of its gain is summed over the ranks. ``split``: a norm over the whole
        output of a column-parallel projection of ``dim`` features (QK-norm over the projection, OLMo 2): each rank
        holds and normalizes dim / tp_size of them, with that slice of the gain (and bias), and the mean and mean
        square are reduced over the ranks, so the result is the one-process norm's slice."""
        ...

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Token embedding; ``.weight`` is this rank's [num_embeddings / tp_size, dim] rows (shared with a tied
        head)."""
        ...

    def head_table(self, rows: int, n_heads: int) -> nn.Parameter:
        """A [rows, n_heads / tp_size] parameter: a per-head table (relative-position biases) of this rank's heads,
        uninitialized (model/init.py draws it whole and keeps the slice)."""
        ...

    def across_heads(self) -> nn.Module | None:
        """Applied to a parameter every head uses (Shaw's relative embeddings) before use: under tensor
        parallelism each rank's heads give part of its gradient, so it sums the gradient over the ranks."""
        ...

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """softmax(q k^T) v over this rank's heads: q [b, h/tp, s, d], k/v [b, kv_local, s, d]."""
        ...

    def logits(self, x: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """x [b, s, d] times this rank's output rows ``weight`` -> logits; with tp_size > 1 they are this rank's
        vocabulary slice, padding rows included (the loss masks them)."""
        ...

    def lm_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, z_loss: float, ignore_index: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token loss (and its parts) over the targets that are not ``ignore_index``."""
        ...

    # -- sequence parallelism (parallel.sequence_parallel): the decoder's residual stream, norms and dropouts hold
    # 1/sequence_shards of the sequence; without it these are identities (WholeSequence)
    sequence_shards: int
    """How many parts the residual stream's sequence is split into on this rank's tensor-parallel group (1: whole)."""

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, d] (the same on every tensor-parallel rank) -> this rank's [b, s / sequence_shards, d]."""
        ...

    def sequence_dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """Dropout on the residual stream (each rank's own sequence part draws its own mask)."""
        ...

    def shared_by_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` computed whole on every rank and used on this rank's sequence part (adaLN's modulation): identity
        forward; under sequence parallelism its gradient is summed over the ranks."""
        ...


class WholeSequence:
    """The sequence-parallel methods of a provider without sequence parallelism: the whole sequence on every rank."""

    sequence_shards = 1

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sequence_dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        return F.dropout(x, p, training) if p > 0 else x

    def shared_by_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return t
