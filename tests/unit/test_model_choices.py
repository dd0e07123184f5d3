"""Every architecture choice of ModelConfig, each checked against a plain hand-written reference.

Shapes are tiny and everything is seeded. References are deliberately naive (explicit loops, formulas
written out) so that they share no code with the implementation they check.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from tplus_dist.backends import get_provider
from tplus_dist.config import ConfigError, ModelConfig
from tplus_dist.model import build_model, lm_loss
from tplus_dist.model.attention import Attention, AttentionCore, attention_mask
from tplus_dist.model.block import Block
from tplus_dist.model.decoder import Decoder
from tplus_dist.model.mlp import MLP
from tplus_dist.model.norms import LayerNorm, RMSNorm
from tplus_dist.model.positions import Rotary, alibi_bias, alibi_slopes, sinusoidal_table

# ----------------------------------------------------------------------------------------- helpers

TINY: dict[str, Any] = dict(
    vocab_size=50, pad_vocab_multiple=16, n_layers=2, d_model=32, n_heads=4, seq_len=16, d_ff_multiple=16
)
LOCAL = dict(sliding_window=3, layer_pattern=["local"])


def tiny_cfg(**overrides: Any) -> ModelConfig:
    merged = {**TINY, **overrides}
    cfg = ModelConfig(**merged)
    # a base setting that the combination makes dead is dropped (validation refuses a setting that has no effect)
    if cfg.d_ff is not None or not cfg.gated:
        merged.pop("d_ff_multiple", None)
    if cfg.init == "t5":
        merged.pop("init_std", None)
    cfg = ModelConfig(**merged)
    cfg.validate()
    return cfg


def build(seed: int = 0, **overrides: Any) -> Decoder:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides))


def twin(model: Decoder, **overrides: Any) -> Decoder:
    """A model of the config of ``model`` changed by ``overrides`` (no new parameters), same weights."""
    other = build(**{**_overrides_of(model.cfg), **overrides})
    other.load_state_dict(model.state_dict())
    return other


def _overrides_of(cfg: ModelConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in ModelConfig.__dataclass_fields__}


def tokens(batch: int = 2, seq: int = 12, vocab: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize_norm_gains(module: torch.nn.Module, seed: int = 0) -> None:
    """Norm gains of one would hide a swapped or missing norm; make every one distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (RMSNorm, LayerNorm)):
                m.weight.copy_(1.0 + 0.5 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


def rms_norm_by_hand(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def layer_norm_by_hand(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y + b if b is not None else y


def attention_by_hand(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    slopes: torch.Tensor | None = None,
    cap: float | None = None,
    off_by_one: bool = False,
) -> torch.Tensor:
    """Masked softmax attention, one head and one query at a time. q [b, h, s, d], k/v [b, kv, s, d]."""
    b, h, s, _ = q.shape
    group = h // k.shape[1]  # query heads per key/value head
    out = torch.zeros(b, h, s, v.shape[-1], dtype=q.dtype)
    for head in range(h):
        kh, vh = k[:, head // group], v[:, head // group]
        for i in range(s):
            keys = [j for j in range(s) if j <= i and (window is None or i - j < window)]
            x = scale * torch.einsum("bd,bjd->bj", q[:, head, i], kh[:, keys])
            if cap is not None:
                x = cap * torch.tanh(x / cap)
            if slopes is not None:
                x = x - slopes[head].to(q.dtype) * torch.tensor([i - j for j in keys], dtype=q.dtype)
            if off_by_one:  # exp(x_i) / (1 + sum_j exp(x_j)), written in log space to stay finite
                log_denominator = torch.logaddexp(torch.zeros((), dtype=x.dtype), torch.logsumexp(x, -1))
                p = torch.exp(x - log_denominator[:, None])
            else:
                p = torch.exp(x - x.max(-1, keepdim=True).values)
                p = p / p.sum(-1, keepdim=True)
            out[:, head, i] = torch.einsum("bj,bjd->bd", p, vh[:, keys])
    return out


def qkv(b: int = 2, h: int = 4, kv: int = 4, s: int = 7, d: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0):
    """Random q [b, h, s, d] and k, v [b, kv, s, d]."""
    return (
        randn(b, h, s, d, seed=seed, dtype=dtype),
        randn(b, kv, s, d, seed=seed + 1, dtype=dtype),
        randn(b, kv, s, d, seed=seed + 2, dtype=dtype),
    )


def probabilities(core: AttentionCore, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention matrix itself: with v = identity, softmax(...) @ v is the probabilities."""
    b, kv, s, _ = k.shape
    return core(q, k, torch.eye(s, dtype=q.dtype).expand(b, kv, s, s))


# ------------------------------------------------------------------------------------------ norms


def test_rmsnorm_matches_formula():
    norm = RMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    x = randn(3, 5, 16)
    torch.testing.assert_close(norm(x), rms_norm_by_hand(x, norm.weight, 1e-5))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layernorm_matches_formula(bias: bool):
    norm = LayerNorm(16, eps=1e-5, bias=bias)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    if bias:
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    assert (norm.bias is not None) == bias
    x = randn(3, 5, 16) * 3 + 1
    torch.testing.assert_close(norm(x), layer_norm_by_hand(x, norm.weight, norm.bias, 1e-5))


@pytest.mark.parametrize("kind", [RMSNorm, LayerNorm])
def test_unit_offset_norm_scales_by_weight_plus_one(kind: type):
    plain, offset = kind(16), kind(16, unit_offset=True)
    assert torch.equal(offset.weight, torch.zeros(16)), "a unit-offset gain is stored as 0 (= a gain of 1)"
    torch.nn.init.normal_(offset.weight, 0.0, 0.5)
    with torch.no_grad():
        plain.weight.copy_(offset.weight + 1)
    x = randn(4, 16)
    torch.testing.assert_close(offset(x), plain(x))


@pytest.mark.parametrize("kind", [RMSNorm, LayerNorm])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_norm_gradcheck(kind: type, unit_offset: bool):
    norm = kind(6, unit_offset=unit_offset).double()
    torch.nn.init.normal_(norm.weight, 0.5, 0.5)
    x = randn(3, 6, dtype=torch.float64).requires_grad_()
    assert gradcheck(norm, (x,))


def test_norms_compute_in_fp32_for_half_inputs():
    norm = RMSNorm(16)
    x = randn(4, 16) * 100
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x.bfloat16()).float(), norm(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_qk_norm_normalizes_each_head_over_head_dim(kind: str):
    cfg = tiny_cfg(qk_norm=kind, norm_bias=kind == "layernorm", position="none")
    torch.manual_seed(0)
    attn = Attention(cfg, 0, get_provider(), rotary=None)
    randomize_norm_gains(attn)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.dim_head,)
    x = randn(2, 6, cfg.d_model)
    b, s, h, d = 2, 6, cfg.n_heads, cfg.dim_head

    def normalize(t: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        if kind == "rmsnorm":
            return rms_norm_by_hand(t, norm.weight, cfg.norm_eps)
        return layer_norm_by_hand(t, norm.weight, norm.bias, cfg.norm_eps)

    q = normalize(attn.wq(x).view(b, s, h, d), attn.q_norm).transpose(1, 2)
    k = normalize(attn.wk(x).view(b, s, h, d), attn.k_norm).transpose(1, 2)
    v = attn.wv(x).view(b, s, h, d).transpose(1, 2)
    out = attention_by_hand(q, k, v, scale=d**-0.5)
    expected = attn.wo(out.transpose(1, 2).reshape(b, s, h * d))
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_qk_norm_over_the_projection_normalizes_all_of_q_and_all_of_k(kind: str):
    """OLMo 2's QK-norm: one norm over the n_heads * head_dim query features, one over the n_kv_heads * head_dim
    key features, before the heads are split (HF modeling_olmo2.py)."""
    bias = dict(norm_bias=True) if kind == "layernorm" else {}  # (only a LayerNorm has one)
    cfg = tiny_cfg(qk_norm=kind, qk_norm_scope="projection", position="none", n_kv_heads=2, **bias)
    torch.manual_seed(0)
    attn = Attention(cfg, 0, get_provider(), rotary=None)
    randomize_norm_gains(attn)
    b, s, h, kv, d = 2, 6, cfg.n_heads, cfg.kv_heads, cfg.dim_head
    assert attn.q_norm.weight.shape == (h * d,) and attn.k_norm.weight.shape == (kv * d,)
    x = randn(2, 6, cfg.d_model)

    def normalize(t: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        if kind == "rmsnorm":
            return rms_norm_by_hand(t, norm.weight, cfg.norm_eps)
        return layer_norm_by_hand(t, norm.weight, norm.bias, cfg.norm_eps)

    q = normalize(attn.wq(x), attn.q_norm).view(b, s, h, d).transpose(1, 2)
    k = normalize(attn.wk(x), attn.k_norm).view(b, s, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    v = attn.wv(x).view(b, s, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    out = attention_by_hand(q, k, v, scale=d**-0.5)
    expected = attn.wo(out.transpose(1, 2).reshape(b, s, h * d))
    torch.testing.assert_close(attn(x), expected)


def test_qkv_bias_puts_biases_on_q_k_v_only():
    model = build(qkv_bias=True)
    a, m = model.blocks()[0].attn, model.blocks()[0].mlp
    assert all(lin.bias is not None for lin in (a.wq, a.wk, a.wv))
    assert all(lin.bias is None for lin in (a.wo, m.w_gate, m.w_up, m.w_down))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(qk_norm_scope="projection"), "model.qk_norm_scope"),  # with qk_norm none it would do nothing
        (dict(qkv_bias=True, linear_bias=True), "model.qkv_bias"),
        (dict(norm_placement="reordered", adaln="adaln", n_conditions=2), "model.norm_placement"),
    ],
)
def test_new_choices_refuse_settings_that_would_be_ignored(overrides: dict[str, Any], field: str):
    from tplus_dist.config import ConfigError

    with pytest.raises(ConfigError) as info:
        tiny_cfg(**overrides)
    assert info.value.field == field


def test_no_qk_norm_has_no_qk_norm_modules():
    model = build(qk_norm="none")
    assert all(layer.attn.q_norm is None and layer.attn.k_norm is None for layer in model.blocks())


def test_embed_norm_is_a_layernorm_right_after_the_embedding():
    model = build(embed_norm=True, position="none")
    randomize_norm_gains(model.embed_norm)
    assert isinstance(model.embed_norm, LayerNorm) and model.embed_norm.bias is not None
    t = tokens()
    en = model.embed_norm
    expected = layer_norm_by_hand(model.embed.weight[t], en.weight, en.bias, en.eps)
    torch.testing.assert_close(model.embed_tokens(t), expected)


def test_no_embed_norm_by_default():
    model = build()
    assert model.embed_norm is None


def test_final_norm_is_applied_before_the_head():
    model = build(final_norm=True)
    randomize_norm_gains(model.final_norm)
    x = randn(2, 5, 32)
    expected = rms_norm_by_hand(x, model.final_norm.weight, model.cfg.norm_eps) @ model.head.weight[:50].T
    torch.testing.assert_close(model.output_logits(x), expected)


def test_final_norm_off_feeds_the_head_directly():
    model = build(final_norm=False)
    assert model.final_norm is None
    x = randn(2, 5, 32)
    torch.testing.assert_close(model.output_logits(x), x @ model.head.weight[:50].T)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_choice_builds_that_norm_everywhere(norm: str):
    model = build(norm=norm, norm_placement="sandwich")
    want = RMSNorm if norm == "rmsnorm" else LayerNorm
    block_norms = [m for layer in model.blocks() for m in layer.modules() if isinstance(m, (RMSNorm, LayerNorm))]
    assert len(block_norms) == 4 * model.cfg.n_layers
    assert all(isinstance(m, want) for m in block_norms)
    assert isinstance(model.final_norm, want)


# ------------------------------------------------------------------------------------ activations

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


# activation -> (nonlinearity, gated)
ACTIVATION_FORMULAS = {
    "gelu": (_gelu, False),
    "gelu_tanh": (_gelu_tanh, False),
    "relu": (_relu, False),
    "silu": (_silu, False),
    "swiglu": (_silu, True),
    "geglu": (_gelu, True),
    "geglu_tanh": (_gelu_tanh, True),
    "reglu": (_relu, True),
}


@pytest.mark.parametrize("activation", list(ACTIVATION_FORMULAS))
def test_mlp_matches_its_formula(activation: str):
    act, gated = ACTIVATION_FORMULAS[activation]
    cfg = tiny_cfg(activation=activation, linear_bias=True)
    torch.manual_seed(0)
    mlp = MLP(cfg, get_provider())
    assert (mlp.w_gate is not None) == gated
    x = randn(2, 5, cfg.d_model) * 2

    def lin(layer: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
        return t @ layer.weight.T + layer.bias

    hidden = act(lin(mlp.w_gate, x)) * lin(mlp.w_up, x) if gated else act(lin(mlp.w_up, x))
    torch.testing.assert_close(mlp(x), lin(mlp.w_down, hidden))


@pytest.mark.parametrize("activation", list(ACTIVATION_FORMULAS))
def test_mlp_gradcheck(activation: str):
    cfg = tiny_cfg(activation=activation, d_model=4, n_heads=1, d_ff=6)
    torch.manual_seed(0)
    mlp = MLP(cfg, get_provider()).double()
    x = randn(3, 4, dtype=torch.float64).add_(0.1).requires_grad_()  # relu: keep away from the kink
    assert gradcheck(mlp, (x,))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("d_model", [32, 96, 100])
def test_derived_d_ff_of_ungated_mlp_is_four_d_model(activation: str, d_model: int):
    cfg = ModelConfig(activation=activation, d_model=d_model)
    assert cfg.ffn_dim == 4 * d_model


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh", "reglu"])
@pytest.mark.parametrize(
    ("d_model", "multiple", "expected"),
    [(768, 256, 2048), (4096, 256, 11008), (100, 64, 320), (128, 128, 384), (32, 16, 96)],
)
def test_derived_d_ff_of_gated_mlp_is_eight_thirds_rounded_up(
    activation: str, d_model: int, multiple: int, expected: int
):
    cfg = ModelConfig(activation=activation, d_model=d_model, d_ff_multiple=multiple)
    assert cfg.ffn_dim == expected
    assert cfg.ffn_dim % multiple == 0 and cfg.ffn_dim >= 8 * d_model / 3 > cfg.ffn_dim - multiple


def test_explicit_d_ff_wins_and_shapes_the_mlp():
    model = build(d_ff=40, activation="swiglu")
    mlp = model.blocks()[0].mlp
    assert mlp.w_gate.weight.shape == mlp.w_up.weight.shape == (40, 32)
    assert mlp.w_down.weight.shape == (32, 40)


# ----------------------------------------------------------------------------------------- biases


@pytest.mark.parametrize("linear_bias", [False, True])
@pytest.mark.parametrize("norm_bias", [False, True])
def test_linear_and_norm_biases_are_separate_switches(linear_bias: bool, norm_bias: bool):
    model = build(linear_bias=linear_bias, norm_bias=norm_bias, norm="layernorm", qk_norm="layernorm")
    linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(linears) == 7 * model.cfg.n_layers  # q, k, v, o, gate, up, down
    assert all((m.bias is not None) == linear_bias for m in linears)
    assert all((m.bias is not None) == norm_bias for m in norms)
    assert model.head.bias is None, "the output head never has a bias"


def test_rmsnorm_never_has_a_bias():
    with pytest.raises(ConfigError, match=r"model\.norm_bias: \(true\) has no effect: only a layernorm has a bias"):
        build(norm="rmsnorm", norm_bias=True, qk_norm="rmsnorm")  # refused rather than silently ignored
    model = build(norm="rmsnorm", qk_norm="rmsnorm")
    rms_norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(rms_norms) == 4 * model.cfg.n_layers + 1
    assert all([n for n, _ in m.named_parameters()] == ["weight"] for m in rms_norms)


# -------------------------------------------------------------------------------------------- RoPE


def rope_by_hand(vec: torch.Tensor, pos: int, rot_dim: int, theta: float) -> torch.Tensor:
    """Half-split layout: dims (i, i + rot_dim/2) turn by the angle pos * theta^(-2i / rot_dim)."""
    out = vec.clone()
    half = rot_dim // 2
    for i in range(half):
        angle = pos * theta ** (-2 * i / rot_dim)
        a, b = vec[i], vec[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def rotate_at(rotary: Rotary, vec: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotate one head vector as if it stood at position ``pos`` of a sequence."""
    seq = torch.zeros(1, 1, pos + 1, vec.shape[-1], dtype=vec.dtype)
    seq[0, 0, pos] = vec
    return rotary(seq)[0, 0, pos]


@pytest.mark.parametrize("rot_dim", [16, 8, 4])
def test_rope_rotates_pairs_by_position_times_frequency(rot_dim: int):
    rotary = Rotary(head_dim=16, rot_dim=rot_dim, theta=10000.0, max_len=64).double()
    x = randn(1, 1, 64, 16, dtype=torch.float64)
    out = rotary(x)
    for pos in (0, 1, 7, 63):
        torch.testing.assert_close(
            out[0, 0, pos], rope_by_hand(x[0, 0, pos], pos, rot_dim, 10000.0), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("rot_dim", [16, 8])
@pytest.mark.parametrize(("m", "n"), [(5, 2), (2, 5), (9, 9), (20, 3)])
def test_rope_scores_depend_only_on_relative_position(rot_dim: int, m: int, n: int):
    rotary = Rotary(head_dim=16, rot_dim=rot_dim, theta=10000.0, max_len=128).double()
    q, k = randn(16, dtype=torch.float64, seed=1), randn(16, dtype=torch.float64, seed=2)
    score = rotate_at(rotary, q, m) @ rotate_at(rotary, k, n)
    for shift in (1, 17, 100):
        shifted = rotate_at(rotary, q, m + shift) @ rotate_at(rotary, k, n + shift)
        torch.testing.assert_close(shifted, score, atol=1e-5, rtol=1e-5)
    if m != n:  # and the score does depend on the distance
        assert not torch.allclose(rotate_at(rotary, q, m + 1) @ rotate_at(rotary, k, n), score, atol=1e-3)


def test_partial_rope_leaves_the_unrotated_dims_untouched():
    rotary = Rotary(head_dim=16, rot_dim=4, theta=10000.0, max_len=32)
    x = randn(2, 3, 32, 16)
    out = rotary(x)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[..., 1:, :4], x[..., 1:, :4])


def test_rope_at_position_zero_is_the_identity_and_preserves_norms():
    rotary = Rotary(head_dim=16, rot_dim=16, theta=10000.0, max_len=32)
    x = randn(2, 3, 32, 16)
    out = rotary(x)
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize(
    ("head_dim", "fraction", "rot_dim"), [(16, 1.0, 16), (16, 0.5, 8), (16, 0.25, 4), (12, 0.25, 2), (8, 0.3, 2)]
)
def test_rope_fraction_sets_the_rotated_dims(head_dim: int, fraction: float, rot_dim: int):
    model = build(n_heads=2, head_dim=head_dim, rope_fraction=fraction)
    assert model.cfg.rope_dim == rot_dim
    rotaries = {id(layer.attn.rotary) for layer in model.blocks()}
    assert len(rotaries) == 1, "one Rotary is shared by every layer"
    assert model.blocks()[0].attn.rotary.rot_dim == rot_dim


def test_rope_gradcheck():
    rotary = Rotary(head_dim=8, rot_dim=4, theta=100.0, max_len=5).double()
    x = randn(1, 2, 5, 8, dtype=torch.float64).requires_grad_()
    assert gradcheck(rotary, (x,))


# ------------------------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_for_eight_heads_are_powers_of_one_half():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))


@pytest.mark.parametrize(
    ("n_heads", "expected_exponents"),
    [
        (4, [-2, -4, -6, -8]),
        (16, [-0.5 * i for i in range(1, 17)]),
        # not a power of two: the 8-head slopes, then every other slope of the 16-head sequence
        (12, [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]),
        (6, [-2, -4, -6, -8, -1, -3]),
    ],
)
def test_alibi_slopes(n_heads: int, expected_exponents: list[float]):
    torch.testing.assert_close(alibi_slopes(n_heads), torch.tensor([2.0**e for e in expected_exponents]))


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 6)
    assert bias.shape == (4, 6, 6)
    for h in range(4):
        for i in range(6):
            for j in range(i + 1):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))


def test_alibi_model_has_no_position_parameters_and_no_rotary():
    model = build(position="alibi")
    assert model.pos_embed is None and all(layer.attn.rotary is None for layer in model.blocks())
    torch.testing.assert_close(model.blocks()[0].attn.core.slopes, alibi_slopes(4))


# --------------------------------------------------------------------- learned, sinusoidal, none


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(20, 8)
    for pos in range(20):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_are_added_to_the_embeddings():
    model = build(position="sinusoidal")
    assert model.pos_embed is None
    assert not any("pos" in name for name, _ in model.named_parameters()), "the table is not trained"
    t = tokens(seq=10)
    torch.testing.assert_close(model.embed_tokens(t), model.embed.weight[t] + sinusoidal_table(10, 32))


def test_learned_positions_are_a_trained_table_added_to_the_embeddings():
    model = build(position="learned")
    assert model.pos_embed.weight.shape == (16, 32) and model.pos_embed.weight.requires_grad
    t = tokens(seq=10)
    torch.testing.assert_close(model.embed_tokens(t), model.embed.weight[t] + model.pos_embed.weight[:10])


def test_no_positions_adds_nothing():
    model = build(position="none")
    assert model.pos_embed is None and not hasattr(model, "pos_table")
    assert all(layer.attn.rotary is None and not layer.attn.core.alibi for layer in model.blocks())
    t = tokens()
    torch.testing.assert_close(model.embed_tokens(t), model.embed.weight[t])


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_position_kind_changes_only_position_parameters(position: str):
    names = {n for n, _ in build(position=position).named_parameters()}
    base = {n for n, _ in build(position="none").named_parameters()}
    assert names - base == ({"pos_embed.weight"} if position == "learned" else set())


# ------------------------------------------------------------------------------- attention core

SDPA_COMBOS = [
    pytest.param(dict(position=pos, n_kv_heads=kv, softmax_scale=scale, **window), id=f"{pos}-kv{kv}-{scale}-{wid}")
    for pos in ("rope", "alibi")
    for kv in (4, 2, 1)
    for scale in (None, 0.3)
    for wid, window in (("full", {}), ("window3", LOCAL))
]


def _reference_kwargs(core: AttentionCore) -> dict[str, Any]:
    return dict(
        scale=core.scale,
        window=core.window,
        slopes=core.slopes if core.alibi else None,
        cap=core.softcap,
        off_by_one=core.off_by_one,
    )


@pytest.mark.parametrize("overrides", SDPA_COMBOS)
def test_sdpa_path_equals_exact_path_and_reference(overrides: dict[str, Any]):
    cfg = tiny_cfg(**overrides)
    core = AttentionCore(cfg, layer=0)
    assert core.use_sdpa
    q, k, v = qkv(kv=cfg.kv_heads)
    sdpa, exact = core(q, k, v), core.exact(q, k, v)
    torch.testing.assert_close(sdpa, exact)
    torch.testing.assert_close(exact, attention_by_hand(q, k, v, **_reference_kwargs(core)))


EXACT_ONLY_COMBOS = [
    pytest.param(dict(position=pos, n_kv_heads=kv, **choice, **window), id=f"{pos}-kv{kv}-{cid}-{wid}")
    for pos in ("rope", "alibi")
    for kv in (4, 1)
    for cid, choice in (
        ("softcap", dict(attn_softcap=2.0)),
        ("off-by-one", dict(softmax_off_by_one=True)),
        ("both", dict(attn_softcap=2.0, softmax_off_by_one=True)),
    )
    for wid, window in (("full", {}), ("window3", LOCAL))
]


@pytest.mark.parametrize("overrides", EXACT_ONLY_COMBOS)
def test_softcap_and_off_by_one_take_the_exact_path_and_match_reference(overrides: dict[str, Any]):
    cfg = tiny_cfg(**overrides)
    core = AttentionCore(cfg, layer=0)
    assert not core.use_sdpa
    q, k, v = qkv(kv=cfg.kv_heads)
    torch.testing.assert_close(core(q, k, v), attention_by_hand(q, k, v, **_reference_kwargs(core)))


@pytest.mark.parametrize(
    "overrides", [{}, dict(position="alibi", **LOCAL), dict(attn_softcap=3.0, softmax_off_by_one=True)]
)
def test_attention_core_gradcheck(overrides: dict[str, Any]):
    core = AttentionCore(tiny_cfg(n_kv_heads=2, **overrides), layer=0)
    q, k, v = (t.requires_grad_() for t in qkv(b=1, kv=2, s=4, d=3))
    assert gradcheck(core, (q, k, v))
    assert gradcheck(core.exact, (q, k, v))


def test_default_softmax_scale_is_one_over_sqrt_head_dim():
    assert AttentionCore(tiny_cfg(), layer=0).scale == pytest.approx(1 / math.sqrt(8))
    assert AttentionCore(tiny_cfg(softmax_scale=0.125), layer=0).scale == 0.125


def test_softmax_scale_multiplies_the_logits():
    q, k, _ = qkv()
    probs = probabilities(AttentionCore(tiny_cfg(softmax_scale=0.7), layer=0), q, k)
    logits = 0.7 * q @ k.transpose(-1, -2)
    expected = logits.masked_fill(~attention_mask(7, None), float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected)


# --------------------------------------------------------------------------------- GQA and MQA


def expand_kv_heads(
    state: dict[str, torch.Tensor], kv_heads: int, n_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """GQA weights -> the MHA weights that compute the same function: each K/V head repeated for its group."""
    out = {}
    for name, w in state.items():
        if name.endswith(("attn.wk.weight", "attn.wv.weight", "attn.wk.bias", "attn.wv.bias")):
            heads = w.reshape(kv_heads, head_dim, *w.shape[1:])
            w = heads.repeat_interleave(n_heads // kv_heads, dim=0).reshape(n_heads * head_dim, *w.shape[1:])
        out[name] = w
    return out


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize(
    "overrides",
    [{}, dict(position="alibi"), dict(attn_softcap=5.0, softmax_off_by_one=True), dict(qk_norm="rmsnorm", **LOCAL)],
    ids=["sdpa", "alibi", "exact", "qk-norm-window"],
)
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(kv_heads: int, overrides: dict[str, Any]):
    gqa = build(n_kv_heads=kv_heads, linear_bias=True, **overrides)
    mha = build(n_kv_heads=None, linear_bias=True, **overrides)
    assert gqa.blocks()[0].attn.wk.weight.shape == (kv_heads * 8, 32)
    mha.load_state_dict(expand_kv_heads(gqa.state_dict(), kv_heads, 4, 8))
    t = tokens()
    torch.testing.assert_close(gqa(t), mha(t))


# -------------------------------------------------------------------------- off-by-one softmax


def test_off_by_one_softmax_equals_its_formula():
    core = AttentionCore(tiny_cfg(softmax_off_by_one=True), layer=0)
    q, k, _ = qkv()
    x = core.scale * q @ k.transpose(-1, -2)
    e = torch.exp(x).masked_fill(~attention_mask(7, None), 0.0)
    torch.testing.assert_close(probabilities(core, q, k), e / (1 + e.sum(-1, keepdim=True)))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-3), (torch.float64, 1e-7)], ids=["fp32", "fp64"])
def test_off_by_one_softmax_is_stable_for_large_logits(dtype: torch.dtype, tol: float):
    core = AttentionCore(tiny_cfg(softmax_off_by_one=True, softmax_scale=1.0), layer=0)
    q, k, _ = qkv(dtype=dtype)
    q = 1000.0 * q / q.norm(dim=-1, keepdim=True)  # scores in the thousands: exp() overflows fp32 and fp64
    probs = probabilities(core, q, k)
    assert torch.isfinite(probs).all()
    x = (q.double() @ k.double().transpose(-1, -2)).masked_fill(~attention_mask(7, None), float("-inf"))
    log_denominator = torch.logaddexp(torch.zeros((), dtype=torch.float64), torch.logsumexp(x, -1, keepdim=True))
    torch.testing.assert_close(probs.double(), torch.exp(x - log_denominator), atol=tol, rtol=tol)


def test_off_by_one_head_can_attend_to_nothing():
    q = torch.full((2, 4, 7, 8), 2.5, dtype=torch.float64)
    k = -q  # every score q.k = -50
    off = probabilities(AttentionCore(tiny_cfg(softmax_off_by_one=True, softmax_scale=1.0), layer=0), q, k)
    plain = probabilities(AttentionCore(tiny_cfg(softmax_scale=1.0), layer=0), q, k)
    assert off.sum(-1).max() < 1e-20, "a head whose scores are all very negative attends to ~nothing"
    torch.testing.assert_close(plain.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))


def test_off_by_one_rows_sum_to_less_than_one():
    q, k, _ = qkv()
    probs = probabilities(AttentionCore(tiny_cfg(softmax_off_by_one=True), layer=0), q, k)
    assert (probs.sum(-1) < 1).all() and (probs >= 0).all()


# -------------------------------------------------------------------------------------- softcap


def test_attention_softcap_is_cap_tanh_before_the_mask():
    cap = 1.5
    core = AttentionCore(tiny_cfg(attn_softcap=cap, softmax_scale=1.0), layer=0)
    q, k, _ = qkv()
    logits = q @ k.transpose(-1, -2)
    capped = (cap * torch.tanh(logits / cap)).masked_fill(~attention_mask(7, None), float("-inf"))
    torch.testing.assert_close(probabilities(core, q, k), capped.softmax(-1))


def test_attention_softcap_comes_after_the_scale_and_before_the_alibi_bias():
    cap = 1.5
    core = AttentionCore(tiny_cfg(attn_softcap=cap, position="alibi", softmax_scale=0.5), layer=0)
    q, k, _ = qkv()
    x = cap * torch.tanh(0.5 * q @ k.transpose(-1, -2) / cap) + alibi_bias(alibi_slopes(4), 7).double()
    expected = x.masked_fill(~attention_mask(7, None), float("-inf")).softmax(-1)
    torch.testing.assert_close(probabilities(core, q, k), expected)


# --------------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("window", [1, 2, 3, 7, 10])
def test_attention_mask_is_causal_within_the_window(window: int):
    mask = attention_mask(7, window)
    for i in range(7):
        for j in range(7):
            assert mask[i, j].item() == (j <= i and i - j < window)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["sdpa", "exact"])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_sliding_window_equals_an_explicit_mask(softcap: float | None, window: int):
    core = AttentionCore(tiny_cfg(sliding_window=window, layer_pattern=["local"], attn_softcap=softcap), layer=0)
    assert core.window == window
    q, k, v = qkv()
    x = core.scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = torch.tensor([[j <= i and i - j < window for j in range(7)] for i in range(7)])
    expected = x.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(core(q, k, v), expected)
    torch.testing.assert_close(core.exact(q, k, v), expected)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (["local", "global"], [3, None, 3, None, 3]),
        (["global", "local"], [None, 3, None, 3, None]),
        (["local"], [3, 3, 3, 3, 3]),
        (["local", "local", "global"], [3, 3, None, 3, 3]),
    ],
)
def test_layer_pattern_repeats_over_the_layers(pattern: list[str], expected: list[int | None]):
    model = build(n_layers=5, sliding_window=3, layer_pattern=pattern)
    assert [layer.attn.core.window for layer in model.blocks()] == expected


def test_no_sliding_window_means_every_layer_is_global():
    model = build(n_layers=3)
    assert [layer.attn.core.window for layer in model.blocks()] == [None, None, None]


@pytest.mark.parametrize(
    "overrides", [{}, dict(attn_softcap=4.0), dict(position="alibi")], ids=["sdpa", "exact", "alibi"]
)
@pytest.mark.parametrize(("window", "seq"), [(16, 16), (16, 9), (9, 9)])
def test_window_at_least_the_sequence_equals_full_causal(overrides: dict[str, Any], window: int, seq: int):
    full = build(**overrides)
    windowed = twin(full, sliding_window=window, layer_pattern=["local"])
    t = tokens(seq=seq)
    torch.testing.assert_close(windowed(t), full(t))


def test_a_short_window_changes_the_output():
    full = build()
    windowed = twin(full, sliding_window=2, layer_pattern=["local"])
    t = tokens(seq=8)
    torch.testing.assert_close(windowed(t)[:, :2], full(t)[:, :2])
    assert not torch.allclose(windowed(t)[:, 2:], full(t)[:, 2:])


# ------------------------------------------------------------------------------------------ blocks


def block_by_formula(block: Block, x: torch.Tensor, parallel: bool, placement: str) -> torch.Tensor:
    a, m, n1, n2 = block.attn, block.mlp, block.norm1, block.norm2
    if placement == "reordered":  # OLMo 2: x + norm(f(x))
        if parallel:
            return x + block.post_attn_norm(a(x)) + block.post_mlp_norm(m(x))
        h = x + block.post_attn_norm(a(x))
        return h + block.post_mlp_norm(m(h))
    if parallel:
        if placement == "pre":
            return x + a(n1(x)) + m(n1(x))
        if placement == "post":
            return n1(x + a(x) + m(x))
        return x + block.post_attn_norm(a(n1(x))) + block.post_mlp_norm(m(n1(x)))
    if placement == "pre":
        h = x + a(n1(x))
        return h + m(n2(h))
    if placement == "post":
        h = n1(x + a(x))
        return n2(h + m(h))
    h = x + block.post_attn_norm(a(n1(x)))
    return h + block.post_mlp_norm(m(n2(h)))


@pytest.mark.parametrize("kind", ["serial", "parallel"])
@pytest.mark.parametrize("placement", ["pre", "post", "sandwich", "reordered"])
def test_block_equals_its_formula(kind: str, placement: str):
    cfg = tiny_cfg(block=kind, norm_placement=placement, norm="layernorm", norm_bias=True)
    torch.manual_seed(0)
    block = Block(cfg, 0, get_provider(), rotary=None)
    randomize_norm_gains(block)
    x = randn(2, 6, cfg.d_model)
    torch.testing.assert_close(block(x), block_by_formula(block, x, kind == "parallel", placement))


@pytest.mark.parametrize(
    ("kind", "placement", "norms"),
    [
        ("serial", "pre", {"norm1", "norm2"}),
        ("serial", "post", {"norm1", "norm2"}),
        ("serial", "sandwich", {"norm1", "norm2", "post_attn_norm", "post_mlp_norm"}),
        ("parallel", "pre", {"norm1"}),
        ("parallel", "post", {"norm1"}),
        ("parallel", "sandwich", {"norm1", "post_attn_norm", "post_mlp_norm"}),
        ("serial", "reordered", {"post_attn_norm", "post_mlp_norm"}),
        ("parallel", "reordered", {"post_attn_norm", "post_mlp_norm"}),
    ],
)
def test_block_has_exactly_the_norms_it_uses(kind: str, placement: str, norms: set[str]):
    block = Block(tiny_cfg(block=kind, norm_placement=placement), 0, get_provider(), rotary=None)
    assert {n.split(".")[0] for n, _ in block.named_parameters() if "norm" in n.split(".")[0]} == norms


def test_parallel_block_equals_x_plus_attn_plus_mlp_of_one_norm():
    cfg = tiny_cfg(block="parallel")
    torch.manual_seed(0)
    block = Block(cfg, 0, get_provider(), rotary=None)
    randomize_norm_gains(block)
    x = randn(2, 6, cfg.d_model)
    h = rms_norm_by_hand(x, block.norm1.weight, cfg.norm_eps)
    torch.testing.assert_close(block(x), x + block.attn(h) + block.mlp(h))


# --------------------------------------------------------------------------- embeddings and head


def test_tied_embeddings_share_storage_with_the_head():
    model = build(tie_embeddings=True)
    assert model.head is None
    assert "head.weight" not in model.state_dict()
    x = randn(2, 5, 32)
    h = model.final_norm(x)
    torch.testing.assert_close(model.output_logits(x), h @ model.embed.weight[:50].T)
    with torch.no_grad():
        model.embed.weight[3].add_(1.0)  # one tensor: the lookup and the head see the change
    torch.testing.assert_close(model.output_logits(x)[..., 3], h @ model.embed.weight[3])
    untied = build(tie_embeddings=False)
    assert untied.num_params() - model.num_params() == model.cfg.padded_vocab_size * 32


def test_tied_embedding_gets_gradient_from_input_and_output():
    model = build(tie_embeddings=True, n_layers=1)
    t = tokens()
    model(t).sum().backward()
    unused = sorted(set(range(50)) - set(t.flatten().tolist()))
    assert unused
    assert (model.embed.weight.grad[unused].abs().sum(-1) > 0).all(), "rows never looked up get the head's gradient"


def test_embed_scale_multiplies_embeddings_by_sqrt_d_model():
    model = build(embed_scale=True, position="none")
    t = tokens()
    torch.testing.assert_close(model.embed_tokens(t), model.embed.weight[t] * math.sqrt(32))


def test_output_logit_scale_multiplies_logits_by_one_over_sqrt_d_model():
    plain = build(tie_embeddings=True)
    scaled = twin(plain, output_logit_scale=True)
    t = tokens()
    torch.testing.assert_close(scaled(t), plain(t) / math.sqrt(32))


@pytest.mark.parametrize(("vocab", "multiple", "padded"), [(50, 16, 64), (64, 16, 64), (257, 128, 384), (1, 8, 8)])
def test_vocabulary_is_padded_but_logits_have_vocab_size(vocab: int, multiple: int, padded: int):
    model = build(vocab_size=vocab, pad_vocab_multiple=multiple)
    assert model.embed.weight.shape == (padded, 32)
    assert model.head.weight.shape == (padded, 32)
    assert model(tokens(vocab=vocab)).shape == (2, 12, vocab)


def test_final_logit_softcap_is_cap_tanh_of_the_logits():
    plain = build()
    capped = twin(plain, final_logit_softcap=0.5)
    t = tokens()
    torch.testing.assert_close(capped(t), 0.5 * torch.tanh(plain(t) / 0.5))
    assert capped(t).abs().max() < 0.5


def test_sequence_longer_than_seq_len_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        build()(tokens(seq=17))


# ------------------------------------------------------------------------------------------- loss


def test_loss_is_mean_cross_entropy():
    logits, targets = randn(2, 5, 11), tokens(2, 5, vocab=11)
    loss, parts = lm_loss(logits, targets)
    log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["ce"], expected)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignored_targets_are_excluded_from_the_mean(ignore_index: int):
    logits, targets = randn(2, 5, 11), tokens(2, 5, vocab=11)
    ignored = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    masked = targets.masked_fill(ignored, ignore_index)
    loss, _ = lm_loss(logits, masked, ignore_index=ignore_index)
    kept = F.cross_entropy(logits[~ignored], targets[~ignored])
    torch.testing.assert_close(loss, kept)
    loss_other, _ = lm_loss(
        logits + 10 * ignored[..., None] * randn(2, 5, 11, seed=3), masked, ignore_index=ignore_index
    )
    torch.testing.assert_close(loss_other, loss)


def test_z_loss_is_coef_times_mean_squared_logsumexp_over_kept_tokens():
    logits, targets = randn(2, 5, 11) * 3 + 2, tokens(2, 5, vocab=11)
    targets[0, 2] = targets[1, 4] = -100
    keep = targets != -100
    loss, parts = lm_loss(logits, targets, z_loss=1e-2)
    ce = F.cross_entropy(logits[keep], targets[keep])
    z = 1e-2 * (torch.logsumexp(logits[keep], -1) ** 2).mean()
    torch.testing.assert_close(parts["z_loss"], z)
    torch.testing.assert_close(loss, ce + z)


def test_zero_z_loss_adds_nothing():
    logits, targets = randn(2, 5, 11) * 3 + 2, tokens(2, 5, vocab=11)
    loss, parts = lm_loss(logits, targets, z_loss=0.0)
    assert "z_loss" not in parts
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_loss_gradcheck_with_z_loss():
    logits = randn(2, 3, 5, dtype=torch.float64).requires_grad_()
    targets = tokens(2, 3, vocab=5)
    targets[0, 1] = -100
    assert gradcheck(lambda x: lm_loss(x, targets, z_loss=0.1)[0], (logits,))


# ---------------------------------------------------------------------------------------- dropout


def test_zero_dropout_train_and_eval_outputs_are_identical():
    model = build(attn_softcap=5.0, n_kv_heads=2)  # the exact path too
    t = tokens()
    train_out = model.train()(t)
    torch.testing.assert_close(model.eval()(t), train_out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(embed_dropout=0.3),
        dict(attn_dropout=0.3),
        dict(attn_dropout=0.3, attn_softcap=5.0),
        dict(resid_dropout=0.3),
        dict(resid_dropout=0.3, block="parallel"),
    ],
    ids=["embed", "attn-sdpa", "attn-exact", "resid", "resid-parallel"],
)
def test_dropout_is_stochastic_in_train_and_off_in_eval(overrides: dict[str, Any]):
    model = build(**overrides)
    no_dropout = twin(model, embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    t = tokens()
    model.train()
    torch.manual_seed(1)
    first = model(t)
    assert not torch.allclose(model(t), first), "two training forwards draw different masks"
    model.eval()
    torch.testing.assert_close(model(t), model(t), rtol=0, atol=0)
    torch.testing.assert_close(model(t), no_dropout.eval()(t))


# -------------------------------------------------------------------------------------- causality

ATTENTION_VARIANTS = {
    "rope-sdpa": {},
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "partial-rope": dict(rope_fraction=0.5),
    "alibi": dict(position="alibi"),
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "no-positions": dict(position="none"),
    "sliding-window": dict(sliding_window=2, layer_pattern=["local"]),
    "local-global": dict(sliding_window=2, layer_pattern=["local", "global"]),
    "alibi-window": dict(position="alibi", sliding_window=3, layer_pattern=["local"]),
    "softcap": dict(attn_softcap=2.0),
    "off-by-one": dict(softmax_off_by_one=True),
    "off-by-one-window-gqa": dict(softmax_off_by_one=True, sliding_window=3, layer_pattern=["local"], n_kv_heads=2),
    "qk-norm": dict(qk_norm="layernorm"),
    "parallel-sandwich": dict(block="parallel", norm_placement="sandwich"),
    "post-norm": dict(norm_placement="post"),
    "olmo2-reordered-projection-qk-norm": dict(
        norm_placement="reordered", qk_norm="rmsnorm", qk_norm_scope="projection"
    ),
    "embed-norm": dict(embed_norm=True),
}


@pytest.mark.parametrize("overrides", list(ATTENTION_VARIANTS.values()), ids=list(ATTENTION_VARIANTS))
@pytest.mark.parametrize("t", [0, 5, 11])
def test_changing_token_t_does_not_change_earlier_logits(overrides: dict[str, Any], t: int):
    model = build(**overrides)
    a = tokens(seq=12)
    b = a.clone()
    b[:, t] = (b[:, t] + 7) % 50
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :t], lb[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(la[:, t], lb[:, t]), "token t itself does change its logits"


# ------------------------------------------------------------------------------ whole-model gradcheck

GRADCHECK_MODELS = {
    "llama": dict(n_kv_heads=2, qk_norm="rmsnorm", rope_fraction=0.5),
    "gpt2": dict(
        position="learned",
        norm="layernorm",
        norm_bias=True,
        linear_bias=True,
        activation="gelu_tanh",
        tie_embeddings=True,
        d_ff=12,
    ),
    "gemma2": dict(
        norm_placement="sandwich",
        norm_unit_offset=True,
        activation="geglu_tanh",
        attn_softcap=3.0,
        final_logit_softcap=4.0,
        sliding_window=3,
        layer_pattern=["local", "global"],
        tie_embeddings=True,
        embed_scale=True,
        n_kv_heads=1,
    ),
    "palm-ish": dict(
        block="parallel",
        position="alibi",
        softmax_off_by_one=True,
        output_logit_scale=True,
        tie_embeddings=True,
        activation="reglu",
        embed_norm=True,
    ),
    "t5-post-sinusoidal": dict(init="t5", norm_placement="post", position="sinusoidal", activation="silu"),
}


@pytest.mark.parametrize("overrides", list(GRADCHECK_MODELS.values()), ids=list(GRADCHECK_MODELS))
def test_whole_model_gradcheck(overrides: dict[str, Any]):
    tiny = dict(vocab_size=11, pad_vocab_multiple=4, d_model=8, n_heads=2, d_ff_multiple=4, seq_len=6, init_std=0.3)
    model = build(**{**tiny, **overrides}).double()
    randomize_norm_gains(model)
    t = tokens(2, 5, vocab=11)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def logits(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps, strict=True)), (t,))

    assert logits(*params).dtype == torch.float64
    assert gradcheck(logits, params, fast_mode=True)


def test_loss_with_every_target_ignored_is_zero_not_nan() -> None:
    from tplus_dist.model.loss import lm_loss

    logits = torch.randn(2, 3, 7, requires_grad=True)
    targets = torch.full((2, 3), -100)
    loss, parts = lm_loss(logits, targets, z_loss=1e-4)
    assert loss.item() == 0.0 and parts["z_loss"].item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
