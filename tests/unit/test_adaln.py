"""Adaptive LayerNorm from a per-sequence label (DiT's adaLN / adaLN-Zero): at initialisation the conditioned
model is exactly the plain one, a label changes the output once trained, no label is the plain model, and a label
out of range or a model without conditioning is refused by name."""

from __future__ import annotations

import pytest
import torch

from tplus_dist.config import ConfigError, ModelConfig, load_config
from tplus_dist.model import build_model


def cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=64, pad_vocab_multiple=8, n_layers=2, d_model=32, n_heads=4, seq_len=16,
                                   adaln="adaln_zero", n_conditions=3)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["adaln", "adaln_zero"])
@pytest.mark.parametrize("block", ["serial", "parallel"])
def test_at_initialisation_the_conditioned_model_is_the_plain_one(kind: str, block: str):
    x = torch.randint(0, 64, (3, 16))
    torch.manual_seed(0)
    plain = build_model(cfg(adaln="none", n_conditions=0, block=block))
    torch.manual_seed(0)
    conditioned = build_model(cfg(adaln=kind, block=block))
    shared = {n: p for n, p in conditioned.state_dict().items() if n in plain.state_dict()}
    assert all(torch.equal(shared[n], p) for n, p in plain.state_dict().items())  # the same draws
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(conditioned(x, labels), plain(x))
    assert torch.equal(conditioned(x), plain(x))  # no label: the plain model


def test_a_label_changes_the_output_after_training_and_no_label_stays_plain():
    torch.manual_seed(0)
    model = build_model(cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (6, 16))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(5):  # each label's sequences ask for something else: the modulation must learn
        loss, _ = model.loss(model(x[:, :-1], labels), (x[:, 1:] + labels[:, None]) % 64)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.layers["0"].ada.weight.abs().sum() > 0
    one = x[:1, :-1]
    outs = [model(one, torch.tensor([c])) for c in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    # without a label the blocks skip the modulation entirely: the plain path of the same weights
    plain_blocks = model(one)
    assert not torch.allclose(plain_blocks, outs[0])


def test_bad_labels_and_settings_are_named():
    model = build_model(cfg())
    x = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match=r"condition label 3 is outside model.n_conditions \(0 .. 2\)"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"model\.adaln is none"):
        build_model(cfg(adaln="none", n_conditions=0))(x, torch.tensor([0, 1]))
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["--model.adaln=adaln"])
    assert info.value.field == "model.n_conditions"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["--model.adaln=adaln", "--model.n_conditions=4", "--model.norm_placement=post"])
    assert info.value.field == "model.norm_placement"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["--model.adaln=adaln", "--model.n_conditions=4", "--parallel.pipeline_parallel=2"])
    assert info.value.field == "model.adaln"
