"""Fault injection (failpoints) for the tests that prove a run survives crashes, bad steps and failing ranks.

A failpoint is a named place in the code (``inject("save.after_manifest", step)``). It does nothing unless the
environment variable ``TPLUS_FAULT`` names it, so a test can make a real training process (one process, a torchrun
job, a spawned gloo job) fail exactly there, the way a kill -9, a full disk, a NaN or a broken rank would:

    TPLUS_FAULT="POINT:ACTION[:rank=R][:step=S][,POINT:ACTION...]"

- POINT: the failpoint's name (see ``POINTS``);
- ACTION: ``raise`` (a RuntimeError naming the point, the rank and the step), ``kill`` (SIGKILL this process: no
  handler, no ``finally``), ``hang`` (sleep forever, as a stuck rank would), ``exit`` (``os._exit(1)``),
  ``sigterm`` / ``sigint`` / ``sigusr1`` (send this process that signal, as a scheduler or a Ctrl-C would, and go
  on), or any other word, which :func:`inject` returns for the call site to act on (``nan``: poison a value);
- rank=R: only on global rank R (RANK, 0 in one process); step=S: only when the call site passes step S (the
  optimizer step being computed, 1-based, or the step being saved).

Databases call these failpoints (FreeBSD's fail(9), TiKV's fail-rs); the cost when unset is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "TPLUS_FAULT"

POINTS = {
    "data": "the step's batch was read (Trainer.train_step)",
    "forward": "the decoder's forward (every layout, every stage; the step's micro-batches and its validation)",
    "grad": "gradients exist, before the optimizer step (where the StepGuard decides, every layout); the actions nan "
    "and inf poison element 0 of this rank's first parameter's gradient, scaleF multiplies each of its gradients by "
    "F, both during the backward, before any reduction (optim/guard.gradient_fault)",
    "optimizer": "right before the optimizer updates (the StepGuard's wrapped step; once per group under ZeRO)",
    "eval": "a validation loss is being computed",
    "save.before_files": "a save: the staging directory exists, no file is written yet",
    "save.mid_file": "a save: this rank's state file is half written",
    "save.after_state": "a save: this rank's files are written and checksummed",
    "save.after_manifest": "a save: the manifest is written inside the staging directory",
    "save.after_rename": "a save: the checkpoint is renamed into place, latest not yet updated",
    "save.after_latest": "a save: latest names the new checkpoint",
}
SIGNAL_ACTIONS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigusr1": signal.SIGUSR1}
STANDARD_ACTIONS = ("raise", "kill", "hang", "exit", *SIGNAL_ACTIONS)


class InjectedFault(RuntimeError):
    """The ``raise`` action's exception."""


@dataclass(frozen=True)
class Fault:
    point: str
    action: str
    rank: int | None = None
    step: int | None = None


_parsed: tuple[str, tuple[Fault, ...]] = ("", ())
_step: int | None = None


def set_step(step: int | None) -> None:
    """The optimizer step being computed (1-based), for failpoints whose call site does not pass one (the
    model's forward): the trainer sets it at the start of each step."""
    global _step
    _step = step


def parse(spec: str) -> tuple[Fault, ...]:
    """``TPLUS_FAULT``'s value as faults. Raises ValueError naming a malformed entry or an unknown point."""
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, _, rest = entry.partition(":")
        parts = rest.split(":") if rest else []
        if point not in POINTS or not parts or not parts[0]:
            raise ValueError(f"{ENV}: {entry!r} is not POINT:ACTION[:rank=R][:step=S] with POINT one of {list(POINTS)}")
        rank = step = None
        for p in parts[1:]:
            key, _, value = p.partition("=")
            if key not in ("rank", "step") or not value.isdigit():
                raise ValueError(f"{ENV}: {entry!r}: {p!r} is not rank=R or step=S")
            if key == "rank":
                rank = int(value)
            else:
                step = int(value)
        faults.append(Fault(point, parts[0], rank, step))
    return tuple(faults)


def active(point: str, step: int | None = None) -> str | None:
    """The action ``TPLUS_FAULT`` asks for at ``point`` (on this rank, at ``step``: by default the step
    :func:`set_step` recorded), or None. No side effects."""
    global _parsed
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    step = _step if step is None else step
    if spec != _parsed[0]:
        _parsed = (spec, parse(spec))
    rank = int(os.environ.get("RANK", "0"))
    for f in _parsed[1]:
        if f.point == point and f.rank in (None, rank) and (f.step is None or f.step == step):
            return f.action
    return None


def inject(point: str, step: int | None = None) -> str | None:
    """Run the fault ``TPLUS_FAULT`` asks for at ``point``: raise, kill, hang or exit here; return any other action
    (for the call site to apply), or None when no fault is asked for."""
    action = active(point, step)
    if action is None or action not in STANDARD_ACTIONS:
        return action
    step = _step if step is None else step
    rank = int(os.environ.get("RANK", "0"))
    where = f"{point} on rank {rank}" + (f" at step {step}" if step is not None else "")
    if action == "raise":
        raise InjectedFault(f"injected fault at {where}")
    if action in SIGNAL_ACTIONS:
        os.kill(os.getpid(), SIGNAL_ACTIONS[action])
        return None
    print(f"tplus: injected fault: {action} at {where}", flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(1)
    while True:  # hang
        time.sleep(3600)
