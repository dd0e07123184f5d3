"""Activation recompute (parallel.recompute_*): keep less for backward, compute it again there.

``apply_recompute`` wraps parts of the decoder in ``torch.utils.checkpoint.checkpoint`` (non-reentrant), in place,
after the decoder is built and before train.compile and the DeepSpeed engine see it, like torchtitan's
``apply_ac`` (torchtitan/models/llama3/infra/parallelize.py, torchtitan/distributed/activation_checkpoint.py). Two
differences from torchtitan's, and why:

- torchtitan replaces each block by ``checkpoint_wrapper(block)`` (torch/distributed/algorithms/_checkpoint/
  checkpoint_wrapper.py), which puts the block under ``_checkpoint_wrapped_module`` and strips that prefix from
  state_dict keys with hooks; named_parameters still carry it, and here the optimizer groups, DeepSpeed's checkpoints
  and the resharding read parameter names. So the wrapped module stays where it is and only its ``forward`` is
  replaced (an instance attribute; ``nn.Module.__call__`` calls ``self.forward``): every name and hook is unchanged.
- torchtitan passes ``preserve_rng_state=False``; here it stays True (torch's default): the checkpoint stashes the
  CPU and device generators' state before the forward and restores it for the recompute, so dropout draws the same
  masks twice and the recomputed run is bit-for-bit the plain one.

Modes (Megatron-core's names and semantics, megatron/core/transformer/transformer_block.py ``_checkpointed_forward``):

- full / uniform, k layers: the layers of each run (below) in consecutive groups of k, each group one checkpoint:
  only the group's input is kept (and the shared T5 bias / adaLN condition passed with it).
- full / block, k layers: the first k layers of each run checkpointed one by one, the rest kept whole.
- selective: the named pieces of every block checkpointed: ``core_attn`` (the attention core: scores, masks, softmax,
  dropout, times V; its q, k, v are kept), ``mlp_act`` (MLP.activation: act(h) [* up]; its inputs are kept), and
  ``layernorm`` (the norms inside the blocks: their statistics and upcasts are recomputed; their input is kept).

A run is what one pipeline stage (or virtual chunk) executes: the blocks of a Decoder (the whole model, a tensor-
parallel slice, an interleaved chunk), or the consecutive one-layer parts of a DeepSpeed PipelineModule stage
(parallel/pipeline.py BlockPart). Groups never cross a run's ends: stages exchange the group boundaries.

A group of k > 1 layers is one checkpoint around the k layers: its first layer's forward runs all k (their original
forwards, in order, with the same extra arguments the caller passes each layer), and the other k - 1 forwards pass
their input through (the caller still calls them, in order, right after).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from tplus_dist.config.sections import ParallelConfig

_MARK = "_tplus_recompute"


def _inner(module: nn.Module, name: str = "forward") -> Callable[..., Any]:
    """The module's method ``name`` as it stands (an instance override, or its class's), before recompute replaces
    it."""
    own = module.__dict__.get(name)
    return own if own is not None else _ClassMethod(module, name)


class _ClassMethod:
    """``type(module).<name>`` bound to ``module`` (an object, not a bound method: ``copy.deepcopy`` of the model
    then binds the copy, as it does for every attribute that refers to a module of the copied tree)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.module), self.name)(self.module, *args, **kwargs)


class _Checkpointed:
    """A forward that runs ``fn`` under torch.utils.checkpoint (non-reentrant, RNG state preserved)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


class _Group:
    """Consecutive layers called one after another with the same extra arguments, run as one function."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.forwards = [_inner(layer) for layer in layers]

    def __call__(self, x: Any, *extra: Any) -> Any:
        for f in self.forwards:
            x = f(x, *extra)
        return x


def _pass_through(x: Any, *extra: Any) -> Any:
    return x


def _set_forward(module: nn.Module, forward: Callable[..., Any], mode: str, name: str = "forward") -> None:
    if getattr(module, _MARK, None) is not None:
        raise ValueError(f"parallel.recompute_granularity: recompute is already applied to {type(module).__name__}")
    setattr(module, name, forward)
    setattr(module, _MARK, mode)


def checkpoint_group(layers: Sequence[nn.Module]) -> None:
    """Make ``layers`` (called in this order by their owner, each ``layer(x, *extra)`` -> x) one checkpointed unit."""
    _set_forward(layers[0], _Checkpointed(_Group(layers)), "full")
    for layer in layers[1:]:
        _set_forward(layer, _pass_through, "full (in the group of the layer before)")


def checkpoint_forward(module: nn.Module, mode: str) -> None:
    """Run ``module``'s forward under torch.utils.checkpoint, in place."""
    _set_forward(module, _Checkpointed(_inner(module)), mode)


def layer_runs(model: nn.Module) -> list[list[nn.Module]]:
    """The layers of ``model`` in the runs recompute groups within (module docstring): for each DeepSpeed pipeline
    stage, its one-layer parts in order; for every other Decoder with blocks, its blocks in order. ``model`` may be
    the decoder, a pipeline module, the interleaved chunks or an engine around them."""
    from tplus_dist.model.decoder import Decoder

    runs: list[list[nn.Module]] = []
    in_pipeline: set[int] = set()
    for m in model.modules():
        funcs = getattr(m, "forward_funcs", None)  # DeepSpeed's PipelineModule: this stage's layers, in order
        if isinstance(m, nn.Module) and isinstance(funcs, list):
            run: list[nn.Module] = []
            for f in funcs:
                if isinstance(f, Decoder) and not f.has_embed and not f.has_head and len(f.layers) > 0:
                    run.append(f)
                    in_pipeline.add(id(f))
                elif run:
                    runs.append(run)
                    run = []
            if run:
                runs.append(run)
    for m in model.modules():
        if isinstance(m, Decoder) and id(m) not in in_pipeline and len(m.layers) > 0:
            runs.append(list(m.layers.values()))
    return runs


def block_norms(block: nn.Module) -> list[nn.Module]:
    """The norms inside a decoder block: pre/post norms, sandwich norms and the attention's QK norms."""
    names = ("norm1", "norm2", "post_attn_norm", "post_mlp_norm")
    found = [getattr(block, n, None) for n in names]
    attn = getattr(block, "attn", None)
    found += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
    return [m for m in found if isinstance(m, nn.Module)]


def apply_recompute(model: nn.Module, cfg: ParallelConfig) -> int:
    """Apply parallel.recompute_* to ``model`` in place (module docstring); call it after the decoder is built and
    before train.compile and deepspeed.initialize. Returns how many modules now run under a checkpoint (0 for
    recompute_granularity none). Parameter names, state_dict keys and hooks are unchanged.

    Raises ValueError naming parallel.recompute_num_layers when it exceeds the layers of a run (a pipeline stage or
    virtual chunk), or parallel.recompute_granularity when recompute was already applied or ``model`` holds no
    decoder block."""
    from tplus_dist.model.block import Block

    granularity, method, k, modules = cfg.recompute_plan()
    if granularity == "none":
        return 0
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"parallel.recompute_granularity: no decoder block found in {type(model).__name__}")
    count = 0
    if granularity == "full":
        for run in layer_runs(model):
            size = len(run) if k is None else k
            if size > len(run):
                raise ValueError(
                    f"parallel.recompute_num_layers: ({size}) is more than the {len(run)} layers of a pipeline stage "
                    "(or virtual chunk) here"
                )
            if method == "block":
                for layer in run[:size]:
                    checkpoint_forward(layer, "full")
                    count += 1
            else:
                for start in range(0, len(run), size):
                    checkpoint_group(run[start : start + size])
                    count += 1
        return count
    for block in blocks:
        if "core_attn" in modules:
            checkpoint_forward(block.attn.core, "core_attn")
            count += 1
        if "mlp_act" in modules:
            _set_forward(block.mlp, _Checkpointed(_inner(block.mlp, "activation")), "mlp_act", name="activation")
            count += 1
        if "layernorm" in modules:
            for norm in block_norms(block):
                checkpoint_forward(norm, "layernorm")
                count += 1
    return count
