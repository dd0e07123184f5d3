"""Global gradient-norm clipping that reports the norm before clipping."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def clip_grad_norm(
    params: Iterable[Tensor],
    max_norm: float,
    *,
    reduce_sq: Callable[[Tensor], Tensor] | None = None,
    foreach: bool | None = None,
) -> float:
    """Clip the global L2 norm of the gradients of ``params`` to ``max_norm``; return the norm before clipping.

    ``max_norm == 0`` disables clipping (the norm is still computed, for logging). The two halves of
    ``torch.nn.utils.clip_grad_norm_`` are called separately so a sharded run can reduce in between:
    ``reduce_sq`` receives this rank's sum of squared gradient entries (a 0-d fp32 tensor) and must return the
    sum over the ranks that hold distinct shards, e.g. ``lambda t: (dist.all_reduce(t, group=g), t)[1]``.
    A non-finite norm is returned as is (gradients are then scaled by nan/0); the caller decides to skip."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    grads = [p.grad for p in with_grad if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=foreach).float()
    if reduce_sq is not None:
        total = reduce_sq(total.square()).sqrt()
    if max_norm > 0:
        # the same coefficient clip_grad_norm_ uses: min(1, max_norm / (total + 1e-6))
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total, foreach=foreach)
    return float(total)
