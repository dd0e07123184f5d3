"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"), as PaLM ran it.

Per parameter X and step t (the paper's Algorithms 4 and 5, plus the momentum and decoupled decay PaLM used):

    beta2_t  = 1 - t^(-decay_rate)                         # 0 at t = 1: no bias correction needed
    V_t      = beta2_t V + (1 - beta2_t) (G^2 + eps1)      # factored for matrices: row and column means
                                                           #   R, C of G^2; V_hat = R C / mean(R)
    U_t      = G / sqrt(V_hat)
    U_hat    = U_t / max(1, RMS(U_t) / clip_threshold)     # update clipping
    step     = lr_t * max(eps2, RMS(X_{t-1})) * U_hat       # relative step: parameter-scaled (scale_parameter)
    m_t      = beta1 m + (1 - beta1) step; step = m_t      # optional momentum (PaLM: beta1 = 0.9)
    X_t      = X_{t-1} (1 - lr_t * weight_decay) - step    # decoupled decay, torch-AdamW convention

Momentum averages the scaled step, as in Mesh TensorFlow / T5X (which PaLM used) and HF transformers. The decay
is not multiplied by the parameter scale, so with ``weight_decay = lr_t`` it is PaLM's ``lr^2`` dynamic decay.

Why not ``torch.optim.Adafactor`` (torch 2.13): it always scales by RMS(param) and caps the rate at 1/sqrt(t)
(``rho_t = min(lr, t^-0.5)``, which fights an external schedule), and has neither momentum nor an unfactored
mode. With ``momentum=None`` and ``lr <= t^-0.5`` the two agree (tests/unit/test_optim.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


class Adafactor(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        *,
        decay_rate: float = 0.8,
        clip_threshold: float = 1.0,
        scale_parameter: bool = True,
        momentum: float | None = 0.9,
        weight_decay: float = 0.0,
        factored: bool = True,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
        defaults = dict(
            lr=lr,
            decay_rate=decay_rate,
            clip_threshold=clip_threshold,
            scale_parameter=scale_parameter,
            momentum=momentum,
            weight_decay=weight_decay,
            factored=factored,
            eps1=eps1,
            eps2=eps2,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if group["factored"] and p.ndim >= 2:
                # factor the last two dims (leading ones are batch-like): O(n + m) memory instead of O(nm)
                state["row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                state["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
            else:
                state["v"] = torch.zeros_like(p, dtype=torch.float32)
            if group["momentum"] is not None:
                state["m"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self._init_state(p, group)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                one_minus_beta2 = t ** (-group["decay_rate"])  # (1 - beta2_t); 1 at t = 1
                g2 = g.square().add_(group["eps1"])
                if "row" in state:
                    row, col = state["row"], state["col"]
                    row.lerp_(g2.mean(dim=-1), one_minus_beta2)
                    col.lerp_(g2.mean(dim=-2), one_minus_beta2)
                    # rank-1 reconstruction of the second moment: V_hat = R C / sum(R) (with means: the same).
                    # Normalize R first: R * C could underflow fp32 for tiny gradients (eps1^2 = 1e-60).
                    r = row / row.mean(dim=-1, keepdim=True)
                    v_hat = r.unsqueeze(-1) * col.unsqueeze(-2)
                else:
                    v_hat = state["v"].lerp_(g2, one_minus_beta2)
                update = g * v_hat.rsqrt()
                update.div_(torch.clamp(_rms(update) / group["clip_threshold"], min=1.0))
                # parameter scale from X_{t-1}, before the decay below touches it
                scale = torch.clamp(_rms(p.float()), min=group["eps2"]) if group["scale_parameter"] else 1.0
                update.mul_(lr * scale)
                if beta1 is not None:
                    update = state["m"].lerp_(update, 1 - beta1)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.sub_(update.to(p.dtype))
        return loss
