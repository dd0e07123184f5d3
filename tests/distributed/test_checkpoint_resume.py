"""Distributed checkpoints: every rank writes its own shards (DeepSpeed's engine files and its trainer state), a
SIGTERM at a step boundary saves and stops every rank, and the resumed run equals the uninterrupted one."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.test_checkpoint import BASE, SignalAt, rows
from tplus_dist.checkpoint.signals import StopRequest
from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed
from tplus_dist.train.run import build_trainer, train


def _rank(rank: int, world: int, overrides: list[str], out: str, stop_at: int | None) -> None:
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    cfg = load_config("configs/tiny.yaml", overrides)
    if stop_at is None:
        _, history = train(cfg)
    else:
        stop = StopRequest().install()
        try:
            trainer, _ = build_trainer(cfg, stop=stop)
            trainer.hooks.insert(0, SignalAt(stop_at, signal.SIGTERM))  # every rank gets it, as under SLURM
            history = trainer.fit()
        finally:
            stop.uninstall()
            destroy_process_groups()
    if rank == 0:
        torch.save(rows(history), out)


def run(tmp_path: Path, world: int, run_dir: Path, extra: list[str], stop_at: int | None = None) -> list[Any]:
    out = tmp_path / f"rows-{stop_at}-{run_dir.name}.pt"
    run_distributed(_rank, world, [*BASE, f"--log.run_dir={run_dir}", *extra], str(out), stop_at)
    result: list[Any] = torch.load(out)
    return result


LAYOUTS = {
    "dp2-zero1": (2, ["--train.grad_accum=1", "--parallel.zero_stage=1"]),
    "dp2-zero3": (2, ["--train.grad_accum=1", "--parallel.zero_stage=3"]),
    # step 2 saved in the background (published at a later step end), step 3 on the signal, 4 in the background
    "dp2-zero3-background": (
        2,
        [
            "--train.grad_accum=1",
            "--parallel.zero_stage=3",
            "--checkpoint.background=true",
            "--checkpoint.interval_steps=2",
        ],
    ),
    "tp2": (2, ["--parallel.tensor_parallel=2"]),
    "pp2": (2, ["--parallel.pipeline_parallel=2"]),
    "pp2-interleaved": (
        2,
        ["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline_stages=2", "--model.n_layers=4"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_distributed_run_stopped_by_sigterm_resumes_as_the_same_run(tmp_path: Path, layout: str) -> None:
    world, extra = LAYOUTS[layout]
    whole = run(tmp_path, world, tmp_path / "whole", extra)
    run_dir = tmp_path / "run"
    first = run(tmp_path, world, run_dir, extra, stop_at=3)
    assert [r[0] for r in first] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    ranks = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000003" / "trainer").iterdir())
    assert ranks == [f"rank{r:05d}.pt" for r in range(world)]
    rest = run(tmp_path, world, run_dir, extra)
    assert first + rest == whole  # bit for bit: losses, norms, lr, samples, validation
