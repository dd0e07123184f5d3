"""`tplus verify-resume CONFIG --steps N [--at K]`: does a resumed run continue the run it stopped?

Runs the configuration twice from the same seed: once for N steps without a stop, once stopped after step K
(default N // 2), saved, and resumed from that checkpoint in a fresh trainer (as a restart would). Compares, step
by step, the loss, gradient norm, learning rate, the samples read, the tokens seen and the validation loss, then
the whole model's parameters at the end; prints where they first differ. Run it under torchrun / the deepspeed
launcher to check a distributed layout. Exit status 0 when the continuation matches, 1 when it does not.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tplus_dist.config import RunConfig

COMPARED = ("loss", "grad_norm", "lr", "first_sample", "last_sample", "tokens", "val_loss")


@dataclass
class Difference:
    step: int
    key: str
    uninterrupted: Any
    resumed: Any


@dataclass
class Report:
    steps: int
    at: int
    rows: int
    first_difference: Difference | None
    max_param_difference: float
    parameter_names: int

    @property
    def matches(self) -> bool:
        return self.first_difference is None and self.max_param_difference == 0.0

    def text(self) -> str:
        head = f"verify-resume: {self.steps} steps, stopped after step {self.at} and resumed"
        if self.matches:
            return (
                f"{head}: the continuation matches bit for bit ({self.rows} steps x {len(COMPARED)} values, "
                f"{self.parameter_names} parameter tensors)"
            )
        lines = [f"{head}: the continuation DIFFERS"]
        d = self.first_difference
        if d is not None:
            lines.append(f"  first difference at step {d.step}, {d.key}:")
            lines.append(f"    uninterrupted {d.uninterrupted!r}, resumed {d.resumed!r}")
        lines.append(f"  largest parameter difference at the end: {self.max_param_difference:.3e}")
        return "\n".join(lines)


def _run(cfg: RunConfig, run_dir: Path, until: int | None) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Train in ``run_dir`` (to step ``until``, then save; or to the end), return the metrics and whole parameters."""
    from tplus_dist.checkpoint.manager import CheckpointManager
    from tplus_dist.parallel.groups import destroy_process_groups
    from tplus_dist.parallel.state import full_state_dict
    from tplus_dist.train.run import build_trainer, checkpoint_root

    try:
        trainer, _ = build_trainer(cfg, run_dir)
        history = trainer.fit(until=until)
        if until is not None:
            CheckpointManager(cfg, checkpoint_root(cfg, run_dir)).save(trainer)
        groups = trainer.layout.groups if trainer.layout is not None else None
        state = full_state_dict(
            trainer.model,
            tp_group=groups.tp if groups is not None else None,
            pp_group=groups.pp if groups is not None else None,
        )
        return history, state
    finally:
        destroy_process_groups(keep_world=True)  # verify_resume tears torch.distributed down at its end


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def verify_resume(cfg: RunConfig, steps: int, at: int | None = None, work_dir: Path | None = None) -> Report:
    at = steps // 2 if at is None else at
    if not 0 < at < steps:
        raise ValueError(f"--at {at} must be between 0 and --steps {steps} (exclusive)")
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=steps),
        checkpoint=dataclasses.replace(cfg.checkpoint, interval_steps=0, interval_minutes=None, at_end=False),
        log=dataclasses.replace(cfg.log, progress=False),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    own_dir = work_dir is None
    if work_dir is not None:
        base = work_dir
    elif world == 1:
        base = Path(tempfile.mkdtemp(prefix="tplus-verify-"))
    else:  # the same path on every rank, where every rank can read the others' checkpoint files
        job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "0")
        base = Path(cfg.log.run_dir.format(name=f"{cfg.log.name}-verify-resume-{job}"))
    fresh = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="none"))
    again = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
    try:
        whole, whole_state = _run(fresh, base / "uninterrupted", None)
        first, _ = _run(fresh, base / "resumed", at)
        rest, rest_state = _run(again, base / "resumed", None)
    finally:
        from tplus_dist.parallel.groups import destroy_process_groups

        destroy_process_groups()
        if own_dir and rank0:
            shutil.rmtree(base, ignore_errors=True)
    resumed = first + rest
    diff = None
    for a, b in zip(whole, resumed, strict=False):
        for key in COMPARED:
            if not _same(a.get(key), b.get(key)):
                diff = Difference(int(a["step"]), key, a.get(key), b.get(key))
                break
        if diff is not None:
            break
    if diff is None and len(whole) != len(resumed):
        diff = Difference(min(len(whole), len(resumed)) + 1, "steps run", len(whole), len(resumed))
    worst = 0.0
    for name, p in whole_state.items():
        q = rest_state.get(name)
        worst = max(worst, math.inf if q is None or q.shape != p.shape else float((p - q).abs().max()))
    return Report(steps, at, len(resumed), diff, worst, len(whole_state))
