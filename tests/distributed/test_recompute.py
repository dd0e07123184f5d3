"""Activation recompute in the distributed layouts (gloo, CPU, fp32, dropout on): full recompute under TP2, PP2 with
DeepSpeed's pipeline engine, PP2 interleaved (torch.distributed.pipelining, virtual_pipeline_stages 2) and DP2 ZeRO
3, and selective under TP2, give the losses, gradient norms and final parameters of the same layout without
recompute, bit for bit: the same operations run in the same order, and torch's checkpoint replays the dropout masks.
Each layout's own agreement with one process is tested in test_tp_training.py, test_pp_training.py,
test_zero_engine.py and test_checkpoint_reshard.py. One spawn of two processes runs every case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_tp_training import BASE, metric_row, whole_parameters
from tplus_dist.spawn import run_distributed

DROPOUT = ["--model.attn_dropout=0.1", "--model.resid_dropout=0.1", "--model.embed_dropout=0.1"]
LAYOUTS = {
    "tp2": ["--parallel.tensor_parallel=2", "--train.grad_accum=2"],
    "pp2-deepspeed": ["--parallel.pipeline_parallel=2", "--train.grad_accum=4"],
    "pp2-interleaved": [
        "--parallel.pipeline_parallel=2",
        "--parallel.virtual_pipeline_stages=2",
        "--train.grad_accum=4",
    ],
    "dp2-zero3": ["--parallel.zero_stage=3", "--train.grad_accum=1"],
}
RECOMPUTE = {
    "none": [],
    "full": ["--parallel.recompute_granularity=full"],
    "full-uniform-2": ["--parallel.recompute_granularity=full", "--parallel.recompute_num_layers=2"],
    "full-block-1": [
        "--parallel.recompute_granularity=full",
        "--parallel.recompute_method=block",
        "--parallel.recompute_num_layers=1",
    ],
    "selective-all": [
        "--parallel.recompute_granularity=selective",
        "--parallel.recompute_modules=[core_attn, mlp_act, layernorm]",
    ],
}
MORE = {
    "tp2": ("full-uniform-2", "selective-all"),
    "pp2-deepspeed": ("full-uniform-2", "full-block-1"),
    "dp2-zero3": ("selective-all",),
}
CASES = [(layout, mode) for layout in LAYOUTS for mode in ("none", "full", *MORE.get(layout, ()))]
# modules whose forward recompute replaced, on rank 0 (tiny: 4 layers; TP and DP ranks hold all 4, a pipeline rank 2:
# in its DeepSpeed stage, or as 2 interleaved chunks of 1); selective-all: per block the core, the activation and
# the two norms
MARKED = {
    "tp2/full": 4,
    "tp2/full-uniform-2": 4,  # 2 groups: a first layer that runs the group, and one that passes through
    "tp2/selective-all": 4 * 4,
    "pp2-deepspeed/full": 2,
    "pp2-deepspeed/full-uniform-2": 2,
    "pp2-deepspeed/full-block-1": 1,
    "pp2-interleaved/full": 2,
    "dp2-zero3/full": 4,
    "dp2-zero3/selective-all": 4 * 4,
}


def run_and_gather(overrides: list[str]) -> tuple[int, list[list[float]], dict[str, torch.Tensor]]:
    """Train 5 steps as configured: the modules recompute wraps, the per-step metrics and the final parameters."""
    from tplus_dist.config import load_config
    from tplus_dist.train.run import build_trainer

    trainer, _ = build_trainer(load_config("configs/tiny.yaml", overrides))
    marked = sum(getattr(m, "_tplus_recompute", None) is not None for m in trainer.model.modules())
    history = trainer.fit()
    return marked, [metric_row(m) for m in history], whole_parameters(trainer)


def _rank(rank: int, world: int, tmp: str, out: str) -> None:
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    results: dict[str, Any] = {}
    try:
        for layout, mode in CASES:
            run_dir = f"--log.run_dir={tmp}/{layout}-{mode}"
            results[f"{layout}/{mode}"] = run_and_gather([*BASE, run_dir, *DROPOUT, *LAYOUTS[layout], *RECOMPUTE[mode]])
            destroy_process_groups(keep_world=True)
    finally:
        destroy_process_groups()
    if rank == 0:
        torch.save(results, out)


@pytest.mark.extended
def test_recompute_in_every_layout_equals_the_layout_without_it(tmp_path: Path) -> None:
    out = tmp_path / "results.pt"
    run_distributed(_rank, 2, str(tmp_path), str(out))
    results: dict[str, Any] = torch.load(out)
    for layout, mode in CASES:
        if mode == "none":
            continue
        (marked, hist, params), (none, ref_hist, ref_params) = results[f"{layout}/{mode}"], results[f"{layout}/none"]
        assert (marked, none) == (MARKED[f"{layout}/{mode}"], 0), (layout, mode)
        assert len(hist) == 5
        assert hist == ref_hist, (layout, mode, hist, ref_hist)  # losses, gradient norms, lr, samples: bit for bit
        assert params.keys() == ref_params.keys()
        for name, p in params.items():
            assert torch.equal(p, ref_params[name]), (layout, mode, name)
