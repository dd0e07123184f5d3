"""Resharding: a run stopped on one layout resumes on another (data-parallel size, ZeRO stage, tensor and pipeline
parallel size, one process) and continues as the uninterrupted one-process run: the same samples, the losses and
norms to fp32 reduction-order noise, the same parameters at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.test_checkpoint_resume import run
from tests.distributed.test_tp_training import PARAM_TOL
from tests.unit.test_checkpoint import BASE, rows
from tplus_dist.checkpoint.sharded import checkpoint_parameters
from tplus_dist.config import load_config
from tplus_dist.train.run import train

# Dropout off: its masks depend on how micro-batches fall on ranks, so no two layouts could agree with it on.
COMMON = [*BASE, "--model.resid_dropout=0.0"]

# name -> (processes, overrides); the global batch stays 8 (micro 4 x accumulation x data-parallel ranks)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "one": (1, ["--train.grad_accum=2"]),
    "tp2-dp2-zero1": (4, ["--parallel.tensor_parallel=2", "--parallel.zero_stage=1", "--train.grad_accum=1"]),
    "dp2-zero3": (2, ["--parallel.zero_stage=3", "--train.grad_accum=1"]),
    "dp2-zero0": (2, ["--parallel.zero_stage=0", "--train.grad_accum=1"]),
    "pp2-dp2": (4, ["--parallel.pipeline_parallel=2", "--train.grad_accum=1"]),
    "tp2-pp2": (4, ["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"]),
    "pp2-interleaved": (2, ["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline_stages=2"]),
}

# (saved on, resumed on, layers): every kind of change, each layout both saving and loading somewhere
CASES = [
    ("tp2-dp2-zero1", "one", 2),  # TP 2 -> 1, DP 2 -> 1, 4 processes -> 1 (the example)
    ("tp2-dp2-zero1", "dp2-zero3", 2),  # TP 2 -> 1, ZeRO 1 -> 3
    ("one", "pp2-dp2", 2),  # 1 process -> PP 2 x DP 2
    ("dp2-zero3", "tp2-pp2", 2),  # ZeRO 3 partitions -> TP x PP slices
    ("pp2-interleaved", "dp2-zero0", 4),  # interleaved chunks -> replicated
]


def launch(tmp_path: Path, layout: str, run_dir: Path, layers: int, stop_at: int | None = None) -> list[Any]:
    world, extra = LAYOUTS[layout]
    overrides = [*extra, f"--model.n_layers={layers}", "--model.resid_dropout=0.0"]
    if world == 1:
        from tests.unit.test_checkpoint import interrupted

        history = (
            interrupted(run_dir, stop_at, *overrides)
            if stop_at is not None
            else train(load_config("configs/tiny.yaml", [*COMMON, f"--log.run_dir={run_dir}", *overrides]))[1]
        )
        return rows(history)
    return run(tmp_path, world, run_dir, overrides, stop_at=stop_at)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[list[Any], Path]]:
    """The uninterrupted one-process run for each depth: its rows and its run directory."""
    out = {}
    for layers in sorted({c[2] for c in CASES}):
        run_dir = tmp_path_factory.mktemp(f"reference{layers}") / "run"
        out[layers] = (launch(run_dir.parent, "one", run_dir, layers), run_dir)
    return out


def assert_close(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        step, loss, norm, lr, first, last, tokens, val = a
        assert [step, first, last, tokens] == [b[0], b[4], b[5], b[6]], (a, b)  # the same samples
        assert lr == pytest.approx(b[3], rel=1e-12)
        assert abs(loss - b[1]) < 1e-5 and abs(norm - b[2]) < 1e-5 * b[2], (a, b)
        assert (val is None) == (b[7] is None) and (val is None or abs(val - b[7]) < 1e-5), (a, b)


def final_parameters(run_dir: Path) -> dict[str, Any]:
    return checkpoint_parameters(run_dir / "checkpoints" / "step_00000006")


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed, layers", CASES, ids=[f"{a}-to-{b}" for a, b, _ in CASES])
def test_a_run_resumed_on_another_layout_continues_the_run(
    tmp_path: Path, reference: dict[int, tuple[list[Any], Path]], saved: str, resumed: str, layers: int
) -> None:
    want, want_dir = reference[layers]
    run_dir = tmp_path / "run"
    first = launch(tmp_path, saved, run_dir, layers, stop_at=3)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    rest = launch(tmp_path, resumed, run_dir, layers)
    assert [r[0] for r in first] == [1, 2, 3] and [r[0] for r in rest] == [4, 5, 6]
    assert_close(first + rest, want)
    a, b = final_parameters(want_dir), final_parameters(run_dir)
    assert a.keys() == b.keys()
    worst = max(((a[n] - b[n]).abs().max().item(), n) for n in a)
    print(f"largest parameter difference: {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < PARAM_TOL, worst
