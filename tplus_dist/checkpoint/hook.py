"""When to save: every N steps, every M minutes, on a preemption signal (then stop), after the last step."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from tplus_dist.checkpoint.manager import CheckpointManager, SaveResult
from tplus_dist.checkpoint.signals import StopRequest
from tplus_dist.train.hooks import Hook

if TYPE_CHECKING:
    from tplus_dist.train.trainer import Trainer


class CheckpointHook(Hook):
    """Runs on every rank; the ranks agree on whether to save (an all-reduce of five flags per step: the four
    reasons to save and whether a background save is still writing somewhere), since each rank's clock, signals
    and disk are its own. Runs after the metrics file hook, so a step's row is on disk before its save starts;
    ``log(step, values)`` (rank 0's metrics writer) then records the save's timings in a line of their own for that
    step (``checkpoint_s``: the save's duration, ``checkpoint_stall_s`` = ``time/checkpoint``: how long the step
    loop waited for it, less than the save's duration for a background save)."""

    def __init__(
        self,
        manager: CheckpointManager,
        stop: StopRequest | None,
        verbose: bool,
        background: bool = False,
        log: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.manager = manager
        self.stop = stop
        self.verbose = verbose
        self.background = background
        self.log = log
        self.last_save = time.monotonic()
        self.saved: SaveResult | None = None
        """The last checkpoint published by this run (what a stopped run resumes from)."""

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
                not self.manager.pending_done(),
            ],
            dtype=torch.float32,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        by_step, by_time, signalled, at_end, writing = (bool(f) for f in flags.tolist())
        if self.manager.pending is not None and not writing:  # every rank's files are written: publish
            self._report(self.manager.finish_pending(), "interval, in the background")
        if not (by_step or by_time or signalled or at_end):
            return
        if self.background and not (signalled or at_end):
            stall = self.manager.save_in_background(trainer)
            metrics["checkpoint_stall_s"] = metrics["time/checkpoint"] = stall
            self._log(step, {"checkpoint_stall_s": stall, "time/checkpoint": stall})
            self.last_save = time.monotonic()
            return
        result = self.manager.save(trainer)  # (a background save still writing is published first)
        self.last_save = time.monotonic()
        metrics["checkpoint_s"] = metrics["checkpoint_stall_s"] = metrics["time/checkpoint"] = result.seconds
        self._log(
            step,
            {"checkpoint_s": result.seconds, "checkpoint_stall_s": result.seconds, "time/checkpoint": result.seconds},
        )
        self._report(result, "signal" if signalled else "end" if at_end else "interval")
        if signalled:
            trainer.stop_requested = True
            if self.verbose:
                name = self.stop.signal_name if self.stop is not None and self.stop.signal_name else "a signal"
                print(f"tplus: stopping after step {step} on {name}", flush=True)

    def _log(self, step: int, values: dict[str, Any]) -> None:
        if self.log is not None:
            self.log(step, values)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.manager.pending is None:
            return
        if sys.exc_info()[0] is not None:  # training failed: no collective now; the next start removes the staging
            return
        self._report(self.manager.wait(), "interval, in the background")  # published before the run ends

    def _report(self, result: SaveResult | None, why: str) -> None:
        if result is None:
            return
        self.saved = result
        if not self.verbose:
            return
        if result.note:
            print(f"tplus: {result.note}", flush=True)
        stall = f"; the step loop waited {result.stall:.2f} s" if result.stall < result.seconds else ""
        print(
            f"tplus: saved step {result.step} ({why}) to {result.path}: {result.bytes / 1e6:.1f} MB in "
            f"{result.seconds:.2f} s{stall}",
            flush=True,
        )
