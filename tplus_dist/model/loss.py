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
    flat = logits.reshape(-1, logits.shape[-1]).float()
    tgt = targets.reshape(-1)
    ce = F.cross_entropy(flat, tgt, ignore_index=ignore_index)
    parts = {"ce": ce.detach()}
    if z_loss > 0:
        keep = tgt != ignore_index
        lse = torch.logsumexp(flat[keep], dim=-1)
        z = z_loss * lse.pow(2).mean() if keep.any() else flat.sum() * 0.0
        parts["z_loss"] = z.detach()
        return ce + z, parts
    return ce, parts
