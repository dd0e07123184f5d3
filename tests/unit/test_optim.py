"""Optimizers, parameter groups, schedules and clipping (tplus_dist.optim). CPU, deterministic, a few seconds."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tplus_dist import ModelConfig, build_model
from tplus_dist.config.sections import OptimConfig, ScheduleConfig
from tplus_dist.model import lm_loss
from tplus_dist.optim import (
    SOAP,
    Adafactor,
    Scheduler,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    clip_grad_norm,
    lr_at,
)
from tplus_dist.optim.soap import _rotate

OPTIMIZERS = ("adamw", "adafactor", "soap")


def tiny_cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=64, pad_vocab_multiple=8, n_layers=1, d_model=16, n_heads=2, seq_len=8, d_ff=32
    )
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def group_of(groups: list[dict], p: Tensor) -> dict:
    (g,) = [g for g in groups if any(q is p for q in g["params"])]
    return g


# ---------------------------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_decay_matrices_not_vectors(tie: bool) -> None:
    cfg = tiny_cfg(linear_bias=True, norm="layernorm", norm_bias=True, position="learned", tie_embeddings=tie)
    model = build_model(cfg)
    groups = build_param_groups(model, OptimConfig(weight_decay=0.1), cfg)
    grouped = [p for g in groups for p in g["params"]]
    # every parameter exactly once
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    names = {g["name"] for g in groups}
    assert names == ({"embedding", "hidden", "vector"} if tie else {"embedding", "hidden", "head", "vector"})
    for name, p in model.named_parameters():
        g = group_of(groups, p)
        if p.ndim >= 2:
            assert g["decay"] and g["weight_decay"] == pytest.approx(0.1), name
        else:  # norms' gains and biases, linear biases
            assert g["name"] == "vector" and not g["decay"] and g["weight_decay"] == 0.0, name
        assert g["lr_scale"] == 1.0 and g["lr"] == pytest.approx(3e-4)
    assert group_of(groups, model.embed.weight)["name"] == "embedding"
    assert group_of(groups, model.pos_embed.weight)["name"] == "embedding"
    assert group_of(groups, model.blocks()[0].attn.wq.bias)["name"] == "vector"


def test_param_groups_any_module() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    groups = build_param_groups(model, OptimConfig(), tiny_cfg())
    assert [(g["name"], len(g["params"])) for g in groups] == [("hidden", 1), ("vector", 3)]


def test_mup_lr_scaling() -> None:
    cfg = tiny_cfg(init="mup", d_model=64, n_heads=4, mup_base_d_model=16, linear_bias=True)
    assert cfg.width_mult == 4.0
    model = build_model(cfg)
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, ocfg, cfg)
    sched = Scheduler(opt, ScheduleConfig(name="constant", warmup_steps=0), ocfg, total_steps=10)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["hidden"]["lr"] == pytest.approx(1e-2 / 4)
    for kind in ("embedding", "head", "vector"):
        assert by_name[kind]["lr"] == pytest.approx(1e-2), kind
    # the decoupled shrink lr * wd is the base rate's in every decayed group: width-independent decay
    for kind in ("embedding", "hidden", "head"):
        g = by_name[kind]
        assert g["lr"] * g["weight_decay"] == pytest.approx(1e-2 * 0.1), kind
    assert by_name["vector"]["weight_decay"] == 0.0
    assert sched.get_lr() == pytest.approx(1e-2)


# ------------------------------------------------------------------------------------------------- schedules
PEAK, FLOOR, WARM, TOTAL = 1e-3, 1e-5, 10, 100


def sched(name: str, **kw: object) -> ScheduleConfig:
    return ScheduleConfig(name=name, warmup_steps=WARM, min_lr=FLOOR, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_warmup(name: str) -> None:
    c = sched(name)
    # step = optimizer steps taken; update number s = step + 1 gets peak * s / warmup
    assert lr_at(0, c, PEAK, TOTAL) == pytest.approx(PEAK / WARM)
    assert lr_at(4, c, PEAK, TOTAL) == pytest.approx(PEAK * 5 / WARM)
    assert lr_at(WARM - 1, c, PEAK, TOTAL) == pytest.approx(PEAK)
    ramp = [lr_at(s, c, PEAK, TOTAL) for s in range(WARM)]
    assert all(a < b for a, b in itertools.pairwise(ramp))


def test_cosine_values() -> None:
    c = sched("cosine")
    f = lambda s: lr_at(s, c, PEAK, TOTAL)
    assert f(WARM - 1) == pytest.approx(PEAK)
    mid = WARM + (TOTAL - WARM) // 2 - 1  # update number 55: halfway from 10 to 100
    assert f(mid) == pytest.approx((PEAK + FLOOR) / 2)
    quarter = (WARM + (TOTAL - WARM) / 4) - 1
    assert f(int(quarter)) == pytest.approx(FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi * 0.25)), rel=0.02)
    assert f(TOTAL - 1) == pytest.approx(FLOOR)  # the last update of the run is at the floor
    assert f(TOTAL) == f(5 * TOTAL) == FLOOR
    decay = [f(s) for s in range(WARM - 1, 2 * TOTAL)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert min(decay) == FLOOR
    # decay_steps overrides the run length
    c2 = sched("cosine", decay_steps=50)
    assert lr_at(49, c2, PEAK, TOTAL) == FLOOR and lr_at(29, c2, PEAK, TOTAL) == pytest.approx((PEAK + FLOOR) / 2)


def test_wsd_values() -> None:
    c = sched("wsd", wsd_decay_fraction=0.2)  # decays over updates 80..100
    f = lambda s: lr_at(s, c, PEAK, TOTAL)
    assert f(WARM - 1) == f(WARM) == f(79) == PEAK
    assert f(84) == pytest.approx(PEAK + (FLOOR - PEAK) * 5 / 20)
    assert f(89) == pytest.approx((PEAK + FLOOR) / 2)
    assert f(TOTAL - 1) == pytest.approx(FLOOR)
    assert f(TOTAL + 7) == FLOOR
    decay = [f(s) for s in range(WARM - 1, 2 * TOTAL)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_constant_and_no_warmup() -> None:
    c = sched("constant")
    assert [lr_at(s, c, PEAK, TOTAL) for s in (WARM - 1, WARM, TOTAL, 10 * TOTAL)] == [PEAK] * 4
    c0 = ScheduleConfig(name="constant", warmup_steps=0)
    assert lr_at(0, c0, PEAK, TOTAL) == PEAK
    cos0 = ScheduleConfig(name="cosine", warmup_steps=0, min_lr=0.0)
    assert lr_at(0, cos0, PEAK, TOTAL) == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi / TOTAL)))


def test_scheduler_writes_groups_and_resumes() -> None:
    cfg = tiny_cfg(init="mup", d_model=32, mup_base_d_model=16)
    ocfg = OptimConfig(lr=PEAK, weight_decay_schedule="lr_squared")
    scfg = sched("cosine")
    model = build_model(cfg)
    opt = build_optimizer(model, ocfg, cfg)
    s = build_scheduler(opt, scfg, ocfg, TOTAL)
    for _ in range(13):
        s.step()
    base = lr_at(13, scfg, PEAK, TOTAL)
    assert s.get_lr() == base
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base * g["lr_scale"])
        assert g["lr"] * g["weight_decay"] == pytest.approx(base**2 if g["decay"] else 0.0)
    # a fresh optimizer + scheduler restored from the state dict is at the same point and stays in step
    opt2 = build_optimizer(build_model(cfg), ocfg, cfg)
    s2 = build_scheduler(opt2, scfg, ocfg, TOTAL)
    s2.load_state_dict(copy.deepcopy(s.state_dict()))
    for _ in range(5):
        assert s2.get_lr() == s.get_lr()
        assert [(g["lr"], g["weight_decay"]) for g in opt2.param_groups] == [
            (g["lr"], g["weight_decay"]) for g in opt.param_groups
        ]
        s.step()
        s2.step()


# ------------------------------------------------------------------------------------- lr^2 weight decay
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("mup", [False, True])
def test_lr_squared_weight_decay(name: str, mup: bool) -> None:
    cfg = tiny_cfg(linear_bias=True, **(dict(init="mup", d_model=32, mup_base_d_model=16) if mup else {}))
    model = build_model(cfg)
    lr = 0.05
    ocfg = OptimConfig(name=name, lr=lr, weight_decay=0.3, weight_decay_schedule="lr_squared")
    opt = build_optimizer(model, ocfg, cfg)
    build_scheduler(opt, ScheduleConfig(name="constant", warmup_steps=0), ocfg, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    kinds = {n: k for n, _, k in model.parameter_kinds()}
    for n, p in model.named_parameters():
        # the base rate's square, whatever the group's (muP-scaled) rate and the optimizer's step scaling
        expect = before[n] * (1 - lr**2) if kinds[n] != "vector" else before[n]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=0, msg=f"{name} {n}")


# --------------------------------------------------------------------------------------------------- Adafactor
def rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


def reference_adafactor(
    x0: Tensor,
    grads: list[Tensor],
    lr: float,
    *,
    beta1: float | None,
    wd: float,
    factored: bool,
    decay_rate: float = 0.8,
    d: float = 1.0,
    eps1: float = 1e-30,
    eps2: float = 1e-3,
) -> tuple[Tensor, bool]:
    """Shazeer & Stern Algorithm 4 written out densely in fp64 (sums, not means). Returns (X_T, clipped once)."""
    x = x0.double().clone()
    r = c = v = m = None
    clipped = False
    for t, g in enumerate(grads, start=1):
        g = g.double()
        b2 = 1 - t**-decay_rate
        alpha = max(eps2, rms(x).item()) * lr
        g2 = g * g + eps1
        if factored and x.ndim == 2:
            r_new, c_new = g2 @ torch.ones(g.shape[1], dtype=g.dtype), torch.ones(g.shape[0], dtype=g.dtype) @ g2
            r = r_new if r is None else b2 * r + (1 - b2) * r_new
            c = c_new if c is None else b2 * c + (1 - b2) * c_new
            v_hat = torch.outer(r, c) / r.sum()
        else:
            v = g2 if v is None else b2 * v + (1 - b2) * g2
            v_hat = v
        u = g / v_hat.sqrt()
        clipped |= bool(rms(u) > d)
        step = alpha * u / max(1.0, rms(u).item() / d)
        if beta1 is not None:
            m = (1 - beta1) * step if m is None else beta1 * m + (1 - beta1) * step
            step = m
        x = x * (1 - lr * wd) - step
    return x, clipped


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_matches_reference(factored: bool, beta1: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(6, 5, generator=g), torch.randn(5, generator=g) * 1e-4  # b: below eps2 -> eps2 scale
    scales = [1.0, 1.0, 30.0, 0.1, 5.0, 1.0]  # a sudden large gradient makes update clipping act
    gw = [torch.randn(6, 5, generator=g) * s for s in scales]
    gb = [torch.randn(5, generator=g) * s for s in scales]
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = Adafactor([w, b], lr=0.05, momentum=beta1, weight_decay=0.2, factored=factored)
    for t in range(len(scales)):
        w.grad, b.grad = gw[t], gb[t]
        opt.step()
    ref_w, clipped = reference_adafactor(w0, gw, 0.05, beta1=beta1, wd=0.2, factored=factored)
    ref_b, _ = reference_adafactor(b0, gb, 0.05, beta1=beta1, wd=0.2, factored=factored)
    assert clipped
    torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), ref_b, rtol=1e-5, atol=1e-7)
    state = opt.state[w]
    if factored:
        assert state["row"].shape == (6,) and state["col"].shape == (5,) and "v" not in state
    else:
        assert state["v"].shape == (6, 5) and "row" not in state
    assert ("m" in state) == (beta1 is not None)


def test_adafactor_matches_torch_adafactor() -> None:
    # torch's rho_t = min(lr, t^-0.5) equals lr here; no momentum, no decay: the same algorithm
    g = torch.Generator().manual_seed(1)
    w0, b0 = torch.randn(7, 4, generator=g), torch.randn(4, generator=g)
    ours = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    theirs = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    o1, o2 = Adafactor(ours, lr=1e-2, momentum=None), torch.optim.Adafactor(theirs, lr=1e-2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for a, b, gr in zip(ours, theirs, grads, strict=True):
            a.grad, b.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adafactor_parameter_scaling() -> None:
    g = torch.Generator().manual_seed(2)
    base, grad = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    zero = torch.zeros(8, 4)

    def delta(p0: Tensor, scale_parameter: bool, factored: bool = True) -> Tensor:
        p = p0.clone().requires_grad_()
        p.grad = grad.clone()
        Adafactor([p], lr=0.1, momentum=None, scale_parameter=scale_parameter, factored=factored).step()
        return (p - p0).detach()

    torch.testing.assert_close(delta(10 * base, True), 10 * delta(base, True))  # step proportional to RMS(param)
    torch.testing.assert_close(delta(10 * base, False), delta(base, False))
    assert delta(10 * base, True).abs().mean() > 5 * delta(base, True).abs().mean()
    # unfactored step 1: V = G^2, so U = sign(G) with RMS 1 (no clipping); a zero tensor moves by lr * eps2
    torch.testing.assert_close(delta(zero, True, factored=False), -0.1 * 1e-3 * grad.sign())


def test_adafactor_least_squares() -> None:
    g = torch.Generator().manual_seed(3)
    a, x_true = torch.randn(32, 16, generator=g), torch.randn(16, 8, generator=g)
    b = a @ x_true
    x = (0.5 * torch.randn(16, 8, generator=g)).requires_grad_()
    opt = Adafactor([x], lr=0.05)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (a @ x - b).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


# -------------------------------------------------------------------------------------------------------- SOAP
def run_steps(params: list[Tensor], opt: torch.optim.Optimizer, grads: list[list[Tensor]]) -> None:
    for gs in grads:
        for p, gr in zip(params, gs, strict=True):
            p.grad = gr.clone()
        opt.step()


def test_soap_is_adamw_until_first_refresh() -> None:
    g = torch.Generator().manual_seed(4)
    w0, b0 = torch.randn(6, 5, generator=g), torch.randn(5, generator=g)
    grads = [[torch.randn(6, 5, generator=g), torch.randn(5, generator=g)] for _ in range(6)]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    ref = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    run_steps(ours, SOAP(ours, precondition_frequency=7, **kw), grads)  # type: ignore[arg-type]
    run_steps(ref, torch.optim.AdamW(ref, **kw), grads)  # type: ignore[arg-type]
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_soap_state_and_eigenbasis() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 5, generator=g).requires_grad_()
    e = torch.randn(9, 5, generator=g).requires_grad_()  # 9 > max_precond_dim: dim 0 stays unrotated
    t3 = torch.randn(2, 3, 4, generator=g).requires_grad_()
    b = torch.randn(5, generator=g).requires_grad_()
    params = [w, e, t3, b]
    sb = 0.9
    opt = SOAP(params, lr=1e-2, shampoo_beta=sb, precondition_frequency=2, max_precond_dim=8)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    run_steps(params, opt, grads)
    sw, se, s3, s_b = (opt.state[p] for p in params)
    assert sw["L0"].shape == sw["Q0"].shape == (6, 6) and sw["L1"].shape == sw["Q1"].shape == (5, 5)
    assert "L0" not in se and "Q0" not in se and se["Q1"].shape == (5, 5)
    assert [s3[f"Q{i}"].shape for i in range(3)] == [(2, 2), (3, 3), (4, 4)]
    assert set(s_b) == {"step", "exp_avg", "exp_avg_sq"}  # 1-D: plain Adam, no statistics
    for s, p in zip((sw, se, s3, s_b), params, strict=True):
        assert s["exp_avg"].shape == s["exp_avg_sq"].shape == p.shape
    # L is the EMA of G G^T; the first refresh's basis diagonalizes it, largest eigenvalue first
    g1, g2 = grads[0][0], grads[1][0]
    expect = sb * (1 - sb) * g1 @ g1.T + (1 - sb) * g2 @ g2.T
    torch.testing.assert_close(sw["L0"], expect)
    q = sw["Q0"]
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)
    lam = q.T @ sw["L0"] @ q
    torch.testing.assert_close(lam, torch.diag(torch.diagonal(lam)), atol=1e-5, rtol=0)
    assert torch.all(torch.diagonal(lam)[:-1] >= torch.diagonal(lam)[1:] - 1e-6)
    # the rotation round-trips (3-D included)
    x = torch.randn(2, 3, 4, generator=g)
    qs = [s3[f"Q{i}"] for i in range(3)]
    torch.testing.assert_close(_rotate(_rotate(x, qs), qs, back=True), x, atol=1e-5, rtol=0)
    # later refreshes (power iteration + QR) keep the bases orthonormal
    run_steps(params, opt, [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)])
    torch.testing.assert_close(sw["Q1"].T @ sw["Q1"], torch.eye(5), atol=1e-5, rtol=0)


def test_soap_vectors_get_adam() -> None:
    g = torch.Generator().manual_seed(6)
    w0, b0 = torch.randn(6, 5, generator=g), torch.randn(5, generator=g)
    grads = [[torch.randn(6, 5, generator=g), torch.randn(5, generator=g)] for _ in range(5)]
    ours = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    ref = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    run_steps(ours, SOAP(ours, lr=1e-2, betas=(0.9, 0.95), precondition_frequency=1), grads)
    run_steps(ref, torch.optim.Adam(ref, lr=1e-2, betas=(0.9, 0.95)), grads)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours[0], ref[0], atol=1e-4)  # the matrix is preconditioned


def rotated_regression(make_opt: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int = 150) -> float:
    """Linear regression with correlated inputs: covariance spectrum 1 .. 1e-3 in a random basis, so a diagonal
    (Adam) preconditioner cannot undo it and Shampoo's eigenbasis can. Returns the final population loss."""
    g = torch.Generator().manual_seed(0)
    din, dout = 16, 8
    q, _ = torch.linalg.qr(torch.randn(din, din, generator=g))
    sqrt_cov = q @ torch.diag(torch.logspace(0, -1.5, din)) @ q.T
    w_true = torch.randn(din, dout, generator=g)
    w = torch.zeros(din, dout, requires_grad=True)
    opt = make_opt([w])
    for _ in range(steps):
        x = torch.randn(64, din, generator=g) @ sqrt_cov
        opt.zero_grad()
        ((x @ (w - w_true)).square().sum(1).mean() / 2).backward()
        opt.step()
    with torch.no_grad():
        d = w - w_true
        return float(0.5 * torch.trace(d.T @ sqrt_cov @ sqrt_cov @ d))


def test_soap_beats_adam_on_ill_conditioned_regression() -> None:
    # each at its best rate of a small grid (at a too-small rate SOAP is slower: Adam in the eigenbasis spends
    # as much step on the flat directions as on the steep ones that dominate the loss)
    lrs = (1e-2, 3e-2, 1e-1)
    adam = min(rotated_regression(lambda p, lr=lr: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.95))) for lr in lrs)
    soap = min(
        rotated_regression(lambda p, lr=lr: SOAP(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=10)) for lr in lrs
    )
    assert soap < 0.5 * adam, (soap, adam)


# ---------------------------------------------------------------------------------------------------- clipping
def test_clip_grad_norm() -> None:
    g = torch.Generator().manual_seed(7)
    ps = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True), torch.zeros(2, requires_grad=True)]
    grads = [torch.randn(p.shape, generator=g) for p in ps]
    ps[2].grad = None  # parameters without a gradient are skipped
    expect = math.sqrt(sum(float(gr.square().sum()) for gr in grads[:2]))

    def set_grads(scale: float) -> None:
        for p, gr in zip(ps[:2], grads[:2], strict=True):
            p.grad = gr * scale

    set_grads(1.0)
    assert clip_grad_norm(ps, 0.5) == pytest.approx(expect, rel=1e-6)
    after = math.sqrt(sum(float(p.grad.square().sum()) for p in ps[:2]))
    assert after == pytest.approx(0.5, rel=1e-5)
    set_grads(1.0)  # max_norm 0: measure only
    assert clip_grad_norm(ps, 0.0) == pytest.approx(expect, rel=1e-6)
    torch.testing.assert_close(ps[0].grad, grads[0])
    set_grads(1.0)  # under the threshold: untouched
    assert clip_grad_norm(ps, 10 * expect) == pytest.approx(expect, rel=1e-6)
    torch.testing.assert_close(ps[0].grad, grads[0])
    # the distributed seam: a reduction over two identical "ranks" doubles the squared norm
    set_grads(1.0)
    total = clip_grad_norm(ps, expect, reduce_sq=lambda sq: 2 * sq)
    assert total == pytest.approx(math.sqrt(2) * expect, rel=1e-6)
    torch.testing.assert_close(ps[0].grad, grads[0] / math.sqrt(2), rtol=1e-5, atol=1e-6)
    assert clip_grad_norm([torch.zeros(2, requires_grad=True)], 1.0) == 0.0


# ------------------------------------------------------------------------------------------- the tiny decoder
def train_tiny(name: str, lr: float, steps: int, state: dict | None = None) -> tuple[list[float], dict]:
    cfg = tiny_cfg(linear_bias=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    ocfg = OptimConfig(name=name, lr=lr, soap_precondition_frequency=3)
    opt = build_optimizer(model, ocfg, cfg)
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=2, min_lr=lr / 10), ocfg, 12)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    data = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = lm_loss(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    out = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    return losses, copy.deepcopy(out)


LRS = {"adamw": 1e-2, "adafactor": 0.5, "soap": 1e-2}  # Adafactor: relative step (times RMS(param))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_trains_tiny_decoder_and_resumes_exactly(name: str) -> None:
    losses, final = train_tiny(name, LRS[name], 8)
    assert losses[-1] < losses[0] - 0.3, losses
    # 5 steps, checkpoint, 3 more in fresh objects == 8 straight (SOAP's bases refresh at 3 and 6: across it)
    _, mid = train_tiny(name, LRS[name], 5)
    resumed, again = train_tiny(name, LRS[name], 3, state=mid)
    assert resumed == losses[5:]
    for k, v in final["model"].items():
        torch.testing.assert_close(again["model"][k], v, rtol=0, atol=0)
