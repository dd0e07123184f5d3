"""Initialization schemes: GPT-2, T5 / Mesh-TensorFlow, muP.

Every weight is drawn from its own generator, seeded from one base seed and the parameter's name in the
whole model ("layers.3.attn.wq.weight"), at its full (unsplit) shape. So a parameter's initial value does
not depend on how the model is cut: a tensor-parallel rank draws the whole matrix and keeps its slice
(as megatron-core's CPU initialization does), a pipeline stage builds only its layers, and both start
from exactly the values one process would have.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig

SHARD_ATTR = "tplus_shard"
"""Attribute a layer provider sets on a parameter that holds one slice of a larger logical tensor."""


@dataclass(frozen=True)
class Shard:
    """This parameter is slice ``index`` of ``parts`` equal slices of the logical tensor along ``dim``."""

    dim: int
    index: int
    parts: int

    def full_shape(self, local: torch.Size) -> torch.Size:
        shape = list(local)
        shape[self.dim] *= self.parts
        return torch.Size(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.parts, dim=self.dim)[self.index]


def shard_of(p: torch.Tensor) -> Shard | None:
    shard = getattr(p, SHARD_ATTR, None)
    return shard if isinstance(shard, Shard) else None


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, typed: providers return plain nn.Modules."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight


def draw_init_seed() -> int:
    """A base seed from torch's global generator: ``torch.manual_seed(s)`` before building fixes the init."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _param_seed(base: int, name: str) -> int:
    digest = hashlib.blake2b(f"{base}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_LAYER = re.compile(r"layers\.\d+\.")


def weight_std(name: str, cfg: ModelConfig) -> float:
    """The init std of the matrix called ``name`` in the whole decoder.

    GPT-2: N(0, 0.02) everywhere, residual output projections N(0, 0.02 / sqrt(2 n_layers)).
    T5: q ~ (d_model d_kv)^-1/2, k, v ~ d_model^-1/2, o ~ (n_heads d_kv)^-1/2, MLP in ~ d_model^-1/2,
        out ~ d_ff^-1/2, embedding ~ 1, relative bias ~ d_model^-1/2 (and no 1/sqrt(d_k) in the softmax: see
        attn_scale).
    muP: hidden matrices N(0, std / sqrt(width_mult)) (fan-in scaling relative to the base width),
        embeddings and head N(0, std) (their multipliers carry the width dependence)."""
    local = _LAYER.sub("", name, count=1)
    d, dkv, h = cfg.d_model, cfg.dim_head, cfg.n_heads
    if cfg.init == "t5":
        t5 = {
            "embed.weight": 1.0,
            "pos_embed.weight": 1.0,
            "cond_embed.weight": 1.0,
            "head.weight": d**-0.5,
            "attn.wq.weight": (d * dkv) ** -0.5,
            "attn.wk.weight": d**-0.5,
            "attn.wv.weight": d**-0.5,
            "attn.wo.weight": (h * dkv) ** -0.5,
            "mlp.w_gate.weight": d**-0.5,
            "mlp.w_up.weight": d**-0.5,
            "mlp.w_down.weight": cfg.ffn_dim**-0.5,
            "rel_bias.weight": d**-0.5,  # T5's relative attention bias (HF: factor * d_model^-0.5)
            "attn.core.rel_bias.weight": d**-0.5,
            "attn.core.shaw.keys": dkv**-0.5,
            "attn.core.shaw.values": dkv**-0.5,
        }
        if local not in t5:
            raise KeyError(f"no T5 init rule for parameter {name!r}")
        return t5[local]
    std = cfg.init_std
    if local in ("embed.weight", "pos_embed.weight", "cond_embed.weight", "head.weight", "rel_bias.weight",
                 "attn.core.rel_bias.weight",
                 "attn.core.shaw.keys", "attn.core.shaw.values"):  # fmt: skip
        return std  # (relative-bias tables are per head, not per width: muP leaves them alone)
    hidden = std / math.sqrt(cfg.width_mult) if cfg.init == "mup" else std
    if local in ("attn.wo.weight", "mlp.w_down.weight"):
        return hidden / math.sqrt(2 * cfg.n_layers)  # each layer adds two residual branches
    return hidden


ZERO_INIT = (".ada.weight",)
"""Matrices that start at zero: adaLN's modulation (the model starts as the plain one)."""


def _is_norm(module: nn.Module) -> bool:
    return hasattr(module, "eps")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int, prefix: str = "") -> None:
    """Initialize ``model`` (the decoder or any part of it whose parameter names, after ``prefix``, are the
    decoder's): matrices from weight_std, each from its own generator (see the module docstring); biases
    zero; norm gains one (zero when stored with a unit offset)."""
    for mod_name, module in model.named_modules(prefix=prefix.rstrip(".")):
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if _is_norm(module):
            reset = getattr(module, "reset_parameters", None)
            assert callable(reset), f"norm {mod_name} has no reset_parameters"
            reset()
            continue
        for pname, p in own:
            full_name = f"{mod_name}.{pname}" if mod_name else pname
            if pname == "bias" or full_name.endswith(ZERO_INIT):
                p.zero_()
                continue
            if p.device.type == "meta":  # shape-only models (FLOP counts) have nothing to fill
                continue
            shard = shard_of(p)
            shape = shard.full_shape(p.shape) if shard else p.shape
            # drawn on the CPU whatever p's device: a CUDA generator gives other numbers for the same seed, and a
            # model built on the GPU (the te provider's, megatron-core's without CPU initialization) must start from
            # the values of one built on the CPU and moved
            gen = torch.Generator().manual_seed(_param_seed(seed, full_name))
            full = torch.empty(shape, dtype=torch.float32)
            full.normal_(0.0, weight_std(full_name, cfg), generator=gen)
            p.copy_(shard.take(full) if shard else full)
