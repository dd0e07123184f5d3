"""Export and load: choosing the family, translating the config both ways, mapping the tensors, the logit check."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from tplus_dist.checkpoint.extra_state import without_extra_state
from tplus_dist.config.base import ConfigError, from_dict, to_dict
from tplus_dist.config.model import ModelConfig
from tplus_dist.fsutil import respect_umask
from tplus_dist.hf.core import (
    _ACT_FROM_HF,
    _GATE_OF,
    STASH_KEY,
    VERIFY_TOL,
    Family,
    HFExportError,
    HFLoadError,
    _hf_act,
    _universal_blockers,
    blockers,
)
from tplus_dist.hf.families import FAMILIES
from tplus_dist.hf.tokenizer import save_tokenizer
from tplus_dist.model import Decoder, build_model


def choose_family(cfg: ModelConfig, family: str | None = None) -> Family:
    """The first family of FAMILIES that represents ``cfg`` exactly (or ``family``, by HF model_type, if it does);
    HFExportError naming the blocking fields otherwise."""
    cfg.validate()
    universal = _universal_blockers(cfg)
    if universal:
        raise HFExportError("cannot export to transformers: " + "; ".join(universal))
    if family is not None:
        fam = _family_of(family, HFExportError)
        why = blockers(fam, cfg)
        if why:
            raise HFExportError(f"{fam.model_type} ({fam.arch}) cannot represent this model: " + "; ".join(why))
        return fam
    found = [(fam, blockers(fam, cfg)) for fam in FAMILIES]
    for fam, why in found:
        if not why:
            return fam
    fewest = min(len(why) for _, why in found)
    closest = [f"{fam.model_type} ({fam.arch}) lacks: " + "; ".join(why) for fam, why in found if len(why) == fewest]
    raise HFExportError("no transformers family represents this model exactly; closest: " + " | ".join(closest))


# --------------------------------------------------------------------------------------------- config translation
def _size_values(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head, "d_ff": cfg.ffn_dim, "seq_len": cfg.seq_len, "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }  # fmt: skip


def hf_config_dict(fam: Family, cfg: ModelConfig) -> dict[str, Any]:
    """The HF config entries that define the function (dropout and bookkeeping aside)."""
    out: dict[str, Any] = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    for name, value in _size_values(cfg).items():
        key = getattr(fam.keys, name)
        if key is not None:
            out[key] = value
    if fam.keys.activation is not None:
        out[fam.keys.activation] = _hf_act(cfg)
    out.update(fam.to_hf(cfg))
    return out


def _dropout_to_hf(fam: Family, cfg: ModelConfig) -> dict[str, float]:
    out: dict[str, float] = {}
    covered: set[str] = set()
    for key, fields in fam.dropout.items():
        values = {getattr(cfg, f) for f in fields}
        covered.update(fields)
        out[key] = max(values)
        if len(values) > 1:
            warnings.warn(
                f"{fam.model_type} has one dropout ({key}) for {', '.join(fields)}; writing {max(values)}",
                stacklevel=3,
            )
    for f in ("embed_dropout", "attn_dropout", "resid_dropout"):
        if f not in covered and getattr(cfg, f) > 0:
            warnings.warn(
                f"model.{f}={getattr(cfg, f)}: {fam.model_type} has no such dropout; the exported model will not "
                "apply it in training (inference is unaffected)",
                stacklevel=3,
            )
    return out


def _cfg_from_hf(fam: Family, hf: Any) -> ModelConfig:
    """Our ModelConfig for an HF config, from the size keys, the spec's fixed choices and the family's reader."""
    k, s = fam.keys, fam.spec

    def get(key: str | None, default: Any) -> Any:
        v = getattr(hf, key, None) if key is not None else None
        return default if v is None else v

    d, h = get(k.d_model, None), get(k.n_heads, None)
    kv, hd = get(k.kv_heads, h), get(k.head_dim, d // h)
    kw: dict[str, Any] = {
        "vocab_size": hf.vocab_size, "n_layers": get(k.n_layers, None), "d_model": d, "n_heads": h,
        "n_kv_heads": kv if kv != h else None, "head_dim": hd if hd * h != d else None,
        "d_ff": get(k.d_ff, None), "norm_eps": get(k.norm_eps, ModelConfig.norm_eps),
        "seq_len": get(k.seq_len, ModelConfig.seq_len), "rope_theta": get(k.rope_theta, ModelConfig.rope_theta),
        "tie_embeddings": bool(hf.tie_word_embeddings), "norm": s.norm, "position": s.position[0],
        "embed_norm": s.embed_norm, "embed_scale": s.embed_scale, "norm_placement": s.norm_placement[0],
        "block": s.block[0], "qk_norm": s.qk_norm[0], "final_norm": s.final_norm[0],
        "qk_norm_scope": s.qk_norm_scope[0] if s.qk_norm[0] != "none" else "head",
    }  # fmt: skip
    if k.activation is not None:
        name = getattr(hf, k.activation)
        act = _ACT_FROM_HF.get(name) if isinstance(name, str) else None
        if s.activation[0] in _GATE_OF and act is not None:
            act = {v: g for g, v in _GATE_OF.items()}[act]
        if act is None or act not in s.activation:
            raise HFLoadError(f"{fam.model_type} {k.activation}={name!r}: tplus_dist has no such activation here")
        kw["activation"] = act
    else:
        kw["activation"] = s.activation[0]
    if getattr(hf, "rope_scaling", None) is not None:
        raise HFLoadError(f"{fam.model_type} rope_scaling={hf.rope_scaling}: tplus_dist's RoPE is unscaled")
    kw.update(fam.from_hf(hf))
    for key, fields in fam.dropout.items():
        for f in fields:
            kw[f] = float(getattr(hf, key, 0.0) or 0.0)
    try:
        cfg = ModelConfig(**kw)
        cfg.validate()
    except ConfigError as e:
        raise HFLoadError(f"{fam.model_type} config does not make a valid tplus_dist model: {e}") from e
    # not checked against fam's Spec: a Mistral without a window is a fine model of ours, exported as a Llama
    return cfg


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return bool(a == b)


def _check_roundtrip(fam: Family, hf: Any, cfg: ModelConfig) -> None:
    """Every entry export would write for ``cfg`` must be what the HF config says: whatever an HF option the
    readers did not consider does (scale_attn_by_inverse_layer_idx, word_embed_proj_dim, ...), a value other
    than the one ours implies is refused here instead of being silently dropped."""
    skip = fam.skip_compare(cfg)
    sizes = {getattr(fam.keys, name) for name in _size_values(cfg)}
    for key, ours in hf_config_dict(fam, cfg).items():
        if key in skip:
            continue
        theirs = getattr(hf, key, None)
        if theirs is None and key in sizes:  # head_dim, n_inner: None is the family's default, read as such
            continue
        if key == "sliding_window" and theirs is not None:  # windows longer than the context were clamped
            theirs = min(theirs, cfg.seq_len)
        if key == fam.keys.activation and _ACT_FROM_HF.get(str(theirs)) == _ACT_FROM_HF[ours]:
            continue  # aliases: gelu_new is the tanh GELU we write as gelu_pytorch_tanh
        if not _same_value(ours, theirs):
            raise HFLoadError(f"{fam.model_type} {key}={theirs!r}: tplus_dist can only represent {key}={ours!r} here")


# ------------------------------------------------------------------------------------------------------- weights
def _to_hf_state(fam: Family, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for rule in fam.rules(cfg):
        out[rule.hf] = rule.to_hf(*(state[o].detach().float().cpu() for o in rule.ours)).contiguous()
    return out


def _to_our_state(fam: Family, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rules = fam.rules(cfg)
    names = {r.hf for r in rules}
    # checkpoints saved from the base model lack the CausalLM prefix (old GPT-2 files)
    prefix = rules[0].hf.split(".")[0] + "."
    tensors = {(prefix + k if k not in names and prefix + k in names else k): v for k, v in tensors.items()}
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for rule in rules:
        if rule.hf not in tensors:
            raise HFLoadError(f"{fam.model_type} checkpoint has no tensor {rule.hf}")
        for name, t in zip(rule.ours, rule.from_hf(tensors[rule.hf].float()), strict=True):
            if name in state and not torch.equal(state[name], t):
                raise HFLoadError(
                    f"{source[name]} and {rule.hf} differ, but tplus_dist keeps one tensor for both ({name})"
                    + (": its parallel block has one norm" if "norm" in name else "")
                )
            state[name], source[name] = t.contiguous(), rule.hf
    tied = {fam.tied_head} if cfg.tie_embeddings else set()  # some writers keep the tied copy
    left = sorted(k for k in tensors if k not in names | tied and not any(re.search(p, k) for p in fam.ignore))
    if left:
        raise HFLoadError(f"{fam.model_type} checkpoint has tensors tplus_dist has no place for: {', '.join(left[:8])}")
    return state


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    files = files or ([] if not (folder / "model.safetensors").exists() else ["model.safetensors"])
    if not files:
        raise HFLoadError(f"{folder}: no model.safetensors (or index); only safetensors checkpoints are read")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


# --------------------------------------------------------------------------------------------------- export / load
def _family_of(model_type: str, error: type[ValueError] = HFLoadError) -> Family:
    for fam in FAMILIES:
        if fam.model_type == model_type:
            return fam
    names = ", ".join(f.model_type for f in FAMILIES)
    raise error(f"model_type {model_type!r} is not a supported family (supported: {names})")


def _verify(model: Decoder, cfg: ModelConfig, folder: Path) -> float:
    """Reload ``folder`` with AutoModelForCausalLM and compare logits with ``model`` on a few random tokens."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    ref = model
    if any(p.dtype != torch.float32 for p in model.parameters()):  # compare in fp32, not the training dtype
        ref = build_model(cfg)
        ref.load_state_dict({k: v.float().cpu() for k, v in without_extra_state(model.state_dict()).items()})
    device = next(ref.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (2, min(cfg.seq_len, 32)), generator=gen)
    was_training = ref.training
    ref.eval()
    try:
        with torch.no_grad():
            ours = ref(tokens.to(device)).float().cpu()
            theirs = hf_model(tokens).logits.float()
    finally:
        ref.train(was_training)
    diff = (ours - theirs).abs().max().item()
    if not diff <= VERIFY_TOL * max(1.0, ours.abs().max().item()):
        raise HFExportError(
            f"exported {hf_model.__class__.__name__} disagrees with the model: max |logit diff| {diff:.3g} "
            f"(tolerance {VERIFY_TOL:g} x max(1, max |logit|)); {folder} is not a faithful export"
        )
    return diff


def _file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime, size) of each file in ``folder``: what an export wrote is what changed."""
    out = {}
    for p in folder.iterdir():
        st = p.stat()
        if p.is_file():
            out[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def export(
    model: Decoder, cfg: ModelConfig, out_dir: str | Path, *, family: str | None = None, tokenizer: Any = None
) -> Path:
    """Write ``model`` to ``out_dir`` as the transformers family that computes the same function, reload it with
    AutoModelForCausalLM and check the logits agree; returns the folder. HFExportError when no family can.

    ``family`` (an HF model_type, e.g. "gpt_neox") asks for that family instead of the first that fits.
    ``tokenizer``: the run's tokenizer (data/tokenizers.py), written beside the weights (`save_tokenizer`) with its
    bos / eos / pad ids in config.json and generation_config.json, so that AutoTokenizer loads the folder and
    ``generate`` stops at the end of text; without one those ids stay unset. Files get the user's umask."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_utils import no_init_weights

    if model.cfg != cfg:
        raise ValueError("cfg differs from model.cfg; pass the config the model was built with")
    fam = choose_family(cfg, family)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size ({cfg.vocab_size})"
        )
    kwargs = hf_config_dict(fam, cfg)
    kwargs.update(_dropout_to_hf(fam, cfg))
    # without a tokenizer leave special tokens unset rather than inherit a family's defaults (OLMo 2's 50279)
    special: dict[str, int | None] = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = _file_stamps(out)
    if tokenizer is not None:
        special.update(save_tokenizer(tokenizer, out, max_length=cfg.seq_len))
    kwargs.update(special, architectures=[fam.arch])
    kwargs[STASH_KEY] = to_dict(cfg)
    hf_cfg = AutoConfig.for_model(fam.model_type, **kwargs)
    state = _to_hf_state(fam, cfg, without_extra_state(model.state_dict()))  # parameters only: no FP8 scales
    with no_init_weights():  # skip the random init that load_state_dict overwrites anyway
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # strict, except that a tied head is the embedding itself and so is not a separate tensor of ours
    allowed_missing = {fam.tied_head} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise HFExportError(
            f"{fam.model_type} mapping out of date with transformers: missing "
            f"{sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}"
        )
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(**special)
    hf_model.save_pretrained(out, safe_serialization=True)
    # safetensors writes its files 0600; every file this export wrote gets the mode an open() would give
    after = _file_stamps(out)
    respect_umask(*(out / n for n, stamp in after.items() if before.get(n) != stamp))
    _verify(model, cfg, out)
    return out


def load(folder: str | Path) -> tuple[ModelConfig, Decoder]:
    """Read an HF folder (config.json + safetensors) of a supported family: our ModelConfig and a Decoder with
    its weights, computing the same logits. HFLoadError names what tplus_dist cannot represent."""
    from transformers import AutoConfig

    folder = Path(folder)
    hf = AutoConfig.from_pretrained(folder)
    fam = _family_of(hf.model_type)
    derived = _cfg_from_hf(fam, hf)
    _check_roundtrip(fam, hf, derived)
    candidates = [derived]
    stash = getattr(hf, STASH_KEY, None)
    if isinstance(stash, dict):  # our own export: restore the exact config when it still describes this folder
        try:
            stored = from_dict(ModelConfig, stash, "model")
            stored.validate()
        except ConfigError:
            stored = None
        if stored is not None and not blockers(fam, stored):
            a, b = hf_config_dict(fam, stored), hf_config_dict(fam, derived)
            if a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a):
                candidates.insert(0, stored)
    tensors = _read_tensors(folder)
    for i, cfg in enumerate(candidates):
        try:
            state = _to_our_state(fam, cfg, tensors)
        except HFLoadError:
            if i == len(candidates) - 1:
                raise
            continue  # e.g. biases that were zero at export were trained since: fall back to the HF-only reading
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)
        return cfg, model
    raise AssertionError("unreachable")
