"""Resharding: a run stopped on one layout resumes on another (data-parallel size, ZeRO stage, tensor and pipeline
parallel size, one process, sequence parallelism on or off) and continues as the uninterrupted one-process run: the
same samples, the losses and norms to fp32 reduction-order noise, the same parameters at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.test_checkpoint_resume import run
from tests.distributed.test_tp_training import validation_tokens
from tests.unit.test_checkpoint import BASE, rows
from tplus_dist.checkpoint.sharded import checkpoint_parameters
from tplus_dist.config import load_config
from tplus_dist.tolerances import Fp32Run, param_differences
from tplus_dist.train.run import train

# Dropout off: its masks depend on how micro-batches fall on ranks, so no two layouts could agree with it on.
COMMON = [*BASE, "--model.resid_dropout=0.0"]

TP2_DP2 = ["--parallel.tensor_parallel=2", "--parallel.zero_stage=1", "--train.grad_accum=1"]

# name -> (processes, overrides); the global batch stays 8 (micro 4 x accumulation x data-parallel ranks)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "one": (1, ["--train.grad_accum=2"]),
    "tp2-dp2-zero1": (4, TP2_DP2),
    "tp2-dp2-zero1-sp": (4, [*TP2_DP2, "--parallel.sequence_parallel=true"]),
    "dp2-zero3": (2, ["--parallel.zero_stage=3", "--train.grad_accum=1"]),
    "dp2-zero0": (2, ["--parallel.zero_stage=0", "--train.grad_accum=1"]),
    "pp2-dp2": (4, ["--parallel.pipeline_parallel=2", "--train.grad_accum=1"]),
    "tp2-pp2": (4, ["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"]),
    "pp2-interleaved": (2, ["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline_stages=2"]),
}

# (saved on, resumed on, layers): every kind of change, each layout both saving and loading somewhere
CASES = [
    # TP 2 -> 1, DP 2 -> 1, 4 processes -> 1 (the example), sequence parallel -> without it
    ("tp2-dp2-zero1-sp", "one", 2),
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


def fp32_run(want: list[Any], layers: int) -> Fp32Run:
    """The rounding bounds of the reference run (rows: the learning rate in column 3, the tokens so far in 6)."""
    cfg = load_config("configs/tiny.yaml", [*COMMON, f"--model.n_layers={layers}"])
    return Fp32Run.of_history(cfg, want, lr=3, tokens=6)


def assert_close(got: list[Any], want: list[Any], run: Fp32Run, val_tokens: int) -> None:
    """The same samples and learning rates; losses and norms within fp32 rounding in another order
    (tplus_dist/tolerances.py). The validation loss is a mean over ``val_tokens`` tokens."""
    assert len(got) == len(want)
    worst = [0.0, 0.0, 0.0]
    for a, b in zip(got, want, strict=True):
        step, loss, norm, lr, first, last, tokens, val = a
        assert [step, first, last, tokens] == [b[0], b[4], b[5], b[6]], (a, b)  # the same samples
        assert lr == pytest.approx(b[3], rel=1e-12)
        assert abs(loss - b[1]) <= run.loss(step, b[1]), (a, b, run.loss(step, b[1]))
        assert abs(norm - b[2]) <= run.grad_norm(step, b[2]), (a, b, run.grad_norm(step, b[2]))
        worst[:2] = (
            max(worst[0], abs(loss - b[1]) / run.loss(step, b[1])),
            max(worst[1], abs(norm - b[2]) / run.grad_norm(step, b[2])),
        )
        assert (val is None) == (b[7] is None), (a, b)
        if val is not None:
            bound = max(run.loss(step, b[7]), run.loss(step, b[7], val_tokens))
            assert abs(val - b[7]) <= bound, (a, b, bound)
            worst[2] = max(worst[2], abs(val - b[7]) / bound)
    print(f"observed / bound: loss {worst[0]:.2f}, grad_norm {worst[1]:.2f}, val_loss {worst[2]:.2f}")


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
    run = fp32_run(want, layers)
    cfg = load_config("configs/tiny.yaml", COMMON)
    assert_close(first + rest, want, run, validation_tokens(cfg))
    a, b = final_parameters(want_dir), final_parameters(run_dir)
    assert a.keys() == b.keys()
    rms, largest, where = param_differences(a, b)
    print(f"parameters: rms {rms:.1e} ({rms / run.param_rms():.2f} of the bound), largest {largest:.1e} in {where}")
    assert rms <= run.param_rms() and largest <= run.param_max(), (rms, largest, where)
