"""train.compile (train/compile.py): every decoder block compiled in place, fullgraph, with the eager model's names.

The blocks are traced with torch.compile's "aot_eager" backend: the same Dynamo capture of the forward (fullgraph:
any graph break fails) and AOTAutograd's traced backward as inductor gets, without generating C++ kernels, so the
test takes seconds on a CPU. Inductor's own kernels (and FlashAttention under them) are checked on the GPU
(tests/gpu). The expected values are the eager model's loss and gradients."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tplus_dist.config import ModelConfig
from tplus_dist.model import build_model
from tplus_dist.model.block import Block
from tplus_dist.train.compile import apply_compile

BASE: dict[str, Any] = dict(vocab_size=64, pad_vocab_multiple=16, n_layers=3, d_model=32, n_heads=4, seq_len=16)
VARIANTS = {
    "llama": dict(n_kv_heads=2, d_ff_multiple=16),
    # masks and biases (SDPA with an additive mask), the exact path (soft-capping), QK-norm, a parallel block
    "many": dict(
        position="alibi",
        sliding_window=4,
        layer_pattern=["local", "global"],
        attn_softcap=30.0,
        qk_norm="rmsnorm",
        block="parallel",
        activation="gelu",
        linear_bias=True,
        resid_dropout=0.1,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_blocks_give_the_eager_loss_gradients_and_names(variant: str) -> None:
    cfg = ModelConfig(**BASE, **VARIANTS[variant])
    cfg.validate()
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    assert apply_compile(compiled, backend="aot_eager") == cfg.n_layers
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(3)  # the same dropout masks: the compiled graph draws from the same generator
        loss, _ = model.loss(model(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p), (name_c, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        assert name == name_c  # in place: no "_orig_mod." prefix, so checkpoints do not see the compile
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert list(eager.state_dict()) == list(compiled.state_dict())
    # each block's forward is the compiled one
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.modules() if isinstance(b, Block))


def test_a_model_without_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"train\.compile: no decoder block found in Linear"):
        apply_compile(torch.nn.Linear(2, 2))
