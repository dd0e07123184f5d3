"""Zipformer's pieces as options: BiasNorm, the SwooshR / SwooshL activations, the ScaledAdam optimizer; each equal
to its formula on small tensors, and each trains the tiny preset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tplus_dist.config import load_config
from tplus_dist.model.mlp import swoosh_l, swoosh_r
from tplus_dist.model.norms import BiasNorm
from tplus_dist.optim.scaled_adam import ScaledAdam
from tplus_dist.train.run import train

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tplus-tests"


def test_biasnorm_is_x_over_the_rms_of_x_minus_its_bias_times_exp_of_its_scale():
    torch.manual_seed(0)
    norm = BiasNorm(6, eps=0.0).double()
    with torch.no_grad():
        norm.bias.normal_()
        norm.log_scale.fill_(0.3)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    want = torch.empty_like(x)
    for i in range(2):
        for j in range(3):
            row, b = x[i, j], norm.bias.detach()
            rms = math.sqrt(sum((row[c] - b[c]).item() ** 2 for c in range(6)) / 6)
            want[i, j] = row / rms * math.exp(0.3)
    torch.testing.assert_close(norm(x), want, rtol=1e-12, atol=1e-12)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: BiasNorm.forward(norm, t), (x,))
    fresh = BiasNorm(6)  # initialised as zeros: RMSNorm without a gain
    torch.testing.assert_close(fresh(x.detach().float()), torch.rms_norm(x.detach().float(), (6,), eps=1e-5))


def test_swoosh_activations_are_their_formulas():
    x = torch.linspace(-8, 8, 101, dtype=torch.float64)
    r = torch.tensor([math.log1p(math.exp(v - 1)) - 0.08 * v - 0.313261687 for v in x.tolist()], dtype=torch.float64)
    l_ = torch.tensor([math.log1p(math.exp(v - 4)) - 0.08 * v - 0.035 for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(swoosh_r(x), r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(swoosh_l(x), l_, rtol=1e-12, atol=1e-12)
    assert abs(swoosh_r(torch.zeros((), dtype=torch.float64)).item()) < 1e-9  # SwooshR(0) = 0 by its constant


def test_scaled_adam_first_step_is_its_formula():
    torch.manual_seed(1)
    x0 = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(4, 5, dtype=torch.float64)
    p = torch.nn.Parameter(x0.clone())
    scalar = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    lr, k, b1, b2, eps = 0.01, 0.1, 0.9, 0.98, 1e-8
    opt = ScaledAdam([p, scalar], lr=lr, betas=(b1, b2), eps=eps, scalar_lr_scale=k)
    p.grad, scalar.grad = g.clone(), torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    # t = 1: the bias corrections undo (1 - beta); dir = g / (|g| + eps), the scale step -lr k sign(h)
    rms = x0.pow(2).mean().sqrt()
    h = (g * x0).sum()
    direction = g / (g.abs() + eps)
    s = -lr * k * h / (h.abs() + eps)
    torch.testing.assert_close(p.detach(), x0 - lr * rms * direction + s * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scalar.detach(), torch.tensor([0.5 - lr * k * 2.0 / (2.0 + eps)], dtype=torch.float64))


def test_scaled_adam_moves_every_tensor_by_the_same_relative_amount():
    # a tensor 4x larger (with the 4x smaller gradient a scale-invariant loss gives it) moves 4x more (both below
    # param_max_rms, which would shrink them)
    torch.manual_seed(2)
    x = torch.randn(8, 8, dtype=torch.float64)
    g = torch.randn(8, 8, dtype=torch.float64)
    moves = []
    for c in (0.5, 2.0):
        p = torch.nn.Parameter(x * c)
        opt = ScaledAdam([p], lr=0.01, eps=1e-30)  # (eps, added to |g|, is the one scale-dependent term)
        for _ in range(3):
            p.grad = g / c
            opt.step()
        moves.append((p.detach() - x * c) / c)
    torch.testing.assert_close(moves[0], moves[1], rtol=1e-9, atol=1e-12)


def test_a_too_large_tensor_is_shrunk():
    p = torch.nn.Parameter(torch.full((4, 4), 5.0))  # RMS 5 > param_max_rms 3
    opt = ScaledAdam([p], lr=0.01)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p.detach().pow(2).mean().sqrt() < 5.0


@pytest.mark.parametrize(
    "choice",
    [
        ["--optim.name=scaled_adam", "--optim.lr=0.02"],  # (it has no weight decay: optim.weight_decay is refused)
        ["--model.norm=biasnorm", "--model.activation=swooshr"],
        ["--model.norm=biasnorm", "--model.activation=swooshl", "--model.norm_placement=sandwich"],
    ],
    ids=["scaled_adam", "biasnorm-swooshr", "biasnorm-swooshl-sandwich"],
)
def test_the_zipformer_choices_train_the_tiny_preset(tmp_path: Path, choice: list[str]):
    args = ["--train.steps=30", "--train.eval_interval=0", "--log.progress=false", "--log.tensorboard=false",
            "--model.seq_len=64", "--train.micro_batch_size=8", "--schedule.warmup_steps=5",
            f"--data.cache_dir={CACHE}", f"--log.run_dir={tmp_path}/run", *choice]  # fmt: skip
    _, history = train(load_config("configs/tiny.yaml", args))
    first, last = history[0]["loss"], sum(m["loss"] for m in history[-5:]) / 5
    assert math.isfinite(last) and last < first - 1.0, (first, last)
