"""The DeepSpeed engine: its JSON config generated from ours, and our step semantics run through it.

Keys of the generated config that are ours to set (an override of these is applied, but it then disagrees with
the run config, so prefer changing the run config): ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``, ``train_batch_size``, ``zero_optimization.stage``, ``gradient_clipping``,
``bf16.enabled``, ``data_types.grad_accum_dtype`` (fp32 under bf16 with ZeRO 1-3). Everything else
(``zero_optimization`` bucket sizes, ``overlap_comm``, logging, ...) is the user's to tune through ``overrides``,
which deep-merge on top.

What DeepSpeed 0.19.8 does to a step (checked on CPU/gloo with 2 processes, ZeRO 0 to 3, fp32):

* ``engine.backward(loss)`` divides the loss by ``gradient_accumulation_steps`` itself and averages gradients
  over the data-parallel group, so a per-micro-batch *mean* loss gives the gradient of the global-batch mean.
  :class:`EngineStep` instead divides by the step's own micro-batch count and passes ``scale_wrt_gas=False``,
  and marks the accumulation boundary explicitly. The engine's own boundary is
  ``(micro_steps + 1) % gradient_accumulation_steps`` with ``micro_steps`` counted by ``engine.step()``, which
  DeepSpeed's idiom calls after *every* micro-batch; we call it once per optimizer step, and the accumulation
  count may change (a growing batch: ``set_train_batch_size`` only rewrites the config's count, the run-long
  counter would then put the boundary mid-batch). Tested: without the explicit boundary the losses diverge.
* The learning rate: ZeRO 1/2/3 flatten the client optimizer's groups in place and their ``param_groups`` are
  the client optimizer's list, so our Scheduler's writes reach them; we still write through
  ``engine.optimizer.param_groups`` (the one list every stage steps with).
* ``engine.get_global_grad_norm()`` after ``engine.step()`` is the pre-clip norm for ZeRO 1/2/3 and ``None``
  for fp32 ZeRO 0 (its fp32 clipping drops the norm); :class:`EngineStep` computes that one with DeepSpeed's own
  model-parallel-aware norm before the step (bf16 ZeRO 0 goes through DeepSpeed's BF16_Optimizer, which keeps it;
  not tried on CPU).
* /dev/shm/deepspeed_allreduce_buffer_* (66 MB per rank) appear only when LOCAL_SIZE equals the world size
  (the deepspeed launcher sets it; torchrun and tplus_dist.spawn do not).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tplus_dist.config.run import RunConfig
from tplus_dist.optim.guard import StepGuard
from tplus_dist.token_mean import LossSums, count_targets_each, global_token_count

# No periodic prints from the engine: our trainer logs.
_NEVER = 10**12

MicroBatch = tuple[Any, ...]
"""(tokens [b, s], targets [b, s]), or (tokens, targets, labels [b] or None)."""
LossFn = Callable[[nn.Module, MicroBatch], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
"""A micro-batch's mean loss over its counted targets, or (that loss, its terms: ``ce``, ``z_loss``)."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively for nested dicts (neither input is modified)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# DeepSpeed keys whose value comes from our config: where to set each instead
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x data-parallel ranks",
    "zero_optimization.stage": "parallel.zero_stage",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "precision.dtype",
    "fp16": "precision.dtype",
    "data_types.grad_accum_dtype": "precision.dtype",
    "optimizer": "optim.*",
    "scheduler": "schedule.*",
}


def load_deepspeed_overrides(path: str | None) -> dict[str, Any]:
    """The user's DeepSpeed JSON (parallel.deepspeed_config), checked: readable, a JSON object, and setting no
    key our config owns. Raises ConfigError naming the file and the key."""
    import json
    from pathlib import Path

    from tplus_dist.config import ConfigError

    if path is None:
        return {}
    field = "parallel.deepspeed_config"
    file = Path(path)
    if file.is_dir():
        raise ConfigError(field, f"{path} is a directory, not a DeepSpeed JSON file")
    if not file.is_file():
        raise ConfigError(field, f"{path} does not exist")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(field, f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(field, f"{path} must hold a JSON object, got {type(data).__name__}")
    for key, instead in OWNED_KEYS.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(field, f"{path} sets {key!r}, which comes from {instead}: set that instead")
    return data


def use_bf16(cfg: RunConfig, device: str) -> bool:
    """precision.dtype, with auto meaning bf16 on GPU and fp32 on CPU."""
    if cfg.precision.dtype == "auto":
        return device.startswith("cuda")
    return cfg.precision.dtype == "bf16"


def deepspeed_config(
    cfg: RunConfig,
    dp: int,
    device: str,
    *,
    grad_accum: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """DeepSpeed's JSON config for ``cfg`` on ``dp`` data-parallel replicas (see the module docstring for the
    keys that are ours). ``grad_accum`` defaults to ``cfg.train.grad_accum`` (a growing batch starts smaller)."""
    if dp < 1:
        raise ValueError(f"the data-parallel size must be at least 1, got {dp}")
    micro = cfg.train.micro_batch_size
    accum = cfg.train.grad_accum if grad_accum is None else grad_accum
    bf16 = use_bf16(cfg, device)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * dp,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        # ZeRO refuses optimizers it has not tested unless told; ours are torch's AdamW, Adafactor and SOAP.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.sequence_parallel and cfg.parallel.pipeline_parallel > 1:
        # DeepSpeed's pipeline engine sends 1/TP of each activation (and gradient) per tensor-parallel rank and
        # all-gathers it on the next stage (runtime/pipe/engine.py is_pipe_partitioned / is_grad_partitioned, on by
        # default with model parallelism), which assumes every TP rank holds the same tensor. Under sequence
        # parallelism each holds its own part of the sequence (already 1/TP): each sends its own, whole.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if bf16 and cfg.parallel.zero_stage >= 1:
        # bf16 under ZeRO keeps fp32 master weights, as DeepSpeed 0.19.8 does by default (runtime/precision_config.py
        # DeepSpeedBF16Config.bf16_master_weights_and_grads False: ZeRO 1/2's single_partition_of_fp32_groups,
        # ZeRO 3's fp32_partitioned_groups_flat, BF16_Optimizer's fp32_groups_flat_partition). What the default gets
        # wrong is the accumulation: without data_types.grad_accum_dtype the gradients of a step's micro-batches are
        # summed in the model's dtype, bf16 (engine.py get_data_types), losing the low bits of every micro-batch
        # after the first. fp32 sums them in fp32: ZeRO 1 then takes DeepSpeed's BF16_Optimizer (engine.py
        # _do_optimizer_sanity_check: bf16 model + fp32 accumulation + stage 1 -> BFLOAT16; fp32 master weights
        # and gradients, partitioned over data parallel), ZeRO 2 and 3 their own optimizers with fp32 gradient
        # buffers (stage_1_and_2.py / stage3.py gradient_accumulation_dtype). Not for ZeRO 0: DeepSpeed refuses a
        # bf16 model with fp32 accumulation there (_do_optimizer_sanity_check: "unsupported mix").
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return deep_merge(ds, overrides) if overrides else ds


def build_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: Mapping[str, Any], mpu: Any | None = None
) -> Any:
    """``deepspeed.initialize`` with a client optimizer (never the config's "optimizer": on CPU its fused Adam
    JIT-compiles for most of a minute) and our model-parallel groups (a DeepSpeedMPU). Returns the engine."""
    import deepspeed  # imported on use: it takes seconds and probes the accelerator

    from tplus_dist.console import quiet_stdout

    with quiet_stdout():  # (DeepSpeed prints "... built successfully" on every rank, even when it only loaded an op)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(ds_config), mpu=mpu)
    return engine


def set_optimizer_values(engine: Any, values: Sequence[Mapping[str, float]]) -> None:
    """Write per-group values (lr, weight_decay) into the optimizer the engine steps with, in group order."""
    groups = engine.optimizer.param_groups
    if len(groups) != len(values):
        raise ValueError(f"the engine's optimizer has {len(groups)} param groups, {len(values)} values were given")
    for group, vals in zip(groups, values, strict=True):
        group.update(vals)


def deepspeed_grad_norm(engine: Any) -> float:
    """The global pre-clip gradient norm of the step in progress, as DeepSpeed's ZeRO 1/2/3 and bf16 optimizers
    compute it before they call the client optimizer's step (``_global_grad_norm``: set in
    runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer.step``, runtime/zero/stage3.py ``step`` and
    runtime/bf16_optimizer.py ``BF16_Optimizer.step``, before their inner step; inf when they found it invalid and
    skipped the step). Not for fp32 ZeRO 0, whose engine steps the client optimizer directly."""
    value = getattr(engine.optimizer, "_global_grad_norm", None)
    if value is None:
        raise RuntimeError(
            "DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm is false in "
            "parallel.deepspeed_config?): the step guard needs it to skip bad steps"
        )
    return float(value)


@dataclass
class StepResult:
    loss: float
    """Mean loss over every counted target of the global batch (all data-parallel ranks)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    parts: dict[str, float] | None = None
    """The loss's terms (``ce``, ``z_loss``), token-weighted like ``loss`` (with a guard)."""


class EngineStep:
    """One optimizer step of ours through a DeepSpeed engine: any number of micro-batches (the accumulation count
    may change from step to step), per-step optimizer values, the global token-weighted mean loss and the pre-clip
    norm.

    ``loss_fn(module, micro_batch)`` returns the micro-batch's mean loss over its targets that are not
    ``ignore_index`` (or that loss and its terms); every rank passes the same number of micro-batches of the same size
    (the global batch split as data/order.micro_batch_positions does). Micro-batch ``j`` holding ``c_j`` counted
    targets is back-propagated with weight ``c_j x dp / N``, ``N`` the step's counted targets over every rank (one
    all-reduce of a number before the first forward) and ``dp`` undoing DeepSpeed's average over data parallel: the
    gradient is that of the mean over every counted target of the step (token_mean.py)."""

    def __init__(
        self, engine: Any, loss_fn: LossFn, dp_group: dist.ProcessGroup | None = None, ignore_index: int = -100
    ) -> None:
        self.engine = engine
        self.loss_fn = loss_fn
        self.dp_group = dp_group if dp_group is not None else engine.data_parallel_group
        self.dp = dist.get_world_size(self.dp_group)
        self.ignore_index = ignore_index

    def run_step(
        self,
        micro_batches: Sequence[MicroBatch],
        set_values: Callable[[Any], None] | None = None,
        guard: StepGuard | None = None,
        counts_loss: bool = True,
    ) -> StepResult:
        """Forward/backward every micro-batch, then ``engine.step()``. ``set_values(optimizer)`` writes the step's
        lr / weight decay into ``engine.optimizer.param_groups`` first (e.g. ``lambda o: scheduler.update(...)``
        with a Scheduler built on the same groups, or :func:`set_optimizer_values`). With a ``guard`` (wrapping the
        client optimizer) the step is skipped when it is bad and the result is the guard's global mean loss and norm;
        ``counts_loss``: this rank counts its replica's loss (tensor-parallel rank 0)."""
        eng = self.engine
        n = len(micro_batches)
        if n == 0:
            raise ValueError("a step needs at least one micro-batch")
        micro = micro_batches[0][0].shape[0]
        # Keep the engine's notion of the batch right (its throughput timer and config read it).
        if eng.gradient_accumulation_steps() != n:
            eng.set_train_batch_size(micro * n * self.dp)
        if set_values is not None:
            set_values(eng.optimizer)
        counts = count_targets_each([mb[1] for mb in micro_batches], self.ignore_index)
        total = global_token_count(sum(counts), self.dp_group, eng.device if self.dp > 1 else None)
        share = LossSums(counts=counts_loss)
        for j, (mb, count) in enumerate(zip(micro_batches, counts, strict=True)):
            eng.set_gradient_accumulation_boundary(j == n - 1)
            out = self.loss_fn(eng, mb)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            share.add({"loss": loss, **parts}, count)  # summed on the device, read once by the guard
            # our own weight, not DeepSpeed's 1/gradient_accumulation_steps: the count may change between steps
            eng.backward(loss * (count * self.dp / total), scale_wrt_gas=False)
        # Only fp32 ZeRO 0 loses the norm (DeepSpeed's clip_fp32_gradients path); the others keep it in step().
        fp32_zero0 = eng.zero_optimization_stage() == 0 and not (eng.bfloat16_enabled() or eng.fp16_enabled())
        norm = self._zero0_norm() if fp32_zero0 else None
        if guard is not None:
            zero0_norm = norm
            guard.arm(
                lambda: share, (lambda: zero0_norm) if zero0_norm is not None else lambda: deepspeed_grad_norm(eng)
            )
            eng.step()  # the client optimizer's step asks the guard
            verdict = guard.conclude()
            return StepResult(loss=verdict.loss, grad_norm=verdict.grad_norm, parts=verdict.parts)
        eng.step()
        if norm is None:
            got = eng.get_global_grad_norm()
            norm = float("nan") if got is None else float(got)
        sums = torch.tensor([share.settle()["loss"], float(share.tokens)], dtype=torch.float64)
        if self.dp > 1:
            sums = sums.to(loss.device)  # NCCL reduces device tensors only
            dist.all_reduce(sums, group=self.dp_group)
        loss_sum, tokens = sums.tolist()
        return StepResult(loss=loss_sum / tokens if tokens else 0.0, grad_norm=norm)

    def _zero0_norm(self) -> float:
        # After the boundary backward ZeRO 0's gradients are averaged over data parallel; DeepSpeed's clip helper
        # with an infinite bound returns their norm (model-parallel aware) and changes nothing.
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        return float(clip_grad_norm_(params, max_norm=math.inf, mpu=self.engine.mpu))


class EngineStepRunner:
    """The trainer's StepRunner over a DeepSpeed engine (see :class:`EngineStep`); ``guard`` is the trainer's
    (wrapping the client optimizer), ``counts_loss`` whether this rank counts its replica's loss (tp rank 0)."""

    def __init__(self, step: EngineStep, guard: StepGuard, counts_loss: bool = True) -> None:
        self.step = step
        self.guard = guard
        self.counts_loss = counts_loss

    def run(self, micro_batches: Sequence[Any], before_update: Callable[[], None]) -> tuple[dict[str, float], float]:
        batches = [(mb.tokens, mb.targets, mb.labels) for mb in micro_batches]
        result = self.step.run_step(batches, lambda _opt: before_update(), self.guard, self.counts_loss)
        return {"loss": result.loss, **(result.parts or {})}, result.grad_norm
