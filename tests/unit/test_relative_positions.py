"""T5's bucketed relative position bias: buckets as T5 computes them, scores that depend only on the relative
position, attention equal to a plain reference (SDPA and exact paths), gradients checked, shared or per layer."""

from __future__ import annotations

import math

import pytest
import torch

from tplus_dist.config import ConfigError, ModelConfig, load_config
from tplus_dist.model import build_model
from tplus_dist.model.attention import AttentionCore
from tplus_dist.model.positions import T5RelativeBias, t5_relative_buckets


@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (8, 20), (4, 5)])
def test_buckets_are_t5s(buckets: int, max_distance: int):
    from transformers.models.t5.modeling_t5 import T5Attention

    s = 300
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    theirs = T5Attention._relative_position_bucket(j - i, bidirectional=False, num_buckets=buckets,
                                                   max_distance=max_distance)  # fmt: skip
    ours = t5_relative_buckets(s, buckets, max_distance)
    causal = j <= i
    assert torch.equal(ours[causal], theirs[causal])
    assert ours.max() == buckets - 1 and ours.min() == 0


def test_the_bias_depends_only_on_the_relative_position():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(8, 3))
    bias = T5RelativeBias(table, 8, 20)(40, torch.device("cpu"), torch.float32)  # [h, s, s]
    assert bias.shape == (3, 40, 40)
    for d in range(40):  # every (i, i - d) pair has the same bias, per head
        diag = torch.diagonal(bias, offset=-d, dim1=1, dim2=2)
        assert torch.equal(diag, diag[:, :1].expand_as(diag))
    exact = 4  # distances below buckets / 2 each have their own bucket
    for d in range(exact):
        assert torch.equal(bias[:, d + 5, 5], table[d].detach())


def reference_attention(q, k, v, scale, bias):  # plain softmax attention, causal, plus the bias
    s = q.shape[-2]
    scores = q @ k.transpose(-2, -1) * scale + bias
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, -math.inf).softmax(-1) @ v


@pytest.mark.parametrize("exact_path", [False, True])
def test_attention_with_the_bias_equals_a_plain_reference(exact_path: bool):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, seq_len=24, position="t5_bias",
                      attn_softcap=None if not exact_path else 1e9)  # fmt: skip
    core = AttentionCore(cfg, 0).double()
    core.rel_bias = T5RelativeBias(torch.nn.Parameter(torch.randn(32, 4, dtype=torch.float64)), 32, 128)
    q, k, v = (torch.randn(2, 4, 24, 8, dtype=torch.float64) for _ in range(3))
    bias = core.rel_bias(24, q.device, q.dtype)
    want = reference_attention(q, k, v, cfg.attn_scale, bias)
    got = core(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-6 if exact_path else 1e-10, atol=1e-6 if exact_path else 1e-10)


def test_gradients_of_the_table_are_checked():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, seq_len=10, position="t5_bias")
    core = AttentionCore(cfg, 0)
    table = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64) for _ in range(3))

    buckets = t5_relative_buckets(10, 8, 20)

    def f(t):  # what T5RelativeBias.forward computes from its table, then the exact attention
        return core.exact(q, k, v, learned=t[buckets].permute(2, 0, 1))

    assert torch.autograd.gradcheck(f, (table,))


@pytest.mark.parametrize("shared", [True, False])
def test_shared_is_one_table_and_per_layer_one_each_and_both_train(shared: bool):
    cfg = ModelConfig(vocab_size=64, pad_vocab_multiple=8, n_layers=3, d_model=32, n_heads=4, seq_len=16,
                      position="t5_bias", t5_bias_shared=shared)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    tables = [n for n, _ in model.named_parameters() if "rel_bias" in n]
    assert tables == (["rel_bias.weight"] if shared else [f"layers.{i}.attn.core.rel_bias.weight" for i in range(3)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(20):
        logits = model(x[:, :-1])
        loss, _ = model.loss(logits, x[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(model.get_parameter(n).grad is not None for n in tables)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_bad_relative_bias_settings_name_the_field():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["--model.position=t5_bias", "--model.t5_bias_buckets=32",
                               "--model.t5_bias_max_distance=10"])  # fmt: skip
    assert info.value.field == "model.t5_bias_max_distance"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["--model.position=t5_bias", "--parallel.pipeline_parallel=2"])
    assert info.value.field == "model.t5_bias_shared" and "a table per layer" in info.value.reason


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        (["--model.position=alibi", "--model.t5_bias_buckets=16"], "model.t5_bias_buckets", "position t5_bias"),
        (["--model.position=alibi", "--model.t5_bias_shared=false"], "model.t5_bias_shared", "'alibi'"),
        (["--model.position=rope", "--model.shaw_max_distance=8"], "model.shaw_max_distance", "position shaw"),
        (["--model.position=shaw", "--model.t5_bias_max_distance=64"], "model.t5_bias_max_distance", "'shaw'"),
        (["--model.position=[alibi, t5_bias]"], "model.position", "must be one of"),
    ],
)
def test_relative_positions_combined_with_another_position_are_named(
    overrides: list[str], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert info.value.field == field and reason in info.value.reason, (info.value.field, info.value.reason)


# ------------------------------------------------------------------------------------------- Shaw et al. 2018


def shaw_reference(q, k, v, scale, a_k, a_v, max_distance):
    """The paper's formulas with explicit [s, s, d] relative embeddings, causal."""
    s = q.shape[-2]
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    rel = (i - j).clamp(0, max_distance)
    rk, rv = a_k[rel], a_v[rel]  # [s, s, d]
    scores = (q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, rk)) * scale
    probs = scores.masked_fill(j > i, -math.inf).softmax(-1)
    return probs @ v + torch.einsum("bhij,ijd->bhid", probs, rv)


def shaw_core(max_distance: int = 3) -> AttentionCore:
    from tplus_dist.model.positions import ShawRelative

    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, seq_len=12, position="shaw",
                      shaw_max_distance=max_distance)  # fmt: skip
    core = AttentionCore(cfg, 0).double()
    core.shaw = ShawRelative(max_distance, 8).double()
    torch.nn.init.normal_(core.shaw.keys)
    torch.nn.init.normal_(core.shaw.values)
    return core


def test_shaw_attention_equals_the_papers_formulas():
    torch.manual_seed(3)
    core = shaw_core()
    assert not core.use_sdpa  # the value term needs the probabilities: the exact path
    q, k, v = (torch.randn(2, 4, 12, 8, dtype=torch.float64) for _ in range(3))
    want = shaw_reference(q, k, v, core.scale, core.shaw.keys.detach(), core.shaw.values.detach(), 3)
    torch.testing.assert_close(core(q, k, v), want, rtol=1e-10, atol=1e-10)


def test_shaw_scores_depend_only_on_the_clipped_relative_position():
    torch.manual_seed(4)
    core = shaw_core(max_distance=2)
    q1 = torch.randn(8, dtype=torch.float64)
    q = q1.expand(1, 1, 9, 8)  # the same query at every position
    logits = core.shaw.key_logits(q, core.shaw.distances(9, q.device))[0, 0]  # [s, s]
    per_distance = core.shaw.keys.detach() @ q1  # q . a^K_d for d = 0, 1, 2
    for i in range(9):
        for j in range(i + 1):
            assert abs(logits[i, j] - per_distance[min(i - j, 2)]) < 1e-12  # beyond k = 2 they share a^K_2


def test_shaw_gradients_are_checked():
    torch.manual_seed(5)
    core = shaw_core()
    q, k, v = (torch.randn(1, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: core(a, b, c), (q, k, v))
    out = core(q, k, v).sum()
    out.backward()
    assert core.shaw.keys.grad is not None and core.shaw.values.grad is not None
    assert core.shaw.keys.grad.abs().sum() > 0 and core.shaw.values.grad.abs().sum() > 0


def test_a_shaw_model_trains():
    cfg = ModelConfig(vocab_size=64, pad_vocab_multiple=8, n_layers=2, d_model=32, n_heads=4, seq_len=16,
                      position="shaw", shaw_max_distance=4)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    assert [n for n, _ in model.named_parameters() if "shaw" in n] == [
        f"layers.{i}.attn.core.shaw.{w}" for i in range(2) for w in ("keys", "values")
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(20):
        loss, _ = model.loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize(
    "field", [{"position": "t5_bias"}, {"position": "shaw"}, {"adaln": "adaln", "n_conditions": 2}]
)
def test_hugging_face_export_refuses_the_choices_no_family_computes(field: dict[str, object]):
    from tplus_dist import hf

    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, seq_len=16, **field)  # type: ignore[arg-type]
    key, value = next(iter(field.items()))
    with pytest.raises(hf.HFExportError, match=f"model.{key}={value}"):
        hf.choose_family(cfg)
