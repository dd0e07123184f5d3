"""Qwen2ForCausalLM (model_type 'qwen2', HF modeling_qwen2.py): Llama with biases on q, k and v only, and layer
patterns whose full-attention layers all come first (Qwen2Config's max_window_layers: layers from that index on
slide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tplus_dist.config.model import ModelConfig
from tplus_dist.hf.core import (
    _ATTN_DROPOUT,
    Family,
    Keys,
    Spec,
    _fmt,
    _layer_types,
    _llama_like_rules,
    _local,
    _windows_from_hf,
)


def _max_window_layers(cfg: ModelConfig) -> int | None:
    """Qwen2Config's max_window_layers for cfg's layers: k when the first k are full and the rest slide (n_layers
    when none slides), None for any other pattern. transformers derives layer_types from it (index >= k slides) and
    other readers use it alone, so it must say what layer_types says."""
    local = _local(cfg)
    k = local.index(True) if any(local) else len(local)
    return k if all(local[k:]) else None


def windows_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The sliding-window keys of Qwen2Config and Qwen3Config: use_sliding_window, layer_types and a
    max_window_layers that says the same (another pattern is refused by :func:`window_check`)."""
    out = {"use_sliding_window": any(_local(cfg)), **_layer_types(cfg)}
    k = _max_window_layers(cfg)
    if k is not None:
        out["max_window_layers"] = k
    return out


def window_check(model_type: str) -> Callable[[ModelConfig], list[str]]:
    """The family check of a max_window_layers family: refuse a pattern whose full layers do not all come first."""

    def check(cfg: ModelConfig) -> list[str]:
        if _max_window_layers(cfg) is not None:
            return []
        return [
            f"model.layer_pattern={_fmt(cfg.layer_pattern)}: {model_type} slides the layers from max_window_layers "
            "on, so its full-attention layers must all come first"
        ]

    return check


def skip_unused_max_window_layers(cfg: ModelConfig) -> set[str]:
    """Without sliding layers max_window_layers means nothing (Qwen2.5's files carry 21 of 24, 70 of 36)."""
    return set() if any(_local(cfg)) else {"max_window_layers"}


# Qwen2 (HF modeling_qwen2.py): Llama with biases on q, k and v only (none on o or the MLP), tied or untied
QWEN2 = Family(
    model_type="qwen2",
    arch="Qwen2ForCausalLM",
    spec=Spec(norm="rmsnorm", qkv_bias=(True, False), sliding="any"),
    keys=Keys(),
    to_hf=lambda cfg: {"rope_scaling": None, **windows_to_hf(cfg)},
    from_hf=lambda hf: {
        "qkv_bias": True,
        **_windows_from_hf(hf, [t == "sliding_attention" for t in hf.layer_types]),
    },
    rules=lambda cfg: _llama_like_rules(cfg, qkv_bias=True),
    dropout=_ATTN_DROPOUT,
    check=window_check("qwen2"),
    skip_compare=skip_unused_max_window_layers,
)
