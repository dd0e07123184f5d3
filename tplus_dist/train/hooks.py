"""Optional behaviour around the step: evaluation, metrics files, console progress.

A hook sees the trainer and the step's metrics dict; hooks run in order, so an earlier hook
(evaluation) can add values (val_loss) that later ones (metrics file, console) record."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from tplus_dist.train.metrics import MetricsWriter

if TYPE_CHECKING:
    from tplus_dist.train.trainer import Trainer


class Hook:
    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


class EvalHook(Hook):
    """Validation loss every ``interval`` steps and after the last one, with its wall time (``time/eval``, s)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = trainer.state.step
        if self.interval and (step % self.interval == 0 or step == trainer.total_steps):
            t0 = time.perf_counter()
            metrics["val_loss"] = trainer.evaluate()
            metrics["time/eval"] = time.perf_counter() - t0


class MetricsFileHook(Hook):
    def __init__(self, writer: MetricsWriter) -> None:
        self.writer = writer

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.writer.write(trainer.state.step, metrics)

    def on_fit_end(self, trainer: Trainer) -> None:
        self.writer.close()


def format_metrics(m: dict[str, Any], tokens_per_s: float | None = None) -> str:
    """One console line; ``tokens_per_s`` (default: the step's own) is the rate shown."""
    parts = [f"step {m['step']}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}"]
    parts.append(f"{m['tokens_per_s'] if tokens_per_s is None else tokens_per_s:,.0f} tok/s")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    if m.get("skipped"):
        parts.append(f"SKIPPED, no update: {m.get('skip_reason')} ({m.get('skipped_steps')} skipped so far)")
    return " | ".join(parts)


class ConsoleHook(Hook):
    """A tqdm bar (rate and ETA) with the latest loss on ``stream`` (stderr) when it is a terminal; a full line every
    ``interval`` steps. When the stream is not a terminal (a redirected log, SLURM's output file) there is no bar,
    whose carriage-return updates would pile up in the file: the full lines alone, at the log interval. A line's
    tok/s is the training rate since the previous line: the tokens of those steps over their ``time/data +
    time/step`` (the batches' waiting and the steps; evaluation and checkpoint saves, timed apart, excluded)."""

    def __init__(self, interval: int, progress: bool = True, stream: TextIO | None = None) -> None:
        self.interval = interval
        self.progress = progress
        self.stream = stream if stream is not None else sys.stderr
        self.bar: tqdm[Any] | None = None
        self._tokens = 0
        self._seconds = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        from tplus_dist.console import is_terminal

        if self.progress and is_terminal(self.stream):
            self.bar = tqdm(
                total=trainer.total_steps,
                initial=trainer.state.step,
                unit="step",
                dynamic_ncols=True,
                leave=True,
                file=self.stream,
            )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = trainer.state.step
        self._tokens += int(metrics.get("batch_size", 0)) * trainer.seq_len
        self._seconds += float(metrics.get("time/data", 0.0)) + float(metrics.get("time/step", 0.0))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if (
            step % self.interval == 0
            or step == trainer.total_steps
            or step == 1
            or "val_loss" in metrics
            or metrics.get("skipped")
        ):
            line = format_metrics(metrics, self._tokens / self._seconds if self._seconds > 0 else None)
            self._tokens, self._seconds = 0, 0.0
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
