"""Measuring memory: the bytes autograd saves for backward (the activations a recompute mode trades for compute)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (its forward), each storage counted once
    (keyed by ``untyped_storage().data_ptr()``; a view of a saved tensor adds nothing) at its full storage size, and
    parameters excluded (they are held anyway), as are the storages of ``exclude`` (e.g. buffers such as RoPE
    tables). Uses torch.autograd.graph.saved_tensors_hooks; the saved tensors are kept until ``fn`` returns, so the
    figure is the peak of what one forward keeps for its backward. Pass the model's parameters (and buffers) as
    ``exclude``: a view of a parameter (the output projection's ``weight[:vocab]``) is not a Parameter, so only its
    storage identifies it. Returns bytes (int)."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude or []}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter) or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
