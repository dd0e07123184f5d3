"""Numerics of the forward pass: bf16 autocast and Transformer Engine's FP8 recipes.

Written against Transformer Engine 2.20.2 (not yet run on a GPU). TE is imported only inside the functions that
need it, so this module imports on CPU. The weights stay fp32 (the optimizer's master copy) whatever the precision:
torch.autocast runs the matmuls in bf16, and TE's autocast runs its layers' GEMMs in FP8 with the recipe below.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tplus_dist.config.base import ConfigError

if TYPE_CHECKING:
    from tplus_dist.config.run import RunConfig
    from tplus_dist.config.sections import PrecisionConfig

RECIPES = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "block": "Float8BlockScaling"}
"""precision.fp8 -> the recipe class in TE 2.20.2 common/recipe/__init__.py."""
FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}
"""precision.fp8_format -> TE's recipe.Format member (HYBRID: E4M3 forward, E5M2 gradients)."""
FP8_MIN_CAPABILITY = (8, 9)
"""TE 2.20.2 quantization.py ``_compute_fp8_support``: FP8 GEMMs need compute capability 8.9 (Ada) or newer."""


def autocast_dtype(cfg: PrecisionConfig, device: torch.device | str) -> torch.dtype | None:
    """The dtype torch.autocast runs the matmuls in: bf16 for precision.dtype bf16, and for auto on a CUDA device;
    None (no autocast, fp32) otherwise."""
    kind = torch.device(device).type
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and kind == "cuda"):
        return torch.bfloat16
    return None


def recipe_spec(cfg: PrecisionConfig) -> tuple[str, dict[str, Any]] | None:
    """The TE recipe precision.fp8 names, as data: (class name in ``transformer_engine.common.recipe``, its keyword
    arguments, with ``fp8_format`` a ``Format`` member name), or None for fp8 none. Only DelayedScaling takes
    margin, amax_history_len and amax_compute_algo (TE 2.20.2 common/recipe/__init__.py: the other two recipes
    scale each tensor from its own amax and have no such fields)."""
    if cfg.fp8 == "none":
        return None
    kwargs: dict[str, Any] = {"fp8_format": FORMATS[cfg.fp8_format]}
    if cfg.fp8 == "delayed":
        kwargs.update(
            margin=cfg.fp8_margin,
            amax_history_len=cfg.fp8_amax_history_len,
            amax_compute_algo=cfg.fp8_amax_compute_algo,
        )
    return RECIPES[cfg.fp8], kwargs


def fp8_recipe(cfg: PrecisionConfig) -> Any:
    """The TE recipe object for precision.fp8 (:func:`recipe_spec` built), or None for fp8 none. Imports TE."""
    spec = recipe_spec(cfg)
    if spec is None:
        return None
    from transformer_engine.common import recipe  # TE 2.20.2 common/recipe/__init__.py

    name, kwargs = spec
    kwargs = dict(kwargs, fp8_format=getattr(recipe.Format, kwargs["fp8_format"]))
    return getattr(recipe, name)(**kwargs)


def amax_reduction_group(groups: Any) -> Any:
    """The group delayed scaling reduces its amaxes over: the tensor- and data-parallel ranks of this pipeline stage
    (megatron-core's ``parallel_state.get_amax_reduction_group()``, which Megatron-LM passes to TE's autocast), so
    that every shard and replica of a layer uses one scale. None in one process (TE then reduces nothing)."""
    if groups is None:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_amax_reduction_group()


def precision_context(
    cfg: PrecisionConfig, device: torch.device | str, *, amax_reduction_group: Any = None
) -> contextlib.AbstractContextManager[Any]:
    """The context a model's forward runs in: torch.autocast to :func:`autocast_dtype` (nothing for fp32), and for
    precision.fp8 TE's ``autocast(enabled=True, recipe=..., amax_reduction_group=...)`` (TE 2.20.2
    quantization.py ``class autocast``: ``amax_reduction_group`` is the group delayed scaling reduces amaxes over
    at the region's exit; see :func:`amax_reduction_group`). Enter one per micro-batch forward: with delayed
    scaling a module must not run twice inside one region (the amax reduction happens at its exit; TE's note on
    ``autocast``). A fresh context each call (TE's refuses being entered twice at once)."""
    dtype = autocast_dtype(cfg, device)
    recipe = fp8_recipe(cfg)
    if dtype is None and recipe is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if dtype is not None:
        # weights stay fp32 (the optimizer's master copy); matmuls run in bf16
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=dtype))
    if recipe is not None:
        import transformer_engine.pytorch as te

        stack.enter_context(te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_reduction_group))
    return stack


_BLOCK_NAME = re.compile(r"(?:^|\.)layers\.(\d+)$")


def bf16_layer_indices(cfg: PrecisionConfig, n_layers: int) -> list[int]:
    """The global decoder layers kept out of FP8: the first num_layers_at_start_in_bf16 and the last
    num_layers_at_end_in_bf16 of ``n_layers`` (Megatron-LM's rule), ascending; none without fp8."""
    if cfg.fp8 == "none":
        return []
    start, end = cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16
    return sorted(set(range(min(start, n_layers))) | set(range(max(n_layers - end, 0), n_layers)))


def bf16_blocks(model: nn.Module, cfg: PrecisionConfig, n_layers: int) -> list[tuple[str, int, nn.Module]]:
    """This rank's decoder blocks kept out of FP8, as (module name, global layer index, module). Blocks are found by
    name: every layout keeps the decoder's ``layers.<i>`` with ``i`` the global index (a whole Decoder; a DeepSpeed
    pipeline stage ``<k>.layers.<i>``, parallel/pipeline.py; an interleaved chunk ``chunks.<c>.layers.<i>``,
    parallel/interleaved.py), so a stage finds its own share of the kept layers."""
    keep = set(bf16_layer_indices(cfg, n_layers))
    found = []
    for name, module in model.named_modules():
        match = _BLOCK_NAME.search(name)
        if match and int(match.group(1)) in keep:
            found.append((name, int(match.group(1)), module))
    return found


def hold_during_forward(module: nn.Module, make_context: Any) -> None:
    """Run ``module``'s forward inside ``make_context()`` (a fresh context each call), with forward hooks: the
    module and its parameter names stay as they are (no wrapper), so checkpoints are unchanged. The post-hook runs
    even when the forward raises (``always_call``), so the context is always left."""
    held: list[contextlib.AbstractContextManager[Any]] = []

    def enter(_module: nn.Module, _args: Any) -> None:
        ctx = make_context()
        ctx.__enter__()
        held.append(ctx)

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        held.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def keep_layers_in_bf16(
    model: nn.Module, cfg: PrecisionConfig, n_layers: int, *, amax_reduction_group: Any = None
) -> None:
    """Run the first num_layers_at_start_in_bf16 and last num_layers_at_end_in_bf16 decoder blocks (global
    indices, :func:`bf16_blocks`) with FP8 off: each of their forwards runs inside TE's ``autocast(enabled=False)``
    with the run's recipe (TE 2.20.2 quantization.py l. 1037-1065: a nested region saves and restores the outer
    one's state, and ``autocast_exit`` reduces nothing when disabled, l. 772-783), inside the one FP8 region of the
    micro-batch. (Megatron-core refuses first/last bf16 layers with delayed scaling because it enters and leaves an
    FP8 region per layer, fp8_utils.py get_fp8_context; one outer region with nested disabled ones keeps delayed
    scaling's single amax reduction per region.) Nothing to do without fp8."""
    blocks = bf16_blocks(model, cfg, n_layers)
    if not blocks:
        return
    recipe = fp8_recipe(cfg)
    import transformer_engine.pytorch as te
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    @contextlib.contextmanager
    def off() -> Iterator[None]:
        with te.autocast(enabled=False, recipe=recipe, amax_reduction_group=amax_reduction_group):
            # The first module of an FP8 region runs delayed scaling's backward amax reduction (once per backward).
            # TE 2.20.2's fusible ops (te.RMSNorm, te.LayerNorm) claim that role whenever they need a backward, FP8 on
            # or not (ops/fuser.py l. 233-235, reduction at l. 389-390), while te.Linear claims it only in FP8
            # (module/linear.py l. 1857-1862). A block kept in bf16 at the start would then reduce a second time
            # after the FP8 blocks' backward: a second roll of every gradient amax history per step. So no module of
            # a bf16 block may claim it; leaving the region restores the outer region's flag (quantization.py
            # l. 1058, set_autocast_state). (A no-op for current and block scaling, which keep no amax history.)
            FP8GlobalStateManager.quantization_state.is_first_fp8_module = False
            yield

    for _, _, block in blocks:
        hold_during_forward(block, off)


def precheck(cfg: RunConfig, device: torch.device | str) -> None:
    """Refuse, before any work, a run this machine cannot do: model.provider te or precision.fp8 without a CUDA
    device or without Transformer Engine importable, FP8 on a GPU of compute capability below 8.9, and block
    scaling where TE says the GPU (or CUDA) cannot run it (TE 2.20.2 quantization.py
    ``check_fp8_block_scaling_support``: compute capability 9.0 and CUDA 12.9). Raises ConfigError naming the
    field, one sentence."""
    prec, provider = cfg.precision, cfg.model.provider
    if provider != "te" and prec.fp8 == "none":
        return
    field = "precision.fp8" if prec.fp8 != "none" else "model.provider"
    what = f"precision.fp8 {prec.fp8!r}" if prec.fp8 != "none" else "model.provider te"
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(field, f"{what} runs Transformer Engine's CUDA kernels, and this run's device is {dev.type}")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or TE's own OSError/RuntimeError when its libraries do not load
        raise ConfigError(field, f"{what} needs Transformer Engine, which does not import here: {e}") from None
    if prec.fp8 == "none":
        return
    capability = torch.cuda.get_device_capability(dev)
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            field,
            f"{what} needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell), and "
            f"{torch.cuda.get_device_name(dev)} is {capability[0]}.{capability[1]}",
        )
    from transformer_engine.pytorch import quantization

    ok, reason = (
        quantization.check_fp8_block_scaling_support() if prec.fp8 == "block" else quantization.check_fp8_support()
    )
    if not ok:
        raise ConfigError(field, f"{what} cannot run on this GPU: {reason}")
