"""Cross entropy with PaLM's z-loss and an ignore index."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, z_loss: float = 0.0, ignore_index: int = -100
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token loss over the targets that are not ``ignore_index``.

    logits [b, s, V], targets [b, s]. Returns (loss, {"ce": ..., "z_loss": ...}); the z-loss term is
    z_loss * mean(logsumexp(logits)^2), which pulls the softmax normalizer towards 1 (PaLM, 1e-4)."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
    tgt = targets.reshape(-1)
    keep = tgt != ignore_index
    # sum / count rather than the mean reduction: a batch whose targets are all ignored gives 0, not NaN
    count = keep.sum().clamp_min(1)
    ce = F.cross_entropy(flat, tgt, ignore_index=ignore_index, reduction="sum") / count
    parts = {"ce": ce.detach()}
    if z_loss > 0:
        lse = torch.logsumexp(flat, dim=-1)
        z = z_loss * (lse.pow(2) * keep).sum() / count
        parts["z_loss"] = z.detach()
        return ce + z, parts
    return ce, parts
