"""mosaicml-streaming's shared-memory registration, made safe between concurrent jobs on one node.

Every StreamingDataset registers a "prefix" (an integer) that names its shared-memory segments
(``/dev/shm/000017_locals``, ``000017_barrier``, ...) and two file locks in the temp dir. In streaming 0.13
(``streaming/base/shared/prefix.py:get_shm_prefix``), every rank computes the first free prefix on its own
(``_check_and_find``: the first integer with no segment and no file lock), then the node's local leader creates
``NNNNNN_locals`` and the other ranks attach to the prefix *they* computed. Two races follow:

- two jobs starting together both find prefix N free and both create it: ``FileExistsError: '/000017_locals'``;
- a rank of one job computes its prefix while another job registers or exits between the leader's and the
  rank's look: the rank picks another number than its leader ("shared memory prefix=3 was not registered by
  local leader").

:func:`get_shm_prefix` replaces streaming's function (installed by ``streaming_compat.import_streaming``): the
local leader alone chooses and creates the prefix, under an exclusive ``flock`` on a node-local lock file
(``/dev/shm/tplus_streaming_registration.lock``, in the same namespace as the segments it guards), and hands the
number to its ranks with one ``all_gather_object``. Non-leaders never take the lock, so a job spread over nodes
cannot deadlock with another one (each node's leader holds only its own node's lock, and no collective runs
while it is held).

Stale registrations of killed jobs are removed by the leader under the same lock (so no job is half-registered
meanwhile), and only when none of their segments is held by a live process (:mod:`tplus_dist.shm`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from tempfile import gettempdir
from typing import Any

from tplus_dist.shm import SHM_DIR, held

LOCK_FILE = SHM_DIR / "tplus_streaming_registration.lock"


@contextlib.contextmanager
def registration_lock() -> Iterator[None]:
    """Hold the node's exclusive registration lock (blocking). Any user can take it: the file is made 0666, and a
    read-only descriptor suffices for ``flock`` when another user made it."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o666)  # past the umask, so that other users' jobs can open it too
    except PermissionError:
        fd = os.open(LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _files_of(prefix: int) -> list[Path]:
    """Every file streaming makes for one prefix: its segments and its two file locks."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    segments = [SHM_DIR / _get_path(prefix, name) for name in SHM_TO_CLEAN]
    return segments + [Path(gettempdir()) / _get_path(prefix, name) for name in (BARRIER_FILELOCK, CACHE_FILELOCK)]


def registrations() -> dict[int, list[str]]:
    """Every prefix on this node that has any of streaming's files (a segment in /dev/shm or a file lock in the temp
    dir), with the local directories its ``locals`` segment names: [] when it has none, or once its dataset
    released it (streaming's ``StreamingDataset.__del__`` zeroes the record but leaves the segment), or when only
    file locks are left (streaming skips a prefix while they exist)."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    names = {*SHM_TO_CLEAN, BARRIER_FILELOCK, CACHE_FILELOCK}
    out: dict[int, list[str]] = {}
    for directory in (SHM_DIR, Path(gettempdir())):
        for path in directory.glob("[0-9][0-9][0-9][0-9][0-9][0-9]_*"):
            head, _, name = path.name.partition("_")
            if head.isdigit() and name in names:
                out.setdefault(int(head), [])
    for prefix in out:
        try:
            their_locals, _ = _unpack_locals((SHM_DIR / _get_path(prefix, LOCALS)).read_bytes())
        except Exception:  # none, vanished, or not streaming's format
            continue
        out[prefix] = [os.path.abspath(p) for p in their_locals if p]
    return out


def clean_stale_registrations() -> list[int]:
    """Remove the registrations (segments and file locks) of dead jobs on this node, whatever data they read; a
    prefix any of whose files a live process holds is kept, whoever made it. Returns the prefixes removed. Call it
    under :func:`registration_lock`, so that no tplus job is between choosing and creating a prefix (a process
    holds a segment from the moment it creates it, so other streaming users are safe too)."""
    candidates = {p: _files_of(p) for p in registrations()}
    busy = held(str(f) for files in candidates.values() for f in files)
    removed = []
    for prefix, files in sorted(candidates.items()):
        if any(str(f) in busy for f in files):
            continue
        for f in files:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                f.unlink()
        removed.append(prefix)
    return removed


def first_free_prefix(streams_local: list[str], streams_remote: list[str | None]) -> int:
    """The lowest prefix none of whose segments or file locks exists. Raises ValueError, as streaming does, when a
    live registration already names one of our local directories for a stream with a remote (two datasets would
    download into one directory). Unlike streaming's ``_check_and_find``, which attaches a SharedMemory to every
    segment it looks at and never closes it (an open descriptor per segment per scan, held until the process
    exits, which also makes dead jobs' segments look alive), this only looks at names and reads files."""
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    prefix = 0
    while True:
        files = _files_of(prefix)
        if not any(f.exists() for f in files):
            return prefix
        if any(streams_remote):
            try:
                their_locals, _ = _unpack_locals((SHM_DIR / _get_path(prefix, LOCALS)).read_bytes())
            except (OSError, ValueError, IndexError):
                their_locals = []
            for local, remote in zip(streams_local, streams_remote, strict=True):
                if remote is not None and local in their_locals:
                    raise ValueError(
                        f"Reused local directory: {streams_local} vs {their_locals} (shared-memory prefix {prefix}, "
                        f"files {[f.name for f in files if f.exists()][: len(SHM_TO_CLEAN)]}). Provide a different one."
                    )
        prefix += 1


def get_shm_prefix(
    streams_local: list[str], streams_remote: list[str | None], world: Any, retry: int = 100
) -> tuple[int, Any]:
    """Drop-in for ``streaming.base.shared.prefix.get_shm_prefix`` (same arguments and result: the prefix and the
    ``locals`` SharedMemory): the local leader cleans dead registrations, chooses and creates the prefix under
    :func:`registration_lock`; the node's other ranks receive the number from it (``all_gather_object`` over the
    default group, when torch.distributed is initialized, where streaming's own function used two barriers).
    Raises ValueError as streaming does for a reused local directory (with a remote), RuntimeError when a rank
    cannot find its leader's registration. ``retry``: attempts when a prefix is taken between choosing and
    creating it (only a streaming user outside this lock can do that)."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _check_self, _get_path, _pack_locals, _unpack_locals

    _check_self(streams_local)
    prefix, shm = -1, None
    if world.is_local_leader:
        with registration_lock():
            clean_stale_registrations()
            for _ in range(1 + retry):
                prefix = first_free_prefix(streams_local, streams_remote)
                data = _pack_locals(streams_local, prefix)
                try:
                    shm = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
                except FileExistsError:  # taken by a streaming user outside this lock (not a tplus job): next
                    continue
                shm.buf[: len(data)] = data
                break
            else:
                raise RuntimeError(f"streaming: no free shared-memory prefix after {retry + 1} attempts")
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, prefix)
        prefix = int(gathered[dist.get_rank() - world.rank_of_node])  # this node's leader (ranks are contiguous)
    if not world.is_local_leader:
        name = _get_path(prefix, LOCALS)
        try:
            shm = SharedMemory(name, False)
        except FileNotFoundError:
            raise RuntimeError(
                f"streaming: shared memory prefix={prefix} was not registered by the local leader (different "
                "`local` directories on different ranks, or a node's ranks not numbered contiguously?)"
            ) from None
        their_locals, their_prefix = _unpack_locals(bytes(shm.buf))
        if streams_local != their_locals or prefix != their_prefix:
            raise RuntimeError(
                f"streaming: the local leader registered {their_locals} as prefix {their_prefix}; this rank "
                f"expected {streams_local} as prefix {prefix}"
            )
    return prefix, shm
