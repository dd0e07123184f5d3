"""SIGTERM / SIGUSR1 as a request to save and stop at the next step boundary.

SLURM sends SIGTERM at preemption and (with `--signal=B:USR1@SECONDS` or `--signal=USR1@SECONDS`) SIGUSR1 before the
time limit; torchrun forwards SIGTERM to its workers. The handler only records the signal: saving happens between
steps, where every rank agrees on it (CheckpointHook all-reduces the flag)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

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
