"""SIGTERM / SIGUSR1 / SIGINT as a request to save and stop at the next step boundary.

SLURM sends SIGTERM at preemption and (with `--signal=B:USR1@SECONDS` or `--signal=USR1@SECONDS`) SIGUSR1 before the
time limit; torchrun forwards SIGTERM to its workers; Ctrl-C is SIGINT. The handler only records the signal: saving
happens between steps, where every rank agrees on it (CheckpointHook all-reduces the flag). A SIGINT after a stop
was requested (a second Ctrl-C) raises KeyboardInterrupt at once, as Python's own handler would: the run ends
without saving what it did since its last checkpoint (exit 130)."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt("a second interrupt: stopping at once, without saving")
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            # os.write, not print: a handler may run in the middle of another print to the same stream
            os.write(
                2,
                b"\ntplus: interrupted: saving a checkpoint at the end of this step, then stopping "
                b"(interrupt again to stop at once, without saving)\n",
            )

    def install(self) -> StopRequest:
        """Install the handlers (from the main thread only; elsewhere signals cannot be caught)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
