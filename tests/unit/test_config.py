"""Configuration: every shipped YAML loads; bad input is one ConfigError naming the field and the reason;
``--section.key=value`` overrides; ``defaults:`` includes; to_yaml round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tplus_dist.config import ConfigError, ModelConfig, RunConfig, load_config, parse_overrides
from tplus_dist.config.run import CONFIGS_DIR

CONFIG_FILES = sorted(CONFIGS_DIR.glob("**/*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(overrides: list[str], path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# ------------------------------------------------------------------------------- shipped configs


def test_the_glob_finds_every_yaml_under_configs():
    yaml_like = sorted(p for p in CONFIGS_DIR.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))
    assert yaml_like == CONFIG_FILES, "use the .yaml suffix: configs/**/*.yaml is what loads"
    if yaml_like:
        assert CONFIG_FILES


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(CONFIGS_DIR))) for p in CONFIG_FILES]
    or [pytest.param(None, id="no-configs-yet")],
)
def test_every_shipped_config_loads_and_round_trips(path: Path | None, tmp_path: Path):
    if path is None:  # nothing shipped yet: nothing to check
        return
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert load_config(write(tmp_path / "dumped.yaml", cfg.to_yaml())) == cfg


def test_the_default_config_is_valid():
    cfg = load_config()
    assert cfg == RunConfig()
    ModelConfig().validate()


# ------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        (["--model.n_heads=12", "--model.n_kv_heads=5"], "model.n_kv_heads", "divisible"),
        (["--model.n_heads=4", "--model.n_kv_heads=0"], "model.n_kv_heads", "positive"),
        (["--model.d_model=28", "--model.n_heads=4"], "model.head_dim", "even"),  # head_dim 7 with RoPE
        (["--model.head_dim=7"], "model.head_dim", "even"),
        (["--model.d_model=30", "--model.n_heads=4"], "model.n_heads", "divisible"),
        (
            ["--model.seq_len=128", "--model.sliding_window=256", "--model.layer_pattern=[local]"],
            "model.sliding_window",
            "longer than the context",
        ),
        (["--model.sliding_window=0", "--model.layer_pattern=[local]"], "model.sliding_window", "positive"),
        (["--model.sliding_window=64"], "model.layer_pattern", "no layer is marked 'local'"),
        (["--model.layer_pattern=[local, global]"], "model.sliding_window", "not set"),
        (["--model.layer_pattern=[]"], "model.layer_pattern", "at least one"),
        (["--model.rope_fraction=1.5"], "model.rope_fraction", "(0, 1]"),
        (["--model.output_logit_scale=true"], "model.output_logit_scale", "tie_embeddings"),
        (["--model.attn_dropout=1.0"], "model.attn_dropout", "[0, 1)"),
        (["--model.z_loss=-1e-4"], "model.z_loss", ">= 0"),
        (["--model.attn_softcap=0"], "model.attn_softcap", "positive"),
        (["--model.d_model=31", "--model.n_heads=1", "--model.position=sinusoidal"], "model.d_model", "even"),
        (["--optim.lr=-1e-3"], "optim.lr", "positive"),
        (["--optim.betas=[0.9, 1.0]"], "optim.betas", "[0, 1)"),
        (["--schedule.min_lr=1.0"], "schedule.min_lr", "above the peak"),
        (["--train.seq_len=4096", "--model.seq_len=2048"], "train.seq_len", "longer than the model's context"),
        (["--data.val_fraction=1"], "data.val_fraction", "[0, 1)"),
    ],
)
def test_invalid_value_is_one_error_naming_field_and_reason(overrides: list[str], field: str, reason: str):
    err = config_error(overrides)
    assert err.field == field
    assert reason in err.reason
    assert str(err).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        (["--model.n_layers=four"], "model.n_layers", "must be an integer"),
        (["--model.n_layers=4.5"], "model.n_layers", "must be an integer"),
        (["--model.n_layers=true"], "model.n_layers", "must be an integer"),
        (["--model.norm_eps=small"], "model.norm_eps", "must be a number"),
        (["--model.tie_embeddings=1"], "model.tie_embeddings", "must be true or false"),
        (["--model.n_kv_heads=two"], "model.n_kv_heads", "int | null"),
        (["--model.layer_pattern=local"], "model.layer_pattern", "must be a list"),
        (["--optim.betas=[0.9]"], "optim.betas", "must have 2 items"),
        (["--log.name=[a, b]"], "log.name", "must be a string"),
        (["--model.d_ff={a: 1}"], "model.d_ff", "int | null"),
    ],
)
def test_wrong_type_is_one_error_naming_field_and_type(overrides: list[str], field: str, reason: str):
    err = config_error(overrides)
    assert (err.field, reason in err.reason) == (field, True), str(err)


@pytest.mark.parametrize(
    ("overrides", "field", "choices"),
    [
        (["--model.norm=batchnorm"], "model.norm", "'layernorm' | 'rmsnorm'"),
        (["--model.activation=tanh"], "model.activation", "'swiglu'"),
        (["--model.position=relative"], "model.position", "'alibi'"),
        (["--model.init=xavier"], "model.init", "'mup'"),
        (["--model.norm_placement=middle"], "model.norm_placement", "'sandwich'"),
        (["--model.layer_pattern=[local, medium]"], "model.layer_pattern[1]", "'global'"),
        (["--optim.name=sgd"], "optim.name", "'adamw'"),
        (["--schedule.name=linear"], "schedule.name", "'wsd'"),
    ],
)
def test_value_outside_a_literal_is_an_error_listing_the_choices(overrides: list[str], field: str, choices: str):
    err = config_error(overrides)
    assert err.field == field
    assert "must be one of" in err.reason and choices in err.reason


def test_unknown_key_in_a_file_is_an_error_naming_it(tmp_path: Path):
    path = write(tmp_path / "run.yaml", "model:\n  n_layers: 2\n  n_layer: 4\n")
    err = config_error([], path)
    assert err.field == "model.n_layer"
    assert "unknown key" in err.reason and "n_layers" in err.reason, "the valid keys are listed"


def test_unknown_section_is_an_error_naming_it(tmp_path: Path):
    err = config_error([], write(tmp_path / "run.yaml", "modle:\n  n_layers: 2\n"))
    assert err.field == "modle" and "unknown key" in err.reason


def test_section_that_is_not_a_mapping_is_an_error(tmp_path: Path):
    err = config_error([], write(tmp_path / "run.yaml", "model: 5\n"))
    assert err.field == "model" and "mapping" in err.reason


def test_file_that_is_not_a_mapping_is_an_error(tmp_path: Path):
    err = config_error([], write(tmp_path / "run.yaml", "- a\n- b\n"))
    assert "mapping" in err.reason


def test_missing_file_is_an_error(tmp_path: Path):
    err = config_error([], tmp_path / "nope.yaml")
    assert "does not exist" in err.reason


def test_invalid_yaml_is_an_error(tmp_path: Path):
    err = config_error([], write(tmp_path / "run.yaml", "model: {n_layers: [\n"))
    assert "not valid YAML" in err.reason


def test_config_error_is_a_value_error_with_field_and_reason():
    err = ConfigError("model.d_model", "must be positive")
    assert isinstance(err, ValueError)
    assert (err.field, err.reason, str(err)) == ("model.d_model", "must be positive", "model.d_model: must be positive")


# ------------------------------------------------------------------------------------- overrides


def test_override_parses_to_a_nested_mapping():
    assert parse_overrides(["--model.n_layers=4", "optim.lr=0.001", "--model.layer_pattern=[local, global]"]) == {
        "model": {"n_layers": 4, "layer_pattern": ["local", "global"]},
        "optim": {"lr": 0.001},
    }


def test_override_applies():
    cfg = load_config(None, ["--model.n_layers=4"])
    assert cfg.model.n_layers == 4
    assert dataclasses.replace(cfg.model, n_layers=ModelConfig().n_layers) == ModelConfig()


@pytest.mark.parametrize(
    ("override", "section", "key", "value"),
    [
        ("--optim.lr=1e-3", "optim", "lr", 1e-3),  # YAML 1.1 would read "1e-3" as a string
        ("--optim.lr=3.0e-4", "optim", "lr", 3e-4),
        ("--optim.lr=2", "optim", "lr", 2.0),  # an int where a float is wanted is fine
        ("--model.sliding_window=null", "model", "sliding_window", None),
        ("--model.n_kv_heads=", "model", "n_kv_heads", None),
        ("--model.tie_embeddings=true", "model", "tie_embeddings", True),
        ("--optim.betas=[0.9, 0.99]", "optim", "betas", (0.9, 0.99)),
        ("--data.source=some/dir/*.txt", "data", "source", "some/dir/*.txt"),
        ("--log.name=a=b", "log", "name", "a=b"),  # only the first '=' splits
    ],
)
def test_override_values_are_parsed_as_yaml(override: str, section: str, key: str, value: Any):
    got = getattr(getattr(load_config(None, [override]), section), key)
    assert got == value and type(got) is type(value)


def test_unknown_override_key_is_an_error_naming_it():
    err = config_error(["--model.nope=1"])
    assert err.field == "model.nope" and "unknown key" in err.reason


def test_unknown_override_section_is_an_error_naming_it():
    err = config_error(["--nope.n_layers=1"])
    assert err.field == "nope" and "unknown key" in err.reason


@pytest.mark.parametrize("override", ["--model.n_layers", "--n_layers=4", "--model..n_layers=4", "--=4"])
def test_malformed_override_is_an_error(override: str):
    with pytest.raises(ConfigError):
        parse_overrides([override])


def test_overrides_beat_the_file_and_later_overrides_beat_earlier(tmp_path: Path):
    path = write(tmp_path / "run.yaml", "model:\n  n_layers: 2\n  d_model: 64\n  n_heads: 2\n")
    cfg = load_config(path, ["--model.n_layers=3", "--model.n_layers=5"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (5, 64, 2)


def test_scientific_notation_in_a_file_is_a_float(tmp_path: Path):
    cfg = load_config(write(tmp_path / "run.yaml", "optim:\n  lr: 1e-3\n  eps: 1.0e-8\nschedule:\n  min_lr: 1E-5\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.schedule.min_lr) == (1e-3, 1e-8, 1e-5)


# -------------------------------------------------------------------------------------- defaults


def test_defaults_are_merged_under_the_file(tmp_path: Path):
    write(tmp_path / "models" / "small.yaml", "model:\n  n_layers: 2\n  d_model: 64\n  n_heads: 2\n")
    write(tmp_path / "optim.yaml", "optim:\n  lr: 0.01\n  weight_decay: 0.0\n")
    path = write(tmp_path / "run.yaml", "defaults: [models/small.yaml, optim.yaml]\nmodel:\n  n_layers: 3\n")
    cfg = load_config(path)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (3, 64, 2), "a deep merge, file wins"
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.01, 0.0)


def test_later_defaults_beat_earlier_ones(tmp_path: Path):
    write(tmp_path / "a.yaml", "model:\n  n_layers: 2\n  d_model: 64\n  n_heads: 2\n")
    write(tmp_path / "b.yaml", "model:\n  n_layers: 3\n")
    cfg = load_config(write(tmp_path / "run.yaml", "defaults: [a.yaml, b.yaml]\n"))
    assert (cfg.model.n_layers, cfg.model.d_model) == (3, 64)


def test_defaults_may_be_a_single_string_and_nest(tmp_path: Path):
    write(tmp_path / "base.yaml", "model:\n  d_model: 64\n  n_heads: 2\n")
    write(tmp_path / "mid.yaml", "defaults: base.yaml\nmodel:\n  n_layers: 2\n")
    cfg = load_config(write(tmp_path / "run.yaml", "defaults: mid.yaml\ntrain:\n  steps: 700\n"))
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.steps) == (64, 2, 700)


def test_defaults_resolve_against_the_configs_directory(tmp_path: Path):
    shipped = sorted(p.relative_to(CONFIGS_DIR) for p in CONFIG_FILES if "defaults" not in p.read_text())
    if not shipped:
        pytest.skip("no self-contained config under configs/ yet")
    path = write(tmp_path / "run.yaml", f"defaults: [{shipped[0].as_posix()}]\n")
    assert load_config(path) == load_config(CONFIGS_DIR / shipped[0])


def test_a_relative_path_resolves_against_the_configs_directory():
    if not CONFIG_FILES:
        pytest.skip("no config under configs/ yet")
    relative = CONFIG_FILES[0].relative_to(CONFIGS_DIR)
    assert load_config(relative) == load_config(CONFIG_FILES[0])


def test_a_config_including_itself_is_an_error(tmp_path: Path):
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    err = config_error([], tmp_path / "a.yaml")
    assert err.field == "defaults" and "includes itself" in err.reason


def test_a_missing_default_is_an_error(tmp_path: Path):
    err = config_error([], write(tmp_path / "run.yaml", "defaults: [missing.yaml]\n"))
    assert "does not exist" in err.reason


def test_errors_in_an_included_file_name_the_field(tmp_path: Path):
    write(tmp_path / "base.yaml", "model:\n  n_heads: 12\n  n_kv_heads: 5\n")
    err = config_error([], write(tmp_path / "run.yaml", "defaults: [base.yaml]\n"))
    assert err.field == "model.n_kv_heads"


# ------------------------------------------------------------------------------------ round trip


ROUND_TRIP_OVERRIDES = [
    "--model.n_layers=3",
    "--model.n_kv_heads=4",
    "--model.sliding_window=1024",
    "--model.layer_pattern=[local, global]",
    "--model.attn_softcap=50.0",
    "--model.norm_eps=1e-6",
    "--model.activation=geglu_tanh",
    "--model.tie_embeddings=true",
    "--model.output_logit_scale=true",
    "--optim.lr=1e-3",
    "--optim.eps=1e-8",
    "--optim.betas=[0.9, 0.999]",
    "--optim.name=soap",
    "--train.seq_len=512",
]


@pytest.mark.parametrize("overrides", [[], ROUND_TRIP_OVERRIDES], ids=["defaults", "many-changes"])
def test_config_round_trips_through_yaml(tmp_path: Path, overrides: list[str]):
    cfg = load_config(None, overrides)
    cfg.log.name = "round trip: 'quoted' #1"  # YAML-significant characters survive
    path = write(tmp_path / "dumped.yaml", cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


def test_to_dict_is_plain_data():
    data = load_config(None, ["--optim.betas=[0.9, 0.99]"]).to_dict()
    assert data["optim"]["betas"] == [0.9, 0.99]
    assert set(data) == {f.name for f in dataclasses.fields(RunConfig)}


# ------------------------------------------------------------- settings that would be accepted and then ignored


@pytest.mark.parametrize(
    "overrides, field, instead",
    [
        (["--schedule.unit=tokens", "--schedule.warmup_steps=50"], "schedule.warmup_steps", "schedule.warmup_tokens"),
        (["--schedule.unit=tokens", "--schedule.decay_steps=500"], "schedule.decay_steps", "schedule.decay_tokens"),
        (["--schedule.warmup_tokens=4096"], "schedule.warmup_tokens", "schedule.warmup_steps"),
        (["--schedule.decay_tokens=100000"], "schedule.decay_tokens", "schedule.decay_steps"),
    ],
)
def test_a_field_of_the_other_clock_is_refused_naming_the_one_that_takes_effect(
    overrides: list[str], field: str, instead: str
):
    e = config_error(overrides)
    assert e.field == field and "has no effect" in e.reason and instead in e.reason


def test_the_quickstart_on_the_token_clock_does_not_silently_lose_its_warmup():
    e = config_error(["--schedule.unit=tokens", "--schedule.warmup_tokens=20000"], Path("configs/tiny.yaml"))
    assert e.field == "schedule.warmup_steps" and "(20)" in e.reason and "schedule.warmup_tokens" in e.reason
    # switched off explicitly, the token clock's warmup alone runs
    cfg = load_config("configs/tiny.yaml", ["--schedule.unit=tokens", "--schedule.warmup_steps=0"])
    assert (cfg.schedule.unit, cfg.schedule.warmup_tokens) == ("tokens", 0)


def test_a_decay_that_ends_before_its_warmup_is_refused_on_either_clock():
    assert config_error(["--schedule.warmup_steps=50", "--schedule.decay_steps=40"]).field == "schedule.decay_steps"
    e = config_error(["--schedule.unit=tokens", "--schedule.warmup_tokens=500", "--schedule.decay_tokens=400"])
    assert e.field == "schedule.decay_tokens" and "warmup_tokens (500)" in e.reason


@pytest.mark.parametrize("warmup, steps", [(500, 10), (10, 10), (20, 3)])
def test_a_warmup_at_least_as_long_as_the_run_is_refused(warmup: int, steps: int):
    e = config_error([f"--schedule.warmup_steps={warmup}", f"--train.steps={steps}"], Path("configs/tiny.yaml"))
    assert e.field == "schedule.warmup_steps" and f"({warmup})" in e.reason and f"train.steps {steps}" in e.reason


def test_a_warmup_shorter_than_the_run_is_accepted_and_the_default_one_is_named_as_such():
    assert load_config("configs/tiny.yaml", ["--schedule.warmup_steps=9", "--train.steps=10"]).train.steps == 10
    e = config_error(["--train.steps=50"])  # the default warmup (100 steps) outlasts a 50-step run
    assert e.field == "schedule.warmup_steps" and "(100, the default)" in e.reason


def test_a_token_warmup_at_least_as_long_as_the_run_in_tokens_is_refused():
    cfg = load_config(None, ["--schedule.unit=tokens", "--schedule.warmup_tokens=512", "--train.steps=2"])
    # 2 steps x 4 sequences x 64 tokens = 512 tokens: the warmup would end exactly with the run
    with pytest.raises(ConfigError, match=r"schedule\.warmup_tokens: \(512\) is at least the whole run \(512 tokens"):
        cfg.check_run_length(total_tokens=2 * 4 * 64)
    cfg.check_run_length(total_tokens=2 * 4 * 64 + 1)


DEAD = [  # (overrides, the refused field, words of the reason): each setting is read only under another choice
    (["--model.position=alibi", "--model.rope_theta=500000"], "model.rope_theta", "position rope"),
    (["--model.position=learned", "--model.rope_fraction=0.5"], "model.rope_fraction", "position rope"),
    (["--model.norm=rmsnorm", "--model.norm_bias=true"], "model.norm_bias", "only a layernorm has a bias"),
    (["--model.norm=biasnorm", "--model.norm_unit_offset=true"], "model.norm_unit_offset", "biasnorm has no gain"),
    (["--model.d_ff=1000", "--model.d_ff_multiple=128"], "model.d_ff_multiple", "model.d_ff is set (1000)"),
    (["--model.activation=gelu", "--model.d_ff_multiple=128"], "model.d_ff_multiple", "'gelu' is not gated"),
    (["--model.n_conditions=4"], "model.n_conditions", "model.adaln is 'none'"),
    (["--model.init=t5", "--model.init_std=0.01"], "model.init_std", "init t5 derives every scale"),
    (["--model.mup_base_d_model=128"], "model.mup_base_d_model", "muP setting"),
    (["--model.mup_output_mult=2.0"], "model.mup_output_mult", "muP setting"),
    (["--optim.adafactor_decay_rate=0.5"], "optim.adafactor_decay_rate", "optimizer adafactor, and optim.name is"),
    (["--optim.soap_precondition_frequency=5"], "optim.soap_precondition_frequency", "optimizer soap"),
    (["--optim.scaled_adam_param_max_rms=2.0"], "optim.scaled_adam_param_max_rms", "optimizer scaled_adam"),
    (["--optim.name=adafactor", "--optim.betas=[0.9, 0.99]"], "optim.betas", "adafactor does not read it"),
    (["--optim.name=adafactor", "--optim.eps=1e-6"], "optim.eps", "adafactor does not read it"),
    (["--optim.name=scaled_adam", "--optim.weight_decay=0.05"], "optim.weight_decay", "scaled_adam applies no"),
    (["--optim.name=scaled_adam", "--optim.weight_decay_schedule=lr_squared"], "optim.weight_decay_schedule",
     "scaled_adam applies no"),
    (["--optim.weight_decay_schedule=lr_squared", "--optim.weight_decay=0"], "optim.weight_decay", "lr(t)^2"),
    (["--schedule.name=constant", "--schedule.decay_steps=500"], "schedule.decay_steps", "no end of decay"),
    (["--schedule.name=constant", "--schedule.min_lr=0.0"], "schedule.min_lr", "never decays"),
    (["--schedule.name=inverse_sqrt", "--schedule.decay_steps=500"], "schedule.decay_steps", "has no end"),
    (["--schedule.wsd_decay_fraction=0.1"], "schedule.wsd_decay_fraction", "schedule wsd, and schedule.name is"),
    (["--train.spike_window=64"], "train.spike_window", "train.skip_spikes is false"),
    (["--train.spike_sigmas=3.0"], "train.spike_sigmas", "train.skip_spikes is false"),
    (["--train.eval_interval=0", "--train.eval_samples=4"], "train.eval_samples", "there is no evaluation"),
    (["--train.batch_size_increment=8"], "train.batch_size_increment", "the batch does not grow"),
    (["--train.batch_ramp_tokens=1000"], "train.batch_ramp_tokens", "the batch does not grow"),
    (["--data.shards=data/x", "--data.source=corpus/*.txt"], "data.source", "data.shards (data/x) is read instead"),
    (["--data.shuffle=false", "--data.shuffle_block_shards=2"], "data.shuffle_block_shards", "nothing is shuffled"),
    (["--data.shuffle=false", "--data.seed=7"], "data.seed", "nothing is shuffled"),
    (["--checkpoint.background=true"], "checkpoint.background", "only interval saves run in the background"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, field, words", DEAD, ids=[d[1] + "|" + d[0][0] for d in DEAD])
def test_a_setting_that_another_makes_dead_is_refused_naming_why(overrides: list[str], field: str, words: str):
    e = config_error(overrides)
    assert e.field == field, e
    assert e.reason.startswith("(") and "has no effect: " in e.reason and words in e.reason, e.reason
    assert "\n" not in str(e)


ALIVE = [  # the same settings where they take effect are accepted
    ["--model.rope_theta=500000", "--model.rope_fraction=0.5"],
    ["--model.norm=rmsnorm", "--model.qk_norm=layernorm", "--model.norm_bias=true"],
    ["--model.norm=biasnorm", "--model.qk_norm=rmsnorm", "--model.norm_unit_offset=true"],
    ["--model.d_ff_multiple=128"],
    ["--model.adaln=adaln", "--model.n_conditions=4"],
    ["--model.init=mup", "--model.mup_base_d_model=128", "--model.mup_output_mult=2.0", "--model.init_std=0.01"],
    ["--optim.name=adafactor", "--optim.adafactor_decay_rate=0.5"],
    ["--optim.name=soap", "--optim.soap_precondition_frequency=5", "--optim.betas=[0.9, 0.99]"],
    ["--optim.name=scaled_adam", "--optim.scaled_adam_param_max_rms=2.0"],
    ["--schedule.name=wsd", "--schedule.wsd_decay_fraction=0.1", "--schedule.decay_steps=500"],
    ["--schedule.name=inverse_sqrt", "--schedule.min_lr=0.0"],
    ["--train.skip_spikes=true", "--train.spike_window=64", "--train.spike_sigmas=3.0"],
    ["--train.eval_samples=4"],
    ["--train.micro_batch_size=4", "--train.grad_accum=2", "--train.batch_size_start=4",
     "--train.batch_size_increment=4", "--train.batch_ramp_tokens=1000", "--schedule.unit=tokens",
     "--schedule.warmup_steps=0"],
    ["--data.shards=data/x", "--data.seed=7", "--data.shuffle_block_shards=2"],
    ["--checkpoint.background=true", "--checkpoint.interval_steps=100"],
]  # fmt: skip


@pytest.mark.parametrize("overrides", ALIVE, ids=[a[0] for a in ALIVE])
def test_the_same_settings_are_accepted_where_they_take_effect(overrides: list[str]):
    load_config(None, overrides)


def test_the_defaults_of_dead_settings_are_accepted():
    """Only a value someone set is refused: every field at its default loads under every choice that ignores it."""
    for overrides in (
        ["--schedule.unit=tokens"],
        ["--schedule.name=constant"],
        ["--optim.name=adafactor"],
        ["--model.position=alibi", "--model.norm=biasnorm", "--model.activation=gelu", "--model.init=t5"],
        ["--data.shuffle=false", "--data.shards=data/x"],
        ["--train.eval_interval=0"],
    ):
        load_config(None, overrides)


# --------------------------------------------------------------------------- paths that are directories


def test_a_config_path_that_is_a_directory_is_named_as_such(tmp_path: Path):
    (tmp_path / "run.yaml").mkdir()
    e = config_error([], tmp_path / "run.yaml")
    assert "is a directory, not a YAML file" in str(e) and "does not exist" not in str(e)


def test_an_included_default_that_is_a_directory_is_named_as_such(tmp_path: Path):
    (tmp_path / "models").mkdir()
    e = config_error([], write(tmp_path / "run.yaml", "defaults: [models]\n"))
    assert f"{tmp_path / 'models'} is a directory, not a YAML file" in str(e)


# --------------------------------------------------------------------------------- resolved derived fields


def test_resolved_fills_every_derived_field_with_the_value_a_run_uses():
    cfg = load_config(
        None,
        ["--model.d_model=100", "--model.n_heads=4", "--model.position=none", "--model.d_ff_multiple=64",
         "--model.seq_len=256", "--train.steps=700", "--train.seed=9"],
    ).resolved()  # fmt: skip
    m = cfg.model
    # head_dim = 100 / 4; swiglu: 8/3 * 100 = 266.7 rounded up to a multiple of 64 = 320; kv heads = heads (MHA)
    assert (m.head_dim, m.d_ff, m.n_kv_heads) == (25, 320, 4)
    assert m.softmax_scale == pytest.approx(1 / 5)  # 1 / sqrt(25)
    assert (cfg.train.seq_len, cfg.data.seed, cfg.schedule.decay_steps) == (256, 9, 700)
    gelu = load_config(None, ["--model.activation=gelu", "--model.d_model=96", "--model.n_heads=3"]).resolved()
    assert (gelu.model.d_ff, gelu.model.head_dim) == (4 * 96, 32)
    t5 = load_config(None, ["--model.init=t5"]).resolved()
    assert t5.model.softmax_scale == 1.0  # Mesh-TensorFlow: no 1/sqrt(d_k)


def test_resolved_values_are_what_the_model_is_built_with():
    from tplus_dist.model import build_model

    cfg = load_config("configs/tiny.yaml").resolved().model
    model = build_model(load_config("configs/tiny.yaml").model)
    block = next(iter(model.blocks()))
    assert block.mlp.w_up.weight.shape == (cfg.d_ff, cfg.d_model)
    assert block.attn.wq.weight.shape == (cfg.n_heads * cfg.head_dim, cfg.d_model)
    assert block.attn.wk.weight.shape == (cfg.n_kv_heads * cfg.head_dim, cfg.d_model)
    assert (cfg.d_ff, cfg.head_dim, cfg.n_kv_heads) == (384, 128 // 4, 2)


def test_a_derived_field_and_its_value_are_the_same_model_to_a_resume():
    """A checkpoint saved from a config with d_ff derived (tiny's old preset: null, rounded to 128) is the model that
    states d_ff 384: the resume check compares what the model is built with."""
    from tplus_dist.checkpoint.manager import model_identity

    now = load_config("configs/tiny.yaml").to_dict()["model"]
    old = {**now, "d_ff": None, "d_ff_multiple": 128}  # 8/3 * 128 = 341.3, rounded up to 384
    assert model_identity(old) == model_identity(now)
    assert model_identity({**now, "d_ff": None})["d_ff"] == 512  # with the default multiple 256: another model
