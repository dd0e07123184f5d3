"""What a run's console shows: each library notice once (rank 0) or, where it does not concern the user, not at all.

A distributed run used to print, on every rank, megatron-core's "Transformer Engine and Apex are not installed"
warnings (its fallbacks serve its own optimizer and FSDP, which tplus does not use), its CUDA_DEVICE_MAX_CONNECTIONS
advice (which concerns CUDA only), DeepSpeed's accelerator notice and its "op built successfully" line (printed
also when the op was only loaded), and torch 2.13's deprecation of the collectives DeepSpeed calls. Each is matched
here by its exact text and the library that raises it (a warning's category and module, a logger's name, a line of
stdout), never by a whole category or stream, so every other warning and every error still shows. Warnings that our
own calls caused are fixed at the call instead (parallel/pipeline.py builds DeepSpeed's pipeline module without
autograd, so its broadcast of the tied weights is not recorded as a differentiable operation).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

NOT_FOR_THE_USER: list[tuple[type[Warning], str, str]] = [
    # (category, message regex from its start, module regex of where it is raised)
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to ", r"megatron\.core\."),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. ", r"torch\.distributed\."),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated\. ", r"torch\.distributed\."),
]
"""Warnings dropped on every rank: what they say is not about the user's run (megatron-core's fallbacks for code
paths tplus does not take; torch's deprecation of collectives that DeepSpeed, not tplus, calls)."""

CUDA_ONLY: list[tuple[type[Warning], str, str]] = [
    (
        UserWarning,
        r"When using (async grad allreduce|sequence parallelism) it is recommended to set the environment variable "
        r"CUDA_DEVICE_MAX_CONNECTIONS",
        r"megatron\.core\.tensor_parallel\.",
    ),
]
"""Warnings about CUDA settings: once on rank 0 where CUDA is available, not at all where it is not."""

DEEPSPEED_ACCELERATOR = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
"""DeepSpeed's accelerator notice (its "DeepSpeed" logger, once per process): kept on rank 0 only."""

DEEPSPEED_STDOUT = (re.compile(r"DeepSpeed \S+ built successfully$"),)
"""Lines DeepSpeed prints on stdout while it sets up its communication backend: dropped (:func:`quiet_stdout`)."""


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankZeroOnly(logging.Filter):
    """Drops the records whose message is one of ``messages`` on every rank but 0."""

    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0 or record.getMessage() not in self.messages


def quiet_library_notices(cuda: bool | None = None) -> None:
    """Install the filters above (idempotent; call before the libraries are imported, since megatron-core warns at
    import). ``cuda``: whether CUDA is available (None: ask torch). Every other warning and log record is untouched."""
    rank0 = _rank() == 0
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    for category, message, module in NOT_FOR_THE_USER:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for category, message, module in CUDA_ONLY:
        warnings.filterwarnings(
            "once" if cuda and rank0 else "ignore", message=message, category=category, module=module
        )
    logger = logging.getLogger("DeepSpeed")  # the object DeepSpeed configures later (logging.getLogger returns it)
    if not any(isinstance(f, _RankZeroOnly) for f in logger.filters):
        logger.addFilter(_RankZeroOnly((DEEPSPEED_ACCELERATOR,)))


class _LineFilter(io.TextIOBase):
    """A text stream that passes whole lines on to ``out``, except those matching one of ``drop``."""

    def __init__(self, out: TextIO, drop: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.out, self.drop, self.pending = out, drop, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not any(p.match(line) for p in self.drop):
                self.out.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def finish(self) -> None:
        if self.pending and not any(p.match(self.pending) for p in self.drop):
            self.out.write(self.pending)
        self.pending = ""
        self.out.flush()


@contextlib.contextmanager
def quiet_stdout(drop: tuple[re.Pattern[str], ...] = DEEPSPEED_STDOUT) -> Iterator[None]:
    """Within the block, lines printed on stdout that match one of ``drop`` are left out; every other line is
    printed as it was (for a library call that ``print``s a notice, e.g. DeepSpeed's initialisation)."""
    line_filter = _LineFilter(sys.stdout, drop)
    try:
        with contextlib.redirect_stdout(line_filter):
            yield
    finally:
        line_filter.finish()


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a live progress bar fits it; a redirected log, e.g. SLURM's
    output file, gets plain lines instead)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_NOTICED: set[str] = set()


def notice_once(message: str, stream: TextIO | None = None) -> bool:
    """Print ``message`` on one line (stderr unless ``stream``), on rank 0 only and once per process; returns whether
    it was printed. For notices about the run's own choices (e.g. the te provider's torch fallbacks), which every
    rank would otherwise repeat."""
    if _rank() != 0 or message in _NOTICED:
        return False
    _NOTICED.add(message)
    print(message, file=stream if stream is not None else sys.stderr, flush=True)
    return True
