"""adaLN (with per-sequence labels) and relative biases under tensor parallelism: TP=2 computes what one process
computes, the loss and the gradients of the conditioning parameters, with non-zero modulation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_tp_training import BASE
from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed
from tplus_dist.tolerances import Fp32Run

MODEL = ["--model.adaln=adaln_zero", "--model.n_conditions=3", "--model.n_kv_heads=2"]


def give_modulation_values(model: torch.nn.Module, gen: torch.Generator) -> None:
    """adaLN's modulation starts at zero: give it values, the same on every rank (drawn whole, in name order)."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".ada.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def forward_backward(overrides: list[str]) -> dict[str, Any]:
    from tplus_dist.train.run import build_decoder, seed_everything, setup_layout

    cfg = load_config("configs/tiny.yaml", [*BASE, *overrides])
    layout = setup_layout(cfg, torch.device("cpu"))
    seed_everything(cfg.train.seed)
    model = build_decoder(cfg, layout, torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    give_modulation_values(model, gen)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=gen)
    labels = torch.tensor([0, 1, 2, 1])
    loss, _ = model.loss(model(tokens[:, :-1], labels), tokens[:, 1:])
    loss.backward()
    wanted = (".ada.weight", "cond_embed.weight")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith(wanted)}
    return {"loss": float(loss.detach()), "grads": grads}


def _rank(rank: int, world: int, overrides: list[str], out: str) -> None:
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    try:
        result = forward_backward(overrides)
    finally:
        destroy_process_groups()
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
@pytest.mark.parametrize("position", ["t5_bias"])  # (shaw and rope: tests/distributed/test_tp_training.py)
def test_conditioned_tensor_parallel_equals_one_process(tmp_path: Path, position: str) -> None:
    extra = [*MODEL, f"--model.position={position}", f"--log.run_dir={tmp_path}"]
    one = forward_backward(extra)
    out = tmp_path / "tp.pt"
    run_distributed(_rank, 2, [*extra, "--parallel.tensor_parallel=2"], str(out))
    two: dict[str, Any] = torch.load(out)
    # one forward and backward from the same parameters: step 1's bounds (tplus_dist/tolerances.py); each gradient as a
    # whole, since an element whose gradient is near zero has no relative accuracy at all
    run = Fp32Run.of(load_config("configs/tiny.yaml", [*BASE, *extra]), [4 * 32], [0.0])
    assert abs(one["loss"] - two["loss"]) <= run.loss(1, one["loss"]), (one["loss"], two["loss"])
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) >= 3  # every block's ada + labels
    worst = 0.0
    for name, g in one["grads"].items():
        assert g.abs().sum() > 0, name
        rel = float((two["grads"][name] - g).norm()) / float(g.norm())
        assert rel <= run.grad_rel(1), (name, rel, run.grad_rel(1))
        worst = max(worst, rel / run.grad_rel(1))
    print(f"loss {abs(one['loss'] - two['loss']) / run.loss(1, one['loss']):.2f}, gradients {worst:.2f} of the bounds")
