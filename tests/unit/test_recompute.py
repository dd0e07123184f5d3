"""Activation recompute (train/recompute.py) on one process, fp32, dropout on.

Expected values come from the same model without recompute (plain PyTorch autograd) and from hand counts: the
recomputed run must be bit-for-bit the plain one (torch checkpoint replays the RNG), keep fewer bytes for backward
(measured with saved-tensor hooks), exactly one block input per layer for full recompute, and its backward must do
the forward FLOPs of the recomputed part once more (torch's FlopCounterMode)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from tplus_dist.config import ConfigError, ModelConfig
from tplus_dist.config.sections import ParallelConfig
from tplus_dist.memory import saved_tensor_bytes
from tplus_dist.model import build_model
from tplus_dist.model.decoder import Decoder
from tplus_dist.train.recompute import apply_recompute

B = 2
CFG: dict[str, Any] = dict(
    vocab_size=64,
    pad_vocab_multiple=16,
    n_layers=4,
    d_model=32,
    n_heads=4,
    seq_len=16,
    attn_dropout=0.1,
    resid_dropout=0.1,
    embed_dropout=0.1,
)
MODES: dict[str, dict[str, Any]] = {
    "full_uniform_1": dict(recompute_granularity="full"),
    "full_uniform_2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_uniform_3": dict(recompute_granularity="full", recompute_num_layers=3),  # groups of 3 and 1
    "full_block_2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective_core_attn": dict(recompute_granularity="selective"),
    "selective_mlp_act": dict(recompute_granularity="selective", recompute_modules=["mlp_act"]),
    "selective_layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
    "selective_all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp_act", "layernorm"]),
}


def model_cfg(**over: Any) -> ModelConfig:
    cfg = ModelConfig(**{**CFG, **over})
    cfg.validate()
    return cfg


def parallel(mode: str) -> ParallelConfig:
    p = ParallelConfig(**MODES[mode])
    p.validate()
    return p


def batch(cfg: ModelConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)
    return x, torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)


def train(model: Decoder, steps: int = 5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Plain AdamW steps with dropout; returns the losses and pre-clip gradient norms."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1234)  # the dropout masks: both runs draw the same sequence (checkpoint restores the RNG)
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(model.cfg, step)
        loss, _ = model.loss(model(x), y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, norms


@pytest.mark.parametrize("variant", ["llama", "t5_shared_parallel_gelu"])
def test_every_mode_is_bit_equal_to_no_recompute(variant: str) -> None:
    over = {} if variant == "llama" else dict(position="t5_bias", block="parallel", activation="gelu", norm="layernorm")
    cfg = model_cfg(**over)
    torch.manual_seed(0)
    plain = build_model(cfg)
    ref_losses, ref_norms = train(copy.deepcopy(plain))
    ref = copy.deepcopy(plain)
    train(ref)
    # the second variant (shared T5 bias handed to every layer, parallel blocks, LayerNorm, GELU): the modes whose
    # checkpoints take the bias as an input (groups of 2, block) and every selective piece
    modes = list(MODES) if variant == "llama" else ["full_uniform_2", "full_block_2", "selective_all"]
    for mode in modes:
        model = copy.deepcopy(plain)
        assert apply_recompute(model, parallel(mode)) > 0
        assert list(model.state_dict()) == list(plain.state_dict())
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
        losses, norms = train(model)
        for a, b in zip(losses + norms, ref_losses + ref_norms, strict=True):
            assert torch.equal(a, b), (mode, a, b)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), (mode, name)


def _bytes(model: Decoder, fn_of_model: Any) -> int:
    return saved_tensor_bytes(lambda: fn_of_model(model), exclude=list(model.buffers()))


def test_saved_bytes_fall_in_every_mode_and_full_keeps_one_input_per_layer() -> None:
    cfg = model_cfg()
    torch.manual_seed(0)
    plain = build_model(cfg)
    x, y = batch(cfg, 0)

    def whole(m: Decoder) -> None:
        torch.manual_seed(5)
        m.loss(m(x), y)

    def without_blocks(m: Decoder) -> None:  # embedding, final norm, head and loss: the parts outside the blocks
        torch.manual_seed(5)
        m.loss(m.output_logits(m.embed_tokens(x)), y)

    none = _bytes(plain, whole)
    outside = _bytes(plain, without_blocks)
    seen = {}
    for mode in MODES:
        model = copy.deepcopy(plain)
        apply_recompute(model, parallel(mode))
        seen[mode] = _bytes(model, whole)
        assert seen[mode] < none, (mode, seen[mode], none)
    # full, one layer per group: each block keeps its input [B, S, d] fp32, nothing else
    assert seen["full_uniform_1"] == outside + cfg.n_layers * B * cfg.seq_len * cfg.d_model * 4
    # groups of 2 keep half the inputs; block 2 of 4 keeps 2 inputs and the 2 other layers whole
    assert seen["full_uniform_2"] == outside + 2 * B * cfg.seq_len * cfg.d_model * 4
    assert seen["full_uniform_1"] > seen["full_uniform_2"]
    assert seen["full_block_2"] > seen["full_uniform_1"]


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_backward_flops_rise_by_the_recomputed_forward() -> None:
    cfg = model_cfg()
    torch.manual_seed(0)
    plain = build_model(cfg)
    x, y = batch(cfg, 0)

    def fwd_bwd(m: Decoder) -> tuple[int, int]:
        holder: dict[str, torch.Tensor] = {}
        forward = _flops(lambda: holder.setdefault("loss", m.loss(m(x), y)[0]))
        backward = _flops(lambda: holder["loss"].backward())
        return forward, backward

    fwd, bwd = fwd_bwd(copy.deepcopy(plain))
    # the blocks' forward FLOPs: the whole forward less the parts outside the blocks (a plain forward each)
    outside = _flops(lambda: plain.loss(plain.output_logits(plain.embed_tokens(x)), y))
    blocks = fwd - outside
    core = sum(_flops(lambda b=b: b.attn.core(*qkv(b))) for b in plain.blocks())
    expected = {
        "full_uniform_1": blocks,
        "full_uniform_2": blocks,
        "full_block_2": blocks // 2,
        "selective_core_attn": core,
        "selective_mlp_act": 0,  # elementwise: FlopCounterMode counts matrix products only
        "selective_layernorm": 0,
    }
    for mode, rise in expected.items():
        model = copy.deepcopy(plain)
        apply_recompute(model, parallel(mode))
        # torch stops a recompute once backward has every tensor it saved (checkpoint's early stop): with it off,
        # the recompute is the recomputed part's whole forward; with it on (the default), at most that
        with set_checkpoint_early_stop(False):
            f, b = fwd_bwd(model)
        assert f == fwd, mode
        assert b - bwd == rise, (mode, b - bwd, rise)
        model = copy.deepcopy(plain)
        apply_recompute(model, parallel(mode))
        f, b = fwd_bwd(model)
        assert 0 <= b - bwd <= rise, (mode, b - bwd, rise)
    assert core > 0 and blocks > core


def qkv(block: Any) -> tuple[torch.Tensor, ...]:
    """Random q, k, v [B, heads, S, head_dim] for one attention core's forward."""
    g = torch.Generator().manual_seed(0)
    heads, dh = CFG["n_heads"], CFG["d_model"] // CFG["n_heads"]
    return tuple(torch.randn(B, heads, CFG["seq_len"], dh, generator=g) for _ in range(3))


def test_compiled_blocks_with_full_recompute_match_eager() -> None:
    from tplus_dist.train.compile import apply_compile

    cfg = model_cfg()
    torch.manual_seed(0)
    plain = build_model(cfg)
    ref_losses, _ = train(copy.deepcopy(plain), steps=2)
    model = copy.deepcopy(plain)
    apply_recompute(model, parallel("full_uniform_1"))
    apply_compile(model, backend="aot_eager")
    losses, _ = train(model, steps=2)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=1e-6)


def test_adaln_labels_pass_through_checkpointed_groups() -> None:
    cfg = model_cfg(adaln="adaln_zero", n_conditions=3)
    torch.manual_seed(0)
    plain = build_model(cfg)
    x, y = batch(cfg, 0)
    labels = torch.tensor([0, 2])
    outs = []
    for mode in (None, "full_uniform_2", "selective_all"):
        model = copy.deepcopy(plain)
        if mode:
            apply_recompute(model, parallel(mode))
        torch.manual_seed(9)
        loss, _ = model.loss(model(x, labels), y)
        loss.backward()
        outs.append((loss.detach(), [p.grad for p in model.parameters()]))
    for loss, grads in outs[1:]:
        assert torch.equal(loss, outs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, outs[0][1], strict=True))


BAD = [
    (dict(recompute_granularity="partial"), "parallel.recompute_granularity"),
    (dict(recompute_method="uniform"), "parallel.recompute_method"),
    (dict(recompute_granularity="selective", recompute_method="block"), "parallel.recompute_method"),
    (dict(recompute_granularity="selective", recompute_num_layers=1), "parallel.recompute_num_layers"),
    (dict(recompute_granularity="full", recompute_num_layers=0), "parallel.recompute_num_layers"),
    (dict(recompute_granularity="full", recompute_modules=["mlp_act"]), "parallel.recompute_modules"),
    (dict(recompute_granularity="selective", recompute_modules=["mlp"]), "parallel.recompute_modules"),
    (dict(recompute_granularity="selective", recompute_modules=[]), "parallel.recompute_modules"),
    (dict(recompute_granularity="full", recompute_method="sometimes"), "parallel.recompute_method"),
]


@pytest.mark.parametrize(("fields", "field"), BAD)
def test_bad_recompute_settings_are_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        ParallelConfig(**fields).validate()
    assert e.value.field == field


def test_num_layers_beyond_a_pipeline_stage_is_refused() -> None:
    from tplus_dist.config import RunConfig

    cfg = RunConfig()
    cfg.model = model_cfg()
    cfg.parallel = ParallelConfig(
        pipeline_parallel=2, zero_stage=1, recompute_granularity="full", recompute_num_layers=3
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == "parallel.recompute_num_layers" and "2 layers of a pipeline stage" in str(e.value)
    cfg.parallel.recompute_num_layers = 2
    cfg.validate()
    cfg.parallel = ParallelConfig(recompute_granularity="full")
    cfg.precision.fp8 = "delayed"
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == "parallel.recompute_granularity"
    # applied twice, or to a module without blocks: refused naming the field
    model = build_model(model_cfg())
    apply_recompute(model, ParallelConfig(recompute_granularity="full"))
    with pytest.raises(ValueError, match=r"parallel\.recompute_granularity"):
        apply_recompute(model, ParallelConfig(recompute_granularity="full"))
    with pytest.raises(ValueError, match=r"parallel\.recompute_granularity"):
        apply_recompute(torch.nn.Linear(2, 2), ParallelConfig(recompute_granularity="full"))
