"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the eigenbasis of
Shampoo's preconditioner.

For a matrix W with gradient G (the paper's Algorithm 3; higher-order tensors rotate every dim the same way):

    G'  = Q_L^T G Q_R                                   # gradient in the eigenbasis
    M   = beta1 M + (1 - beta1) G                       # first moment, kept in the original basis
    V   = beta2 V + (1 - beta2) G' * G'                 # Adam's second moment, in the eigenbasis
    N   = Q_L ((Q_L^T M Q_R) / bc1 / (sqrt(V / bc2) + eps)) Q_R^T
    W  <- W (1 - lr wd) - lr N                          # decoupled decay, torch-AdamW convention
    L   = sb L + (1 - sb) G G^T;  R = sb R + (1 - sb) G^T G    # Shampoo statistics, sb = shampoo_beta
    every f steps: Q_L <- QR(L Q_L), Q_R <- QR(R Q_R)  # one power-iteration step, then QR

A dim longer than ``max_precond_dim`` keeps the identity (no statistic: bounds memory, e.g. the vocabulary dim of
an embedding); 1-D tensors (norms, biases) get plain Adam.

Start-up, where we differ from the reference code: it takes the first eigenbasis from ``eigh`` of the first
gradient's statistics and skips that step's update. Here Q starts as the identity, so the first
``precondition_frequency`` steps are exactly AdamW (bias correction and eps placement as torch's) while L and R
accumulate; the first refresh then takes a full ``eigh`` (one power step from the identity would be a poor basis),
later refreshes the paper's single power-iteration + QR. When a basis changes, V moves to it assuming independent
coordinates: V_new = (R o R) V_old per dim with R = Q_new^T Q_old; for a pure reordering this is the reference
code's permutation of V.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _rotate(x: Tensor, qs: list[Tensor | None], back: bool = False) -> Tensor:
    """x in the eigenbasis (x multiplied by Q_i^T along each dim i), or back (by Q_i).

    Each tensordot contracts dim 0 and appends the new dim last, so after ndim of them the order is restored."""
    for q in qs:
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q.T if back else q, dims=([0], [0]))
    return x


def _mode_product(x: Tensor, m: Tensor, dim: int) -> Tensor:
    """sum_j m[k, j] x[..., j, ...] along ``dim``."""
    return torch.tensordot(m, x, dims=([1], [dim])).movedim(0, dim)


def _eigenbasis(stat: Tensor) -> Tensor:
    """Eigenvectors of a symmetric PSD statistic, largest eigenvalue first."""
    eye = torch.eye(stat.shape[0], dtype=stat.dtype, device=stat.device)
    try:
        _, q = torch.linalg.eigh(stat + 1e-30 * eye)
    except RuntimeError:  # ill-conditioned in fp32: retry in fp64
        _, q = torch.linalg.eigh(stat.double() + 1e-30 * eye.double())
        q = q.to(stat.dtype)
    return q.flip(-1)


def _power_step(stat: Tensor, q: Tensor) -> Tensor:
    """One power iteration from basis q, columns ordered by their Rayleigh quotients (largest first), then QR."""
    est = torch.diagonal(q.T @ stat @ q)
    q = q[:, torch.argsort(est, descending=True)]
    return torch.linalg.qr(stat @ q).Q


class SOAP(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        *,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        shampoo_beta: float = 0.95,
        precondition_frequency: int = 10,
        max_precond_dim: int = 4096,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if precondition_frequency < 1:
            raise ValueError(f"precondition_frequency must be >= 1, got {precondition_frequency}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            shampoo_beta=shampoo_beta,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
        )
        super().__init__(params, defaults)

    # State keys: step, exp_avg (M, original basis), exp_avg_sq (V, eigenbasis), and for each preconditioned dim i
    # L{i} (its statistic) and, after the first refresh, Q{i}. Flat tensor keys keep state_dict simple to shard.
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p.ndim >= 2:
                for i, n in enumerate(p.shape):
                    if n <= group["max_precond_dim"]:
                        state[f"L{i}"] = torch.zeros(n, n, dtype=torch.float32, device=p.device)
        return state

    @staticmethod
    def _bases(state: dict[str, Any], ndim: int) -> list[Tensor | None]:
        return [state.get(f"Q{i}") for i in range(ndim)]

    def _refresh(self, state: dict[str, Any], ndim: int) -> None:
        """New eigenbases from the statistics; moves V into them."""
        v = state["exp_avg_sq"]
        for i in range(ndim):
            stat = state.get(f"L{i}")
            if stat is None:
                continue
            old = state.get(f"Q{i}")
            new = _eigenbasis(stat) if old is None else _power_step(stat, old)
            r = new.T if old is None else new.T @ old  # old basis -> new basis
            v = _mode_product(v, r * r, i)
            state[f"Q{i}"] = new
        state["exp_avg_sq"] = v

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            sb, freq = group["shampoo_beta"], group["precondition_frequency"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SOAP does not support sparse gradients")
                state = self._init_state(p, group)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                qs = self._bases(state, p.ndim)
                m, v = state["exp_avg"], state["exp_avg_sq"]

                # Adam in the eigenbasis (identity until the first refresh)
                m.lerp_(g, 1 - beta1)
                g_rot = _rotate(g, qs)
                v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                denom = (v.sqrt() / bc2**0.5).add_(eps)
                n = _rotate(_rotate(m, qs) / denom, qs, back=True)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.sub_((n * (lr / bc1)).to(p.dtype))

                # Shampoo statistics of this dim's unfolding: G_(i) G_(i)^T
                preconditioned = False
                for i in range(p.ndim):
                    stat = state.get(f"L{i}")
                    if stat is not None:
                        others = [d for d in range(p.ndim) if d != i]
                        stat.lerp_(torch.tensordot(g, g, dims=(others, others)), 1 - sb)
                        preconditioned = True
                if preconditioned and t % freq == 0:
                    self._refresh(state, p.ndim)
        return loss
