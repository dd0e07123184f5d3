"""megatron-core's tensor-parallel layers behind the decoder's provider seam.

Column-parallel linears (q, k, v, MLP in, untied head) split output features, row-parallel ones (attention
out, MLP down) split input features and all-reduce their outputs, the embedding splits the vocabulary. The
logits stay split by vocabulary and the loss is megatron-core's vocab-parallel cross entropy (plus our
z-loss across ranks), so no rank ever holds [tokens, vocab] whole.

Parameters are allocated by megatron-core (on the CPU with use_cpu_initialization, else on the current
GPU) and left uninitialized (perform_initialization=False): model/init.py fills them, drawing each logical
tensor whole and keeping this rank's slice, so a TP=2 model starts from the one-process values. Each split
parameter is marked with a Shard for that and for gathering full state (parallel/state.py).

The process group is handed in, not read from parallel_state (the layers take tp_group); megatron's
vocab-parallel cross entropy alone reads parallel_state's tensor group, which init_process_groups sets to
the same group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tplus_dist.backends.base import LinearRole
from tplus_dist.model.attention import AttentionCore
from tplus_dist.model.init import SHARD_ATTR, Shard
from tplus_dist.model.norms import build_norm

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig, NormKind


def _no_init(_: torch.Tensor) -> None:
    """megatron-core wants an init_method; ours runs after construction (model/init.py)."""


def _mark(p: torch.Tensor | None, dim: int, rank: int, parts: int) -> None:
    """Our Shard, and megatron's tensor_model_parallel attributes: megatron-core sets those only when it
    initializes, and DeepSpeed's gradient norm reads them (an unmarked parameter counts on TP rank 0 only)."""
    if p is not None:
        setattr(p, SHARD_ATTR, Shard(dim, rank, parts))
        if not hasattr(p, "tensor_model_parallel"):  # a column-parallel bias has them already (megatron asserts)
            _layers().set_tensor_model_parallel_attributes(p, True, dim, 1)


def _layers() -> Any:
    from megatron.core import tensor_parallel  # imported on use: megatron-core takes seconds to import

    return tensor_parallel


class MegatronProvider:
    name = "megatron"

    def __init__(self, tp_group: dist.ProcessGroup, *, device: torch.device, params_dtype: torch.dtype) -> None:
        from megatron.core import ModelParallelConfig

        self.group = tp_group
        self.tp_size = dist.get_world_size(tp_group)
        self.tp_rank = dist.get_rank(tp_group)
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=device.type == "cpu",
            perform_initialization=False,
            params_dtype=params_dtype,
            sequence_parallel=False,
            gradient_accumulation_fusion=False,
        )
        tp = _layers()

        class Column(tp.ColumnParallelLinear):  # type: ignore[name-defined]
            def forward(self, x: torch.Tensor) -> torch.Tensor:  # megatron returns (output, bias)
                return super().forward(x)[0]

        class Row(tp.RowParallelLinear):  # type: ignore[name-defined]
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x)[0]

        self._column, self._row = Column, Row

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        r, n, g = self.tp_rank, self.tp_size, self.group
        if role == "replicated":
            return ReplicatedLinear(in_features, out_features, bias=bias, group=g)
        if role in ("column", "vocab"):
            m = self._column(
                in_features, out_features, config=self.config, init_method=_no_init, bias=bias, gather_output=False,
                skip_bias_add=False, tp_group=g,
            )  # fmt: skip
            _mark(m.weight, 0, r, n)
            _mark(m.bias, 0, r, n)
            return m
        m = self._row(
            in_features, out_features, config=self.config, init_method=_no_init, bias=bias, input_is_parallel=True,
            skip_bias_add=False, tp_group=g,
        )  # fmt: skip
        _mark(m.weight, 1, r, n)  # the bias is added once, after the all-reduce: whole on every rank
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
        if split and self.tp_size > 1:
            m = SplitNorm(kind, dim, eps=eps, bias=bias, unit_offset=unit_offset, group=self.group)
            _mark(m.weight, 0, self.tp_rank, self.tp_size)
            _mark(m.bias, 0, self.tp_rank, self.tp_size)
            return m
        # replicated: every rank normalizes the same (whole) activations, so their gradients agree across ranks;
        # except QK-norm's, which sees this rank's heads only: its gain's gradient is summed over the ranks
        norm = build_norm(kind, dim, eps=eps, bias=bias, unit_offset=unit_offset)
        if per_head:
            norm.param_map = SumGradOverTP(self.group)
        return norm

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        m = _layers().VocabParallelEmbedding(
            num_embeddings, dim, init_method=_no_init, config=self.config, tp_group=self.group
        )
        _mark(m.weight, 0, self.tp_rank, self.tp_size)
        return m

    def head_table(self, rows: int, n_heads: int) -> nn.Parameter:
        # this rank's heads' columns; each rank's gradient is its own (its heads' logits), as a column-parallel weight
        p = nn.Parameter(torch.empty(rows, n_heads // self.tp_size))
        _mark(p, 1, self.tp_rank, self.tp_size)
        return p

    def across_heads(self) -> nn.Module | None:
        return SumGradOverTP(self.group)

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        per = cfg.n_heads // self.tp_size
        return AttentionCore(cfg, layer, heads=range(self.tp_rank * per, (self.tp_rank + 1) * per))

    def logits(self, x: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        # every rank multiplies the whole x by its vocabulary rows: x's gradient is summed over the ranks
        x = _layers().copy_to_tensor_model_parallel_region(x, group=self.group)
        return F.linear(x, weight)

    def lm_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, z_loss: float, ignore_index: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return vocab_parallel_lm_loss(
            logits, targets, vocab_size=vocab_size, z_loss=z_loss, ignore_index=ignore_index, group=self.group
        )


class SplitNorm(nn.Module):
    """RMSNorm or LayerNorm over ``dim`` features of which this rank holds dim / tp (the output of a column-parallel
    projection: QK-norm over the whole projection, OLMo 2), with this rank's slice of the gain (and bias).

    The mean (LayerNorm) and the mean square are sums over the last dimension all-reduced over the group, forward and
    backward (every rank's output depends on every rank's features), so the result is the one-process norm's slice:
    x [..., dim / tp] -> [..., dim / tp]. Computed in fp32 (fp64 stays fp64), like model/norms.py."""

    def __init__(
        self, kind: NormKind, dim: int, *, eps: float, bias: bool, unit_offset: bool, group: dist.ProcessGroup
    ) -> None:
        super().__init__()
        if kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"a norm split over tensor-parallel ranks is rmsnorm or layernorm, not {kind!r}")
        tp = dist.get_world_size(group)
        if dim % tp:
            raise ValueError(f"a norm over {dim} features cannot be split over {tp} tensor-parallel ranks")
        self.kind, self.dim, self.eps, self.unit_offset, self.group = kind, dim, eps, unit_offset, group
        local = dim // tp
        self.weight = nn.Parameter(torch.zeros(local) if unit_offset else torch.ones(local))
        self.bias = nn.Parameter(torch.zeros(local)) if bias and kind == "layernorm" else None

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the whole feature dimension: a local sum, all-reduced in the forward (reduce_from) and,
        for its gradient, in the backward (copy_to)."""
        tp = _layers()
        total = tp.reduce_from_tensor_model_parallel_region(t.sum(-1, keepdim=True), group=self.group)
        return tp.copy_to_tensor_model_parallel_region(total, group=self.group) / self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.kind == "layernorm":
            xf = xf - self._mean(xf)
        y = xf * torch.rsqrt(self._mean(xf * xf) + self.eps)
        w = self.weight.to(y.dtype)
        y = y * (w + 1.0 if self.unit_offset else w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class SumGradOverTP(nn.Module):
    """Identity forward; the gradient is summed over the tensor-parallel group (megatron's copy-to-region)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return _layers().copy_to_tensor_model_parallel_region(t, group=self.group)


class ReplicatedLinear(nn.Linear):
    """A whole linear on every tensor-parallel rank whose ranks each use part of its output (the key/value
    projections when there are fewer kv heads than ranks). Its input is the same on every rank; the gradient
    of its output is summed over the ranks (forward identity, backward all-reduce), so every rank's weight
    gradient is the whole model's, the same on all ranks, like a norm's."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group: dist.ProcessGroup) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layers().copy_to_tensor_model_parallel_region(super().forward(x), group=self.group)


def vocab_parallel_lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    z_loss: float,
    ignore_index: int,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lm_loss (model/loss.py) on logits split by vocabulary over ``group``: megatron-core's vocab-parallel
    cross entropy, PaLM's z-loss from a logsumexp across ranks, and the padding rows beyond ``vocab_size``
    masked out, so the result equals the one-process loss over the real vocabulary."""
    tp = _layers()
    local = logits.shape[-1]
    start = dist.get_rank(group) * local
    flat = logits.reshape(-1, local)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    if start + local > vocab_size:  # this rank holds padding rows: they take no probability
        pad = torch.arange(start, start + local, device=flat.device) >= vocab_size
        flat = flat.masked_fill(pad, float("-inf"))
    elif flat.data_ptr() == logits.data_ptr():
        flat = flat.clone()  # megatron's cross entropy works in place on its input, which is still ours
    tgt = targets.reshape(-1)
    keep = tgt != ignore_index
    count = keep.sum().clamp_min(1)
    lse = None
    if z_loss > 0:  # before the cross entropy, which overwrites flat in place
        m = flat.detach().amax(dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(flat - m[:, None]).sum(dim=-1)
        lse = torch.log(tp.reduce_from_tensor_model_parallel_region(sum_exp, group=group)) + m
    per_token = tp.vocab_parallel_cross_entropy(flat, torch.where(keep, tgt, 0))
    ce = (per_token * keep).sum() / count
    parts = {"ce": ce.detach()}
    if lse is None:
        return ce, parts
    z = z_loss * (lse.pow(2) * keep).sum() / count
    parts["z_loss"] = z.detach()
    return ce + z, parts
