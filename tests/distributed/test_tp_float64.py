"""Tensor parallelism computes the same mathematics as one process: in float64, TP=2 gives the one-process loss and
every gradient to ~1e-15, for every architecture choice the fp32 training tests cover and the combinations they
leave out.

The fp32 tests (test_tp_training.py) must allow last-bit differences: the ranks sum partial products in another
order, and Adam's per-element normalisation amplifies them over steps (e.g. a T5 per-layer table with MQA and
QK-norm once gave a gradient norm 1.2e-5 off after five steps). In float64 rounding shrinks by 2^29, so a wrong
gradient (a missing all-reduce, a shard of the wrong rows) still shows at 1e-3 and rounding no longer hides it.

The logits are gathered across the ranks and the plain loss taken on them: megatron-core's vocab-parallel cross
entropy works in fp32 whatever its input (it is compared in fp32 by the training tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_conditioning_tp import give_modulation_values
from tests.distributed.test_tp_training import CHOICES, UNEVEN
from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed

BASE = ["--model.seq_len=64", "--log.progress=false", "--log.tensorboard=false"]
CASES = {
    "plain": [],
    # the model choices (one forward and backward: the training-run markers and settings do not apply)
    **{k: [o for o in v if o != UNEVEN and not o.startswith("--train.")] for k, v in CHOICES.items()},
    "t5-per-layer-mqa-qknorm": [
        "--model.position=t5_bias",
        "--model.t5_bias_shared=false",
        "--model.n_kv_heads=1",
        "--model.qk_norm=rmsnorm",
    ],
    "projection-layernorm-qknorm-gqa": [  # q and k both split over the ranks: LayerNorm's mean, bias and gain too
        "--model.qk_norm=layernorm",
        "--model.qk_norm_scope=projection",
        "--model.norm_bias=true",
        "--model.n_kv_heads=2",
        "--model.norm_placement=reordered",
        "--model.block=parallel",
    ],
    "adaln-zero-labels-shaw": [
        "--model.adaln=adaln_zero",
        "--model.n_conditions=3",
        "--model.position=shaw",
        "--model.n_kv_heads=2",
    ],
    "adaln-parallel-block-t5-shared": [
        "--model.adaln=adaln",
        "--model.n_conditions=3",
        "--model.block=parallel",
        "--model.position=t5_bias",
    ],
}


def loss_and_grads(overrides: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """One float64 forward and backward of a fixed batch; the loss and the whole model's gradients."""
    from tplus_dist.model.loss import lm_loss
    from tplus_dist.parallel.state import full_state_dict
    from tplus_dist.train.run import build_decoder, seed_everything, setup_layout

    cfg = load_config("configs/tiny.yaml", [*BASE, *overrides])
    layout = setup_layout(cfg, torch.device("cpu"))
    seed_everything(cfg.train.seed)
    model = build_decoder(cfg, layout, torch.device("cpu")).to(torch.float64)  # fp32 init values, as in training
    gen = torch.Generator().manual_seed(7)
    give_modulation_values(model, gen)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=gen)
    labels = torch.tensor([0, 1, 2, 1]) if cfg.model.adaln != "none" else None
    logits = model(tokens[:, :-1], labels) if labels is not None else model(tokens[:, :-1])
    tp = layout.groups.tp if layout.groups is not None else None
    scale = 1.0
    if tp is not None:
        import torch.distributed.nn.functional as dist_fn

        logits = torch.cat(dist_fn.all_gather(logits.contiguous(), group=tp), dim=-1)
        scale = 1.0 / layout.groups.dims.tp  # the gather's backward sums every rank's (equal) gradient
    loss, _ = lm_loss(logits[..., : cfg.model.vocab_size], tokens[:, 1:], z_loss=cfg.model.z_loss)
    (loss * scale).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return float(loss.detach()), full_state_dict(model, tp_group=tp)


def _rank(rank: int, world: int, out: str) -> None:
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    results = {}
    try:
        for name, extra in CASES.items():
            results[name] = loss_and_grads([*extra, "--parallel.tensor_parallel=2"])
            destroy_process_groups(keep_world=True)
    finally:
        destroy_process_groups()
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_tensor_parallel_is_exact_in_float64(tmp_path: Path) -> None:
    out = tmp_path / "tp.pt"
    run_distributed(_rank, 2, str(out))
    parallel: dict[str, Any] = torch.load(out)
    worst: dict[str, float] = {}
    for name, extra in CASES.items():
        loss, grads = loss_and_grads(extra)
        tp_loss, tp_grads = parallel[name]
        assert abs(loss - tp_loss) < 1e-12 * abs(loss), (name, loss, tp_loss)
        assert grads.keys() == tp_grads.keys(), name
        # Some gradients are zero in exact arithmetic and only rounding in practice (a bias on the key norm shifts
        # every score of a row alike, which softmax ignores): they are measured against the model's largest.
        floor = 1e-3 * max(g.abs().max().item() for g in grads.values())
        for p, g in grads.items():
            err = (g - tp_grads[p]).abs().max().item() / max(g.abs().max().item(), floor)
            worst[name] = max(worst.get(name, 0.0), err)
            assert err < 1e-10, (name, p, err, g.abs().max().item())
    print("largest relative gradient difference per case:", {k: f"{v:.1e}" for k, v in worst.items()})
