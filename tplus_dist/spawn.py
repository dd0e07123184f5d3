"""Spawn N gloo processes on this machine and run a function in each: fn(rank, world, *args).

Used by the multi-process tests and benchmarks; the function must be importable (spawn pickles it)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
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
