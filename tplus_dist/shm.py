"""Which processes hold a /dev/shm file, and removing only the files no live process holds.

Jobs leave shared memory behind when they are killed (kill -9, OOM, a node's scheduler): mosaicml-streaming's
per-dataset segments (``/dev/shm/000017_locals`` ...) and DeepSpeed's CPU all-reduce buffers
(``/dev/shm/deepspeed_allreduce_buffer_*``, about 69 MB a rank). A name alone does not say whether the job that
made it still runs, and deleting a live job's segment breaks it (another job then creates a new file under the
same name, and the two jobs stop seeing each other's writes). So the owner is asked of the kernel:

- a process holds a file while it has it open (``/proc/PID/fd/*`` links to it) or mapped (a line of
  ``/proc/PID/maps`` names it). Both libraries keep a descriptor for as long as they use the segment
  (CPython's ``multiprocessing.shared_memory.SharedMemory`` keeps ``_fd`` until ``close()``, which streaming's
  ``streaming/base/shared/memory.py:SharedMemory`` wraps; DeepSpeed's ``ops/csrc/cpu/comm/shm.cpp:shared_open``
  keeps ``descriptor`` and the mapping until ``shared_close``), and both map it; reading both covers code that
  closes the descriptor after mapping.
- A process whose /proc entries cannot be read (another user's, when we are not root) is assumed to hold every
  file it could open by the file's permission bits (its owner, a group it belongs to, or "other" access). Root's
  override is not assumed for files of other users: otherwise a non-root user could never clean anything, since
  root processes always run; a root daemon that maps a user's private 0600 segment is not a case that occurs.
  A process of our own user that cannot be read is "non-dumpable" (a setuid program, a sandbox's init, one that
  called prctl(PR_SET_DUMPABLE, 0)); training processes (Python, DeepSpeed) never are, so it is not assumed to
  hold anything. Without that exception one such process (this machine's PID 1 is one) would keep every file.
- Limits: processes in another PID namespace that share this /dev/shm (containers started with ``--ipc=host`` but
  their own PID namespace) are invisible here; give such containers their own /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def _proc_ids(pid: str) -> tuple[int, set[int]] | None:
    """(effective uid, all gids) of a process from /proc/PID/status (readable for every process), or None."""
    uid, gids = None, set()
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[2])
                elif line.startswith("Gid:"):
                    gids.add(int(line.split()[2]))
                elif line.startswith("Groups:"):
                    gids.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError, IndexError):
        return None
    return None if uid is None else (uid, gids)


def _could_open(ids: tuple[int, set[int]] | None, st: os.stat_result) -> bool:
    if ids is None:  # nothing known about it: it might hold anything
        return True
    uid, gids = ids
    if uid == os.geteuid():  # ours but unreadable: non-dumpable, not a training process (module docstring)
        return False
    return uid == st.st_uid or (st.st_gid in gids and bool(st.st_mode & 0o060)) or bool(st.st_mode & 0o006)


def held(paths: Iterable[str | Path]) -> set[str]:
    """The subset of ``paths`` (absolute file names, e.g. ``/dev/shm/000003_locals``) that a live process holds
    open or mapped, as strings. A process whose /proc cannot be read counts as holding each path it could open
    (see the module docstring). Paths that no longer exist are left out. Cost: a readlink per open descriptor of
    every process, then reading /proc/PID/maps of every process only while some path is still unaccounted for."""
    stats: dict[str, os.stat_result] = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            stats[str(p)] = os.stat(p)
    found: set[str] = set()
    pids = [d for d in os.listdir("/proc") if d.isdigit()]
    unreadable: list[str] = []
    for pid in pids:  # descriptors: cheap, and both libraries keep one for as long as they use the segment
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # exited meanwhile
        except PermissionError:
            unreadable.append(pid)
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target in stats:
                    found.add(target)
    for pid in pids:  # mappings: only for what no descriptor explained
        if len(found) == len(stats):
            break
        if pid in unreadable:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        name = line.split(None, 5)[-1].strip().removesuffix(" (deleted)")
                        if name in stats:
                            found.add(name)
        except FileNotFoundError:
            continue
        except PermissionError:
            unreadable.append(pid)
    for pid in unreadable:
        ids = _proc_ids(pid)
        found.update(p for p, st in stats.items() if _could_open(ids, st))
    return found


def remove_unheld(paths: Iterable[str | Path]) -> list[str]:
    """Unlink each of ``paths`` that no live process holds (see :func:`held`); return the ones removed. A file
    we may not delete (another user's, in the sticky /dev/shm) is left, silently."""
    candidates = [str(p) for p in paths]
    busy = held(candidates)
    removed = []
    for p in candidates:
        if p in busy:
            continue
        try:
            os.unlink(p)
        except (FileNotFoundError, PermissionError):
            continue
        removed.append(p)
    return removed
