"""One training loop for every layout: forward_backward_step -> train_step -> fit."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from tplus_dist import faults
from tplus_dist.config import RunConfig
from tplus_dist.data.loader import MicroBatch, StepBatch
from tplus_dist.model.loss import lm_loss
from tplus_dist.optim import clip_grad_norm
from tplus_dist.optim.guard import StepGuard, gradient_fault
from tplus_dist.precision import autocast_dtype, precision_context
from tplus_dist.token_mean import LossSums, all_reduce_sums, count_targets, count_targets_each
from tplus_dist.train.compile import attention_backends
from tplus_dist.train.hooks import Hook
from tplus_dist.train.metrics import mfu


class StepSource(Protocol):
    """Where the training batches come from (data.loader.ShardBatches)."""

    def next_step(self) -> StepBatch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LRScheduler(Protocol):
    def update(self, step: int, tokens_after: int) -> None: ...

    def get_lr(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StepRunner(Protocol):
    """How one optimizer step's micro-batches become an update: plain PyTorch in one process (LocalStepRunner),
    or a DeepSpeed engine across data-parallel ranks (parallel.engine.EngineStepRunner). ``before_update`` writes
    the step's learning rate and weight decay. A runner arms the trainer's StepGuard (where this rank's loss sums and
    the global norm come from), steps (the optimizer's step asks the guard), and concludes the guard; returns the
    step's loss terms (``loss``, ``ce``, ``z_loss``: means over every target that counts in the step, on every rank;
    token_mean.py) and the pre-clip grad norm, the loss and norm being the guard's (what it decided on). Micro-batch
    ``j`` is back-propagated with weight count_j / N (its counted targets over the step's, all ranks), so the
    gradient is that of the token mean."""

    def run(
        self, micro_batches: list[MicroBatch], before_update: Callable[[], None]
    ) -> tuple[dict[str, float], float]: ...


class LocalStepRunner:
    """One process: backward each micro-batch weighted by its share of the step's counted targets (token_mean.py),
    clip the global norm, step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def run(self, micro_batches: list[MicroBatch], before_update: Callable[[], None]) -> tuple[dict[str, float], float]:
        t = self.trainer
        t.optimizer.zero_grad(set_to_none=True)
        ignore = t.cfg.model.ignore_index
        counts = count_targets_each([mb.targets for mb in micro_batches], ignore)
        total = max(sum(counts), 1)
        share = LossSums()
        for mb, count in zip(micro_batches, counts, strict=True):
            share.add(t.forward_backward_step(mb.tokens, mb.targets, count / total, mb.labels), count)
        grad_norm = clip_grad_norm(t.model.parameters(), t.cfg.optim.grad_clip)  # (nan: gradients become nan)
        t.guard.arm(lambda: share, lambda: grad_norm)
        before_update()
        t.optimizer.step()  # the guard's: no update when the step is bad
        verdict = t.guard.conclude()
        return {"loss": verdict.loss, **(verdict.parts or {})}, verdict.grad_norm


@dataclass
class TrainState:
    """What a restart must restore besides model/optimizer/scheduler/data states."""

    step: int = 0
    tokens: int = 0


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states of this process."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        train_data: StepSource,
        val_data: Iterable[MicroBatch] | None,
        device: torch.device,
        hooks: list[Hook] | None = None,
        peak_flops: float | None = None,
        runner: StepRunner | None = None,
        n_devices: int = 1,
        flops_per_token: float | None = None,
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
        self.n_devices = n_devices
        self.runner: StepRunner = runner or LocalStepRunner(self)
        self.stop_requested = False
        """Set by a hook (a preemption signal) to end fit() after the current step."""
        self.layout: Any = None
        """Where this process stands in a distributed run (train.run.Layout), set by build_trainer."""
        self.checkpoints: Any = None
        """The run's checkpoint.CheckpointManager, set by build_trainer."""
        self.run_locks: list[Any] = []
        """The run and checkpoint directories' locks (train.rundir.RunLock, rank 0), set by build_trainer; released
        by close()."""
        core = getattr(model, "module", model)  # under an engine: its module
        if flops_per_token is None:
            flops = getattr(core, "flops_per_token", None)
            flops_per_token = float(flops(self.seq_len)) if callable(flops) else None
        self.flops_per_token = flops_per_token
        # the decoder's own loss (vocabulary-parallel under tensor parallelism); lm_loss for other models
        mcfg = cfg.model
        self.loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] = getattr(core, "loss", None) or (
            lambda logits, targets: lm_loss(logits, targets, z_loss=mcfg.z_loss, ignore_index=mcfg.ignore_index)
        )
        self.autocast_dtype = autocast_dtype(cfg.precision, device)
        self.amax_reduction_group: Any = None
        """The group FP8 delayed scaling reduces amaxes over (precision.amax_reduction_group), set by build_trainer."""
        self.guard = StepGuard.from_config(cfg.train, device)
        """Skips bad steps (optim/guard.py); its wrapped optimizer step is every layout's only way to update."""
        self.guard.wrap(optimizer)

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        """The precision one micro-batch's forward runs in (precision.precision_context: bf16 autocast, and TE's
        FP8 autocast with precision.fp8); a fresh context each micro-batch."""
        return precision_context(self.cfg.precision, self.device, amax_reduction_group=self.amax_reduction_group)

    def loss_on(
        self, tokens: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch; ``labels`` (each sequence's condition, model.adaln) when the data has them."""
        with self.forward_context(), attention_backends(self.device):
            logits = self.model(tokens) if labels is None else self.model(tokens, labels.to(self.device))
        return self.loss_fn(logits, targets)

    def forward_backward_step(
        self, tokens: torch.Tensor, targets: torch.Tensor, scale: float, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Forward and backward one micro-batch; gradients accumulate, scaled by ``scale``. Returns its loss terms
        (mean over its counted targets) as detached 0-d tensors on the device: the caller adds them up there
        (token_mean.LossSums) and reads them once per step, so the host never waits for a micro-batch to finish."""
        loss, parts = self.loss_on(tokens.to(self.device), targets.to(self.device), labels)
        (loss * scale).backward()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over this step's micro-batches (their number grows with the batch ramp). Its times:
        ``time/data`` waiting for the batch, ``time/step`` the forward, backward and update; ``tokens_per_s`` and
        ``mfu`` are the step's own (tokens / time/step): evaluation and checkpoint saves are timed apart
        (``time/eval``, ``time/checkpoint``, added by their hooks)."""
        self.model.train()
        t0 = time.perf_counter()
        faults.set_step(self.state.step + 1)
        batch = self.train_data.next_step()
        faults.inject("data")
        t1 = time.perf_counter()
        n_tokens = batch.global_batch * self.seq_len
        step, tokens = self.state.step, self.state.tokens
        self.guard.begin(step + 1)
        remove_fault = gradient_fault(self.model, step + 1)  # TPLUS_FAULT=grad:nan etc. (tests)
        try:
            totals, grad_norm = self.runner.run(
                batch.micro_batches, lambda: self.scheduler.update(step, tokens + n_tokens)
            )
        finally:
            remove_fault()
        verdict = self.guard.last
        assert verdict is not None and verdict.step == step + 1, "the step runner did not conclude the StepGuard"
        if not self.cfg.model.z_loss:
            totals.pop("z_loss", None)  # (no such term)
        lr = self.scheduler.get_lr()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        # a skipped step still consumes its batch and advances the clocks: a retry would meet the same batch
        self.state.step += 1
        self.state.tokens += n_tokens
        self.guard.check_limit()  # too many skips in a row: stop before any hook saves or logs this step
        tok_s = n_tokens / (t2 - t1)
        return {
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": verdict.skipped,
            "skipped_steps": self.guard.skipped_steps,
            "skip_reason": verdict.reason,
            "loss_sigmas": verdict.loss_sigmas,
            "grad_norm_sigmas": verdict.grad_norm_sigmas,
            "tokens": self.state.tokens,
            "batch_size": batch.global_batch,
            "first_sample": batch.first_sample,
            "last_sample": batch.last_sample,
            "time/data": t1 - t0,
            "time/step": t2 - t1,
            "tokens_per_s": tok_s,
            "mfu": mfu(tok_s, self.flops_per_token, self.peak_flops, self.n_devices) if self.flops_per_token else None,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss: the mean over every target token of the validation set (train.eval_samples), the
        same set and the same value (to rounding) in every layout. Each data-parallel replica evaluates its share of
        the batches (data.loader.EvalBatches); the per-token sums are added over the replicas (token_mean.py). The
        loss includes the z-loss term when model.z_loss is set, like the training loss."""
        if self.val_data is None:
            return float("nan")
        faults.inject("eval")
        run_eval = getattr(self.runner, "evaluate", None)  # a pipeline evaluates through its schedule
        if callable(run_eval):
            share = run_eval(list(self.val_data))
        else:
            self.model.eval()
            ignore = self.cfg.model.ignore_index
            share = LossSums(counts=self.counts_loss)
            for mb in self.val_data:
                loss, parts = self.loss_on(mb.tokens.to(self.device), mb.targets.to(self.device), mb.labels)
                # summed on the device; all_reduce_sums reads them once
                share.add({"loss": loss, **parts}, count_targets(mb.targets, ignore))
            self.model.train()
        return all_reduce_sums(share, self.device).means()["loss"]

    @property
    def counts_loss(self) -> bool:
        """Whether this rank's losses enter a mean over ranks: one rank per data-parallel replica (tensor-parallel
        rank 0; a pipeline's runner says which of its ranks)."""
        groups = getattr(self.layout, "groups", None)
        return groups is None or groups.tp_rank == 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs, listed once: model, optimizer, schedule, data position, RNG, counters."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_data.state_dict(),
            "rng": rng_state(),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.state = TrainState(step=int(state["step"]), tokens=int(state["tokens"]))
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])

    def close(self) -> None:
        """Release the run directory for another job (the end of a run; the process exiting does it too)."""
        for lock in self.run_locks:
            lock.release()
        self.run_locks = []

    def fit(self, until: int | None = None) -> list[dict[str, Any]]:
        """Train to train.steps (or to step ``until``, e.g. to stop part-way); returns each step's metrics."""
        history = []
        stop = min(self.total_steps, until) if until is not None else self.total_steps
        for h in self.hooks:
            h.on_fit_start(self)
        try:
            while self.state.step < stop and not self.stop_requested:
                metrics = self.train_step()
                metrics["step"] = self.state.step
                for h in self.hooks:
                    h.on_step_end(self, metrics)
                history.append(metrics)
        finally:
            for h in self.hooks:
                h.on_fit_end(self)
        return history
