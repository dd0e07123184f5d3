"""Token-weighted means: every reported loss is a sum over the targets that count divided by their number.

A micro-batch's loss (model/loss.py ``lm_loss``) is the mean over its targets that are not ``ignore_index``. When
micro-batches (or data-parallel ranks, or validation batches) hold different numbers of such targets, the mean of
their means is not the mean over the tokens: a short last validation batch, or a micro-batch with more ignored
targets, would count as much as a full one. So each micro-batch contributes ``loss x count`` and the global mean
divides by the global count, as Megatron-LM's ``loss_func`` (pretrain_gpt.py: the loss summed over the mask, then
divided by the number of tokens reduced over data parallel) and torchtitan's ``global_valid_tokens`` rescaling do.

The gradient follows the same rule: micro-batch ``j`` of data-parallel rank ``r`` is back-propagated with weight
``count_j / N`` (``N`` the step's count over every micro-batch and rank; times the number of ranks where the
framework averages gradients over them), so the update is the gradient of the mean over every token of the step.

This module sits low (no model or training import) so that the optimizer's step guard, the parallel runners and the
trainer share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PARTS = ("loss", "ce", "z_loss")
"""The loss terms every layout reports: the total (``ce + z_loss``), the cross entropy and PaLM's z-loss term."""


def count_targets(targets: torch.Tensor, ignore_index: int) -> int:
    """The number of targets that count (not ``ignore_index``) in ``targets`` [b, s] (any shape)."""
    return int((targets != ignore_index).sum())


def count_targets_each(targets: Sequence[torch.Tensor], ignore_index: int) -> list[int]:
    """:func:`count_targets` of each of a step's micro-batches, read in one go (one host read per step, not one per
    micro-batch, when the targets already sit on an accelerator)."""
    if not targets:
        return []
    return [int(c) for c in torch.stack([(t != ignore_index).sum() for t in targets]).tolist()]


Sum = float | torch.Tensor
"""A loss sum: a Python float, or a 0-d float64 tensor still on the device that computed it (read once per step)."""


@dataclass
class LossSums:
    """A share of a token-weighted mean: per-term sums over the targets that count, and their number.

    ``sums[k]`` is Σ over counted targets of term ``k`` (for a micro-batch: its mean ``x`` its count); ``tokens`` the
    number of counted targets; ``counts`` whether this share enters a reduction over ranks (one rank per data-parallel
    replica: the others hold copies of the same values, or none).

    A micro-batch's terms may be added as 0-d tensors: they accumulate where they were computed and are read to the
    host once, by :meth:`settle` (called by :meth:`vector` and :meth:`means`), so that a GPU's run-ahead does not stall
    at every micro-batch (a ``.item()`` per micro-batch waits for its forward to finish before the next is queued)."""

    sums: dict[str, Sum] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    tokens: int = 0
    counts: bool = True

    def add(self, means: Mapping[str, Sum], tokens: int) -> None:
        """Add one micro-batch: its per-term means (floats or 0-d tensors, detached here) over its ``tokens`` counted
        targets."""
        for k, v in means.items():
            term = v.detach().double() * tokens if isinstance(v, torch.Tensor) else float(v) * tokens
            self.sums[k] = self.sums.get(k, 0.0) + term
        self.tokens += tokens

    def merge(self, other: LossSums) -> None:
        """Add another share's sums and count (e.g. one evaluation batch's)."""
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.tokens += other.tokens

    def settle(self) -> dict[str, float]:
        """The sums as floats: every device-side sum read to the host in one transfer (the step's only one)."""
        pending = {k: v for k, v in self.sums.items() if isinstance(v, torch.Tensor)}
        if pending:
            values = torch.stack([v.reshape(()).to(torch.float64) for v in pending.values()]).tolist()
            self.sums.update(zip(pending, values, strict=True))
        return {k: float(v) for k, v in self.sums.items()}

    def means(self) -> dict[str, float]:
        """Each term's mean over the counted targets (0 for a term with no target, as lm_loss gives)."""
        return {k: v / self.tokens if self.tokens else 0.0 for k, v in self.settle().items()}

    def vector(self) -> list[float]:
        """[sum of each of PARTS, tokens, counts], zeros when this share does not count: what a reduction adds."""
        if not self.counts:
            return [0.0] * (len(PARTS) + 2)
        sums = self.settle()
        return [sums.get(k, 0.0) for k in PARTS] + [float(self.tokens), 1.0]

    @classmethod
    def from_vector(cls, values: Iterable[float]) -> tuple[LossSums, int]:
        """The inverse of :meth:`vector` after a sum over ranks: (the total share, how many ranks counted)."""
        v = list(values)
        n = len(PARTS)
        return cls(dict(zip(PARTS, v[:n], strict=True)), round(v[n]), True), round(v[n + 1])


def all_reduce_sums(share: LossSums, device: torch.device | None = None) -> LossSums:
    """The sum of every rank's counting share over the world group (float64, one all-reduce); ``share`` itself in
    one process. Raises RuntimeError when no rank counted (a runner's bug, never a data property)."""
    if not (dist.is_available() and dist.is_initialized()):
        return share
    t = torch.tensor(share.vector(), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total, counted = LossSums.from_vector(t.tolist())
    if counted == 0:
        raise RuntimeError("no rank counted the loss (a runner's loss share is wrong)")
    return total


def global_token_count(local: int, group: dist.ProcessGroup | None, device: torch.device | None = None) -> int:
    """Σ of ``local`` over ``group`` (the data-parallel group: every replica's counted targets of a step); ``local``
    when there is no process group. At least 1, so a step whose targets are all ignored weighs 0, not NaN."""
    n = local
    if dist.is_available() and dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
        t = torch.tensor([float(local)], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        n = round(t.item())
    return max(n, 1)
