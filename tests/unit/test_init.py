"""Initialization schemes (GPT-2, T5 / Mesh-TensorFlow, muP) and muP's width transfer (a coordinate check)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tplus_dist.config import ModelConfig, OptimConfig
from tplus_dist.model import build_model, lm_loss
from tplus_dist.model.decoder import Decoder
from tplus_dist.model.norms import LayerNorm, RMSNorm

# big enough that an empirical std is within ~1% of the true one (the smallest matrix has 64k entries)
MEDIUM: dict[str, Any] = dict(
    vocab_size=1000, pad_vocab_multiple=64, n_layers=4, d_model=256, n_heads=4, seq_len=64, d_ff_multiple=64
)
STD_TOL = 0.03  # relative


def build(seed: int = 0, **overrides: Any) -> Decoder:
    torch.manual_seed(seed)
    merged = {**MEDIUM, **overrides}
    if merged.get("d_ff") is not None or not ModelConfig(**merged).gated:
        merged.pop("d_ff_multiple")  # it has no effect there, and a setting without effect is refused
    return build_model(ModelConfig(**merged))


def assert_std(t: torch.Tensor, expected: float, what: str) -> None:
    std, mean = t.detach().float().std().item(), t.detach().float().mean().item()
    assert std == pytest.approx(expected, rel=STD_TOL), f"{what}: std {std:.5f}, expected {expected:.5f}"
    assert abs(mean) < 5 * expected / math.sqrt(t.numel()) + 1e-12, f"{what}: mean {mean} is not ~0"


def hidden_inputs(model: Decoder) -> list[tuple[str, torch.Tensor]]:
    """Matrices that read the residual stream: q, k, v and the MLP's gate/up."""
    out = []
    for i, layer in enumerate(model.blocks()):
        for name in ("wq", "wk", "wv"):
            out.append((f"layers.{i}.attn.{name}", getattr(layer.attn, name).weight))
        for name in ("w_gate", "w_up"):
            lin = getattr(layer.mlp, name)
            if lin is not None:
                out.append((f"layers.{i}.mlp.{name}", lin.weight))
    return out


def residual_outputs(model: Decoder) -> list[tuple[str, torch.Tensor]]:
    """Matrices that write into the residual stream: the attention output and the MLP's down projection."""
    return [
        (f"layers.{i}.{name}", lin.weight)
        for i, layer in enumerate(model.blocks())
        for name, lin in (("attn.wo", layer.attn.wo), ("mlp.w_down", layer.mlp.w_down))
    ]


# ------------------------------------------------------------------------------------------- GPT-2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gpt2_init_matrices_and_embeddings_have_std_init_std(activation: str):
    model = build(init="gpt2", activation=activation, position="learned")
    for name, w in hidden_inputs(model):
        assert_std(w, 0.02, name)
    assert_std(model.embed.weight, 0.02, "embed")
    assert_std(model.pos_embed.weight, 0.02, "pos_embed")
    assert_std(model.head.weight, 0.02, "head")


@pytest.mark.parametrize("n_layers", [2, 6])
def test_gpt2_init_residual_output_projections_are_scaled_by_depth(n_layers: int):
    model = build(init="gpt2", n_layers=n_layers)
    for name, w in residual_outputs(model):
        assert_std(w, 0.02 / math.sqrt(2 * n_layers), name)


def test_gpt2_init_follows_init_std():
    model = build(init="gpt2", init_std=0.05, n_layers=2)
    assert_std(model.blocks()[0].attn.wq.weight, 0.05, "wq")
    assert_std(model.blocks()[0].attn.wo.weight, 0.05 / 2, "wo")


def test_init_zeroes_every_bias_and_sets_norm_gains_to_one():
    model = build(init="gpt2", linear_bias=True, norm="layernorm", norm_bias=True, qk_norm="layernorm", embed_norm=True)
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 4 * 7 + 4 * 4 + 1 + 1  # 7 linears, 4 norms per layer (2 + q/k); embed and final norm
    assert all(torch.equal(p, torch.zeros_like(p)) for _, p in biases)
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_unit_offset_norm_gains_are_stored_as_zero():
    model = build(init="gpt2", norm_unit_offset=True, norm_placement="sandwich")
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 4 * 4 + 1
    assert all(torch.equal(m.weight, torch.zeros_like(m.weight)) for m in norms)


def test_init_is_deterministic_given_the_seed():
    a, b, c = build(seed=3, n_layers=1), build(seed=3, n_layers=1), build(seed=4, n_layers=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.blocks()[0].attn.wq.weight, c.blocks()[0].attn.wq.weight)


# ---------------------------------------------------------------------------------------------- T5


def test_t5_init_attention_stds():
    model = build(init="t5", n_heads=8, head_dim=16)  # n_heads * d_kv = 128 != d_model: the fan-ins differ
    d, dkv, h = 256, 16, 8
    for i, layer in enumerate(model.blocks()):
        assert_std(layer.attn.wq.weight, (d * dkv) ** -0.5, f"layers.{i}.wq")
        assert_std(layer.attn.wk.weight, d**-0.5, f"layers.{i}.wk")
        assert_std(layer.attn.wv.weight, d**-0.5, f"layers.{i}.wv")
        assert_std(layer.attn.wo.weight, (h * dkv) ** -0.5, f"layers.{i}.wo")


def test_t5_init_mlp_embedding_and_head_stds():
    model = build(init="t5", activation="swiglu")
    f = model.cfg.ffn_dim
    for i, layer in enumerate(model.blocks()):
        assert_std(layer.mlp.w_gate.weight, 256**-0.5, f"layers.{i}.w_gate")
        assert_std(layer.mlp.w_up.weight, 256**-0.5, f"layers.{i}.w_up")
        assert_std(layer.mlp.w_down.weight, f**-0.5, f"layers.{i}.w_down")
    assert_std(model.embed.weight, 1.0, "embed")
    assert_std(model.head.weight, 256**-0.5, "head")


def test_t5_attention_has_no_one_over_sqrt_dk_in_the_softmax():
    cfg = ModelConfig(**MEDIUM, init="t5")
    assert cfg.attn_scale == 1.0
    model = build_model(cfg)
    assert all(layer.attn.core.scale == 1.0 for layer in model.blocks())


def test_explicit_softmax_scale_wins_over_the_init_default():
    for init in ("gpt2", "t5", "mup"):
        assert ModelConfig(**MEDIUM, init=init, softmax_scale=0.3).attn_scale == 0.3


# --------------------------------------------------------------------------------------------- muP


@pytest.mark.parametrize("d_model", [256, 512])
def test_mup_hidden_std_scales_with_one_over_sqrt_width_mult(d_model: int):
    model = build(init="mup", d_model=d_model, mup_base_d_model=64, n_layers=2)
    width_mult = d_model / 64
    assert model.cfg.width_mult == width_mult
    for name, w in hidden_inputs(model):
        assert_std(w, 0.02 / math.sqrt(width_mult), name)
    for name, w in residual_outputs(model):
        assert_std(w, 0.02 / math.sqrt(width_mult) / math.sqrt(2 * 2), name)


def test_mup_embedding_and_head_std_do_not_depend_on_width():
    for d_model in (128, 512):
        model = build(init="mup", d_model=d_model, mup_base_d_model=64, n_layers=1)
        assert_std(model.embed.weight, 0.02, f"embed at d_model={d_model}")
        assert_std(model.head.weight, 0.02, f"head at d_model={d_model}")


def test_mup_at_the_base_width_is_gpt2():
    mup, gpt2 = build(init="mup", mup_base_d_model=256, n_layers=2), build(init="gpt2", n_layers=2)
    assert mup.cfg.width_mult == 1.0 and mup.logit_mult == 1.0
    assert mup.cfg.attn_scale == 1 / mup.cfg.dim_head, "muP's 1/d attention scale holds at every width"
    for (n, p), (_, q) in zip(mup.named_parameters(), gpt2.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("head_dim", [16, 64])
def test_mup_attention_scale_is_one_over_head_dim(head_dim: int):
    model = build(init="mup", n_heads=256 // head_dim, mup_base_d_model=64, n_layers=1)
    assert model.cfg.attn_scale == 1.0 / head_dim
    assert model.blocks()[0].attn.core.scale == 1.0 / head_dim


@pytest.mark.parametrize(("d_model", "output_mult"), [(128, 1.0), (256, 1.0), (256, 2.5)])
def test_mup_logit_multiplier_is_output_mult_over_width_mult(d_model: int, output_mult: float):
    model = build(init="mup", d_model=d_model, mup_base_d_model=64, mup_output_mult=output_mult, n_layers=1)
    assert model.logit_mult == pytest.approx(output_mult / (d_model / 64))
    x = torch.randn(2, 3, d_model, generator=torch.Generator().manual_seed(0))
    expected = model.final_norm(x) @ model.head.weight[: model.cfg.vocab_size].T * model.logit_mult
    torch.testing.assert_close(model.output_logits(x), expected)


def test_width_mult_is_one_without_mup():
    cfg = ModelConfig(**{**MEDIUM, "d_model": 1024}, init="gpt2", mup_base_d_model=64)
    assert cfg.width_mult == 1.0


# ------------------------------------------------------------------------------ muP coordinate check

WIDTHS = (64, 128, 256)
COORD_LR = 1e-2
COORD_STEPS = 5


def _adam(model: Decoder, cfg: ModelConfig) -> torch.optim.Optimizer:
    """The project's optimizer (muP: hidden matrices lr / width_mult), without weight decay or clipping."""
    try:
        from tplus_dist.optim import build_optimizer
    except ImportError:  # the optimizer package is optional for this check: the same groups by hand
        kinds: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
        for _, p, kind in model.parameter_kinds():
            kinds[kind == "hidden"].append(p)
        hidden_lr = COORD_LR / cfg.width_mult
        groups = [{"params": kinds[True], "lr": hidden_lr}, {"params": kinds[False], "lr": COORD_LR}]
        return torch.optim.Adam(groups, betas=(0.9, 0.95))
    return build_optimizer(model, OptimConfig(lr=COORD_LR, weight_decay=0.0, betas=(0.9, 0.95)), cfg)


def update_sizes(init: str, width: int) -> dict[str, float]:
    """std of the change, over a few Adam steps on fixed data, of the logits and of the last hidden state
    (the residual stream entering the final norm), at one width."""
    cfg = ModelConfig(
        vocab_size=64, pad_vocab_multiple=64, n_layers=2, d_model=width, n_heads=4, seq_len=16, d_ff_multiple=16,
        init=init, **({"mup_base_d_model": 64} if init == "mup" else {}),  # (a muP setting: refused otherwise)
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = data[:, :-1], data[:, 1:]
    optimizer = _adam(model, cfg)
    hidden: list[torch.Tensor] = []
    model.final_norm.register_forward_hook(lambda _m, args, _out: hidden.append(args[0].detach()))

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model(inputs), hidden[-1]

    logits_before, hidden_before = forward()
    for _ in range(COORD_STEPS):
        loss, _ = lm_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logits_after, hidden_after = forward()
    return {
        "logits": (logits_after - logits_before).std().item(),
        "hidden": (hidden_after - hidden_before).std().item(),
    }


@pytest.fixture(scope="module")
def update_sizes_by_width() -> dict[str, dict[str, list[float]]]:
    """{init: {"logits" | "hidden": [update size at each of WIDTHS]}}"""
    out: dict[str, dict[str, list[float]]] = {}
    for init in ("mup", "gpt2"):
        runs = [update_sizes(init, w) for w in WIDTHS]
        out[init] = {what: [r[what] for r in runs] for what in ("logits", "hidden")}
    return out


def _growth(sizes: list[float]) -> float:
    return sizes[-1] / sizes[0]


@pytest.mark.parametrize("what", ["logits", "hidden"])
def test_mup_updates_stay_constant_across_widths(update_sizes_by_width: dict[str, dict[str, list[float]]], what: str):
    sizes = update_sizes_by_width["mup"][what]
    assert max(sizes) / min(sizes) < 2.0, f"muP: {what} change by width {dict(zip(WIDTHS, sizes, strict=True))}"


@pytest.mark.parametrize(("what", "min_growth"), [("logits", 2.5), ("hidden", 5.0)])
def test_standard_parametrization_updates_grow_with_width(
    update_sizes_by_width: dict[str, dict[str, list[float]]], what: str, min_growth: float
):
    sp, mup = update_sizes_by_width["gpt2"][what], update_sizes_by_width["mup"][what]
    assert sp[0] < sp[1] < sp[2], f"SP: {what} change by width {dict(zip(WIDTHS, sp, strict=True))}"
    assert _growth(sp) > min_growth
    assert _growth(sp) > 2 * _growth(mup), "SP's updates grow clearly faster with width than muP's"
