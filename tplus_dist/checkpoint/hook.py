"""When to save: every N steps, every M minutes, on a preemption signal (then stop), after the last step."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from tplus_dist.checkpoint.manager import CheckpointManager
from tplus_dist.checkpoint.signals import StopRequest
from tplus_dist.train.hooks import Hook

if TYPE_CHECKING:
    from tplus_dist.train.trainer import Trainer


class CheckpointHook(Hook):
    """Runs on every rank; the ranks agree on whether to save (an all-reduce of four flags per step), since each
    rank's clock and signals are its own."""

    def __init__(self, manager: CheckpointManager, stop: StopRequest | None, verbose: bool) -> None:
        self.manager = manager
        self.stop = stop
        self.verbose = verbose
        self.last_save = time.monotonic()

    def on_fit_start(self, trainer: Trainer) -> None:
        self.last_save = time.monotonic()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        ck = self.manager.ck
        step = trainer.state.step
        minutes = (time.monotonic() - self.last_save) / 60
        flags = torch.tensor(
            [
                bool(ck.interval_steps) and step % ck.interval_steps == 0,
                ck.interval_minutes is not None and minutes >= ck.interval_minutes,
                self.stop is not None and self.stop.requested,
                ck.at_end and step >= trainer.total_steps,
            ],
            dtype=torch.float32,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        by_step, by_time, signalled, at_end = (bool(f) for f in flags.tolist())
        if not (by_step or by_time or signalled or at_end):
            return
        result = self.manager.save(trainer)
        self.last_save = time.monotonic()
        metrics["checkpoint_s"] = result.seconds
        if self.verbose:
            why = "signal" if signalled else "end" if at_end else "interval"
            print(
                f"tplus: saved step {step} ({why}) to {result.path}: {result.bytes / 1e6:.1f} MB in "
                f"{result.seconds:.2f} s",
                flush=True,
            )
        if signalled:
            trainer.stop_requested = True
            if self.verbose:
                name = self.stop.signal_name if self.stop is not None and self.stop.signal_name else "a signal"
                print(f"tplus: stopping after step {step} on {name}; resume with the same command", flush=True)
