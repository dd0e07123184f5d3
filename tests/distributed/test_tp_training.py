"""Tensor parallelism (megatron-core layers under a DeepSpeed engine) computes what one process computes: the
same losses and gradient norms over five steps, and the same parameters afterwards, for every model choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed
from tplus_dist.tolerances import Fp32Run, param_differences
from tplus_dist.train.run import build_trainer

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tplus-tests"
BASE = [
    "--model.seq_len=64",
    "--train.steps=5",
    "--train.micro_batch_size=4",
    "--train.eval_interval=0",
    "--log.progress=false",
    "--log.tensorboard=false",
    "--schedule.warmup_steps=2",
    f"--data.cache_dir={CACHE}",
]
KEYS = ("loss", "grad_norm", "lr", "batch_size", "first_sample", "last_sample", "tokens")

Result = tuple[list[list[float]], dict[str, torch.Tensor]]

UNEVEN = "uneven-targets"
"""Put in a run's overrides: its training and validation targets are made uneven (:class:`UnevenTargets`)."""


def uneven(targets: torch.Tensor, positions: Any, ignore_index: int) -> torch.Tensor:
    """``targets`` [m, s] where the sample at stream position p counts only its first (37 p) mod (s + 1) targets
    (none to all): micro-batches and data-parallel ranks hold different numbers of counted targets, the same in every
    layout (the positions are global)."""
    out = targets.clone()
    for row, p in enumerate(positions):
        out[row, (37 * int(p)) % (targets.shape[1] + 1) :] = ignore_index
    return out


class UnevenTargets:
    """A StepSource (or validation batches) whose targets are made uneven (:func:`uneven`): what a user's own data
    with ignored targets looks like through the Python API."""

    def __init__(self, source: Any, ignore_index: int) -> None:
        self.source, self.ignore_index = source, ignore_index

    def _fix(self, mb: Any) -> Any:
        import dataclasses

        return dataclasses.replace(mb, targets=uneven(mb.targets, mb.positions, self.ignore_index))

    def next_step(self) -> Any:
        import dataclasses

        batch = self.source.next_step()
        return dataclasses.replace(batch, micro_batches=[self._fix(mb) for mb in batch.micro_batches])

    def __iter__(self) -> Any:
        return (self._fix(mb) for mb in self.source)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.source.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def run_and_gather(overrides: list[str]) -> Result:
    """Train 5 steps as configured; the per-step metrics (KEYS, then val_loss, ce and z_loss, -1 where absent) and the
    whole model's final parameters. With :data:`UNEVEN` among the overrides, the targets are made uneven."""
    made_uneven = UNEVEN in overrides
    trainer, _ = build_trainer(load_config("configs/tiny.yaml", [o for o in overrides if o != UNEVEN]))
    if made_uneven:
        ignore = trainer.cfg.model.ignore_index
        trainer.train_data = UnevenTargets(trainer.train_data, ignore)
        if trainer.val_data is not None:
            trainer.val_data = UnevenTargets(trainer.val_data, ignore)
    history = trainer.fit()
    check_plan_states(trainer)
    check_plan_activations(trainer)
    return [metric_row(m) for m in history], whole_parameters(trainer)


def whole_parameters(trainer: Any) -> dict[str, torch.Tensor]:
    """The whole model's parameters, gathered over this rank's tensor- and pipeline-parallel groups (every rank of
    the groups must call it)."""
    from tplus_dist.parallel.state import full_state_dict

    groups = trainer.layout.groups if trainer.layout is not None else None
    return full_state_dict(
        trainer.model,
        tp_group=groups.tp if groups is not None else None,
        pp_group=groups.pp if groups is not None else None,
    )


def allocated_state_bytes(trainer: Any) -> dict[str, int]:
    """What this rank really holds after its steps, each storage counted once at its full size: the model's weights
    (DeepSpeed's flat buffers, padding included, when it flattened them), the fp32 master partition DeepSpeed keeps
    (ZeRO 1/2 single_partition_of_fp32_groups, ZeRO 3 fp32_partitioned_groups_flat, its bf16 optimizer's
    fp32_groups_flat_partition), and the torch
    optimizer's state tensors (the client optimizer DeepSpeed steps). Read from the objects, not from tplus plan."""
    engine = trainer.model
    module = getattr(engine, "module", engine)
    storages: dict[int, int] = {}
    for p in module.parameters():
        # ZeRO 3: p.data is whole for a persistent parameter (empty otherwise), ds_tensor its partition (a view of
        # DeepSpeed's flat low-precision buffer)
        for t in (p, getattr(p, "ds_tensor", None)):
            if t is not None and t.untyped_storage().nbytes():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    opt = trainer.optimizer
    master = 0
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        for t in getattr(opt, name, None) or []:
            master += t.untyped_storage().nbytes()
    inner = getattr(opt, "optimizer", opt)
    inner = getattr(inner, "optimizer", inner) if not isinstance(inner, torch.optim.Optimizer) else inner
    states = sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
    return {"params": sum(storages.values()), "master": master, "optimizer": states}


def check_plan_states(trainer: Any) -> None:
    """tplus plan's weights, master weights and optimizer states for this rank equal what the rank allocated
    (exact bytes)."""
    from tplus_dist.plan import Layout, state_bytes

    layout_info = getattr(trainer, "layout", None)
    groups = layout_info.groups if layout_info is not None else None
    world = layout_info.world if layout_info is not None else 1
    cfg = trainer.cfg
    layout = Layout.from_config(cfg, world)
    stage = groups.pp_rank if groups is not None else 0
    predicted = state_bytes(cfg, layout, stage, device=trainer.device.type)
    real = allocated_state_bytes(trainer)
    got = {"params": predicted.params, "master": predicted.master, "optimizer": predicted.optimizer}
    assert got == real, (layout.describe(), stage, got, real)


def check_plan_activations(trainer: Any) -> None:
    """tplus plan's saved-for-backward bytes of one micro-batch on this rank (its tensor-parallel share: megatron's
    layers, the vocabulary-parallel loss) within 10% of autograd's (tplus_dist/memory.py), without a pipeline and
    below ZeRO 3 (whose gathered weights are not parameters while a forward runs)."""
    import os

    from tplus_dist.memory import saved_tensor_bytes
    from tplus_dist.plan import Layout, stage_activation_bytes

    cfg = trainer.cfg.resolved()
    world = trainer.layout.world if trainer.layout is not None else 1
    if cfg.parallel.pipeline_parallel > 1 or cfg.parallel.zero_stage == 3:
        return
    module = getattr(trainer.model, "module", trainer.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.seq_len))
    trainer.model.train()
    exclude = [*module.parameters(), *module.buffers()]
    measured = saved_tensor_bytes(lambda: trainer.loss_on(tokens, tokens), exclude=exclude)
    predicted = stage_activation_bytes(cfg, Layout.from_config(cfg, world), 0, device="cpu").saved_per_micro_batch
    assert abs(predicted - measured) <= 0.10 * measured, (os.environ.get("RANK"), world, predicted, measured)


def metric_row(m: dict[str, Any]) -> list[float]:
    """One step's compared values: KEYS, then val_loss, ce and z_loss (-1 where absent), as compare() reads them."""
    return [m[k] for k in KEYS] + [m.get(k, -1.0) for k in ("val_loss", "ce", "z_loss")]


def _rank(rank: int, world: int, overrides: list[str], out: str) -> None:
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    try:
        result = run_and_gather(overrides)
    finally:
        destroy_process_groups()
    if rank == 0:
        torch.save(result, out)


def fp32_run(rows: list[list[float]], overrides: list[str] | None = None) -> Fp32Run:
    """The rounding bounds of a run of configs/tiny.yaml with BASE (and ``overrides``), from the reference run's
    rows (KEYS: the learning rate in column 2, the tokens so far in column 6)."""
    return Fp32Run.of_history(load_config("configs/tiny.yaml", [*BASE, *(overrides or [])]), rows, lr=2, tokens=6)


def validation_tokens(cfg: Any) -> int:
    """The most tokens a validation loss averages: train.eval_samples, or the whole validation split."""
    from tplus_dist.data.loader import fetch_manifest
    from tplus_dist.train.run import ensure_prepared

    samples = cfg.train.eval_samples
    if samples is None:
        samples = fetch_manifest(ensure_prepared(cfg), cfg.data.cache_dir)["splits"]["val"]["samples"]
    return int(samples) * cfg.model.seq_len


def compare(single: Result, parallel: Result, overrides: list[str] | None = None) -> None:
    """The same samples and learning rates exactly; losses, validation losses, gradient norms and parameters within
    what fp32 rounding in another order can do (tplus_dist/tolerances.py states each bound and its source)."""
    (a_hist, a_params), (b_hist, b_params) = single, parallel
    assert len(a_hist) == len(b_hist) == 5
    overrides = [o for o in overrides or [] if o != UNEVEN]
    run = fp32_run(a_hist, overrides)
    val_tokens = validation_tokens(load_config("configs/tiny.yaml", [*BASE, *overrides]))
    worst = {"loss": 0.0, "grad_norm": 0.0, "val_loss": 0.0, "ce": 0.0, "z_loss": 0.0}
    for step, (a, b) in enumerate(zip(a_hist, b_hist, strict=True), 1):
        assert a[3:7] == b[3:7]  # the same samples: batch size, first and last stream position, tokens
        assert a[2] == pytest.approx(b[2], rel=1e-12)  # lr
        bounds = {
            "loss": run.loss(step, a[0]),
            "grad_norm": run.grad_norm(step, a[1]),
            "val_loss": max(run.loss(step, a[7]), run.loss(step, a[7], val_tokens)),
            "ce": run.loss(step, a[8]),
            "z_loss": run.loss(step, a[9]),
        }
        for i, key in ((0, "loss"), (1, "grad_norm"), (7, "val_loss"), (8, "ce"), (9, "z_loss")):
            assert abs(a[i] - b[i]) <= bounds[key], (key, step, a, b, bounds[key])
            worst[key] = max(worst[key], abs(a[i] - b[i]) / bounds[key])
        # the loss's terms, logged in every layout (z_loss -1 where model.z_loss is 0)
        assert a[8] != -1 and (a[9] == -1) == (b[9] == -1), (a, b)
    assert a_params.keys() == b_params.keys()
    rms, largest, where = param_differences(a_params, b_params)
    print(
        "observed / bound:", {k: f"{v:.2f}" for k, v in worst.items()},
        f"parameters: rms {rms:.1e} ({rms / run.param_rms():.2f}), largest {largest:.1e} in {where} "
        f"({largest / run.param_max():.4f})",
    )  # fmt: skip
    assert rms <= run.param_rms(), (rms, run.param_rms())
    assert largest <= run.param_max(), (where, largest, run.param_max())


def single(tmp_path: Path, *extra: str) -> Result:
    return run_and_gather([*BASE, f"--log.run_dir={tmp_path}/one", *extra])


def distributed(tmp_path: Path, world: int, *extra: str) -> Result:
    out = tmp_path / "parallel.pt"
    run_distributed(_rank, world, [*BASE, f"--log.run_dir={tmp_path}/parallel", *extra], str(out))
    result: Any = torch.load(out)
    return result


# Choices that change what crosses tensor-parallel ranks: kv-head layouts, QK-norm, biases, tied or untied
# head, soft-capping, z-loss, parallel blocks, sliding windows, ALiBi slopes per head, padding rows.
CHOICES = {
    # uneven ignored targets (token-weighted means), validated over the whole val split (a short last batch)
    "gqa-tied-zloss": [
        "--model.n_kv_heads=2",
        "--model.tie_embeddings=true",
        "--model.z_loss=1e-4",
        "--train.eval_interval=5",
        UNEVEN,
    ],
    "mqa-qknorm-untied-softcap": [
        "--model.n_kv_heads=1",  # fewer kv heads than ranks: replicated
        "--model.qk_norm=rmsnorm",
        "--model.tie_embeddings=false",
        "--model.attn_softcap=30.0",
        "--model.final_logit_softcap=20.0",
    ],
    "parallel-block-window-alibi-bias": [
        "--model.n_kv_heads=4",
        "--model.block=parallel",
        "--model.sliding_window=16",
        "--model.layer_pattern=[local, global]",
        "--model.position=alibi",
        "--model.norm=layernorm",
        "--model.qk_norm=layernorm",
        "--model.norm_bias=true",
    ],
    "zipformer-biasnorm-swoosh": ["--model.norm=biasnorm", "--model.activation=swooshl", "--model.n_kv_heads=2"],
    "shaw-gqa": ["--model.position=shaw", "--model.shaw_max_distance=8", "--model.n_kv_heads=2"],
    "t5-bias-shared": ["--model.position=t5_bias", "--model.t5_bias_buckets=8", "--model.t5_bias_max_distance=32"],
    # OLMo 2 / Qwen2 choices: QK-norm over the whole projection (q split over the ranks: statistics all-reduced; k
    # replicated, one kv head: whole on each rank), biases on q, k, v only (test_tp_float64.py adds LayerNorm's mean)
    "reordered-projection-qknorm-qkv-bias": [
        "--model.norm_placement=reordered",
        "--model.qk_norm=rmsnorm",
        "--model.qk_norm_scope=projection",
        "--model.qkv_bias=true",
        "--model.n_kv_heads=1",
    ],
    "t5-bias-per-layer-windowed": [
        "--model.position=t5_bias",
        "--model.t5_bias_shared=false",
        "--model.sliding_window=16",
        "--model.layer_pattern=[local, global]",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("choice", list(CHOICES))
def test_tensor_parallel_equals_one_process(tmp_path: Path, choice: str) -> None:
    extra = CHOICES[choice]
    compare(
        single(tmp_path, "--train.grad_accum=2", *extra),
        distributed(tmp_path, 2, "--train.grad_accum=2", "--parallel.tensor_parallel=2", *extra),
        extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_tensor_and_data_parallel_equal_one_process(tmp_path: Path, zero: int) -> None:
    # TP 2 x DP 2: global batch 8 = 4 x 1 x 2 replicas, against 4 x 2 in one process. Uneven ignored targets: the
    # replicas hold different numbers of counted targets. Validation on 26 samples: batches of 4, 4, ..., 2 dealt to
    # the two replicas (4 and 3, and a stand-in without counted targets), the same token mean as one process.
    model = ["--model.z_loss=1e-4", "--train.eval_interval=5", "--train.eval_samples=26", UNEVEN]
    compare(
        single(tmp_path, "--train.grad_accum=2", *model),
        distributed(
            tmp_path, 4, "--train.grad_accum=1", "--parallel.tensor_parallel=2", f"--parallel.zero_stage={zero}",
            *model,
        ),
    )  # fmt: skip
