"""The rounding bounds of tplus_dist/tolerances.py hold where they can be checked directly: a sum and an inner
product in another order, and Adam's largest step ratio against torch's AdamW."""

from __future__ import annotations

import torch

from tplus_dist.tolerances import U, adam_ratio_bound, dot_error_bound, sum_error_bound, typical_sum_error


def test_a_sum_and_an_inner_product_in_another_order_stay_within_their_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (10, 1000, 100_000):
        x = torch.randn(n, generator=g)
        y = torch.randn(n, generator=g)
        exact = float(x.double().sum())
        dot = float((x.double() * y.double()).sum())
        for order in (torch.arange(n), torch.randperm(n, generator=g), torch.arange(n).flip(0)):
            s = 0.0
            forward = x[order].reshape(-1, 1)  # summed one block after another, as a kernel split over lanes would
            for block in forward.split(97):
                s = float(torch.tensor(s, dtype=torch.float32) + block.sum())
            assert abs(s - exact) <= sum_error_bound(n, float(x.abs().sum())), (n, s, exact)
            assert abs(float((x[order] * y[order]).sum()) - dot) <= dot_error_bound(n, float((x * y).abs().sum()))
        # the typical error is much smaller than the worst case, and still an overestimate here
        assert abs(float(x.sum()) - exact) <= typical_sum_error(n, float(x.abs().sum()))
    assert U == 2.0**-24


def test_adam_never_steps_further_than_its_ratio_bound() -> None:
    g = torch.Generator().manual_seed(1)
    steps, betas = 6, (0.9, 0.95)
    assert adam_ratio_bound(1, betas) == 1.0  # the first step is exactly lr times the gradient's sign
    # gradients chosen to push the ratio up: one sign, shrinking magnitudes (the first moment remembers the large
    # early ones that the second moment forgets faster), and random ones
    trials = [torch.tensor([0.9 ** (-k) for k in range(steps)][::-1])]
    trials += [torch.randn(steps, generator=g) * torch.rand(steps, generator=g) ** 4 for _ in range(200)]
    for grads in trials:
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=1.0, betas=betas, eps=0.0, weight_decay=0.0)
        for t, gt in enumerate(grads.double(), 1):
            before = p.detach().clone()
            p.grad = gt.reshape(1)
            opt.step()
            assert float((p.detach() - before).abs()) <= adam_ratio_bound(t, betas) * (1 + 1e-12), (t, grads)
