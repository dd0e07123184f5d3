"""How far apart two fp32 computations of the same mathematics in different orders may be: the tolerances of every
test that compares layouts (TP, PP, DP, ZeRO against one process; a run resumed on another layout) and of
`tplus verify-resume --resume-with`, derived from fp32 rounding for the operations involved rather than a number that
passed on one machine.

Two sides that compute the same mathematics differ only by rounding (tests/distributed/test_tp_float64.py shows TP
equals one process to 1e-14 in float64), but they round differently: another layout splits matmuls and sums over
ranks, and another CPU or thread count blocks a kernel's reductions differently (AVX-512 against AVX2, 1 thread
against 2). A test that compares them must allow what rounding can do and no more, so that a wrong gradient still
fails it. Where both sides compute in exactly the same order (a resume on the same layout), compare exactly.

Sources (N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM 2002):

- (2.4): fl(x op y) = (x op y)(1 + d), |d| <= u; u = 2^-24 for fp32 (round to nearest).
- Lemma 3.1, (3.8): gamma_n = n u / (1 - n u) bounds n accumulated relative errors.
- (3.5): an inner product of length n, in any order, errs by at most gamma_n sum |x_i y_i|.
- (4.4): a sum of n terms, in any order (recursive, pairwise, blocked, split over ranks), errs by at most
  gamma_{n-1} sum |x_i|.
- Section 2.8 and 4.2 (the rule of thumb): the worst cases are rarely approached; rounding errors behave like
  independent random variables of mean zero, so an accumulation of n terms typically errs by sqrt(n) u of its
  magnitude, and errors of independent stages add in quadrature.

Two sides, each within a bound of the exact value, are within twice the bound of each other (TWO_SIDES).

From one step to a run (the model the bounds below state; the measurements in the issue-15 report check it):

- One step from identical parameters: a value passes through ``depth`` sequential accumulations (each matmul's inner
  product, each norm's and softmax's sum, forward and backward), the longest of length ``n`` (the widest inner
  dimension, or the tokens a weight gradient sums over). Its typical relative difference is
  rho_1 = TWO_SIDES * sqrt(depth * n) * u.
- Adam divides each gradient element by its own running rms, so it passes a relative gradient difference into the
  update one for one, and the parameters then carry it into the next step: the relative difference of step t's
  gradient is rho_t = t * rho_1 (each step adds its own rounding; over a few steps the loss surface neither
  damps nor amplifies it much).
- The loss is the mean of N per-token losses: their rounding differences are independent, so the mean's relative
  difference is rho_t(forward) / sqrt(N), plus the mean's own sum of N terms, TWO_SIDES * sqrt(N) * u.
- A gradient norm: | |a| - |b| | <= |a - b| (triangle inequality), so its relative difference is at most rho_t.
- Parameters after k steps, as a whole (the root mean square over every element): each step moves an element by
  lr_t times Adam's normalised ratio, which the relative gradient difference changes by at most about rho_t:
  rms <= sum_t lr_t rho_t. A single element can do worse: Adam turns a near-zero gradient (the last bits of a
  cancellation, or a gradient that is zero in exact arithmetic) into a step of either sign, so an element is only
  bounded by a sign flip at every step, 2 sum_t lr_t A_t (A_t: Adam's largest step ratio, adam_ratio_bound). The
  element bound catches gross errors (a skipped or doubled step); the rms catches a wrong gradient, which moves a
  whole tensor.

What the bounds let through, for the tiny model of the distributed tests (4 layers, 512 tokens a step, lr 3e-3, five
steps): losses 1.8e-5 to 2.6e-5, gradient norms 2.4e-5 to 1.2e-4 of themselves, a parameter rms of 4.7e-7. Measured
across layouts, thread counts (1 and 2), ATen's kernel levels (AVX2, default) and a loaded machine (load average up
to 21 on 2 cores): losses at most 0.05 of their bound, gradient norms 0.18 (shaw-gqa under the default kernels: the
1.9e-5 an AVX-512 machine gives), the parameters' rms 0.31 (TP 2 x DP 2 with uneven targets). Where targets are
ignored, the loss is a mean over fewer terms than ``tokens``; the forward term then grows by sqrt(tokens / counted),
which the measured margin covers. A wrong gradient is far outside: the tied embedding's input-side gradient dropped
(what a missing all-reduce between the stages that hold it does) moves the loss by 1e-2, the first gradient norm by
4% and the parameters' rms by 6.6e-4 (500 to 1600 times the bounds); FACTS.md's 6e-4 loss drift of that bug in a
pipeline is 20 times the loss bound. A parameter that is off by 1e-3 everywhere in one 128-element norm weight gives
an rms of 1.2e-5, 25 times its bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

U = 2.0**-24
"""fp32 unit roundoff (round to nearest): Higham (2.4)."""

TWO_SIDES = 2.0
"""Both sides err from the exact value; their difference is at most the sum of the two bounds."""

STAGES_PER_LAYER = 9
"""Sequential accumulations in one transformer block's forward pass: two norms (a sum over d_model each), the q/k/v
projections, the scores, the softmax sum, the weighted values, the output projection, the MLP's up and down
projections. The backward pass runs as many again (counted in Fp32Run.depth)."""


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): Higham, Lemma 3.1 and (3.8)."""
    assert n * U < 1, n
    return n * U / (1 - n * U)


def sum_error_bound(n: int, abs_sum: float) -> float:
    """Worst case of a sum of n terms in any order: gamma_{n-1} sum |x_i| (Higham (4.4))."""
    return gamma(max(n - 1, 0)) * abs_sum


def dot_error_bound(n: int, abs_dot: float) -> float:
    """Worst case of an inner product of length n in any order: gamma_n sum |x_i y_i| (Higham (3.5))."""
    return gamma(n) * abs_dot


def typical_sum_error(n: int, abs_sum: float) -> float:
    """Typical error of a sum of n terms: sqrt(n) u sum |x_i| (Higham section 2.8 and 4.2, the rule of thumb)."""
    return math.sqrt(n) * U * abs_sum


def adam_ratio_bound(t: int, betas: tuple[float, float] = (0.9, 0.95)) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can take at step t (1-based), whatever the gradients: by Cauchy-Schwarz,
    |sum_s b1^(t-s) g_s| <= sqrt(sum_k (b1^2/b2)^k) sqrt(sum_s b2^(t-s) g_s^2), so with bias correction the ratio is
    at most (1-b1)/(1-b1^t) sqrt((1-b2^t)/(1-b2)) sqrt(sum_{k<t} (b1^2/b2)^k); 1 at t = 1 (a step of exactly lr)."""
    b1, b2 = betas
    r = b1 * b1 / b2
    return (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2)) * math.sqrt(sum(r**k for k in range(t)))


@dataclass(frozen=True)
class Fp32Run:
    """A short fp32 training run compared with the same run computed in another order (see the module docstring for
    each bound and its source)."""

    n_layers: int
    width: int
    """The widest inner dimension: max(d_model, d_ff, vocabulary)."""
    tokens: Sequence[int]
    """Tokens of each optimizer step (the global batch): the loss is their mean, each weight gradient their sum."""
    lrs: Sequence[float]
    """The learning rate of each step, from the reference run's metrics."""
    betas: tuple[float, float] = (0.9, 0.95)

    @classmethod
    def of(cls, cfg: object, tokens: Sequence[int], lrs: Sequence[float]) -> Fp32Run:
        """From a run config (its model and optimizer sections) and the reference run's tokens and learning rate at
        each step."""
        m = cfg.model  # type: ignore[attr-defined]
        b1, b2 = cfg.optim.betas  # type: ignore[attr-defined]
        width = max(m.d_model, m.ffn_dim, m.padded_vocab_size)
        return cls(m.n_layers, width, tuple(tokens), tuple(lrs), (b1, b2))

    @classmethod
    def of_history(cls, cfg: object, rows: Sequence[Sequence[float]], lr: int, tokens: int) -> Fp32Run:
        """From a run config and the reference run's metric rows (columns ``lr`` and ``tokens``, the latter counted
        from the start of the run)."""
        seen = [0, *(int(r[tokens]) for r in rows)]
        return cls.of(cfg, [b - a for a, b in itertools.pairwise(seen)], [r[lr] for r in rows])

    @property
    def depth(self) -> int:
        """Sequential accumulations of a forward pass: the blocks, the final norm, the head and the loss's sum."""
        return STAGES_PER_LAYER * self.n_layers + 3

    def n(self, step: int) -> int:
        """The longest accumulation up to step ``step``: the widest inner dimension, or the tokens a weight gradient
        sums over."""
        return max(self.width, *self.tokens[:step])

    def grad_rel(self, step: int) -> float:
        """Relative difference of step ``step``'s (1-based) gradient: step * 2 sqrt(2 depth n) u (forward and
        backward)."""
        return step * TWO_SIDES * math.sqrt(2 * self.depth * self.n(step)) * U

    def loss(self, step: int, loss: float, tokens: int | None = None) -> float:
        """Absolute difference of step ``step``'s mean loss over its tokens (or over ``tokens``: a validation loss,
        the same forward and the same kind of mean, with the parameters of step ``step``)."""
        n = tokens if tokens is not None else self.tokens[step - 1]
        forward = step * TWO_SIDES * math.sqrt(self.depth * self.n(step)) * U / math.sqrt(n)
        mean = TWO_SIDES * math.sqrt(n) * U
        return (forward + mean) * abs(loss)

    def grad_norm(self, step: int, norm: float) -> float:
        """Absolute difference of step ``step``'s gradient norm: | |a| - |b| | <= |a - b| <= grad_rel * |a|."""
        return self.grad_rel(step) * abs(norm)

    def param_rms(self, steps: int | None = None) -> float:
        """Root mean square over every parameter element of the difference after ``steps`` steps (all by default):
        sum_t lr_t grad_rel(t)."""
        lrs = self.lrs[: steps if steps is not None else len(self.lrs)]
        return sum(lr * self.grad_rel(t) for t, lr in enumerate(lrs, 1))

    def param_max(self, steps: int | None = None) -> float:
        """Any one element: a sign flip at every step, 2 sum_t lr_t A_t (adam_ratio_bound)."""
        lrs = self.lrs[: steps if steps is not None else len(self.lrs)]
        return sum(2 * lr * adam_ratio_bound(t, self.betas) for t, lr in enumerate(lrs, 1))


def param_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float, str]:
    """The root mean square over every element of a - b, the largest element difference and its tensor's name."""
    import torch

    total, count, worst, where = 0.0, 0, 0.0, ""
    for name, p in a.items():
        q = b[name]
        assert isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor)
        assert p.shape == q.shape, (name, p.shape, q.shape)
        d = (p.double() - q.double()).abs()
        total += float((d * d).sum())
        count += d.numel()
        if d.numel() and float(d.max()) > worst:
            worst, where = float(d.max()), name
    return math.sqrt(total / max(count, 1)), worst, where
