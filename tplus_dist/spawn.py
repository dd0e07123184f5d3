"""Spawn N gloo processes on this machine and run a function in each: fn(rank, world, *args).

Used by the multi-process tests and benchmarks; the function must be importable (spawn pickles it)."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to outgoing connections and to bind(port 0) (Linux's default otherwise)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port that is free now, for a store that binds it seconds later (after the ranks have started).

    Chosen at random below the ephemeral range: a port from bind(port 0) is ephemeral, so in the seconds before the
    store binds it any process's outgoing connection (another job's gloo ranks connect to each other all the time)
    may take it, and the job fails with "address already in use". Below the range only an explicit bind can."""
    low, _ = _ephemeral_ports()
    candidates = list(range(20000, low)) if low > 21000 else []
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:100]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual port range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    # One thread per rank, so that ranks do not oversubscribe the cores. The variable above only reaches what this
    # process starts; torch itself was imported (by torch.multiprocessing, before this function ran) and sized its
    # thread pool to every core, so it is told directly.
    torch.set_num_threads(1)
    fn(rank, world, *args)


def run_distributed(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run fn(rank, world, *args) in ``world`` spawned processes; an exception in any fails the call."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")
