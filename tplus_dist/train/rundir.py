"""The run directory: where a run writes, who owns it, and the checks made before anything of it is created.

- Planning creates nothing: train/run.py picks ``runs/NAME`` (this command's run, or ``NAME-1``, ``-2``, ... when
  NAME holds another run's files), and every check (writable paths, the checkpoint to resume, the model and
  optimizer in it) runs before the directory is created.
- One job at a time: :class:`RunLock` holds an exclusive ``flock`` on ``RUN_DIR/.lock`` (and on the checkpoint
  directory's ``.lock``) for the whole run (the kernel releases it when the process dies, so a kill -9 leaves no
  stale lock); a second job on the same run, or on the same checkpoint directory, stops at once, naming the
  directory and the process that holds it.
- Identity: ``RUN_DIR/run.json`` records a run id and the config that started the run, written when the directory
  is created; every checkpoint's manifest records the id, and a run resumes only checkpoints with its own id (or
  one named with ``--resume``). The same command finds its directory again by that config (:func:`started_by`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, ClassVar

from tplus_dist.config import ConfigError
from tplus_dist.fsutil import write_atomic

LOCK = ".lock"
RUN_FILE = "run.json"


class RunInUseError(ValueError):
    """Another process holds the run directory's lock (a second job on the same run)."""


def check_writable(path: Path, field: str) -> None:
    """ConfigError naming ``field`` and the path when ``path`` (or, where it does not exist yet, the directory it
    would be created in) cannot be written: a read-only mount, a missing permission, a file in the way. Probes by
    creating and removing a temporary file, since permission bits do not tell (root, ACLs, read-only mounts)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(field, f"{path} cannot be created: {probe} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".tplus-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        where = "" if probe == path else f" (it would be created in {probe})"
        raise ConfigError(field, f"{path} cannot be written{where}: {e.strerror or e}") from None


class RunLock:
    """An exclusive lock on a run directory for this process (see the module docstring). Re-entrant within the
    process (verify-resume and tests build several trainers on one run); :meth:`release` once per acquisition."""

    _held: ClassVar[dict[str, tuple[int, int]]] = {}  # realpath -> (fd, count)

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.key = os.path.realpath(run_dir)
        self.released = False
        fd, count = self._held.get(self.key, (-1, 0))
        if count:
            self._held[self.key] = (fd, count + 1)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # minus the umask, like open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUseError(
                    f"{run_dir} is in use by another job ({holder}); wait for it to end, or give this run another "
                    "log.name"
                ) from None
            # a filesystem without locks (Lustre mounted without -o flock, some NFS setups): say so, go on
            print(f"tplus: warning: cannot lock {self.path} ({e.strerror}): nothing stops a second job on this run")
            self.released = True
            return
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "argv": sys.argv}
        os.write(fd, json.dumps(info).encode())
        self._held[self.key] = (fd, 1)

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
            if info:
                return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        return "a process that has not written its pid yet"

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        fd, count = self._held.get(self.key, (-1, 0))
        if count > 1:
            self._held[self.key] = (fd, count - 1)
        elif count == 1:
            del self._held[self.key]
            os.close(fd)  # releases the flock


def release_all(locks: list[RunLock]) -> None:
    for lock in locks:
        lock.release()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _comparable(config: dict[str, Any]) -> Any:
    """A config as JSON data without train.steps (raising it continues a run; see :func:`started_by`)."""
    data = json.loads(json.dumps(config))
    data.get("train", {}).pop("steps", None)
    return data


def started_by(run_dir: Path, config: dict[str, Any]) -> bool:
    """Whether ``run_dir`` was started by the same command: its run.json records this resolved config (train.steps
    aside; checkpoint.resume included, so a run started from ``--resume PATH`` is the same run only with that
    PATH). Such a directory is where the command continues, from its own newest checkpoint, or from the start (or
    PATH) when it died before its first one, whatever its name (runs/NAME-1 ...)."""
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "config" in data and _comparable(data["config"]) == _comparable(config)


def read_identity(run_dir: Path) -> dict[str, str] | None:
    """The run's identity from ``RUN_DIR/run.json`` ({"id", "dir"}), or None when it has none (a new directory,
    or one written before run ids)."""
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {"id": str(data["id"]), "dir": str(run_dir)} if isinstance(data, dict) and "id" in data else None


def new_identity(run_dir: Path) -> dict[str, str]:
    return {"id": uuid.uuid4().hex, "dir": str(run_dir)}


def write_identity(run_dir: Path, identity: dict[str, str], config: dict[str, Any]) -> None:
    """Record the run id and the config that started it in ``RUN_DIR/run.json`` (once: an existing file is kept)."""
    path = run_dir / RUN_FILE
    if path.exists():
        return
    data: dict[str, Any] = {"id": identity["id"], "created": _now(), "host": socket.gethostname(), "config": config}
    write_atomic(path, json.dumps(data, indent=1) + "\n")
