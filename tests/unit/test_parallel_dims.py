"""ParallelDims: every layout rule is one ConfigError naming the field with a readable reason; rank
coordinates follow megatron-core's "tp-cp-ep-dp-pp" order; the launcher environment is checked up front."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tplus_dist.config import ConfigError, ModelConfig, ParallelConfig, load_config
from tplus_dist.parallel.dims import LaunchEnvError, ParallelDims, launch_env

MODEL = ModelConfig(vocab_size=256, pad_vocab_multiple=64, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, seq_len=32)


def dims(world: int = 4, model: ModelConfig | None = MODEL, **parallel: Any) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**parallel), world, model)


def error(d: ParallelDims) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        d.validate()
    return info.value


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "world, parallel",
    [
        (1, {}),
        (4, {"tensor_parallel": 2}),
        (4, {"tensor_parallel": 4}),  # 2 kv heads replicated on 2 ranks each
        (4, {"pipeline_parallel": 2, "virtual_pipeline_stages": 2}),
        (8, {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1}),
        (4, {"pipeline_parallel": 2, "zero_stage": 1}),
        (2, {"tensor_parallel": 2, "sequence_parallel": True}),
    ],
)
def test_valid_layouts_pass(world: int, parallel: dict[str, Any]):
    d = dims(world, **parallel).validate()
    assert d.tp * d.pp * d.dp == d.world == world


@pytest.mark.parametrize(
    "world, model, parallel, field, words",
    [
        (
            6,
            MODEL,
            {"tensor_parallel": 4},
            "parallel.tensor_parallel",
            "world size 6 is not divisible by tensor_parallel 4 x pipeline_parallel 1",
        ),
        (
            6,
            MODEL,
            {"tensor_parallel": 2, "pipeline_parallel": 2},
            "parallel.pipeline_parallel",
            "world size 6 is not divisible by tensor_parallel 2 x pipeline_parallel 2",
        ),
        (
            3,
            ModelConfig(n_heads=4, d_model=64, vocab_size=192),
            {"tensor_parallel": 3},
            "parallel.tensor_parallel",
            "model.n_heads (4) is not divisible by tensor_parallel 3",
        ),
        (
            4,
            ModelConfig(n_heads=12, n_kv_heads=3, d_model=96),
            {"tensor_parallel": 4},
            "parallel.tensor_parallel",
            "model.n_kv_heads (3) must be divisible by tensor_parallel 4, or divide it",
        ),
        (
            3,
            ModelConfig(n_heads=3, d_model=96, vocab_size=256, pad_vocab_multiple=64),
            {"tensor_parallel": 3},
            "model.pad_vocab_multiple",
            "set pad_vocab_multiple to 192",
        ),
        (
            2,
            dataclasses.replace(MODEL, n_layers=3),
            {"pipeline_parallel": 2},
            "parallel.pipeline_parallel",
            "model.n_layers (3) is not divisible by pipeline_parallel 2 x virtual_pipeline_stages 1 = 2 chunks",
        ),
        (
            2,
            MODEL,
            {"pipeline_parallel": 2, "virtual_pipeline_stages": 4},
            "parallel.virtual_pipeline_stages",
            "pipeline_parallel 2 x virtual_pipeline_stages 4 = 8 chunks",
        ),
        (
            2,
            MODEL,
            {"pipeline_parallel": 2, "zero_stage": 2},
            "parallel.zero_stage",
            "ZeRO stage 2 cannot run with pipeline_parallel 2",
        ),
        (
            2,
            MODEL,
            {"pipeline_parallel": 2, "zero_stage": 3},
            "parallel.zero_stage",
            "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only",
        ),
        (2, MODEL, {"zero_stage": 4}, "parallel.zero_stage", "must be 0, 1, 2 or 3"),
        (2, MODEL, {"sequence_parallel": True}, "parallel.sequence_parallel", "needs tensor_parallel > 1"),
        (
            8,
            MODEL,
            {"sequence_parallel": True, "tensor_parallel": 2, "pipeline_parallel": 2, "virtual_pipeline_stages": 2},
            "parallel.sequence_parallel",
            "not built for the interleaved pipeline schedule",
        ),
        (2, MODEL, {"virtual_pipeline_stages": 2}, "parallel.virtual_pipeline_stages", "needs pipeline_parallel > 1"),
        (2, MODEL, {"tensor_parallel": 0}, "parallel.tensor_parallel", "must be at least 1"),
        (2, MODEL, {"pipeline_parallel": -1}, "parallel.pipeline_parallel", "must be at least 1"),
    ],
)
def test_each_rule_is_one_error_naming_the_field(world, model, parallel, field, words):
    e = error(dims(world, model, **parallel))
    assert e.field == field
    assert words in e.reason, e.reason


def test_model_checks_are_skipped_without_a_model():
    assert dims(3, None, tensor_parallel=3).validate().dp == 1


def test_kv_heads_replicate_when_fewer_than_tp_as_megatron_does():
    mqa = ModelConfig(n_heads=8, n_kv_heads=1, d_model=64, vocab_size=256)
    assert dims(8, mqa, tensor_parallel=8).validate().tp == 8


def test_the_run_config_checks_the_layout_against_the_model():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["--model.n_heads=12", "--model.d_model=96", "--parallel.tensor_parallel=8"])
    assert info.value.field == "parallel.tensor_parallel"
    # sequence parallelism runs on CPU (gloo) too, but splits every sequence into tensor_parallel equal parts
    sp = ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true", "--train.device=cpu"]
    assert load_config(overrides=sp).parallel.sequence_parallel
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[*sp, "--train.seq_len=63"])
    assert info.value.field == "train.seq_len" and "divisible by parallel.tensor_parallel (2)" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[*sp, "--model.seq_len=65"])
    assert info.value.field == "model.seq_len", info.value
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[*sp, "--train.compile=true"])
    assert info.value.field == "train.compile" and "async_op=True" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[*sp, "--model.provider=te"])
    assert info.value.field == "parallel.sequence_parallel" and "megatron-core" in info.value.reason


def test_a_yaml_with_a_parallel_section_loads(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  n_layers: 4\n  d_model: 64\n  n_heads: 4\n  vocab_size: 256\n"
        "parallel:\n  tensor_parallel: 2\n  pipeline_parallel: 2\n  virtual_pipeline_stages: 1\n"
        "  zero_stage: 0\n"
    )
    cfg = load_config(path)
    assert cfg.parallel == ParallelConfig(2, 2, 1, 0, False)
    d = ParallelDims.from_config(cfg.parallel, 8, cfg.model).validate()
    assert (d.tp, d.pp, d.dp, d.vpp) == (2, 2, 2, 1)
    path.write_text("parallel:\n  data_parallel: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "parallel.data_parallel"  # derived from the world size, never configured


# ------------------------------------------------------------------------------- rank coordinates

# (tp, pp, world) -> expected groups, written out from megatron's documented order: tp fastest, then dp, then pp.
LAYOUTS = {
    (2, 1, 4): {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]]},
    (1, 2, 4): {"tp": [[0], [1], [2], [3]], "dp": [[0, 1], [2, 3]], "pp": [[0, 2], [1, 3]]},
    (2, 2, 4): {"tp": [[0, 1], [2, 3]], "dp": [[0], [1], [2], [3]], "pp": [[0, 2], [1, 3]]},
    # the example in initialize_model_parallel's docstring: 16 GPUs, tp 2, pp 4
    (2, 4, 16): {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "pp": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
    },
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_groups_follow_megatrons_documented_order(layout: tuple[int, int, int]):
    tp, pp, world = layout
    d = dims(world, None, tensor_parallel=tp, pipeline_parallel=pp).validate()
    for kind, groups in LAYOUTS[layout].items():
        assert d.all_groups(kind) == groups, kind
    for rank in range(world):
        c = d.coords(rank)
        assert d.rank_of(c.tp, c.dp, c.pp) == rank
        assert (d.tp_rank(rank), d.dp_rank(rank), d.pp_rank(rank)) == (c.tp, c.dp, c.pp)
        assert d.group_ranks("tp", rank).index(rank) == c.tp
        assert d.group_ranks("dp", rank).index(rank) == c.dp
        assert d.group_ranks("pp", rank).index(rank) == c.pp
        assert d.group_ranks("mp", rank) == [r for r in range(world) if d.dp_rank(r) == c.dp]  # one replica


@pytest.mark.parametrize("layout", [*LAYOUTS, (4, 2, 16), (1, 1, 3)])
def test_groups_equal_megatrons_rank_generator(layout: tuple[int, int, int]):
    from megatron.core.parallel_state import RankGenerator

    from tplus_dist.parallel.dims import MEGATRON_ORDER

    tp, pp, world = layout
    d = dims(world, None, tensor_parallel=tp, pipeline_parallel=pp).validate()
    gen = RankGenerator(tp=tp, ep=1, dp=d.dp, pp=pp, cp=1, order=MEGATRON_ORDER)
    for kind, token in (("tp", "tp"), ("dp", "dp"), ("pp", "pp"), ("mp", "tp-pp")):
        assert d.all_groups(kind) == sorted(sorted(g) for g in gen.get_ranks(token)), kind


# ------------------------------------------------------------------------------- launcher environment

GOOD = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_a_good_launch_env_is_read():
    env = launch_env(GOOD)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (1, 4, 1, "10.0.0.1", 29500)


@pytest.mark.parametrize(
    "change, variable, words",
    [
        ({"RANK": None}, "RANK", "is not set"),
        ({"WORLD_SIZE": None}, "WORLD_SIZE", "is not set"),
        ({"LOCAL_RANK": None}, "LOCAL_RANK", "is not set"),
        ({"MASTER_ADDR": None}, "MASTER_ADDR", "is not set"),
        ({"MASTER_ADDR": " "}, "MASTER_ADDR", "is empty"),
        ({"MASTER_PORT": None}, "MASTER_PORT", "is not set"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT", "must be an integer"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT", "must be a TCP port"),
        ({"RANK": "4"}, "RANK", "must be in [0, WORLD_SIZE 4)"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE", "must be at least 1"),
        ({"RANK": "x"}, "RANK", "must be an integer"),
        ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK", "must be in [0, LOCAL_WORLD_SIZE 2)"),
        ({"LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE", "must be in [1, WORLD_SIZE 4]"),
    ],
)
def test_a_bad_launch_env_names_the_variable(change: dict[str, str | None], variable: str, words: str):
    env = {**GOOD, **change}
    with pytest.raises(LaunchEnvError) as info:
        launch_env({k: v for k, v in env.items() if v is not None})
    assert info.value.variable == variable
    assert words in info.value.reason, info.value.reason
    assert "torchrun" in str(info.value)


# ------------------------------------------------------------------------------- through the CLI


LAUNCHED = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}


@pytest.mark.parametrize(
    "env, overrides, words",
    [
        ({**LAUNCHED, "LOCAL_RANK": None}, [], "launch error: LOCAL_RANK: is not set"),
        ({**LAUNCHED, "MASTER_PORT": "http"}, [], "launch error: MASTER_PORT: must be an integer"),
        (LAUNCHED, ["--parallel.tensor_parallel=4"], "config error: parallel.tensor_parallel: world size 2"),
        (LAUNCHED, ["--parallel.pipeline_parallel=2", "--model.n_layers=3"], "model.n_layers (3) is not divisible"),
        (
            LAUNCHED,
            ["--parallel.pipeline_parallel=2", "--parallel.zero_stage=3"],
            "ZeRO stage 3 cannot run with pipeline_parallel 2",
        ),
    ],
)
def test_a_bad_launch_or_layout_stops_the_cli_before_any_work(tmp_path, monkeypatch, capsys, env, overrides, words):
    from tplus_dist.cli import main

    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    rc = main(["train", "configs/tiny.yaml", f"--log.run_dir={tmp_path}/run", *overrides])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written, no process group joined


def test_the_deepspeed_launchers_local_rank_argument_is_dropped():
    from tplus_dist.cli import strip_launcher_args

    assert strip_launcher_args(["--local_rank=1", "train", "x.yaml", "--a=1"]) == ["train", "x.yaml", "--a=1"]
    assert strip_launcher_args(["train", "--local_rank", "3", "x.yaml"]) == ["train", "x.yaml"]


# ------------------------------------------------------------------------------- the user's DeepSpeed JSON


def test_a_deepspeed_json_is_merged_over_the_generated_config(tmp_path):
    from tplus_dist.parallel.engine import deepspeed_config, load_deepspeed_overrides

    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"reduce_bucket_size": 12345, "overlap_comm": true}}')
    cfg = load_config("configs/tiny.yaml", [f"--parallel.deepspeed_config={path}", "--parallel.zero_stage=2"])
    ds = deepspeed_config(cfg, 2, "cpu", overrides=load_deepspeed_overrides(cfg.parallel.deepspeed_config))
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345, "overlap_comm": True}


@pytest.mark.parametrize(
    "text, words",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"gradient_accumulation_steps": 4}', "'gradient_accumulation_steps', which comes from train.grad_accum"),
        ('{"zero_optimization": {"stage": 3}}', "'zero_optimization.stage', which comes from parallel.zero_stage"),
        ('{"optimizer": {"type": "Adam"}}', "'optimizer', which comes from optim.*"),
    ],
)
def test_a_bad_deepspeed_json_is_one_error_naming_the_file(tmp_path, text, words):
    from tplus_dist.parallel.engine import load_deepspeed_overrides

    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_deepspeed_overrides(str(path))
    assert info.value.field == "parallel.deepspeed_config"
    assert str(path) in info.value.reason and words in info.value.reason, info.value.reason


@pytest.mark.parametrize(
    "optimizer, parallel, words",
    [
        ("adafactor", ["--parallel.zero_stage=1"], "zero_stage 1 hands it flat partitions"),
        ("soap", ["--parallel.zero_stage=0", "--parallel.tensor_parallel=2"], "tensor_parallel 2 hands it slices"),
        ("adafactor", ["--parallel.zero_stage=0", "--precision.dtype=bf16"], "bf16 under DeepSpeed"),
    ],
)
def test_matrix_optimizers_are_refused_where_they_would_see_flat_partitions_or_slices(
    monkeypatch, optimizer, parallel, words
):
    import torch

    from tplus_dist.train.run import setup_layout

    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(overrides=[f"--optim.name={optimizer}", *parallel])
    with pytest.raises(ConfigError) as info:  # refused before any process group is made
        setup_layout(cfg, torch.device("cpu"))
    assert info.value.field == "optim.name" and words in info.value.reason, info.value.reason
