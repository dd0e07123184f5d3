"""Shared memory left by killed jobs is removed; what a live process holds (open or mapped) is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tplus_dist.parallel.groups import clean_stale_deepspeed_buffers
from tplus_dist.shm import held

# A stand-in for one rank of DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp: shm_open(O_CREAT) a
# /dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}, write it, mmap it), without building the op.
HOLDER = textwrap.dedent("""
    import mmap, os, sys
    path, how = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, bytes(1 << 16))
    if how in ("map", "map-closed"):
        m = mmap.mmap(fd, 1 << 16)
    if how == "map-closed":
        os.close(fd)  # only the mapping holds it now
    print("ready", flush=True)
    sys.stdin.readline()
""")


def start(path: Path, how: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def test_killed_jobs_deepspeed_buffers_are_removed_live_ones_kept() -> None:
    base = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.getpid()}"
    paths = {how: Path(f"{base}{i}_0") for i, how in enumerate(("fd", "map", "map-closed", "killed"))}
    procs = {how: start(p, "map" if how == "killed" else how) for how, p in paths.items()}
    other_user = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid() + 1}_127.0.0.1_{os.getpid()}_0")
    other_user.write_bytes(b"not ours to judge")
    try:
        os.killpg(procs["killed"].pid, signal.SIGKILL)
        procs["killed"].wait()
        assert paths["killed"].exists()  # nothing removes it on its own: it would stay until the machine reboots
        removed = clean_stale_deepspeed_buffers()
        assert str(paths["killed"]) in removed and not paths["killed"].exists()
        for how in ("fd", "map", "map-closed"):  # held by a descriptor, a mapping with its descriptor, a mapping alone
            assert paths[how].exists(), how
        assert other_user.exists()  # another user's name pattern: never a candidate
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        for p in [*paths.values(), other_user]:
            p.unlink(missing_ok=True)


def test_held_sees_this_process() -> None:
    path = Path(f"/dev/shm/tplus-test-held-{os.getpid()}")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert held([path, "/dev/shm/does-not-exist"]) == {str(path)}
        os.close(fd)
        fd = -1
        assert held([path]) == set()
    finally:
        if fd >= 0:
            os.close(fd)
        path.unlink()
