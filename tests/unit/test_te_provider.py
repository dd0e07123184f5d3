"""The te provider's CPU-checkable half: the fallback table, `tplus config --provider te`, the parameter names and
shapes TE will create against the torch provider's, and the refusals where TE cannot run."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import yaml
from torch import nn

from tplus_dist import console
from tplus_dist.backends import get_provider
from tplus_dist.backends.te_provider import (
    TEProvider,
    TEUnavailableError,
    fallback_notices,
    strip_extra_state,
    te_plan,
    te_unavailable_reason,
)
from tplus_dist.cli import main
from tplus_dist.config.model import ModelConfig
from tplus_dist.model import norms as torch_norms
from tplus_dist.model.decoder import Decoder


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=100, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, seq_len=16)
    base.update(kw)
    cfg = ModelConfig(**base)  # type: ignore[arg-type]
    cfg.validate()
    return cfg


def table(cfg: ModelConfig, tp: int = 1) -> dict[str, tuple[str, bool]]:
    return {r.piece: (r.implementation, r.fallback) for r in te_plan(cfg, tp)}


# ----------------------------------------------------------------------------------------------------- the plan
def test_plain_llama_runs_all_in_te() -> None:
    rows = table(tiny())
    assert rows == {
        "linears": ("te.Linear", False),
        "norms (rmsnorm)": ("te.RMSNorm", False),
        "attention core": ("te.DotProductAttention", False),
        "activation (swiglu)": ("torch", False),
        "embedding, logits, loss": ("torch", False),
    }
    assert fallback_notices(tiny()) == []


@pytest.mark.parametrize(
    ("choice", "piece", "implementation"),
    [
        # TE 2.20.2 expresses these exactly (dot_product_attention.py softcap / softmax_type, post_scale_bias, alibi)
        (dict(attn_softcap=50.0), "attention core", "te.DotProductAttention"),
        (dict(softmax_off_by_one=True), "attention core", "te.DotProductAttention"),
        (dict(position="t5_bias"), "attention core", "te.DotProductAttention"),
        (dict(position="alibi"), "attention core", "te.DotProductAttention"),
        (dict(sliding_window=4, layer_pattern=["local", "global"]), "attention core", "te.DotProductAttention"),
        (dict(attn_dropout=0.1), "attention core", "te.DotProductAttention"),
        (dict(norm="layernorm", norm_bias=True), "norms (layernorm)", "te.LayerNorm"),
        (dict(norm_unit_offset=True), "norms (rmsnorm)", "te.RMSNorm"),
        (dict(embed_norm=True), "embedding norm (layernorm)", "te.LayerNorm"),
    ],
)
def test_choices_te_expresses(choice: dict[str, object], piece: str, implementation: str) -> None:
    rows = table(tiny(**choice))
    assert rows[piece] == (implementation, False)
    assert fallback_notices(tiny(**choice)) == []


@pytest.mark.parametrize(
    ("choice", "piece"),
    [
        (dict(position="shaw"), "attention core"),
        (dict(norm="layernorm"), "norms (layernorm)"),  # no bias: TE's LayerNorm always has one
        (dict(norm="biasnorm"), "norms (biasnorm)"),
        (dict(activation="swooshr", d_ff=64), "activation (swooshr)"),
        (dict(activation="swooshl", d_ff=64), "activation (swooshl)"),
        (dict(adaln="adaln_zero", n_conditions=3), "adaLN modulation (adaln_zero)"),
        (dict(qk_norm="rmsnorm"), "QK-norm (rmsnorm, head)"),
        (dict(qk_norm="layernorm", qk_norm_scope="projection"), "QK-norm (layernorm, projection)"),
    ],
)
def test_fallback_pieces(choice: dict[str, object], piece: str) -> None:
    cfg = tiny(**choice)
    rows = table(cfg)
    assert rows[piece] == ("torch", True)
    # exactly one logged line, naming the piece, and only for the fallback rows
    notices = fallback_notices(cfg)
    assert len(notices) == 1 and piece in notices[0] and "torch" in notices[0]
    assert rows["linears"] == ("te.Linear", False)


def test_several_fallbacks_each_named_once() -> None:
    cfg = tiny(position="shaw", norm="biasnorm", activation="swooshr", d_ff=64)
    notices = fallback_notices(cfg)
    assert len(notices) == 3
    assert [n.split(" runs in torch")[0] for n in notices] == [
        "te provider: norms (biasnorm)",
        "te provider: attention core",
        "te provider: activation (swooshr)",
    ]


def test_tensor_parallel_rows() -> None:
    # 2 kv heads over 4 ranks: the kv projections are replicated (megatron's), not te.Linear
    rows = table(tiny(), tp=4)
    assert rows["kv projections"] == ("torch", True)
    assert rows["embedding, logits, loss"] == ("megatron-core", False)
    assert "kv projections" not in table(tiny(), tp=2)


def test_notice_once_rank0(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    msg = "te provider: test notice, printed once"
    assert console.notice_once(msg, out)
    assert not console.notice_once(msg, out)
    assert out.getvalue() == msg + "\n"
    monkeypatch.setenv("RANK", "1")
    other = io.StringIO()
    assert not console.notice_once("te provider: another notice", other)
    assert other.getvalue() == ""


# ------------------------------------------------------------------------------------------------------ the CLI
def test_config_provider_te_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "configs/tiny.yaml", "--provider", "te", "--model.position=shaw"]) == 0
    out = capsys.readouterr().out
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert comments[0].startswith("# te provider (Transformer Engine 2.20.2)")
    pieces = [line[4:].split("  ")[0] for line in comments[1:]]
    assert pieces[:2] == ["linears", "norms (rmsnorm)"]
    core = next(line for line in comments if "attention core" in line)
    assert "torch" in core and "fallback" in core and "Shaw" in core
    # the output stays a loadable config, with the provider set
    assert yaml.safe_load(out)["model"]["provider"] == "te"


def test_config_without_te_prints_no_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "configs/tiny.yaml", "--provider=torch"]) == 0
    assert "# te provider" not in capsys.readouterr().out


# ---------------------------------------------------------------------------- parameter names and shapes
# TE 2.20.2 parameter names, read from the source:
#   module/linear.py Linear.__init__: parameters_split None -> weight_names ["weight"], bias_names ["bias"];
#     weight torch.empty(out_features, in_features), bias torch.empty(out_features) (registered only with bias=True;
#     without it `self.bias` is a plain empty tensor, not a parameter)
#   ops/basic/rmsnorm.py RMSNorm.__init__: register_parameter("weight", ...) of normalized_shape
#   ops/basic/layer_norm.py LayerNorm.__init__: register_parameter("weight"), register_parameter("bias")
#   attention/dot_product_attention/dot_product_attention.py: no parameter unless softmax_type "learnable"
#     ("off-by-one" keeps softmax_offset as a plain tensor)
# Each is a TransformerEngineBaseModule (module/base.py get_extra_state) or a fusible op (ops/op.py
# get_extra_state), so the state dict gains "<module>._extra_state".
TE_PARAMS: dict[str, tuple[str, ...]] = {
    "te.Linear": ("weight", "bias"),
    "te.RMSNorm": ("weight",),
    "te.LayerNorm": ("weight", "bias"),
    "te.DotProductAttention": (),
}


def te_shapes(impl: str, fan_in: int, fan_out: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """The parameters TE's constructor registers (formulas from the source lines above)."""
    if impl == "te.Linear":
        shapes = {"weight": (fan_out, fan_in), "bias": (fan_out,)}
        return {k: v for k, v in shapes.items() if k in TE_PARAMS[impl] and (k != "bias" or bias)}
    return {k: (fan_in,) for k in TE_PARAMS[impl]}


LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
BLOCK_NORMS = ("norm1", "norm2", "post_attn_norm", "post_mlp_norm", "final_norm", "embed_norm")


def expected_implementation(cfg: ModelConfig, local: str) -> str:
    """Which TE class the te provider builds for module ``local`` (the last part of its name), by hand from the
    issue's list: every projection is te.Linear; block norms by kind (LayerNorm only with a bias; BiasNorm torch);
    the embedding norm is a LayerNorm with bias; QK-norm, embedding, head and adaLN stay torch."""
    if local in LINEARS:
        return "te.Linear"
    if local == "embed_norm":
        return "te.LayerNorm"
    if local in BLOCK_NORMS:
        if cfg.norm == "rmsnorm":
            return "te.RMSNorm"
        return "te.LayerNorm" if cfg.norm == "layernorm" and cfg.norm_bias else "torch"
    return "torch"


CONFIGS = [
    dict(),
    dict(linear_bias=True),
    dict(qkv_bias=True, norm_unit_offset=True),
    dict(norm="layernorm", norm_bias=True, embed_norm=True, tie_embeddings=True),
    dict(norm="layernorm", block="parallel"),
    dict(norm_placement="sandwich", qk_norm="rmsnorm", n_kv_heads=1),
    dict(norm="biasnorm", position="t5_bias", t5_bias_shared=False),
    dict(adaln="adaln", n_conditions=2, position="shaw"),
]


@pytest.mark.parametrize("choice", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "llama")
def test_te_parameter_names_and_shapes_match_torch(choice: dict[str, object]) -> None:
    cfg = tiny(**choice)
    model = Decoder(cfg, init_seed=0)  # the torch provider
    te_names: dict[str, tuple[int, ...]] = {}
    extra: list[str] = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        local = name.rsplit(".", 1)[-1]
        impl = expected_implementation(cfg, local)
        if local == "core" and table(cfg)["attention core"][0] == "te.DotProductAttention":
            extra.append(f"{name}.dpa._extra_state")  # the core wraps te.DotProductAttention as .dpa
        if impl == "torch":
            te_names.update({f"{name}.{k}": tuple(p.shape) for k, p in own.items()})
            continue
        if impl == "te.Linear":
            assert isinstance(module, nn.Linear), name
            shapes = te_shapes(impl, module.in_features, module.out_features, module.bias is not None)
        else:
            assert isinstance(module, torch_norms.RMSNorm | torch_norms.LayerNorm), name
            shapes = te_shapes(impl, module.weight.shape[0], 0, True)
        te_names.update({f"{name}.{k}": v for k, v in shapes.items()})
        extra.append(f"{name}._extra_state")
    torch_names = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert te_names == torch_names
    # what the te model's state dict adds, and what strip_extra_state removes again
    assert all(e.endswith("._extra_state") for e in extra)
    sd = dict(model.state_dict())
    sd.update({e: torch.empty(0, dtype=torch.uint8) for e in extra})
    assert strip_extra_state(sd).keys() == model.state_dict().keys()


def test_plan_agrees_with_the_name_map() -> None:
    """The plan's norm row is the implementation the name map assumes for every block norm."""
    for choice in CONFIGS:
        cfg = tiny(**choice)
        assert table(cfg)[f"norms ({cfg.norm})"][0] == expected_implementation(cfg, "norm1"), choice


# ------------------------------------------------------------------------------------------------- refusals
def test_unavailable_on_cpu() -> None:
    reason = te_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason and "cpu" in reason and "model.provider" in reason
    assert reason.count(". ") == 0  # one sentence


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less refusal")
def test_provider_refuses_on_cpu() -> None:
    with pytest.raises(TEUnavailableError, match=r"^model\.provider te needs a CUDA device"):
        TEProvider(device=torch.device("cpu"))
    with pytest.raises(TEUnavailableError, match="CUDA"):
        get_provider("te", device="cpu")


def test_unavailable_without_te_on_cuda_names_te() -> None:
    """On a CUDA device the reason is TE itself (or None where it imports)."""
    try:
        import transformer_engine.pytorch  # noqa: F401

        have_te = True
    except Exception:
        have_te = False
    reason = te_unavailable_reason("cuda")
    if have_te:
        assert reason is None
    else:
        assert reason is not None and "Transformer Engine 2.20.2" in reason


def test_unknown_provider_lists_te() -> None:
    with pytest.raises(ValueError, match="available: torch, te"):
        get_provider("apex")


def test_plan_is_pure_of_te() -> None:
    """te_plan runs without Transformer Engine (this machine has none) and does not change the config."""
    cfg = tiny(position="alibi")
    before = dataclasses.asdict(cfg)
    te_plan(cfg)
    assert dataclasses.asdict(cfg) == before
