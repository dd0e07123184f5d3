"""The te provider against the torch provider on a GPU: logits and gradients within bf16 tolerance for a matrix of
choices on a tiny model, each fallback piece exercised, and state dicts moving between the two providers.

Skipped without CUDA or Transformer Engine (collected, not errors, on CPU)."""

from __future__ import annotations

import pytest
import torch

from tplus_dist.config.model import ModelConfig
from tplus_dist.model.decoder import Decoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = torch.device("cuda")
B, S = 2, 32


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=256, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seq_len=S, d_ff=128)
    base.update(kw)
    cfg = ModelConfig(**base)  # type: ignore[arg-type]
    cfg.validate()
    return cfg


def te_module() -> object:
    return pytest.importorskip("transformer_engine.pytorch")


def pair(cfg: ModelConfig) -> tuple[Decoder, Decoder]:
    """The torch-provider model (built on the CPU, moved) and the te-provider one (TE's layers built on the GPU; its
    torch pieces, the embedding, rotary tables and fallbacks, are built on the CPU and moved, as train/run.py does),
    the second loaded from the first's state dict (a torch checkpoint into te, strictly)."""
    te_module()
    from tplus_dist.backends.te_provider import TEProvider

    ref = Decoder(cfg, init_seed=0).to(DEVICE)
    te = Decoder(cfg, TEProvider(device=DEVICE), init_seed=0).to(DEVICE)
    te.load_state_dict(ref.state_dict(), strict=True)
    return ref, te


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run(model: Decoder, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens, labels)
        loss, _ = model.loss(logits, tokens.roll(-1, dims=1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def compare(cfg: ModelConfig, *, labels: bool = False) -> None:
    ref, te = pair(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(DEVICE)
    lab = torch.randint(0, max(cfg.n_conditions, 1), (B,), generator=g).to(DEVICE) if labels else None
    if labels:  # adaLN starts at zero (the plain model): give the modulation weights values to exercise it
        with torch.no_grad():
            for (n, p), (_, q) in zip(ref.named_parameters(), te.named_parameters(), strict=True):
                if n.endswith(".ada.weight"):
                    p.normal_(0.0, 0.02, generator=torch.Generator(DEVICE).manual_seed(2))
                    q.copy_(p)
    l_ref, g_ref = run(ref, tokens, lab)
    l_te, g_te = run(te, tokens, lab)
    assert torch.isfinite(l_te).all()
    assert rel(l_te, l_ref) < 2e-2, f"logits differ: {rel(l_te, l_ref):.3g}"
    assert g_te.keys() == g_ref.keys()
    bad = {n: rel(g_te[n], g_ref[n]) for n in g_ref if rel(g_te[n], g_ref[n]) > 5e-2}
    assert not bad, f"gradients differ beyond bf16 tolerance: {bad}"


MATRIX = {
    "llama": dict(),
    "mha": dict(n_kv_heads=None),
    "mqa": dict(n_kv_heads=1),
    "layernorm-bias": dict(norm="layernorm", norm_bias=True),
    "unit-offset": dict(norm_unit_offset=True),
    "post-norm": dict(norm_placement="post"),
    "sandwich": dict(norm_placement="sandwich"),
    "window": dict(sliding_window=8, layer_pattern=["local", "global"]),
    "alibi": dict(position="alibi"),
    "alibi-window": dict(position="alibi", sliding_window=8, layer_pattern=["local"]),
    "t5-shared": dict(position="t5_bias"),
    "t5-per-layer": dict(position="t5_bias", t5_bias_shared=False),
    "softcap": dict(attn_softcap=20.0),
    "off-by-one": dict(softmax_off_by_one=True),
    "biases": dict(linear_bias=True),
    "qkv-bias": dict(qkv_bias=True),
    "parallel": dict(block="parallel"),
    "tied": dict(tie_embeddings=True, embed_scale=True),
    "gelu-learned": dict(activation="gelu", position="learned", norm="layernorm", norm_bias=True),
    "embed-norm": dict(embed_norm=True),
    "scale": dict(softmax_scale=0.1),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_te_matches_torch(name: str) -> None:
    compare(tiny(**MATRIX[name]))


FALLBACKS = {
    "shaw": dict(position="shaw"),
    "biasnorm": dict(norm="biasnorm"),
    "layernorm-no-bias": dict(norm="layernorm"),
    "swooshr": dict(activation="swooshr"),
    "swooshl": dict(activation="swooshl"),
    "qk-norm-head": dict(qk_norm="rmsnorm"),
    "qk-norm-projection": dict(qk_norm="layernorm", qk_norm_scope="projection", norm="layernorm", norm_bias=True),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallback_pieces(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tplus_dist import console
    from tplus_dist.backends.te_provider import fallback_notices

    cfg = tiny(**FALLBACKS[name])
    console._NOTICED.clear()  # notices print once per process: forget the earlier tests' ones
    compare(cfg)
    err = capsys.readouterr().err
    lines = fallback_notices(cfg)
    assert lines and all(err.count(line) == 1 for line in lines), err  # logged at build, once each


@pytest.mark.parametrize("kind", ["adaln", "adaln_zero"])
def test_adaln_fallback(kind: str) -> None:
    compare(tiny(adaln=kind, n_conditions=3), labels=True)


def test_attention_dropout_is_training_only() -> None:
    cfg = tiny(attn_dropout=0.2)
    ref, te = pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), device=DEVICE)
    ref.eval(), te.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel(te(tokens), ref(tokens)) < 2e-2
        te.train()
        a, b = te(tokens), te(tokens)
    assert torch.isfinite(a).all() and not torch.equal(a, b)  # dropout draws in training


def test_state_dict_round_trip() -> None:
    """torch -> te (strict, TE's _extra_state filled in) -> torch (strip_extra_state): equal outputs."""
    from tplus_dist.backends.te_provider import EXTRA_STATE, strip_extra_state

    cfg = tiny(linear_bias=True, position="alibi")
    ref, te = pair(cfg)
    sd = te.state_dict()
    assert any(k.endswith(EXTRA_STATE) for k in sd)
    back = Decoder(cfg, init_seed=123).to(DEVICE)
    back.load_state_dict(strip_extra_state(sd), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(back(tokens), ref(tokens))
        for n, p in te.named_parameters():
            assert torch.equal(p, dict(ref.named_parameters())[n]), n


def test_te_init_equals_torch_init() -> None:
    """Built on the GPU with the same seed, the te model starts from the torch model's values (model/init.py
    draws on the CPU)."""
    te_module()
    from tplus_dist.backends.te_provider import TEProvider

    cfg = tiny()
    ref = Decoder(cfg, init_seed=7)
    te = Decoder(cfg, TEProvider(device=DEVICE), init_seed=7).to(DEVICE)
    for n, p in ref.named_parameters():
        assert torch.equal(dict(te.named_parameters())[n].cpu(), p), n
