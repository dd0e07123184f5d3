"""Bad steps in every layout, in one spawned gloo job that runs the layouts one after another: a nan in one rank's
gradient at step 3 (rank 1 only) and a gradient-norm spike at step 4 are skipped by every rank together, each
skipped step leaves every rank's weights and optimizer state as they were (against a snapshot), and the run equals
the one-process run with the same faults (losses, gradient norms, parameters).

The layouts cover each way a step reaches the weights: DeepSpeed ZeRO 1 and 3 (whose own overflow check skips the
nan step, the guard the spike), fp32 ZeRO 0 under tensor parallelism (the engine steps the client optimizer
directly), DeepSpeed's pipeline engine (the step inside train_batch; fp32 ZeRO 0) and the interleaved pipeline
(ZeRO 1)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_tp_training import BASE, compare, metric_row, whole_parameters
from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed
from tplus_dist.train.hooks import Hook

SPIKE = ["--train.skip_spikes=true", "--train.spike_window=4", "--train.spike_sigmas=100", "--checkpoint.at_end=false"]
"""Window 4: the rule acts from the second earlier finite step on, so at step 4 (steps 1 and 2 in the window); 100
standard deviations: only the injected spike (x1000) is one."""
FAULTS = "grad:nan:{rank}step=3,grad:scale1000:step=4"
LAYOUTS = {
    "dp2-zero1": ["--train.grad_accum=1", "--parallel.zero_stage=1"],
    "dp2-zero3": ["--train.grad_accum=1", "--parallel.zero_stage=3"],
    "tp2-zero0": ["--train.grad_accum=2", "--parallel.tensor_parallel=2", "--parallel.zero_stage=0"],
    "pp2-zero0": ["--train.grad_accum=2", "--parallel.pipeline_parallel=2", "--parallel.zero_stage=0"],
    "interleaved-pp2-zero1": [
        "--train.grad_accum=2",
        "--parallel.pipeline_parallel=2",
        "--parallel.virtual_pipeline_stages=2",
        "--parallel.zero_stage=1",
    ],
}
SKIPPED = [False, False, True, True, False]


class LocalSnapshots(Hook):
    """This rank's weights and optimizer state (the checkpoint's pieces: fp32 masters, moments, step counts) at the
    end of each step."""

    def __init__(self) -> None:
        self.taken: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        from tplus_dist.checkpoint.sharded import collect_pieces, local_parameters

        # ZeRO 3: the rank's partition (whether the whole weight is gathered between steps varies)
        state = {f"model:{n}": getattr(p, "ds_tensor", p).detach().clone() for n, p in local_parameters(trainer)}
        for piece in collect_pieces(trainer):
            for k, v in {**piece.values, **piece.whole, **piece.scalars}.items():
                state[f"{piece.name}@{piece.start}:{k}"] = v.detach().clone()
        self.taken[trainer.state.step] = state


def unchanged(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def run_layout(overrides: list[str]) -> dict[str, Any]:
    from tplus_dist.train.run import build_trainer

    trainer, _ = build_trainer(load_config("configs/tiny.yaml", overrides))
    snaps = LocalSnapshots()
    trainer.hooks.append(snaps)
    history = trainer.fit()
    params = whole_parameters(trainer)
    t = snaps.taken
    return {
        "rows": [metric_row(m) for m in history],
        "skipped": [m["skipped"] for m in history],
        "skipped_steps": [m["skipped_steps"] for m in history],
        "step3_unchanged": unchanged(t[2], t[3]),
        "step4_unchanged": unchanged(t[3], t[4]),
        "step5_changed": not unchanged(t[4], t[5]),
        "params": params,
    }


def _rank(rank: int, world: int, tmp: str, out: str) -> None:
    del world
    import torch.distributed as dist

    from tplus_dist.parallel.groups import destroy_process_groups

    os.environ["TPLUS_FAULT"] = FAULTS.format(rank="rank=1:")  # the nan on rank 1 only, the spike everywhere
    results: dict[str, Any] = {}
    try:
        for name, layout in LAYOUTS.items():
            mine = run_layout([*BASE, *SPIKE, f"--log.run_dir={tmp}/{name}", *layout])
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, {k: v for k, v in mine.items() if k not in ("rows", "params")})
            results[name] = {**mine, "ranks": every}
            destroy_process_groups(keep_world=True)
    finally:
        destroy_process_groups()
    if rank == 0:
        torch.save(results, out)


def rows_without_nan(rows: list[list[float]]) -> list[list[float]]:
    """The skipped nan step's norm is nan in one process and inf where DeepSpeed reports its own overflow check:
    both not finite, checked before; the rest is compared as compare() does."""
    out = []
    for r in rows:
        assert math.isfinite(r[0])
        out.append([r[0], 1.0 if not math.isfinite(r[1]) else r[1], *r[2:]])
    return out


@pytest.mark.slow
def test_every_layout_skips_a_nan_on_one_rank_and_a_spike_like_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.distributed.test_tp_training import run_and_gather

    monkeypatch.setenv("TPLUS_FAULT", FAULTS.format(rank=""))
    single_rows, single_params = run_and_gather(
        [*BASE, *SPIKE, f"--log.run_dir={tmp_path}/one", "--train.grad_accum=2"]
    )
    monkeypatch.delenv("TPLUS_FAULT")
    assert not math.isfinite(single_rows[2][1]) and single_rows[3][1] > 100  # the nan, the x1000 spike
    out = tmp_path / "layouts.pt"
    run_distributed(_rank, 2, str(tmp_path), str(out))
    results: dict[str, Any] = torch.load(out)
    for name in LAYOUTS:
        got = results[name]
        for rank, r in enumerate(got["ranks"]):  # every rank decided the same, and kept its state
            assert r["skipped"] == SKIPPED and r["skipped_steps"] == [0, 0, 1, 2, 2], (name, rank, r)
            assert r["step3_unchanged"] and r["step4_unchanged"] and r["step5_changed"], (name, rank, r)
        assert not math.isfinite(got["rows"][2][1]), name
        print(name)
        compare((rows_without_nan(single_rows), single_params), (rows_without_nan(got["rows"]), got["params"]))
