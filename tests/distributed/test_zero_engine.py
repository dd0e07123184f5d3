"""DeepSpeed ZeRO 0, 1, 2 and 3 on two gloo processes compute what one process computes with plain torch.

Five steps from the same seed: the global-batch mean loss, the pre-clip gradient norm and the parameters afterwards
equal a single-process AdamW loop to what fp32 rounding in another order allows (tplus_dist/tolerances.py). The targets
are deliberately uneven (each sample ignores a different tail of its targets, some all of them), and the reference
computes each step's loss as plain PyTorch would on one batch: ``F.cross_entropy(..., ignore_index)`` over the whole
global batch at once, the mean over every counted target; so micro-batches and ranks must be weighted by their
counted targets, not averaged. The accumulation count changes between steps (a growing and then shrinking batch) and
the learning rate follows a warmup + cosine schedule, so the engine's batch bookkeeping and our per-step lr writes
are both exercised. One spawn runs every stage in turn (spawning and the first deepspeed.initialize cost seconds)."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tplus_dist.config.model import ModelConfig
from tplus_dist.config.run import RunConfig
from tplus_dist.config.sections import OptimConfig, ScheduleConfig
from tplus_dist.data.order import micro_batch_positions
from tplus_dist.model import build_model, lm_loss
from tplus_dist.optim import Scheduler, build_optimizer
from tplus_dist.parallel.engine import deep_merge, deepspeed_config
from tplus_dist.spawn import run_distributed
from tplus_dist.tolerances import Fp32Run, param_differences

SEED = 7
MICRO = 2
DP = 2
ACCUMS = (2, 2, 3, 2, 1)  # per data-parallel rank; the single process runs DP times as many micro-batches
STAGES = (0, 1, 2, 3)
MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=16, linear_bias=False)
OPTIM = OptimConfig(lr=1e-2, grad_clip=1.0)  # large enough that five steps move the weights visibly
SCHEDULE = ScheduleConfig(name="cosine", warmup_steps=2, min_lr=1e-3)
STEPS = len(ACCUMS)


IGNORE = -100


def _samples() -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens; sample i counts only its first (5 i) mod (seq_len + 1) targets (0 to all of them)."""
    g = torch.Generator().manual_seed(SEED + 1)
    n = sum(ACCUMS) * MICRO * DP
    tokens = torch.randint(0, MODEL.vocab_size, (n, MODEL.seq_len + 1), generator=g)
    targets = tokens[:, 1:].clone()
    for i in range(n):
        targets[i, (5 * i) % (MODEL.seq_len + 1) :] = IGNORE
    return tokens[:, :-1], targets


def _model() -> nn.Module:
    torch.manual_seed(SEED)
    return build_model(MODEL)


def _schedule_step(sched: Scheduler, step: int, first: int, batch: int) -> None:
    sched.update(step, (first + batch) * MODEL.seq_len)


def _reference() -> tuple[list[float], list[float], dict[str, torch.Tensor], Fp32Run]:
    """One process, plain torch: micro-batches j of the step at position p hold p + j*MICRO + [0, MICRO)."""
    tokens, targets = _samples()
    model = _model()
    opt = build_optimizer(model, OPTIM, MODEL)
    sched = Scheduler(opt, SCHEDULE, OPTIM, total_steps=STEPS)
    losses, norms, first, lrs, counted = [], [], 0, [], []
    for step, accum in enumerate(ACCUMS):
        n = accum * DP
        _schedule_step(sched, step, first, n * MICRO)
        lrs.append(opt.param_groups[0]["lr"])
        batch = torch.arange(first, first + n * MICRO)  # the whole global batch in one forward
        counted.append(int((targets[batch] != IGNORE).sum()))
        logits = model(tokens[batch])
        loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), ignore_index=IGNORE)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        norms.append(float(norm))
        first += n * MICRO
    run = Fp32Run.of(RunConfig(model=MODEL, optim=OPTIM), counted, lrs)  # the loss: a mean over counted targets
    return losses, norms, {k: v.detach().clone() for k, v in model.named_parameters()}, run


def _loss_fn(engine: Any, mb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, targets = mb
    return lm_loss(engine(tokens), targets, ignore_index=IGNORE)[0]  # the micro-batch's mean


def _run_stage(rank: int, stage: int, mpu: Any) -> tuple[list[float], list[float], dict[str, torch.Tensor], bool]:
    import deepspeed

    from tplus_dist.parallel.engine import EngineStep, build_engine

    tokens, targets = _samples()
    cfg = RunConfig(model=MODEL, optim=OPTIM, schedule=SCHEDULE)
    cfg.train.micro_batch_size, cfg.train.grad_accum = MICRO, ACCUMS[0]
    cfg.parallel.zero_stage = stage
    cfg.precision.dtype = "fp32"
    model = _model()
    client = build_optimizer(model, OPTIM, MODEL)
    engine = build_engine(model, client, deepspeed_config(cfg, dp=DP, device="cpu"), mpu=mpu)
    # The scheduler writes into the groups the engine steps with (ZeRO's wrappers expose the same dicts).
    sched = Scheduler(cast(torch.optim.Optimizer, engine.optimizer), SCHEDULE, OPTIM, total_steps=STEPS)
    stepper = EngineStep(engine, _loss_fn, ignore_index=IGNORE)
    losses, norms, first = [], [], 0
    lr_reaches_client = True
    for step, accum in enumerate(ACCUMS):
        pos = micro_batch_positions(first, MICRO, DP, rank, accum)
        mbs = [(tokens[p], targets[p]) for p in pos]
        batch = accum * DP * MICRO

        def set_values(_opt: Any, s: int = step, f: int = first, b: int = batch) -> None:
            _schedule_step(sched, s, f, b)

        out = stepper.run_step(mbs, set_values)
        assert engine.train_batch_size() == batch
        lr_reaches_client &= [g["lr"] for g in client.param_groups] == [g["lr"] for g in engine.optimizer.param_groups]
        losses.append(out.loss)
        norms.append(out.grad_norm)
        first += batch
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):  # ZeRO-3 holds shards only
        final = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    engine.destroy()
    return losses, norms, final, lr_reaches_client


def _worker(rank: int, world: int, out_dir: str) -> None:
    from tplus_dist.parallel import DeepSpeedMPU, ParallelDims, destroy_process_groups, init_process_groups

    # One set of groups for every stage: DeepSpeed's comm layer keeps the torch.distributed world it first saw.
    groups = init_process_groups(ParallelDims(tp=1, pp=1, world_size=world, zero_stage=1), backend="gloo")
    try:
        ref_losses, ref_norms, ref_params, run = _reference()
        report = []
        for stage in STAGES:
            t0 = time.perf_counter()
            losses, norms, params, lr_ok = _run_stage(rank, stage, DeepSpeedMPU(groups))
            # each difference as a fraction of its bound (tplus_dist/tolerances.py), the worst step
            loss_err = max(
                abs(a - b) / run.loss(t, b) for t, (a, b) in enumerate(zip(losses, ref_losses, strict=True), 1)
            )
            norm_err = max(
                abs(a - b) / run.grad_norm(t, b) for t, (a, b) in enumerate(zip(norms, ref_norms, strict=True), 1)
            )
            rms, largest, where = param_differences(params, ref_params)
            took = time.perf_counter() - t0
            errs = f"loss {loss_err:.2f} norm {norm_err:.2f} params rms {rms / run.param_rms():.2f} of the bounds"
            report.append(f"ZeRO {stage}: {errs}, lr reaches the client optimizer: {lr_ok} ({took:.1f} s)")
            assert loss_err <= 1, (stage, losses, ref_losses)
            assert norm_err <= 1, (stage, norms, ref_norms)
            assert rms <= run.param_rms() and largest <= run.param_max(), (stage, rms, largest, where)
        if rank == 0:
            Path(out_dir, "report.txt").write_text("\n".join(report) + "\n")
    finally:
        destroy_process_groups()


@pytest.mark.slow
def test_zero_stages_equal_single_process(tmp_path: Path) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache/torch_extensions"))
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    try:
        run_distributed(_worker, DP, str(tmp_path))
    finally:
        for leftover in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
            os.remove(leftover)  # 66 MB per rank when DeepSpeed's shm all-reduce starts
    print((tmp_path / "report.txt").read_text())


def test_deepspeed_config_from_ours() -> None:
    cfg = RunConfig(model=MODEL, optim=OPTIM)
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.parallel.zero_stage = 3, 4, 2
    ds = deepspeed_config(cfg, dp=2, device="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == OPTIM.grad_clip
    assert ds["bf16"] == {"enabled": False}  # auto: fp32 on CPU
    assert deepspeed_config(cfg, dp=2, device="cuda")["bf16"] == {"enabled": True}
    cfg.precision.dtype = "fp32"
    assert deepspeed_config(cfg, dp=2, device="cuda")["bf16"] == {"enabled": False}
    assert deepspeed_config(cfg, dp=2, device="cpu", grad_accum=1)["train_batch_size"] == 6
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True

    # A user's overrides deep-merge: nested keys are added without dropping ours.
    over = deepspeed_config(cfg, dp=2, device="cpu", overrides={"zero_optimization": {"overlap_comm": True}})
    assert over["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert deep_merge({"a": {"b": 1}}, {"a": {"c": 2}, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    with pytest.raises(ValueError, match="data-parallel size"):
        deepspeed_config(cfg, dp=0, device="cpu")
