"""The exit codes of `tplus train` (and of `tplus launch`, which reports its ranks'), for wrappers and schedulers.

| code | meaning | what to do |
|---|---|---|
| 0 | finished: train.steps reached (or nothing left to do) | nothing |
| 1 | failed: an error during the run (every rank's job ends; the failing rank's error is printed first) | read it |
| 2 | bad input: config, data, checkpoint, launch environment, or the run is in use by another job | fix it |
| 75 | stopped on a signal (SIGTERM, SIGUSR1, Ctrl-C) after saving a checkpoint | run the same command again |
| 130 | interrupted at once (a second Ctrl-C): the steps since the last checkpoint are lost | run it again |

75 is sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to retry").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tplus_dist.fsutil import write_atomic

FINISHED = 0
FAILED = 1
BAD_INPUT = 2
STOPPED = 75
INTERRUPTED = 130

STATUS_DIR = "TPLUS_STATUS_DIR"
"""Set by `tplus launch` for the ranks it starts: each rank writes ``rank<R>.json`` (its exit code and where it
stopped) there, and a stopped rank exits 0, so that torchrun (which turns any non-zero code into its own failure,
exit 1) ends quietly; `tplus launch` then exits with the ranks' code."""


def report(code: int, **details: Any) -> int:
    """The code this process should exit with: ``code``, or 0 for STOPPED when a launcher collects the codes
    (STATUS_DIR), after writing them there."""
    where = os.environ.get(STATUS_DIR)
    if not where:
        return code
    rank = int(os.environ.get("RANK", "0"))
    path = Path(where) / f"rank{rank}.json"
    write_atomic(path, json.dumps({"code": code, **{k: str(v) for k, v in details.items()}}))
    return 0 if code == STOPPED else code


def collected(directory: Path) -> list[dict[str, Any]]:
    """The ranks' reports in ``directory`` (see STATUS_DIR)."""
    out = []
    for p in sorted(directory.glob("rank*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out
