"""ScaledAdam (Yao et al. 2023, "Zipformer: A faster and better encoder for automatic speech recognition"), the
optimizer icefall trains Zipformer with: Adam whose update is scaled by the parameter's RMS, so every tensor moves
by the same *relative* amount, plus an explicitly learned overall scale per tensor.

Per tensor X (more than one element), gradient G, step t (bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t):

    r      = max(RMS(X), param_min_rms)                         # the parameter's scale
    v      = beta2 v + (1 - beta2) G^2                          # Adam's second moment, elementwise
    dir    = G / (sqrt(v / c2) + eps)
    h      = sum(G * X)                                         # gradient of the loss w.r.t. log of X's scale
    w      = beta2 w + (1 - beta2) h^2
    s      = -lr * scalar_lr_scale * h / (sqrt(w / c2) + eps)   # the scale's own Adam step (a relative change)
             (= +lr * scalar_lr_scale if RMS(X) < param_min_rms, -lr * scalar_lr_scale if RMS(X) > param_max_rms)
    u      = -lr * r * dir + s * X                              # the update
    m      = beta1 m + (1 - beta1) u                            # momentum on the update, as icefall keeps it
    X      = X + m / c1

Scalars (one element) take a plain Adam step at lr * scalar_lr_scale and are clamped to [-scalar_max,
scalar_max]. Weight decay is not applied (group values are ignored): the scale is learned, and bounded by
param_max_rms. icefall's other pieces (its median-based gradient clipping, batched size updates every few steps,
the Eden schedule) are left out: the trainer's clipping and schedules apply instead. Its momentum is not
bias-corrected (it warms up with the Eden schedule); here it is divided by c1, so the first steps are not 10x small
under a plain warmup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class ScaledAdam(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-2,
        *,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        scalar_lr_scale: float = 0.1,
        param_min_rms: float = 1e-5,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            scalar_lr_scale=scalar_lr_scale,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
            scalar_max=scalar_max,
            weight_decay=0.0,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, k = group["lr"], group["eps"], group["scalar_lr_scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                dtype = torch.promote_types(p.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
                g = p.grad.to(dtype)
                x = p.to(dtype)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_sq"] = torch.zeros_like(x)
                    state["delta"] = torch.zeros_like(x)
                    if p.numel() > 1:
                        state["scale_exp_avg_sq"] = torch.zeros((), dtype=dtype, device=p.device)
                state["step"] += 1
                t = state["step"]
                c1, c2 = 1 - beta1**t, 1 - beta2**t
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                direction = g / ((v / c2).sqrt() + eps)
                if p.numel() == 1:
                    update = direction * (-lr * k)
                else:
                    rms = x.pow(2).mean().sqrt()
                    h = (g * x).sum()
                    w = state["scale_exp_avg_sq"].mul_(beta2).add_(h * h, alpha=1 - beta2)
                    s = -lr * k * h / ((w / c2).sqrt() + eps)
                    s = torch.where(rms < group["param_min_rms"], torch.full_like(s, lr * k), s)
                    s = torch.where(rms > group["param_max_rms"], torch.full_like(s, -lr * k), s)
                    update = direction * (-lr * rms.clamp(min=group["param_min_rms"])) + s * x
                delta = state["delta"].mul_(beta1).add_(update, alpha=1 - beta1)
                x = x + delta / c1
                if p.numel() == 1:
                    x = x.clamp(-group["scalar_max"], group["scalar_max"])
                p.copy_(x)
        return loss
