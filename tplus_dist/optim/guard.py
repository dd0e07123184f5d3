"""Bad steps: the update of a step whose loss or gradient norm is not finite (or, optionally, spikes) is skipped.

One mechanism for every layout. :class:`StepGuard` wraps ``step()`` of the torch optimizer that finally writes the
weights: in one process the trainer's; under DeepSpeed the client optimizer, which the engine (fp32 ZeRO 0), its
ZeRO 1/2/3 optimizers and its bf16 optimizer call after they have reduced the gradients and computed the global
gradient norm. The wrapped step asks the guard, which decides once per step, on every rank together, and returns
without stepping when the step is bad. What that leaves unchanged, read in DeepSpeed 0.19.8:

- one process, fp32 ZeRO 0 (runtime/engine.py ``_take_model_step``: ``clip_fp32_gradients``, then
  ``self.optimizer.step()``): the client optimizer is the only writer of weights and moments;
- ZeRO 1/2 (runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer.step``): after ``_optimizer_step(i)`` it copies
  the fp32 partition into the model's partition and all-gathers: the partition is unchanged, so are the weights;
- ZeRO 3 (runtime/zero/stage3.py ``step``: ``_optimizer_step``, then ``_reassign_or_swap_out_partitioned_parameters``):
  the same per sub-group;
- bf16 ZeRO 0 (runtime/bf16_optimizer.py ``BF16_Optimizer.step``: ``optimizer.step()``, then ``update_lp_params``):
  the bf16 weights are recast from the unchanged fp32 ones (GPU only: read, not run).
Each drops the step's gradients afterwards as after any step. The clip and the unscale before the inner step touch
gradients only.

DeepSpeed skips some bad steps itself: ZeRO 1/2 in fp32 (or bf16 with ``check_grad_overflow``), ZeRO 3 and the bf16
optimizer never call the client step when the norm is nan/inf (``overflow``; they report the norm as inf). The
guard then decides when the runner concludes the step (:meth:`StepGuard.conclude`). That norm is global (reduced
over data and model parallel), so on every rank either the wrapped step asks or nobody does: the decision's
collective is in the same place everywhere.

The decision: one all-reduce (sum, float64) over the world group of [this rank's loss sums (total, ce, z-loss: each
a sum over its counted targets) and its number of counted targets if it counts them, 1 if it does, rank 0's gradient
norm, 1 if this rank's loss is not finite, 1 if its norm is not finite]. A runner says which ranks count the loss
(each data-parallel replica once: tensor-parallel rank 0, and in a pipeline the rank that knows it), so the loss is
the mean over every target of the step (token_mean.py); the norm is the pre-clip norm, global already (the runner's
source: ours in one process and fp32 ZeRO 0, DeepSpeed's ``_global_grad_norm`` otherwise). Every rank reads the
same sums, applies the same rule to the same history, and so skips the same steps.

The spike rule is OLMo-core's (olmo_core/optim/skip_step_optimizer.py ``SkipStepOptimizer.get_step_factor``, with
its defaults: a window of 128 steps, 6 standard deviations): skip a step whose loss or gradient norm exceeds the
mean of the previous ``window`` steps by more than ``sigmas`` sample standard deviations (one-sided: a drop is never
a spike); the values of a step skipped as a spike enter the window, as there (a lasting shift of the level then
stops being skipped instead of stopping the run). Two departures, each with its reason: a step with a non-finite
loss or norm adds nothing to the window (OLMo-core would append the nan and from then on skip every step, its
comparisons with a nan mean being false); and the rule acts once at least ``max(2, window // 2)`` *earlier* steps are
in the window (OLMo-core counts the current step, so with a window under 6 its standard deviation is that of a
single value: nan).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tplus_dist import faults
from tplus_dist.token_mean import PARTS, LossSums

LossShare = Callable[[], LossSums]
"""This rank's share of the step's token-weighted loss (token_mean.LossSums: its sums, its counted targets, and
whether this rank counts: one rank per data-parallel replica)."""
GradNorm = Callable[[], float]
"""The step's global pre-clip gradient norm."""


class SkippedStepsError(RuntimeError):
    """``train.max_consecutive_skips`` steps in a row were skipped: the run stops without saving that step."""


@dataclass(frozen=True)
class Verdict:
    """What the guard decided about one optimizer step (the values it decided on are the ones logged)."""

    step: int
    loss: float
    """The step's loss: the mean over every target that counts, on every rank (token_mean)."""
    grad_norm: float
    skipped: bool
    reason: str | None = None
    parts: dict[str, float] | None = None
    """The loss's terms (``ce``, ``z_loss``), token-weighted means like ``loss``."""
    loss_sigmas: float | None = None
    """With the spike rule acting: (loss - window mean) / window standard deviation."""
    grad_norm_sigmas: float | None = None


def _stats(values: deque[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1, as torch.std_mean's default in OLMo-core)."""
    std, mean = torch.std_mean(torch.tensor(list(values), dtype=torch.float64))
    return float(mean), float(std)


class StepGuard:
    """Decides, once per optimizer step and the same on every rank, whether the update is applied; counts skips and
    stops the run after ``max_consecutive_skips`` in a row. Lifecycle per step: the trainer calls :meth:`begin`, the
    runner :meth:`arm` (where the loss and the norm come from), the wrapped optimizer step asks
    :meth:`allows_update`, the runner calls :meth:`conclude`, the trainer :meth:`check_limit`."""

    def __init__(
        self,
        max_consecutive_skips: int,
        skip_spikes: bool = False,
        spike_window: int = 128,
        spike_sigmas: float = 6.0,
        device: torch.device | None = None,
    ) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.skip_spikes = skip_spikes
        self.spike_window = spike_window
        self.spike_sigmas = spike_sigmas
        self.device = device if device is not None else torch.device("cpu")
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.grad_norms: deque[float] = deque(maxlen=spike_window)
        self.skipped_steps = 0
        self.streak: list[tuple[int, str]] = []
        """The current run of consecutive skipped steps: (step, reason)."""
        self.last: Verdict | None = None
        self._step = 0
        self._sources: tuple[LossShare, GradNorm] | None = None
        self._verdict: Verdict | None = None

    @classmethod
    def from_config(cls, train: Any, device: torch.device | None = None) -> StepGuard:
        """From the train section (max_consecutive_skips, skip_spikes, spike_window, spike_sigmas)."""
        return cls(train.max_consecutive_skips, train.skip_spikes, train.spike_window, train.spike_sigmas, device)

    # ------------------------------------------------------------------------------------------- the optimizer
    def wrap(self, optimizer: Any) -> None:
        """Make ``optimizer``'s updates ask this guard first. A DeepSpeed ZeRO or bf16 optimizer is unwrapped to the
        client torch optimizer it steps (its ``.optimizer``), which is what writes the weights."""
        inner = getattr(optimizer, "optimizer", None)
        target: Any = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        if getattr(target, "_tplus_step_guard", None) is self:
            return
        unguarded = target.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if not self.allows_update():
                return None
            faults.inject("optimizer", self._step)
            return unguarded(*args, **kwargs)

        target.step = guarded_step
        target._tplus_step_guard = self

    # ---------------------------------------------------------------------------------------------- one step
    def begin(self, step: int) -> None:
        """A new optimizer step (1-based) starts."""
        self._step, self._sources, self._verdict = step, None, None

    def arm(self, loss: LossShare, grad_norm: GradNorm) -> None:
        """The runner's sources for this step's decision, read when the decision is made (inside the optimizer
        step, after DeepSpeed has computed its norm, or in :meth:`conclude`)."""
        self._sources = (loss, grad_norm)

    def allows_update(self) -> bool:
        """Whether the optimizer may update now (decided on the first call of the step; unarmed: always)."""
        if self._sources is None:
            return True
        if self._verdict is None:
            self._verdict = self._decide()
        return not self._verdict.skipped

    def conclude(self) -> Verdict:
        """The step's verdict, recorded (counts, window). When the optimizer never asked, DeepSpeed skipped the
        step itself (an invalid norm, see the module docstring): it is decided now, and counted as skipped."""
        if self._sources is None:
            raise RuntimeError("StepGuard.conclude: the runner did not arm the guard for this step")
        if self._verdict is None:
            verdict = self._decide()
            if not verdict.skipped:
                verdict = replace(verdict, skipped=True, reason="the DeepSpeed optimizer skipped it (overflow)")
            self._verdict = verdict
        v = self._verdict
        if v.skipped:
            self.skipped_steps += 1
            self.streak.append((v.step, v.reason or "skipped"))
        else:
            self.streak.clear()
        if math.isfinite(v.loss) and math.isfinite(v.grad_norm):  # spikes enter the window too (OLMo-core)
            self.losses.append(v.loss)
            self.grad_norms.append(v.grad_norm)
        self._sources = None
        self.last = v
        return v

    def check_limit(self) -> None:
        """Raise SkippedStepsError when the last ``max_consecutive_skips`` steps were all skipped."""
        n = len(self.streak)
        if n < self.max_consecutive_skips:
            return
        first, last = self.streak[0][0], self.streak[-1][0]
        shown = "; ".join(f"step {s}: {r}" for s, r in self.streak[-3:])
        raise SkippedStepsError(
            f"train.max_consecutive_skips ({self.max_consecutive_skips}): steps {first} to {last} were all skipped "
            f"({'...; ' if n > 3 else ''}{shown}); stopping without saving. The weights and optimizer state are "
            f"still those after step {first - 1}; look for the cause (data, learning rate, hardware) before resuming"
        )

    def _decide(self) -> Verdict:
        assert self._sources is not None
        faults.inject("grad", self._step)  # the step's gradients exist, the update is not made yet
        loss_share, grad_norm = self._sources
        share = loss_share()
        norm = float(grad_norm())
        distributed = dist.is_available() and dist.is_initialized()
        rank0 = not distributed or dist.get_rank() == 0
        vector = share.vector()  # (reads the step's device-side loss sums: the step's one host read of them)
        own_loss = vector[0]
        sums = torch.tensor(
            [
                *vector,
                norm if rank0 else 0.0,
                float(share.counts and not math.isfinite(own_loss)),
                float(not math.isfinite(norm)),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        if distributed:
            dist.all_reduce(sums)
        values = sums.tolist()
        total, counted = LossSums.from_vector(values[: len(PARTS) + 2])
        norm, bad_loss, bad_norm = values[len(PARTS) + 2 :]
        if counted == 0:
            raise RuntimeError(f"step {self._step}: no rank counted the loss (a runner's loss share is wrong)")
        means = total.means()
        loss = means.pop("loss")
        if bad_norm and math.isfinite(norm):
            norm = math.nan  # another rank's norm was not finite
        reasons = []
        if bad_loss or not math.isfinite(loss):
            reasons.append(f"loss {loss}")
        if not math.isfinite(norm):
            reasons.append(f"grad_norm {norm}")
        if reasons:
            return Verdict(self._step, loss, norm, True, " and ".join(reasons) + " (not finite)", parts=means)
        verdict = Verdict(self._step, loss, norm, False, parts=means)
        if not self.skip_spikes or len(self.losses) < max(2, self.spike_window // 2):
            return verdict
        k, n = self.spike_sigmas, len(self.losses)
        sigmas: dict[str, float | None] = {}
        for name, x, window in (("loss", loss, self.losses), ("grad_norm", norm, self.grad_norms)):
            mean, std = _stats(window)
            z = sigmas[name] = (x - mean) / std if std > 0 else None
            if x - mean > k * std:  # OLMo-core steps when (x - mean) <= k * std, for both
                by = f"{z:.1f} standard deviations" if z is not None else "more than the spread (none)"
                reasons.append(f"{name} spike ({x:.4g}: {by} above the mean {mean:.4g} of the last {n} steps)")
        return replace(
            verdict,
            skipped=bool(reasons),
            reason="; ".join(reasons) or None,
            loss_sigmas=sigmas["loss"],
            grad_norm_sigmas=sigmas["grad_norm"],
        )

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counts and windows (plain data: the checkpoint's trainer state loads with weights_only)."""
        return {
            "skipped_steps": self.skipped_steps,
            "streak": [[s, r] for s, r in self.streak],
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        self.streak = [(int(s), str(r)) for s, r in state["streak"]]
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.spike_window)
        self.grad_norms = deque((float(x) for x in state["grad_norms"]), maxlen=self.spike_window)


def gradient_fault(module: nn.Module, step: int) -> Callable[[], None]:
    """TPLUS_FAULT's ``grad`` actions that change this rank's gradients at ``step``, as tensor hooks for the step's
    backward, so they act before any reduction as a fault in this rank's backward would: ``nan`` / ``inf`` set element
    0 of the first parameter's gradient, ``scaleF`` multiplies every gradient by F (a gradient-norm spike with a
    finite loss). The other actions (raise, kill, ...) run where the guard decides. Returns what removes the hooks."""
    action = faults.active("grad", step)
    if action is None or action in faults.STANDARD_ACTIONS:
        return lambda: None
    params = [p for p in module.parameters() if p.requires_grad]
    if action in ("nan", "inf"):
        bad = float(action)

        def poison(g: torch.Tensor) -> torch.Tensor:
            g = g.clone(memory_format=torch.contiguous_format)
            g.view(-1)[0] = bad
            return g

        handles = [params[0].register_hook(poison)]
    elif action.startswith("scale"):
        try:
            factor = float(action.removeprefix("scale"))
        except ValueError:
            raise ValueError(f"{faults.ENV}: grad:{action}: scale needs a number, e.g. scale1000") from None
        handles = [p.register_hook(lambda g: g * factor) for p in params]
    else:
        raise ValueError(f"{faults.ENV}: grad:{action} is not nan, inf, scaleF or one of {faults.STANDARD_ACTIONS}")

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove
