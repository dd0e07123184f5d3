"""Learning-rate schedules and the scheduler that writes them (and PaLM's lr^2 weight decay) into the optimizer.

Counting. ``step`` is the number of optimizer steps already taken: ``lr_at(0, ...)`` is the rate of the first
update. The formulas run over the 1-based update number ``s = step + 1`` (nanoGPT's ``it + 1`` warmup), so

* warmup: ``peak * s / warmup_steps`` -- the first update already moves (a zero-rate step wastes a batch) and
  update number ``warmup_steps`` (``step = warmup_steps - 1``) is the first at ``peak``;
* the decay ends on ``min_lr`` exactly at update number ``decay_steps``: with ``decay_steps = train.steps`` the
  last update of the run uses ``min_lr``; later steps stay at ``min_lr``.

Kinds: ``cosine`` (half cosine from peak to min_lr), ``wsd`` (warmup-stable-decay, MiniCPM: flat at peak, then
linear to min_lr over the last ``wsd_decay_fraction`` of decay_steps), ``constant`` (warmup, then peak forever),
``inverse_sqrt`` (the Transformer's and ESPnet's: peak * sqrt(warmup / s) after the warmup, not below min_lr).
``min_lr`` is absolute; a muP group's floor is ``min_lr * lr_scale`` like the rest of its schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tplus_dist.config.sections import OptimConfig, ScheduleConfig
from tplus_dist.optim.param_groups import group_weight_decay


def lr_at(step: int, sched_cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> float:
    """The base learning rate of the update after ``step`` completed steps (see the module docstring)."""
    end = sched_cfg.decay_steps if sched_cfg.decay_steps is not None else total_steps
    return _lr(step + 1, sched_cfg.warmup_steps, end, sched_cfg, peak_lr)


def lr_at_tokens(tokens_after: int, sched_cfg: ScheduleConfig, peak_lr: float, total_tokens: int) -> float:
    """The base learning rate of the update that brings the run to ``tokens_after`` tokens (the token clock:
    warmup and decay stay right when the batch grows)."""
    end = sched_cfg.decay_tokens if sched_cfg.decay_tokens is not None else total_tokens
    return _lr(tokens_after, sched_cfg.warmup_tokens, end, sched_cfg, peak_lr)


def _lr(s: int, warmup: int, end: int, sched_cfg: ScheduleConfig, peak_lr: float) -> float:
    """The schedule at progress ``s`` (1-based update number, or tokens after the update)."""
    if s < warmup:
        return peak_lr * s / warmup
    if sched_cfg.name == "constant":
        return peak_lr
    floor = sched_cfg.min_lr
    if sched_cfg.name == "inverse_sqrt":  # Vaswani et al.'s ("Noam") decay after the warmup, no end
        return max(floor, peak_lr * math.sqrt(warmup / s))
    if s >= end:
        return floor
    if sched_cfg.name == "cosine":
        progress = (s - warmup) / (end - warmup)  # end > s >= warmup here, so no division by zero
        return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))
    if sched_cfg.name == "wsd":
        decay_start = max(warmup, end - round(sched_cfg.wsd_decay_fraction * end))
        if s <= decay_start:
            return peak_lr
        return peak_lr + (floor - peak_lr) * (s - decay_start) / (end - decay_start)
    raise ValueError(f"unknown schedule {sched_cfg.name!r}")


class Scheduler:
    """Sets every param group's ``lr = lr_at(step) * lr_scale`` and its decoupled weight decay.

    Use like torch's LR schedulers: construct after the optimizer (it applies step 0's values at once), call
    ``step()`` after each ``optimizer.step()``. The state is the step counter alone -- the schedule is a pure
    function of it -- so ``load_state_dict`` resumes exactly (it re-applies the rates to the groups too)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sched_cfg: ScheduleConfig,
        optim_cfg: OptimConfig,
        total_steps: int,
        last_step: int = 0,
        total_tokens: int | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.sched_cfg = sched_cfg
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.total_tokens = total_tokens
        self.last_step = last_step
        self.tokens_after = 0
        """Token clock: tokens seen after the next update (set by `update`)."""
        if sched_cfg.unit == "tokens" and total_tokens is None and sched_cfg.decay_tokens is None:
            raise ValueError("a token-clock schedule needs total_tokens or schedule.decay_tokens")
        self._apply()

    def _apply(self) -> None:
        if self.sched_cfg.unit == "tokens":
            total = self.total_tokens if self.total_tokens is not None else 0
            base = lr_at_tokens(max(self.tokens_after, 1), self.sched_cfg, self.optim_cfg.lr, total)
        else:
            base = lr_at(self.last_step, self.sched_cfg, self.optim_cfg.lr, self.total_steps)
        self._lr = base
        for group in self.optimizer.param_groups:
            scale = group.setdefault("lr_scale", 1.0)
            group["lr"] = base * scale
            if "decay" in group:  # groups from build_param_groups; leave foreign groups' decay alone
                group["weight_decay"] = group_weight_decay(group, base, self.optim_cfg)

    def get_lr(self) -> float:
        """The base (lr_scale 1) rate the next ``optimizer.step()`` uses."""
        return self._lr

    def get_last_lr(self) -> list[float]:
        """Each group's current rate (torch's LRScheduler name)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        """Advance one optimizer step and write the next step's rates and weight decay."""
        self.last_step += 1
        self._apply()

    def update(self, step: int, tokens_after: int) -> None:
        """Write the rates of the update after ``step`` completed steps that brings the run to ``tokens_after``
        tokens (the trainer calls this before each optimizer step; it knows the step's batch size)."""
        self.last_step = step
        self.tokens_after = tokens_after
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "tokens_after": self.tokens_after}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self.tokens_after = int(state.get("tokens_after", 0))
        self._apply()
