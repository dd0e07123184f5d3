"""`tplus train` across data-parallel ranks through DeepSpeed ZeRO computes what one process computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_tp_training import BASE, KEYS, check_plan_activations, check_plan_states, fp32_run
from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed
from tplus_dist.train.run import build_trainer, train


def _rank(rank: int, world: int, overrides: list[str], out: str) -> None:
    """train()'s steps (build_trainer, then fit), and then tplus plan's weight, master-weight and optimizer-state
    bytes checked against this rank's real allocation (check_plan_states: ZeRO 1 and 3 here), and its activations
    against autograd's saved bytes (check_plan_activations)."""
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    trainer, _ = build_trainer(load_config("configs/tiny.yaml", overrides))
    try:
        history = trainer.fit()
        check_plan_states(trainer)
        check_plan_activations(trainer)
    finally:
        trainer.close()
        destroy_process_groups()
    if rank == 0:
        torch.save([[m[k] for k in KEYS] for m in history], out)


def _single(tmp_path: Path, *extra: str) -> list[list[float]]:
    _, history = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={tmp_path}/one", *extra]))
    return [[m[k] for k in KEYS] for m in history]


def _compare(single: list[list[float]], dp: list[list[float]], overrides: list[str] | None = None) -> None:
    """The same samples and learning rates; losses and gradient norms within fp32 rounding in another order (the data-
    parallel ranks sum their gradients in another order: tplus_dist/tolerances.py)."""
    assert len(single) == len(dp) == 5
    run = fp32_run(single, overrides)
    worst = [0.0, 0.0]
    for step, (a, b) in enumerate(zip(single, dp, strict=True), 1):
        assert a[3:] == b[3:]  # the same samples: batch size, first and last stream position, tokens
        assert a[2] == pytest.approx(b[2], rel=1e-12)  # lr
        assert abs(a[0] - b[0]) <= run.loss(step, a[0]), (step, a, b, run.loss(step, a[0]))
        assert abs(a[1] - b[1]) <= run.grad_norm(step, a[1]), (step, a, b, run.grad_norm(step, a[1]))
        worst = [
            max(worst[0], abs(a[0] - b[0]) / run.loss(step, a[0])),
            max(worst[1], abs(a[1] - b[1]) / run.grad_norm(step, a[1])),
        ]
    print(f"observed / bound: loss {worst[0]:.2f}, grad_norm {worst[1]:.2f}")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_data_parallel_zero_equals_one_process(tmp_path: Path, zero: int) -> None:
    single = _single(tmp_path, "--train.grad_accum=2")  # global batch 8 = 4 x 2
    out = tmp_path / "dp.pt"
    dp_overrides = [*BASE, "--train.grad_accum=1", f"--parallel.zero_stage={zero}", f"--log.run_dir={tmp_path}/dp"]
    run_distributed(_rank, 2, dp_overrides, str(out))  # global batch 8 = 4 x 1 x 2 ranks
    _compare(single, torch.load(out))
    assert (tmp_path / "dp" / "metrics.jsonl").is_file()
    assert not (tmp_path / "dp-1").exists()  # one run directory, written by rank 0 alone


@pytest.mark.slow
def test_data_parallel_with_a_growing_batch_equals_one_process(tmp_path: Path) -> None:
    ramp = [
        "--schedule.unit=tokens",
        "--schedule.warmup_steps=0",
        "--schedule.warmup_tokens=512",
        "--train.batch_ramp_tokens=1024",
    ]
    # one process: 4 -> 8 per replica; two ranks: 2 x (2 -> 4): the same global batches 4 -> 8
    single = _single(
        tmp_path, *ramp, "--train.grad_accum=2", "--train.batch_size_start=4", "--train.batch_size_increment=4"
    )
    out = tmp_path / "dp.pt"
    dp_overrides = [
        *BASE,
        *ramp,
        "--train.micro_batch_size=2",
        "--train.grad_accum=2",
        "--train.batch_size_start=2",
        "--train.batch_size_increment=2",
        f"--log.run_dir={tmp_path}/dp",
    ]
    single_micro2 = _single(
        tmp_path / "m2",
        *ramp,
        "--train.micro_batch_size=2",
        "--train.grad_accum=4",
        "--train.batch_size_start=4",
        "--train.batch_size_increment=4",
    )
    run_distributed(_rank, 2, dp_overrides, str(out))
    _compare(single_micro2, torch.load(out))
    assert [r[3] for r in single] == [r[3] for r in single_micro2]


@pytest.mark.slow
def test_labeled_data_parallel_equals_one_process(tmp_path: Path) -> None:
    """Labels from `tplus prepare --labels` reach the conditioned model through DeepSpeed's engine as in one
    process; without them the losses differ (so the labels were used)."""
    from tests.unit.test_labels import write_inputs
    from tplus_dist.data.prepare import prepare

    shards = tmp_path / "shards"
    prepare(write_inputs(tmp_path / "in"), "bytes", 64, shards, labels="field:src", progress=False)
    cond = [f"--data.shards={shards}", "--model.adaln=adaln_zero", "--model.n_conditions=3"]
    single = _single(tmp_path, *cond, "--train.grad_accum=2")
    plain = _single(tmp_path / "plain", *cond, "--train.grad_accum=2", "--data.labels=false")
    assert single[0][0] == plain[0][0] and single[-1][0] != plain[-1][0]
    out = tmp_path / "dp.pt"
    run_distributed(_rank, 2, [*BASE, *cond, "--parallel.zero_stage=1", f"--log.run_dir={tmp_path}/dp"], str(out))
    _compare(single, torch.load(out), cond)
