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

Sequence parallelism (``sequence_parallel=True``; Korthikanti et al. 2022, arXiv 2205.05198), through megatron-core
0.16.1's own pieces: the embedding output is split along the sequence (mappings.py scatter_to_sequence_parallel_region,
as models/common/embeddings/language_model_embedding.py does), so the norms, dropouts and residual adds between the
tensor-parallel regions hold [b, s / tp, d]; each column-parallel linear all-gathers the sequence in its forward and
reduce-scatters its input gradient (layers.py LinearWithGradAccumulationAndAsyncCommunication with
sequence_parallel: it saves only this rank's part and gathers again in the backward), each row-parallel linear
reduce-scatters its output (RowParallelLinear.forward: reduce_scatter_to_sequence_parallel_region) instead of
all-reducing it; attention, between the two, sees the whole sequence (so RoPE, ALiBi, T5 and Shaw biases and sliding
windows are unchanged); the logits gather the final norm's output the way the column-parallel linears do. Parameters
used whole on every rank on its part of the sequence (the norms' gains and biases, row-parallel biases, adaLN's
modulation) get their gradient summed over the group (SumGradOverTP), which megatron-core does after the backward
instead (distributed/finalize_model_grads.py _allreduce_layernorm_grads, for parameters marked ``sequence_parallel``);
we do it in the autograd graph because DeepSpeed, not megatron's DDP, reduces our gradients.

The layout: megatron's mappings split and gather dimension 0, its sequence-first [s, b, d]. The decoder keeps its
[b, s, d] view, but under sequence parallelism the residual stream is stored sequence-first: a transposed view of a
contiguous [s / tp, b, d] (scatter_sequence makes it, the row-parallel linears return it, and elementwise ops, norms
and dropout keep their input's strides), so a column-parallel linear hands megatron ``x.transpose(0, 1)`` without a
copy and the three projections of one input save one tensor between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tplus_dist.backends.base import LinearRole, WholeSequence
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


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def allow_megatron_sequence_parallel_on_cpu() -> None:
    """megatron-core 0.16.1 allocates the buffers of its sequence-parallel collectives with
    ``device=torch.cuda.current_device()`` (tensor_parallel/mappings.py _gather_along_first_dim and
    _reduce_scatter_along_first_dim, layers.py LinearWithGradAccumulationAndAsyncCommunication.backward's
    sub_grad_input, utils.py GlobalMemoryBuffer.get_tensor), which raises on a torch built without CUDA. The
    collectives themselves run on gloo (all_gather_into_tensor, reduce_scatter_tensor). On such a build only, and
    only for a sequence-parallel run, torch.cuda.current_device answers the CPU device, so those buffers are
    allocated where the tensors are; every call of it raised before, so nothing that worked changes."""
    if not torch.cuda.is_available():
        torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    """[b, s, d] -> the [s, b, d] megatron's sequence-parallel linears split on dimension 0: a free view when x is a
    sequence-parallel residual stream (stored sequence-first), else a copy (all_gather_into_tensor needs contiguous)."""
    return x.transpose(0, 1).contiguous()


def _stored_seq_first(x: torch.Tensor) -> torch.Tensor:
    """[b, s, d] stored as a contiguous [s, b, d] (x itself when it already is)."""
    if x.transpose(0, 1).is_contiguous():
        return x
    return x.transpose(0, 1).contiguous().transpose(0, 1)


class MegatronProvider(WholeSequence):
    name = "megatron"

    def __init__(
        self,
        tp_group: dist.ProcessGroup,
        *,
        device: torch.device,
        params_dtype: torch.dtype,
        sequence_parallel: bool = False,
    ) -> None:
        from megatron.core import ModelParallelConfig

        self.group = tp_group
        self.tp_size = dist.get_world_size(tp_group)
        self.tp_rank = dist.get_rank(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.sequence_shards = self.tp_size if self.sequence_parallel else 1
        if self.sequence_parallel and device.type == "cpu":
            allow_megatron_sequence_parallel_on_cpu()
        if self.sequence_parallel:
            # megatron-core's SP matmul warns (once) from inside the forward that CUDA_DEVICE_MAX_CONNECTIONS should
            # be 1 (layers.py linear_with_grad_accumulation_and_async_allreduce); torch.compile cannot trace
            # warnings.warn, so the advice is given here, before any forward, and megatron's own once-flag set
            import os
            import warnings

            if device.type == "cuda" and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
                warnings.warn(
                    "sequence parallelism: set CUDA_DEVICE_MAX_CONNECTIONS=1 so megatron-core's all-gathers are "
                    "scheduled before the gradient matmuls they overlap (its recommendation)",
                    stacklevel=2,
                )
            _layers().linear_with_grad_accumulation_and_async_allreduce.warned = True
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=device.type == "cpu",
            perform_initialization=False,
            params_dtype=params_dtype,
            sequence_parallel=self.sequence_parallel,
            gradient_accumulation_fusion=False,
        )
        tp = _layers()
        group, sp = self.group, self.sequence_parallel

        class Column(tp.ColumnParallelLinear):  # type: ignore[name-defined]
            def forward(self, x: torch.Tensor) -> torch.Tensor:  # megatron returns (output, bias)
                if not sp:
                    return super().forward(x)[0]
                # [b, s/tp, in] -> megatron's [s/tp, b, in] -> gathered inside -> [s, b, out/tp] -> [b, s, out/tp]
                return super().forward(_seq_first(x))[0].transpose(0, 1)

        class Row(tp.RowParallelLinear):  # type: ignore[name-defined]
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if not sp:
                    return super().forward(x)[0]
                # [b, s, in/tp] -> [s, b, in/tp] -> reduce-scattered inside -> [s/tp, b, out] -> [b, s/tp, out]; the
                # bias (skip_bias_add) added here, its gradient summed over the ranks: each adds it to its own part
                out, bias = super().forward(_seq_first(x))
                out = out.transpose(0, 1)
                return out if bias is None else out + SumGradOverTP(group)(bias)

        self._column, self._row = Column, Row

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: LinearRole) -> nn.Module:
        r, n, g = self.tp_rank, self.tp_size, self.group
        if role == "replicated":
            return ReplicatedLinear(
                in_features, out_features, bias=bias, group=g, sequence_parallel=self.sequence_parallel
            )
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
            skip_bias_add=self.sequence_parallel, tp_group=g,
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
        # except QK-norm's, which sees this rank's heads only, and, under sequence parallelism, the residual stream's
        # norms (every norm that is neither per head nor split), which see this rank's part of the sequence only: the
        # gradient of their gain (and bias) is summed over the ranks (megatron-core marks these ``sequence_parallel``
        # and all-reduces them in finalize_model_grads.py _allreduce_layernorm_grads)
        norm = build_norm(kind, dim, eps=eps, bias=bias, unit_offset=unit_offset)
        if per_head or self.sequence_parallel:
            norm.param_map = SumGradOverTP(self.group)
        if self.sequence_parallel and not per_head:
            # F.rms_norm / F.layer_norm return a contiguous [b, s/tp, d]: laid out sequence-first once here, so the
            # column-parallel linears that read it (q, k, v; gate and up) share one saved tensor instead of a copy each
            norm.register_forward_hook(lambda _m, _i, y: _stored_seq_first(y))
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
        tp = _layers()
        if self.sequence_parallel:
            # x is this rank's part of the sequence: gathered, multiplied and the gradient reduce-scattered by
            # megatron's column-parallel matmul (as its output layer does), which saves only this rank's part
            out = tp.linear_with_grad_accumulation_and_async_allreduce(
                _seq_first(x), weight, None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                sequence_parallel=True, tp_group=self.group,
            )  # fmt: skip
            return out.transpose(0, 1)
        # every rank multiplies the whole x by its vocabulary rows: x's gradient is summed over the ranks
        x = tp.copy_to_tensor_model_parallel_region(x, group=self.group)
        return F.linear(x, weight)

    # -- sequence parallelism (identities from WholeSequence without it)
    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return x
        if x.shape[1] % self.tp_size:
            raise ValueError(
                f"a sequence of {x.shape[1]} tokens cannot be split over {self.tp_size} tensor-parallel ranks "
                "(parallel.sequence_parallel)"
            )
        # [b, s, d] -> [s, b, d] -> this rank's [s/tp, b, d] (contiguous; its gradient all-gathered) -> a [b, s/tp, d]
        # view: the residual stream is stored sequence-first from here on (see the module docstring)
        return _layers().scatter_to_sequence_parallel_region(x.transpose(0, 1), group=self.group).transpose(0, 1)

    def sequence_dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if not self.sequence_parallel or p == 0 or not training:
            return super().sequence_dropout(x, p, training)
        return sequence_parallel_dropout(x, p, self.tp_rank, self.tp_size)

    def shared_by_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return SumGradOverTP(self.group)(t) if self.sequence_parallel else t

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
    gradient is the whole model's, the same on all ranks, like a norm's. Under sequence parallelism its input is
    this rank's part of the sequence [b, s/tp, in], gathered first (megatron's gather_from_sequence_parallel_region;
    the gradient that comes back is already summed, so the backward keeps this rank's part of it, not a sum again)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, group: dist.ProcessGroup, sequence_parallel: bool
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = _layers()
        if self.sequence_parallel:
            x = tp.gather_from_sequence_parallel_region(
                _seq_first(x), tensor_parallel_output_grad=False, group=self.group
            ).transpose(0, 1)
        return tp.copy_to_tensor_model_parallel_region(super().forward(x), group=self.group)


def sequence_parallel_dropout(x: torch.Tensor, p: float, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Dropout of probability ``p`` on this rank's part [b, s / tp_size, d] of the sequence, with this rank's part of
    the mask the whole sequence would get.

    Every tensor-parallel rank's default generator is in the same state (one seed: replicated computations must draw
    alike), so a plain F.dropout would give each rank the same mask for different tokens. Megatron draws these masks
    from its model-parallel RNG tracker instead (tensor_parallel/random.py get_cuda_rng_tracker().fork(), seeded per
    rank by model_parallel_cuda_manual_seed; CUDA only). Here every rank draws the whole sequence's mask from the
    shared generator, as F.dropout does on the whole x (``bernoulli_(1 - p)`` in [b, s, d] order), and keeps its own
    part: the ranks' parts are independent, the generator stays in step on every rank (so checkpoints and activation
    recompute replay it), and the masks are those tensor parallelism without SP draws. The price: tp_size times the
    random numbers, and a transient whole-sequence mask (the kept one is this rank's part, bool). It needs no .item()
    or generator object, so it compiles. x [b, s/tp, d] -> x * mask / (1 - p)."""
    b, part, d = x.shape
    whole = torch.empty(b, part * tp_size, d, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    keep = whole[:, tp_rank * part : (tp_rank + 1) * part].bool()
    return x * keep * (1.0 / (1.0 - p))  # F.dropout's order: (x * mask) * scale


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
