"""Parity with Hugging Face transformers: export -> AutoModelForCausalLM gives our logits, and load() reads HF
folders (ours and ones transformers wrote itself) into a Decoder with the HF model's logits. CPU, fp32, tiny."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tplus_dist import ModelConfig, build_model, hf
from tplus_dist.config import from_dict
from tplus_dist.model import Decoder

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny matmuls: thread fan-out costs more than it saves (10x on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """Our model with every parameter moved off its init, so that unit gains and zero biases are really mapped."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(cfg.vocab_size, (2, cfg.seq_len), generator=gen)


def hf_logits(folder: Path, toks: torch.Tensor) -> tuple[torch.Tensor, str]:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(toks).logits, type(model).__name__


def our_logits(model: Decoder, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(toks)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def random_cfg(family: str, seed: int) -> ModelConfig:
    """A tiny config that ``family`` is the first in hf.FAMILIES to represent, with random choices inside it.
    Each choice takes option (seed + random offset) mod n, so seeds 0-2 cover every option of a 2- or 3-way choice
    while the combinations stay random."""
    rng = random.Random(family)

    def c(options: list[Any]) -> Any:
        return options[(seed + rng.randrange(len(options))) % len(options)]

    n_heads = c([2, 4])
    kw: dict[str, Any] = dict(
        vocab_size=rng.randint(90, 300) + seed,  # rarely a multiple of 64: the padded rows must not be exported
        n_layers=c([2, 3]),
        d_model=64,
        n_heads=n_heads,
        seq_len=c([16, 24, 32]),
        norm_eps=c([1e-5, 1e-6]),
        tie_embeddings=c([True, False]),
    )
    gqa = dict(n_kv_heads=c([None, 1, n_heads // 2]))  # MHA / MQA / GQA
    rope = dict(position="rope", rope_theta=c([10000.0, 500000.0]))
    gated = dict(activation=c(["swiglu", "geglu", "geglu_tanh", "reglu"]))
    plain = dict(activation=c(["gelu", "gelu_tanh", "relu", "silu"]))
    layernorm = dict(norm="layernorm", norm_bias=c([True, False]), norm_unit_offset=c([True, False]))
    rmsnorm = dict(norm="rmsnorm", norm_unit_offset=c([True, False]))
    window = c([4, 8])
    mixed = dict(sliding_window=window, layer_pattern=c([["local", "global"], ["global", "local"]]))
    gemma = dict(rmsnorm, embed_scale=True, head_dim=c([None, 32]), **gqa, **rope, **gated)
    if family == "gpt2":
        kw |= dict(layernorm, position=c(["learned", "learned", "none"]), linear_bias=c([True, False]), **plain)
    elif family == "opt":  # what GPT-2 cannot: post-norm, or pre-norm without the final norm (both: no final norm)
        kw |= dict(layernorm, norm_eps=1e-5, norm_placement=c(["pre", "post"]), final_norm=False, **plain)
        kw |= dict(position=c(["learned", "none"]), linear_bias=c([True, False]))
    elif family == "bloom":
        n_heads = c([4, 6])  # 6: ALiBi slopes of a non-power-of-two head count
        d = 8 * n_heads
        kw |= dict(layernorm, d_model=d, n_heads=n_heads, d_ff=4 * d, position="alibi", embed_norm=True)
        kw |= dict(activation="gelu_tanh", linear_bias=c([True, False]))
    elif family == "llama":
        kw |= dict(rmsnorm, linear_bias=c([True, False]), head_dim=c([None, 8]), **gqa, **rope, **gated)
    elif family == "mistral":
        kw |= dict(rmsnorm, sliding_window=window, layer_pattern=["local"], **gqa, **rope, **gated)
    elif family == "ministral":
        kw |= dict(rmsnorm, n_layers=c([2, 4]), **mixed, **gqa, **rope, **gated)
    elif family == "qwen2":  # biases on q, k, v only; sliding layers after the full ones (max_window_layers)
        first_full = dict(sliding_window=window, layer_pattern=["global"] + ["local"] * (kw["n_layers"] - 1))
        sliding = c([{}, first_full, dict(sliding_window=window, layer_pattern=["local"])])
        kw |= dict(rmsnorm, qkv_bias=True, head_dim=c([None, 32]), **sliding, **gqa, **rope, **gated)
    elif family == "olmo2":  # norms after the sublayers, QK-norm over the whole projections
        kw |= dict(rmsnorm, norm_placement="reordered", qk_norm="rmsnorm", qk_norm_scope="projection")
        kw |= dict(head_dim=c([None, 32]), **gqa, **rope, **gated)
    elif family == "olmo3":
        kw |= dict(rmsnorm, norm_placement="reordered", qk_norm="rmsnorm", qk_norm_scope="projection")
        kw |= dict(n_layers=c([2, 4]), **c([mixed, dict(sliding_window=window, layer_pattern=["local"])]))
        kw |= dict(**gqa, **rope, **gated)
    elif family == "phi3":  # partial rotary with RMSNorm (a whole-head rotary is a Llama)
        kw |= dict(rmsnorm, rope_fraction=c([0.25, 0.5]), **gqa, **rope, **gated)
    elif family == "stablelm":  # LayerNorm with a gated MLP
        kw |= dict(layernorm, rope_fraction=c([0.25, 0.5, 1.0]), qkv_bias=c([True, False]))
        kw |= dict(block=c(["serial", "parallel"]), **gqa, **rope, **gated)
    elif family == "starcoder2":  # LayerNorm, RoPE and a plain MLP with fewer kv heads (GPT-NeoX has none)
        kw |= dict(layernorm, linear_bias=c([True, False]), n_kv_heads=c([1, n_heads // 2]), **rope, **plain)
    elif family == "granite":  # only Granite multiplies: muP's logits and softmax, a logit scale, any softmax scale
        mup = dict(init="mup", mup_base_d_model=32, mup_output_mult=c([1.0, 2.0]))
        extra = c([mup, dict(output_logit_scale=True, tie_embeddings=True), dict(softmax_scale=0.1)])
        kw |= dict(rmsnorm, linear_bias=c([True, False]), embed_scale=c([True, False]), **extra, **gqa, **rope, **gated)
    elif family == "qwen3":  # as qwen2: sliding layers after the full ones (max_window_layers)
        first_full = dict(sliding_window=window, layer_pattern=["global"] + ["local"] * (kw["n_layers"] - 1))
        sliding = c([{}, first_full, dict(sliding_window=window, layer_pattern=["local"])])
        kw |= dict(rmsnorm, qk_norm="rmsnorm", head_dim=c([None, 32]), **sliding, **gqa, **rope, **gated)
    elif family == "gemma":
        kw |= gemma
    elif family in ("gemma2", "gemma3_text"):
        kw |= dict(gemma, norm_placement="sandwich", n_layers=c([2, 3]), **mixed)
        kw |= dict(softmax_scale=c([None, 0.1]), final_logit_softcap=c([None, 5.0]))
        if family == "gemma2":
            kw["attn_softcap"] = c([None, 20.0])
        else:
            kw["qk_norm"] = "rmsnorm"
    elif family == "phi":
        kw |= dict(layernorm, block="parallel", rope_fraction=c([0.25, 0.5, 1.0]), qk_norm=c(["none", "layernorm"]))
        kw |= dict(linear_bias=c([True, False]), **gqa, **rope, **plain)
    elif family == "gpt_neox":
        kw |= dict(layernorm, rope_fraction=c([0.25, 0.5, 1.0]), linear_bias=c([True, False]), **rope, **plain)
    else:
        raise ValueError(family)
    return ModelConfig(**kw)


FAMILIES = [f.model_type for f in hf.FAMILIES]


# ------------------------------------------------------------------------------------------------- export parity
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_transformers(family: str, seed: int, tmp_path: Path) -> None:
    cfg = random_cfg(family, seed)
    fam = hf.choose_family(cfg)
    assert fam.model_type == family
    model = perturbed(cfg, seed)
    folder = hf.export(model, cfg, tmp_path)
    toks = tokens(cfg, seed)
    ours = our_logits(model, toks)
    theirs, arch = hf_logits(folder, toks)
    assert arch == fam.arch
    assert theirs.shape[-1] == cfg.vocab_size  # the padding rows stay home
    assert max_diff(ours, theirs) <= ATOL
    # round trip: our own export reads back to the same config and the same function
    cfg2, model2 = hf.load(folder)
    assert cfg2 == cfg
    assert max_diff(our_logits(model2, toks), ours) <= ATOL


def test_required_families_by_class(tmp_path: Path) -> None:
    """GPT2LMHeadModel and LlamaForCausalLM, from the presets' choices at tiny size."""
    gpt2 = ModelConfig(
        vocab_size=211, n_layers=2, d_model=64, n_heads=4, seq_len=32, norm="layernorm", norm_bias=True,
        position="learned", activation="gelu_tanh", linear_bias=True, tie_embeddings=True,
    )  # fmt: skip
    llama = ModelConfig(vocab_size=257, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seq_len=32)
    for cfg, arch in ((gpt2, "GPT2LMHeadModel"), (llama, "LlamaForCausalLM")):
        model = perturbed(cfg)
        folder = hf.export(model, cfg, tmp_path / arch)
        theirs, got = hf_logits(folder, tokens(cfg))
        assert got == arch
        assert max_diff(our_logits(model, tokens(cfg)), theirs) <= ATOL


def test_gpt2_conv1d_and_fused_qkv_layout(tmp_path: Path) -> None:
    """HF GPT-2 stores Conv1D weights [in, out] with q, k, v fused in c_attn: check the tensors, not just logits."""
    cfg = random_cfg("gpt2", 0)
    cfg = dataclasses.replace(cfg, linear_bias=True)
    model = perturbed(cfg)
    folder = hf.export(model, cfg, tmp_path)
    w = load_file(str(folder / "model.safetensors"))
    a = model.blocks()[0].attn
    c_attn = w["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (cfg.d_model, 3 * cfg.d_model)
    torch.testing.assert_close(c_attn, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).t(), rtol=0, atol=0)
    assert w["transformer.wte.weight"].shape[0] == cfg.vocab_size


def test_t5_init_unscaled_softmax_exports_as_gpt2(tmp_path: Path) -> None:
    """T5 init folds 1/sqrt(d_k) into q (softmax scale 1): GPT-2's scale_attn_weights=false is that."""
    cfg = dataclasses.replace(random_cfg("gpt2", 1), init="t5")
    model = perturbed(cfg)
    folder = hf.export(model, cfg, tmp_path)
    assert json.loads((folder / "config.json").read_text())["scale_attn_weights"] is False
    theirs, _ = hf_logits(folder, tokens(cfg))
    ours = our_logits(model, tokens(cfg))
    assert max_diff(ours, theirs) <= ATOL * max(1.0, ours.abs().max().item())


def test_forced_family_gpt_neox_parallel_writes_the_shared_norm_twice(tmp_path: Path) -> None:
    """Phi is the first match for a parallel LayerNorm block; family= asks for GPT-NeoX, whose parallel block has
    two norms: both get our one norm, and load() reads them back into one."""
    cfg = dataclasses.replace(random_cfg("gpt_neox", 0), block="parallel")
    assert hf.choose_family(cfg).model_type == "phi"
    model = perturbed(cfg)
    folder = hf.export(model, cfg, tmp_path, family="gpt_neox")
    theirs, arch = hf_logits(folder, tokens(cfg))
    assert arch == "GPTNeoXForCausalLM"
    assert max_diff(our_logits(model, tokens(cfg)), theirs) <= ATOL
    cfg2, model2 = hf.load(folder)
    assert cfg2 == cfg
    assert max_diff(our_logits(model2, tokens(cfg)), theirs) <= ATOL
    with pytest.raises(hf.HFExportError, match=r"model\.n_kv_heads=1: gpt_neox"):
        hf.export(perturbed(c := dataclasses.replace(cfg, n_kv_heads=1)), c, tmp_path / "x", family="gpt_neox")


def test_bf16_model_exports_in_fp32_and_verifies_against_an_fp32_copy(tmp_path: Path) -> None:
    cfg = random_cfg("gemma2", 0)
    model = perturbed(cfg).to(torch.bfloat16)
    folder = hf.export(model, cfg, tmp_path)
    ref = build_model(cfg)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert max_diff(our_logits(ref, tokens(cfg)), hf_logits(folder, tokens(cfg))[0]) <= ATOL


def test_dropout_maps_to_family_keys_or_warns(tmp_path: Path) -> None:
    cfg = dataclasses.replace(random_cfg("gpt2", 0), embed_dropout=0.1, attn_dropout=0.2, resid_dropout=0.3)
    folder = hf.export(perturbed(cfg), cfg, tmp_path / "gpt2")  # eval-mode check: dropout is off
    got = json.loads((folder / "config.json").read_text())
    assert (got["embd_pdrop"], got["attn_pdrop"], got["resid_pdrop"]) == (0.1, 0.2, 0.3)
    assert hf.load(folder)[0] == cfg
    cfg = dataclasses.replace(random_cfg("llama", 0), resid_dropout=0.1)
    with pytest.warns(UserWarning, match=r"model\.resid_dropout=0\.1: llama has no such dropout"):
        hf.export(perturbed(cfg), cfg, tmp_path / "llama")


def test_verification_catches_a_wrong_tensor(tmp_path: Path) -> None:
    cfg = random_cfg("llama", 0)
    model = perturbed(cfg)
    folder = hf.export(model, cfg, tmp_path)
    path = folder / "model.safetensors"
    w = load_file(str(path))
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"].flip(0).contiguous()
    save_file(w, str(path), metadata={"format": "pt"})
    with pytest.raises(hf.HFExportError, match="disagrees"):
        hf._verify(model, cfg, folder)


def _layer_types_qwen_derives(config: dict[str, Any], family: str) -> list[str]:
    """What transformers' Qwen2Config / Qwen3Config makes of an exported config.json without its layer_types: the
    layers that slide by use_sliding_window and max_window_layers alone."""
    rest = {k: v for k, v in config.items() if k != "layer_types"}
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.Qwen3Config
    return list(cls(**rest).layer_types)


QWEN_KW = {"qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm="rmsnorm")}
"""What makes a model export as each Qwen family."""


@pytest.mark.parametrize("family", list(QWEN_KW))
@pytest.mark.parametrize(
    "pattern",
    [["global"], ["local"], ["global", "local", "local"], ["global", "global", "local"]],
)
def test_qwen_max_window_layers_says_what_layer_types_says(family: str, pattern: list[str], tmp_path: Path) -> None:
    cfg = ModelConfig(
        vocab_size=100, n_layers=3, d_model=32, n_heads=2, seq_len=16, **QWEN_KW[family],
        sliding_window=4 if "local" in pattern else None, layer_pattern=pattern,
    )  # fmt: skip
    hf.export(build_model(cfg), cfg, tmp_path, family=family)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    expected = [("sliding" if pattern[i % len(pattern)] == "local" else "full") + "_attention" for i in range(3)]
    assert config["layer_types"] == expected
    assert _layer_types_qwen_derives(config, family) == expected
    # and a reader that believes use_sliding_window and max_window_layers (vLLM, older transformers) agrees
    slides = [config["use_sliding_window"] and i >= config["max_window_layers"] for i in range(3)]
    assert slides == [t == "sliding_attention" for t in expected]


@pytest.mark.parametrize("family", list(QWEN_KW))
@pytest.mark.parametrize("pattern", [["local", "global"], ["global", "local", "global"]])
def test_qwen_refuses_a_pattern_max_window_layers_cannot_say(family: str, pattern: list[str], tmp_path: Path) -> None:
    cfg = ModelConfig(
        vocab_size=100, n_layers=3, d_model=32, n_heads=2, seq_len=16, sliding_window=4, layer_pattern=pattern,
        **({} if family == "qwen2" else QWEN_KW[family]),
    )  # fmt: skip
    with pytest.raises(hf.HFExportError, match=rf"model\.layer_pattern=\[.*\]: {family} slides the layers from "):
        hf.export(build_model(cfg), cfg, tmp_path / "out", family=family)
    assert not (tmp_path / "out").exists()
    if family == "qwen2":
        assert hf.choose_family(cfg).model_type == "ministral"  # another family takes it


def test_reexported_qwen2_keeps_its_max_window_layers(tmp_path: Path) -> None:
    folder, _ = save_hf_model(tmp_path, "qwen2-tied-window")  # 3 layers, max_window_layers 1
    original = json.loads((folder / "config.json").read_text())
    cfg, model = hf.load(folder)
    again = json.loads((hf.export(model, cfg, tmp_path / "again") / "config.json").read_text())
    assert again["model_type"] == "qwen2"
    assert (again["max_window_layers"], again["layer_types"]) == (1, original["layer_types"])
    # one without windows (max_window_layers 28 > 2 layers, Qwen2Config's default) still loads and exports
    folder, _ = save_hf_model(tmp_path / "plain", "qwen2")
    cfg, model = hf.load(folder)
    again = json.loads((hf.export(model, cfg, tmp_path / "plain-again") / "config.json").read_text())
    assert _layer_types_qwen_derives(again, "qwen2") == again["layer_types"] == ["full_attention"] * 2


# ------------------------------------------------------------------------------------------ loading HF's own models
GPT2_SIZES = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=150)
OPT_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
    max_position_embeddings=32, vocab_size=150,
)  # fmt: skip
SIZES = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
    vocab_size=150,
)  # fmt: skip
THREE_LAYERS = dict(SIZES, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=8)
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": GPT2_SIZES,
    "gpt2-untied-relu": dict(
        GPT2_SIZES, model_type="gpt2", activation_function="relu", n_inner=96, tie_word_embeddings=False
    ),
    "opt": OPT_SIZES,
    "opt-post": dict(OPT_SIZES, model_type="opt", do_layer_norm_before=False),
    "bloom": dict(hidden_size=48, n_layer=2, n_head=6, vocab_size=150),
    "llama": dict(SIZES, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "mistral": dict(SIZES, num_key_value_heads=1, sliding_window=8),
    "mistral-no-window": dict(SIZES, model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "mistral-window-past-context": dict(SIZES, model_type="mistral", num_key_value_heads=2, sliding_window=4096),
    "ministral": dict(THREE_LAYERS, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qwen2": dict(SIZES, num_key_value_heads=2),
    "qwen2-tied-window": dict(
        THREE_LAYERS, model_type="qwen2", use_sliding_window=True, max_window_layers=1, tie_word_embeddings=True
    ),
    "qwen3": dict(THREE_LAYERS, use_sliding_window=True, max_window_layers=1),
    "gemma": dict(SIZES, num_key_value_heads=1, head_dim=32),
    "gemma2": dict(THREE_LAYERS, query_pre_attn_scalar=24),
    "gemma3_text": dict(
        THREE_LAYERS,
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=5.0,
    ),
    "phi": dict(SIZES, num_key_value_heads=2, qk_layernorm=True),
    "gpt_neox": dict(SIZES, use_parallel_residual=False),
    "olmo2": dict(SIZES, num_key_value_heads=2),
    "olmo3": dict(THREE_LAYERS, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": dict(SIZES, num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=None),
    "stablelm": dict(SIZES, num_key_value_heads=2, use_qkv_bias=True),
    "stablelm-parallel": dict(
        SIZES, model_type="stablelm", num_key_value_heads=4, use_parallel_residual=True, partial_rotary_factor=1.0
    ),
    "starcoder2": dict(SIZES, num_key_value_heads=2),
    "granite": dict(
        SIZES, num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        embedding_multiplier=8.0, attention_multiplier=0.1, logits_scaling=8.0,  # sqrt(64): embed / logit scales
    ),
}  # fmt: skip


def save_hf_model(tmp_path: Path, model_type: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """A randomly initialised transformers model, every parameter perturbed (HF inits gains to 1, biases to 0),
    saved with save_pretrained."""
    kwargs = dict(HF_CONFIGS[model_type]) | overrides
    model_type = kwargs.pop("model_type", model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **kwargs), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "lm_head.bias":  # tplus_dist's head has no bias: Phi's must stay zero to load
                p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_load_model_written_by_transformers(name: str, tmp_path: Path) -> None:
    folder, theirs = save_hf_model(tmp_path, name)
    cfg, ours = hf.load(folder)
    toks = tokens(cfg)
    with torch.no_grad():
        ref = theirs(toks).logits
    assert max_diff(our_logits(ours, toks), ref) <= ATOL
    # and back, as the same family where it can (asked for: OPT's pre-norm choices are GPT-2's too), else as the
    # first that fits (a Mistral without a window is a Llama)
    fam = next(f for f in hf.FAMILIES if f.model_type == theirs.config.model_type)
    out = hf.export(ours, cfg, tmp_path / "again", family=None if hf.blockers(fam, cfg) else fam.model_type)
    assert max_diff(hf_logits(out, toks)[0], ref) <= ATOL


def test_load_falls_back_when_stored_config_no_longer_fits(tmp_path: Path) -> None:
    """GPT-2 without biases is written with zero biases; once they are trained in HF, the stored config
    (linear_bias=false) no longer describes the folder and load() reads the biases."""
    cfg = dataclasses.replace(random_cfg("gpt2", 0), linear_bias=False)
    folder = hf.export(perturbed(cfg), cfg, tmp_path)
    assert hf.load(folder)[0].linear_bias is False
    path = folder / "model.safetensors"
    w = load_file(str(path))
    w["transformer.h.0.mlp.c_fc.bias"] = torch.randn_like(w["transformer.h.0.mlp.c_fc.bias"])
    save_file(w, str(path), metadata={"format": "pt"})
    cfg2, model2 = hf.load(folder)
    assert cfg2.linear_bias is True
    theirs, _ = hf_logits(folder, tokens(cfg))
    assert max_diff(our_logits(model2, tokens(cfg)), theirs) <= ATOL


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        ("llama", dict(attention_bias=True, mlp_bias=False), "mlp_bias=False"),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        ("opt", dict(word_embed_proj_dim=32), "word_embed_proj_dim=32"),
        ("gpt_neox", dict(use_parallel_residual=True), "differ.*one norm"),
        ("qwen3", dict(attention_bias=True), "attention_bias=True"),
        ("olmo2", dict(attention_bias=True), "attention_bias=True"),
        ("granite", dict(residual_multiplier=0.5), "residual_multiplier=0.5"),
        ("granite", dict(logits_scaling=3.0), "logits_scaling=3.0"),
        ("gemma3_text", dict(rope_local_base_freq=5000.0), "rope_local_base_freq=5000"),
        ("gemma2", dict(hidden_activation="gelu_fast"), "hidden_activation='gelu_fast'"),
    ],
)
def test_load_refuses_what_it_cannot_represent(
    name: str, overrides: dict[str, Any], match: str, tmp_path: Path
) -> None:
    folder, _ = save_hf_model(tmp_path, name, **overrides)
    with pytest.raises(hf.HFLoadError, match=match):
        hf.load(folder)


def test_load_refuses_phi_head_bias_and_unknown_families(tmp_path: Path) -> None:
    folder, _ = save_hf_model(tmp_path, "phi")
    w = load_file(str(folder / "model.safetensors"))
    w["lm_head.bias"] = torch.ones_like(w["lm_head.bias"])
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFLoadError, match=r"lm_head\.bias is nonzero.*no bias"):
        hf.load(folder)
    cfg = AutoConfig.for_model("falcon", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    cfg.save_pretrained(tmp_path / "falcon")
    with pytest.raises(hf.HFLoadError, match="'falcon' is not a supported family"):
        hf.load(tmp_path / "falcon")


# ------------------------------------------------------------------------------------------- refusals on export
BASE = dict(vocab_size=100, n_layers=2, d_model=64, n_heads=4, seq_len=16)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(softmax_off_by_one=True), r"model\.softmax_off_by_one=true: no transformers family computes"),
        (dict(position="alibi"), r"model\.position=alibi: llama"),  # BLOOM has ALiBi, with LayerNorm + embed norm
        (dict(position="sinusoidal"), r"model\.position=sinusoidal"),
        (dict(norm_placement="post"), r"model\.norm_placement=post: llama"),
        (dict(block="parallel"), r"model\.block=parallel: llama"),
        (  # Granite multiplies the logits, with RMSNorm only
            dict(output_logit_scale=True, tie_embeddings=True, norm="layernorm", position="learned", activation="gelu"),
            r"model\.output_logit_scale=true: gpt2 does not multiply the output logits",
        ),
        (dict(init="mup", mup_base_d_model=32, norm="layernorm"), r"granite .* lacks: model\.norm=layernorm"),
        (dict(init="t5", qk_norm="rmsnorm"), r"model\.softmax_scale=null \(init=t5: attention scale 1\): qwen3"),
        (dict(attn_softcap=50.0), r"model\.attn_softcap=50\.0: llama"),
        (dict(rope_fraction=0.5, linear_bias=True), r"model\.rope_fraction=0\.5: llama rotates the whole head"),
        (dict(sliding_window=4, layer_pattern=["local"], linear_bias=True), r"model\.linear_bias=true: mistral"),
        (dict(qk_norm="layernorm"), r"model\.qk_norm=layernorm: llama"),
        (dict(final_norm=False), r"model\.final_norm=false: llama"),
        (dict(embed_norm=True), r"model\.embed_norm=true: llama"),
        (
            dict(qk_norm="rmsnorm", qk_norm_scope="projection"),
            r"qwen3 \(Qwen3ForCausalLM\) lacks: model\.qk_norm_scope",
        ),
        (dict(qkv_bias=True, qk_norm="rmsnorm"), r"qwen2 \(Qwen2ForCausalLM\) lacks: model\.qk_norm=rmsnorm"),
        (dict(norm_placement="reordered"), r"olmo2 \(Olmo2ForCausalLM\) lacks: model\.qk_norm=none"),
        (
            dict(norm="layernorm", position="learned", activation="gelu", norm_placement="post"),
            r"model\.final_norm=true: opt's post-norm layers",
        ),
    ],
)
def test_export_refuses_with_the_field(overrides: dict[str, Any], match: str, tmp_path: Path) -> None:
    cfg = ModelConfig(**(BASE | overrides))
    with pytest.raises(hf.HFExportError, match=match):
        hf.export(build_model(cfg), cfg, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_every_model_config_field_is_accounted_for() -> None:
    assert set(hf.FIELD_HANDLING) == {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize(
    ("preset", "family"),
    [("gpt2-124m", "gpt2"), ("llama-1.1b", "llama"), ("llama-7b", "llama"), ("gemma2-2b", "gemma2"), ("tiny", "llama")],
)
def test_presets_choose_their_family(preset: str, family: str) -> None:
    data = yaml.safe_load((REPO / "configs" / "models" / f"{preset}.yaml").read_text())["model"]
    assert hf.choose_family(from_dict(ModelConfig, data, "model")).model_type == family


def test_importing_tplus_dist_does_not_import_transformers() -> None:
    code = "import sys, tplus_dist, tplus_dist.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
