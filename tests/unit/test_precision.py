"""precision.py and the FP8 config checks, on CPU (Transformer Engine itself is exercised in tests/gpu/test_fp8.py)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

from tplus_dist import precision
from tplus_dist.checkpoint import extra_state
from tplus_dist.config import ConfigError
from tplus_dist.config.model import ModelConfig
from tplus_dist.config.run import load_config
from tplus_dist.config.sections import PrecisionConfig
from tplus_dist.model.decoder import Decoder

TE = ["--model.provider=te", "--precision.fp8=delayed"]


def refused(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return e.value


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["--precision.fp8_margin=1"], "precision.fp8_margin"),
        (["--precision.fp8_format=e4m3"], "precision.fp8_format"),
        (["--precision.num_layers_at_start_in_bf16=1"], "precision.num_layers_at_start_in_bf16"),
        (["--model.provider=te", "--precision.fp8=current", "--precision.fp8_amax_history_len=16"],
         "precision.fp8_amax_history_len"),
        (["--model.provider=te", "--precision.fp8=block", "--precision.fp8_amax_compute_algo=most_recent"],
         "precision.fp8_amax_compute_algo"),
        (["--precision.fp8=delayed"], "precision.fp8"),
        ([*TE, "--precision.dtype=fp32"], "precision.dtype"),
        ([*TE, "--model.n_layers=4", "--precision.num_layers_at_start_in_bf16=3",
          "--precision.num_layers_at_end_in_bf16=2"], "precision.num_layers_at_start_in_bf16"),
        ([*TE, "--model.d_model=776", "--model.n_heads=8", "--model.head_dim=64"], "model.d_model"),
        ([*TE, "--model.d_ff=1000"], "model.d_ff"),
        ([*TE, "--model.n_heads=10", "--model.head_dim=20"], "model.n_heads"),
        ([*TE, "--train.micro_batch_size=1", "--train.seq_len=100"], "train.micro_batch_size"),
        ([*TE, "--precision.fp8_amax_history_len=0"], "precision.fp8_amax_history_len"),
        ([*TE, "--train.compile=true"], "train.compile"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(overrides: list[str], field: str) -> None:
    err = refused(overrides)
    assert err.field == field
    assert field in str(err) and str(err).count("\n") == 0


def test_fp8_dims_per_tensor_parallel_rank() -> None:
    # d_ff 2048 is a multiple of 16, but split over 8 ranks... 256 is still; 1040 / 2 = 520 is not (520 % 16 == 8)
    ok = [*TE, "--model.d_ff=1040"]
    load_config(None, ok)  # 1040 = 65 x 16 on one rank
    cfg = load_config(None, ok)
    cfg.parallel.tensor_parallel = 2
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == "model.d_ff" and "520" in str(e.value)
    # kv heads fewer than ranks: each rank holds one head (head_dim 64 -> 64 wide: accepted)
    cfg = load_config(None, [*TE, "--model.n_kv_heads=2"])
    cfg.parallel.tensor_parallel = 4
    cfg.validate()


def test_accepted_fp8_configs() -> None:
    for recipe in ("delayed", "current", "block"):
        cfg = load_config(None, ["--model.provider=te", f"--precision.fp8={recipe}", "--precision.fp8_format=e4m3"])
        assert cfg.precision.fp8 == recipe
    load_config(None, [*TE, "--precision.fp8_margin=2", "--precision.num_layers_at_end_in_bf16=1"])


def test_recipe_table() -> None:
    # TE 2.20.2 common/recipe/__init__.py: margin / amax_history_len / amax_compute_algo are DelayedScaling's only
    p = PrecisionConfig(fp8="delayed", fp8_margin=1, fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent")
    assert precision.recipe_spec(p) == (
        "DelayedScaling",
        {"fp8_format": "HYBRID", "margin": 1, "amax_history_len": 16, "amax_compute_algo": "most_recent"},
    )
    assert precision.recipe_spec(PrecisionConfig(fp8="current")) == ("Float8CurrentScaling", {"fp8_format": "HYBRID"})
    assert precision.recipe_spec(PrecisionConfig(fp8="block", fp8_format="e4m3")) == (
        "Float8BlockScaling",
        {"fp8_format": "E4M3"},
    )
    assert precision.recipe_spec(PrecisionConfig()) is None
    assert precision.fp8_recipe(PrecisionConfig()) is None  # (no TE import for none)


def test_autocast_unchanged_for_fp32_and_bf16() -> None:
    assert precision.autocast_dtype(PrecisionConfig(dtype="auto"), "cpu") is None
    assert precision.autocast_dtype(PrecisionConfig(dtype="auto"), torch.device("cuda")) is torch.bfloat16
    assert precision.autocast_dtype(PrecisionConfig(dtype="bf16"), "cpu") is torch.bfloat16
    assert precision.autocast_dtype(PrecisionConfig(dtype="fp32"), "cuda") is None
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with precision.precision_context(PrecisionConfig(dtype="bf16"), "cpu"):
        assert (x @ w).dtype is torch.bfloat16
    with precision.precision_context(PrecisionConfig(dtype="fp32"), "cpu"):
        y = x @ w
    assert y.dtype is torch.float32 and torch.equal(y, x @ w)


def test_precheck_refuses_te_on_cpu() -> None:
    precision.precheck(load_config(None, []), "cpu")  # the torch provider: nothing to check
    with pytest.raises(ConfigError) as e:
        precision.precheck(load_config(None, ["--model.provider=te"]), "cpu")
    assert e.value.field == "model.provider" and "cpu" in str(e.value)
    with pytest.raises(ConfigError) as e:
        precision.precheck(load_config(None, TE), torch.device("cpu"))
    assert e.value.field == "precision.fp8"


def test_bf16_layers_of_a_pipeline_stage() -> None:
    # 8 layers, first 2 and last 1 in bf16: global layers 0, 1, 7
    p = PrecisionConfig(fp8="delayed", num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=1)
    assert precision.bf16_layer_indices(p, 8) == [0, 1, 7]
    cfg = ModelConfig(n_layers=8, d_model=32, n_heads=2, vocab_size=64, seq_len=16)
    # a stage holding layers 4..7 (as parallel/pipeline.py and interleaved.py build them): only layer 7
    stage = Decoder(cfg, layers=range(4, 8), embed=False, head=True)
    assert [(n, i) for n, i, _ in precision.bf16_blocks(stage, p, 8)] == [("layers.7", 7)]
    # interleaved chunks: 4 stages of 2 layers, this rank has stages 0 and 2 -> layers 0,1 and 4,5
    chunks = nn.Module()
    chunks.chunks = nn.ModuleList([Decoder(cfg, layers=range(0, 2)), Decoder(cfg, layers=range(4, 6))])
    assert [(n, i) for n, i, _ in precision.bf16_blocks(chunks, p, 8)] == [
        ("chunks.0.layers.0", 0),
        ("chunks.0.layers.1", 1),
    ]
    assert precision.bf16_blocks(stage, PrecisionConfig(), 8) == []  # no fp8: nothing kept apart


def test_hold_during_forward_keeps_names_and_exits() -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def ctx() -> Any:
        events.append("enter")
        yield
        events.append("exit")

    lin = nn.Linear(4, 4)
    names = [n for n, _ in lin.named_parameters()]
    precision.hold_during_forward(lin, ctx)
    lin(torch.randn(2, 4))
    assert events == ["enter", "exit"] and [n for n, _ in lin.named_parameters()] == names
    with pytest.raises(RuntimeError):
        lin(torch.randn(2, 5))  # the forward fails: the context is still left
    assert events == ["enter", "exit", "enter", "exit"]


class Scaled(nn.Linear):
    """A layer with torch's extra state (get_extra_state / set_extra_state), as TE's modules have."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        self.amax = torch.zeros(3)

    def get_extra_state(self) -> torch.Tensor:
        return self.amax.clone()

    def set_extra_state(self, state: Any) -> None:
        self.amax = state.clone()


def test_extra_state_per_module_and_between_providers() -> None:
    model = nn.Sequential()
    model.layers = nn.ModuleDict({"0": Scaled(4), "1": Scaled(4)})
    model.layers["0"].amax = torch.tensor([1.0, 2.0, 3.0])
    model.layers["1"].amax = torch.tensor([4.0, 5.0, 6.0])
    saved = extra_state.extra_states(model)
    assert set(saved) == {"layers.0._extra_state", "layers.1._extra_state"}
    # torch's own state_dict names them the same way
    assert {k for k in model.state_dict() if k.endswith("_extra_state")} == set(saved)
    fresh = nn.Sequential()
    fresh.layers = nn.ModuleDict({"0": Scaled(4), "1": Scaled(4)})
    missing, dropped = extra_state.load_extra_states(fresh, saved)
    assert missing == [] and dropped == []
    assert torch.equal(fresh.layers["1"].amax, torch.tensor([4.0, 5.0, 6.0]))
    # a torch-provider checkpoint (none) into a te-like model: fresh state, reported
    missing, _ = extra_state.load_extra_states(fresh, {})
    assert missing == ["layers.0._extra_state", "layers.1._extra_state"]
    # the reverse: a plain model takes none, they are dropped
    plain = nn.Sequential()
    plain.layers = nn.ModuleDict({"0": nn.Linear(4, 4)})
    assert extra_state.load_extra_states(plain, saved) == ([], sorted(saved))
    # per module, never concatenated: merging ranks keeps the first rank's value of each module
    merged = extra_state.merge([{"a._extra_state": 1}, {"a._extra_state": 2, "b._extra_state": 3}])
    assert merged == {"a._extra_state": 1, "b._extra_state": 3}
    assert extra_state.without_extra_state(model.state_dict()).keys() == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    }


def test_extra_state_named_as_the_decoder_names_it() -> None:
    # a pipeline stage's names carry a stage prefix that decoder_name strips (parallel/pipeline.py)
    from tplus_dist.parallel.pipeline import decoder_name

    stage = nn.Module()
    setattr(stage, "5", nn.Module())
    getattr(stage, "5").layers = nn.ModuleDict({"3": Scaled(2)})
    assert list(extra_state.extra_states(stage, rename=decoder_name)) == ["layers.3._extra_state"]


def test_deepspeed_bf16_accumulates_in_fp32_under_zero() -> None:
    from tplus_dist.parallel.engine import deepspeed_config

    def ds(dtype: str, zero: int) -> dict[str, Any]:
        return deepspeed_config(
            load_config(None, [f"--precision.dtype={dtype}", f"--parallel.zero_stage={zero}"]), 2, "cpu"
        )

    for zero in (1, 2, 3):
        got = ds("bf16", zero)
        assert got["bf16"] == {"enabled": True} and got["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in ds("bf16", 0)  # DeepSpeed 0.19.8 refuses bf16 params with fp32 accumulation there
    assert "data_types" not in ds("fp32", 1) and ds("fp32", 1)["bf16"] == {"enabled": False}
