"""`tplus verify-resume CONFIG --steps N [--at K] [--resume-with OVERRIDE ...]`: does a resumed run continue
the run it stopped?

Runs the configuration twice from the same seed: once for N steps without a stop, once stopped after step K
(default N // 2), saved, and resumed from that checkpoint in a fresh trainer (as a restart would). Compares, step
by step, the loss, gradient norm, learning rate, the samples read, the tokens seen and the validation loss, then
the whole model's parameters at the end; prints where they first differ. Run it under torchrun / the deepspeed
launcher to check a distributed layout. Exit status 0 when the continuation matches, 1 when it does not.

``--resume-with`` resumes on another layout (``--resume-with --parallel.tensor_parallel=1``, repeatable: only
``parallel.*``, ``train.grad_accum`` and ``train.micro_batch_size`` may change, and the global batch must stay the
same). Another layout sums in another order, so the continuation must then match to fp32 reduction-order noise
instead of bit for bit: the bounds of tplus_dist/tolerances.py (Fp32Run: derived from fp32 rounding for the model's
depth and widths, the tokens of each step and the learning rates, counted from the resume; a fixed number would pass
on one CPU and fail on another); the samples, tokens and learning rates must still be equal.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tplus_dist.config import RunConfig
from tplus_dist.tolerances import Fp32Run, param_differences

COMPARED = ("loss", "grad_norm", "lr", "first_sample", "last_sample", "tokens", "val_loss", "skipped_steps")
LAYOUT_FIELDS = ("parallel.", "train.grad_accum", "train.micro_batch_size")
"""What --resume-with may change."""


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
    other_layout: str | None = None
    """The --resume-with overrides, when the continuation ran on another layout."""
    max_loss_difference: float = 0.0
    param_rms: float = 0.0
    """The root mean square of the final parameters' difference over every element."""
    param_bounds: tuple[float, float] = (0.0, 0.0)
    """On another layout: what fp32 rounding allows for (param_rms, max_param_difference) (tolerances.Fp32Run)."""

    @property
    def matches(self) -> bool:
        rms_tol, max_tol = self.param_bounds if self.other_layout else (0.0, 0.0)
        return self.first_difference is None and self.param_rms <= rms_tol and self.max_param_difference <= max_tol

    def text(self) -> str:
        where = f" on another layout ({self.other_layout})" if self.other_layout else ""
        head = f"verify-resume: {self.steps} steps, stopped after step {self.at} and resumed{where}"
        if self.matches and not self.other_layout:
            return (
                f"{head}: the continuation matches bit for bit ({self.rows} steps x {len(COMPARED)} values, "
                f"{self.parameter_names} parameter tensors)"
            )
        if self.matches:
            return (
                f"{head}: the continuation matches to fp32 reduction-order noise ({self.rows} steps: the same "
                f"samples, tokens and learning rates; largest loss difference {self.max_loss_difference:.2e}, "
                f"parameters over {self.parameter_names} tensors: rms difference {self.param_rms:.2e} (bound "
                f"{self.param_bounds[0]:.1e}), largest {self.max_param_difference:.2e} "
                f"(bound {self.param_bounds[1]:.1e}))"
            )
        lines = [f"{head}: the continuation DIFFERS"]
        d = self.first_difference
        if d is not None:
            lines.append(f"  first difference at step {d.step}, {d.key}:")
            lines.append(f"    uninterrupted {d.uninterrupted!r}, resumed {d.resumed!r}")
        lines.append(
            f"  parameters at the end: rms difference {self.param_rms:.3e}, largest {self.max_param_difference:.3e}"
            + (f" (fp32 bounds {self.param_bounds[0]:.1e}, {self.param_bounds[1]:.1e})" if self.other_layout else "")
        )
        return "\n".join(lines)


def _run(cfg: RunConfig, run_dir: Path, until: int | None) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], int]:
    """Train in ``run_dir`` (to step ``until``, then save; or to the end), return the metrics, whole parameters and
    the validation set's tokens (0 without one)."""
    from tplus_dist.parallel.groups import destroy_process_groups
    from tplus_dist.parallel.state import full_state_dict
    from tplus_dist.train.run import build_trainer

    try:
        trainer, _ = build_trainer(cfg, run_dir)
        try:
            history = trainer.fit(until=until)
            if until is not None:
                trainer.checkpoints.save(trainer)
        finally:
            trainer.close()
        groups = trainer.layout.groups if trainer.layout is not None else None
        state = full_state_dict(
            trainer.model,
            tp_group=groups.tp if groups is not None else None,
            pp_group=groups.pp if groups is not None else None,
        )
        val = getattr(trainer.val_data, "n_samples", 0) * cfg.seq_len
        return history, state, val
    finally:
        destroy_process_groups(keep_world=True)  # verify_resume tears torch.distributed down at its end


def _same(a: Any, b: Any, key: str = "", bound: Callable[[str, float], float] | None = None) -> bool:
    """Equal; with ``bound`` (another layout), loss-like values and gradient norms within ``bound(key, a)``."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    floats = isinstance(a, float) and isinstance(b, float)
    if bound is not None and floats and key in ("loss", "val_loss", "grad_norm"):
        return abs(a - b) <= bound(key, a)
    if bound is not None and floats and key == "lr":
        return math.isclose(a, b, rel_tol=1e-12)
    return bool(a == b)


def _global_batch(cfg: RunConfig, world: int) -> int:
    dp = world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    return cfg.train.micro_batch_size * cfg.train.grad_accum * max(dp, 1)


def check_resume_overrides(cfg: RunConfig, resumed: RunConfig, overrides: list[str], world: int) -> None:
    """--resume-with may change the layout only, and not the global batch (ValueError naming what)."""
    for o in overrides:
        key = o.removeprefix("--").partition("=")[0]
        if not key.startswith(LAYOUT_FIELDS):
            raise ValueError(
                f"--resume-with {o}: only the layout may change on resume ({', '.join(LAYOUT_FIELDS)}*), so the "
                "continuation can be compared with the uninterrupted run"
            )
    a, b = _global_batch(cfg, world), _global_batch(resumed, world)
    if a != b:
        raise ValueError(
            f"--resume-with changes the global batch from {a} to {b} (micro_batch_size x grad_accum x data-parallel "
            "ranks): set train.grad_accum so that it stays the same"
        )


def verify_resume(
    cfg: RunConfig,
    steps: int,
    at: int | None = None,
    work_dir: Path | None = None,
    resume_cfg: RunConfig | None = None,
    resume_with: list[str] | None = None,
) -> Report:
    """``resume_cfg``: the configuration to resume with (another layout; ``resume_with`` names its overrides)."""
    at = steps // 2 if at is None else at
    if not 0 < at < steps:
        raise ValueError(f"--at {at} must be between 0 and --steps {steps} (exclusive)")

    def prepared(c: RunConfig) -> RunConfig:
        return dataclasses.replace(
            c,
            train=dataclasses.replace(c.train, steps=steps),
            checkpoint=dataclasses.replace(c.checkpoint, interval_steps=0, interval_minutes=None, at_end=False),
            log=dataclasses.replace(c.log, progress=False),
        )

    cfg = prepared(cfg)
    other = prepared(resume_cfg) if resume_cfg is not None else cfg
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
    again = dataclasses.replace(other, checkpoint=dataclasses.replace(other.checkpoint, resume="auto"))
    from tplus_dist.parallel.groups import destroy_process_groups

    failed = True
    try:
        whole, whole_state, val_tokens = _run(fresh, base / "uninterrupted", None)
        first, _, _ = _run(fresh, base / "resumed", at)
        rest, rest_state, _ = _run(again, base / "resumed", None)
        failed = False
    finally:
        destroy_process_groups(failed=failed)  # after a failure: no collective (a peer may be gone)
        if own_dir and rank0:
            shutil.rmtree(base, ignore_errors=True)
    resumed = first + rest
    close = resume_cfg is not None
    # another layout: the rounding differences start at the resume; its bounds count steps from there
    tokens = [0, *(int(r["tokens"]) for r in whole)]
    after = Fp32Run.of(cfg, [b - a for a, b in itertools.pairwise(tokens[at:])], [r["lr"] for r in whole[at:]])
    bound: Callable[[str, float], float] | None = None
    step_now = 0

    def bound_at(key: str, value: float) -> float:
        k = max(step_now - at, 1)
        if key == "grad_norm":
            return after.grad_norm(k, value)
        if key == "val_loss" and val_tokens:
            return max(after.loss(k, value), after.loss(k, value, val_tokens))
        return after.loss(k, value)

    if close:
        bound = bound_at
    diff = None
    for a, b in zip(whole, resumed, strict=False):
        step_now = int(a["step"])
        for key in COMPARED:
            if not _same(a.get(key), b.get(key), key, bound if step_now > at else None):
                diff = Difference(step_now, key, a.get(key), b.get(key))
                break
        if diff is not None:
            break
    if diff is None and len(whole) != len(resumed):
        diff = Difference(min(len(whole), len(resumed)) + 1, "steps run", len(whole), len(resumed))
    missing = [n for n, p in whole_state.items() if n not in rest_state or rest_state[n].shape != p.shape]
    rms, worst, _ = param_differences(whole_state, rest_state) if not missing else (math.inf, math.inf, missing[0])
    losses = [abs(a["loss"] - b["loss"]) for a, b in zip(whole, resumed, strict=False)]
    layout = " ".join(resume_with) if resume_with else ("another configuration" if close else None)
    return Report(
        steps, at, len(resumed), diff, worst, len(whole_state), layout, max(losses, default=0.0), rms,
        (after.param_rms(), after.param_max()) if close else (0.0, 0.0),
    )  # fmt: skip
