"""The whole model's parameters, gathered from however they are split: tensor-parallel slices (Shard marks),
ZeRO-3 partitions, pipeline stages. For parity tests, exports and inspection; it holds the whole model on
every rank, so use it on models that fit in one process's memory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tplus_dist.model.init import shard_of


def _zero3_gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    if not any(hasattr(p, "ds_id") for p in params):  # not partitioned by ZeRO-3
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def full_state_dict(
    model: nn.Module,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """{decoder parameter name: whole tensor on the CPU}, the same on every rank.

    ``model`` is the decoder, a DeepSpeed engine around it, or a pipeline stage; ``rename`` maps a stage's
    parameter names to the decoder's (None drops one; default: the module's own ``decoder_name``, if any)."""
    core = getattr(model, "module", model)
    rename = rename or getattr(core, "decoder_name", None)
    named = list(core.named_parameters())
    out: dict[str, torch.Tensor] = {}
    with _zero3_gathered([p for _, p in named]):
        for name, p in named:
            key = rename(name) if rename is not None else name
            if key is None:
                continue
            t = p.detach()
            shard = shard_of(p)
            if shard is not None and shard.parts > 1:
                if tp_group is None:
                    raise ValueError(f"{name} is a tensor-parallel slice: pass the tensor-parallel group")
                parts = [torch.empty_like(t) for _ in range(shard.parts)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = torch.cat(parts, dim=shard.dim)
            out[key] = t.cpu().clone()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        stages: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, out, group=pp_group)
        merged: dict[str, torch.Tensor] = {}
        for stage in stages:
            assert stage is not None
            merged.update(stage)
        out = merged
    return out
