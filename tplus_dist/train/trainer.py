"""One training loop for every layout: forward_backward_step -> train_step -> fit."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from tplus_dist.config import RunConfig
from tplus_dist.model.loss import lm_loss
from tplus_dist.optim import clip_grad_norm
from tplus_dist.train.hooks import Hook
from tplus_dist.train.metrics import mfu


class BatchSource(Protocol):
    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class LRScheduler(Protocol):
    def step(self) -> None: ...

    def get_lr(self) -> float: ...


@dataclass
class TrainState:
    """What a restart must restore besides model/optimizer/scheduler/data states."""

    step: int = 0
    tokens: int = 0


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        train_data: BatchSource,
        val_data: BatchSource | None,
        device: torch.device,
        hooks: list[Hook] | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_data = train_data
        self.val_data = val_data
        self.device = device
        self.hooks = hooks or []
        self.state = TrainState()
        self.total_steps = cfg.train.steps
        self.seq_len = cfg.seq_len
        self.peak_flops = peak_flops
        flops = getattr(model, "flops_per_token", None)
        self.flops_per_token = float(flops(self.seq_len)) if callable(flops) else None
        self.autocast_dtype = self._autocast_dtype()

    def _autocast_dtype(self) -> torch.dtype | None:
        choice = self.cfg.precision.dtype
        if choice == "bf16" or (choice == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # weights stay fp32 (the optimizer's master copy); matmuls run in bf16
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def loss_on(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mcfg = self.cfg.model
        with self._autocast():
            logits = self.model(tokens)
        return lm_loss(logits, targets, z_loss=mcfg.z_loss, ignore_index=mcfg.ignore_index)

    def forward_backward_step(self, tokens: torch.Tensor, targets: torch.Tensor, scale: float) -> dict[str, float]:
        """Forward and backward one micro-batch; gradients accumulate, scaled by ``scale``."""
        loss, parts = self.loss_on(tokens.to(self.device), targets.to(self.device))
        (loss * scale).backward()
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        tcfg = self.cfg.train
        self.model.train()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _ in range(tcfg.grad_accum):
            tokens, targets = self.train_data.batch(tcfg.micro_batch_size)
            parts = self.forward_backward_step(tokens, targets, 1.0 / tcfg.grad_accum)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / tcfg.grad_accum
        if not math.isfinite(totals["loss"]):
            raise NonFiniteLossError(f"loss is {totals['loss']} at step {self.state.step + 1}")
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip)
        lr = self.scheduler.get_lr()
        self.optimizer.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        n_tokens = tcfg.grad_accum * tcfg.micro_batch_size * self.seq_len
        self.state.step += 1
        self.state.tokens += n_tokens
        tok_s = n_tokens / dt
        return {
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.state.tokens,
            "batch_size": tcfg.grad_accum * tcfg.micro_batch_size,
            "step_time": dt,
            "tokens_per_s": tok_s,
            "mfu": mfu(tok_s, self.flops_per_token, self.peak_flops) if self.flops_per_token else None,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over train.eval_batches batches (the same batches every time)."""
        if self.val_data is None:
            return float("nan")
        self.model.eval()
        losses = []
        reset = getattr(self.val_data, "reset", None)
        if callable(reset):
            reset()
        for _ in range(self.cfg.train.eval_batches):
            tokens, targets = self.val_data.batch(self.cfg.train.micro_batch_size)
            loss, _ = self.loss_on(tokens.to(self.device), targets.to(self.device))
            losses.append(loss.item())
        self.model.train()
        return sum(losses) / len(losses)

    def fit(self) -> list[dict[str, Any]]:
        history = []
        for h in self.hooks:
            h.on_fit_start(self)
        try:
            while self.state.step < self.total_steps:
                metrics = self.train_step()
                metrics["step"] = self.state.step
                for h in self.hooks:
                    h.on_step_end(self, metrics)
                history.append(metrics)
        finally:
            for h in self.hooks:
                h.on_fit_end(self)
        return history
