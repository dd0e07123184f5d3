"""Small object collectives that also work in one process (then they return at once), for the start-up and
checkpoint code that every rank runs together: decide on one rank, tell the others, agree on failures."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


def agree(error: BaseException | str | None, kind: type[BaseException] = RuntimeError) -> None:
    """Raise on every rank if any rank has an error, so that no rank waits in a collective for one that stopped.
    A string becomes ``kind(error)``; an exception is re-raised as it is on the rank that had it and as ``kind``
    with its message on the others (with the rank that failed named)."""
    errors = all_gather(None if error is None else (rank(), str(error)))
    failed = [e for e in errors if e is not None]
    if not failed:
        return
    if isinstance(error, BaseException):
        raise error
    who, message = failed[0]
    if error is None and world() > 1:
        message = f"{message} (on rank {who})"
    raise kind(message)
