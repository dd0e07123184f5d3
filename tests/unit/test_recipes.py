"""The named recipes in configs/recipes/ load as they are (validated at full size) and train a few steps on CPU
at a small size (their choices kept: only widths, depths and lengths shrink)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tplus_dist.config import load_config
from tplus_dist.optim.schedules import lr_at
from tplus_dist.train.run import train

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "tplus-tests"
RECIPES = sorted(p.name for p in (ROOT / "configs" / "recipes").glob("*.yaml"))
SMALL = ["--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.d_ff=128", "--model.seq_len=64"]
RUN = ["--data.source=builtin:pydoc", "--data.tokenizer=bytes", "--train.steps=4", "--train.micro_batch_size=4",
       "--train.eval_interval=0", "--log.progress=false", "--log.tensorboard=false", "--schedule.warmup_steps=2",
       f"--data.cache_dir={CACHE}"]  # fmt: skip


def test_the_recipes_are_there():
    assert RECIPES == ["espnet-transformer.yaml", "palm-style.yaml", "t5-decoder.yaml", "transformer-pp.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_loads_at_full_size_and_trains_small(tmp_path: Path, recipe: str):
    full = load_config(f"recipes/{recipe}")
    assert full.model.n_layers >= 6  # the recipe's own size validates
    _, history = train(load_config(f"recipes/{recipe}", [*SMALL, *RUN, f"--log.run_dir={tmp_path}/run"]))
    assert len(history) == 4 and all(math.isfinite(m["loss"]) for m in history)


def test_the_recipes_choices_are_the_named_ones():
    espnet = load_config("recipes/espnet-transformer.yaml")
    m = espnet.model
    assert (m.d_model, m.n_heads, m.d_ff, m.n_layers) == (256, 8, 2048, 6)
    assert (m.embed_dropout, m.attn_dropout, m.resid_dropout) == (0.1, 0.1, 0.1)
    assert m.position == "sinusoidal" and m.embed_scale and m.norm_placement == "pre"
    palm = load_config("recipes/palm-style.yaml")
    assert palm.model.block == "parallel" and palm.model.kv_heads == 1 and palm.model.output_logit_scale
    assert palm.model.tie_embeddings and palm.model.z_loss > 0 and not palm.model.linear_bias
    assert palm.optim.name == "adafactor" and palm.optim.weight_decay_schedule == "lr_squared"
    t5 = load_config("recipes/t5-decoder.yaml")
    assert t5.model.position == "t5_bias" and t5.model.init == "t5" and t5.model.norm == "rmsnorm"
    tpp = load_config("recipes/transformer-pp.yaml")
    assert (tpp.optim.betas, tpp.optim.weight_decay, tpp.optim.grad_clip) == ((0.9, 0.95), 0.1, 1.0)
    assert tpp.schedule.name == "cosine" and tpp.schedule.min_lr == 1e-5
    # the Noam schedule: peak at the end of warmup, then peak * sqrt(warmup / step)
    s = espnet.schedule
    assert lr_at(s.warmup_steps - 1, s, 1.0, 10**6) == pytest.approx(1.0)
    assert lr_at(4 * s.warmup_steps - 1, s, 1.0, 10**6) == pytest.approx(0.5)
