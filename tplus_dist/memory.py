"""Measured memory: the bytes of tensors that autograd keeps for the backward pass.

The activation memory a layout and a recompute mode cost is what the forward leaves saved for backward. It is
measured here with torch's ``torch.autograd.graph.saved_tensors_hooks`` (every tensor an autograd node saves passes
through the pack hook), not predicted. torch.utils.checkpoint (non-reentrant) saves its region's inputs through
an autograd Function (``_NoopSaveInputs``, torch/utils/checkpoint.py) outside its own hooks, so a checkpointed
region counts as its inputs, which is what it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def _is_parameter_storage(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (linear layers save ``weight.t()``): not an activation."""
    base = t._base if t._base is not None else t
    return isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)


def saved_tensor_bytes(fn: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors saved for backward while ``fn()`` runs (its forward; ``fn`` should not call backward).

    Each storage counts once, whole (``untyped_storage().nbytes()``), keyed by its data pointer: two views of one
    tensor, or one tensor saved by two nodes, are one allocation. Parameters and views of them are left out (their
    memory is the model's, not the activations'), as are the storages of ``exclude`` (for example the model's
    buffers, such as rotary tables). Tensors without storage (a ZeRO-3 partitioned placeholder, meta tensors) count
    0. Units: bytes. Raises whatever ``fn`` raises."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t.device.type != "meta"}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and not _is_parameter_storage(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip and storage.nbytes() > 0:
                seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
