"""The family table: one module per transformers family, each a `Family` entry over the rules core (core.py).
To add a family: a module here with its Spec, Keys, config translation and rules, and a line in FAMILIES."""

from __future__ import annotations

from tplus_dist.hf.core import Family
from tplus_dist.hf.families.bloom import BLOOM
from tplus_dist.hf.families.gemma import GEMMA
from tplus_dist.hf.families.gemma2 import GEMMA2
from tplus_dist.hf.families.gemma3 import GEMMA3
from tplus_dist.hf.families.gpt2 import GPT2
from tplus_dist.hf.families.gpt_neox import GPT_NEOX
from tplus_dist.hf.families.granite import GRANITE
from tplus_dist.hf.families.llama import LLAMA
from tplus_dist.hf.families.ministral import MINISTRAL
from tplus_dist.hf.families.mistral import MISTRAL
from tplus_dist.hf.families.olmo2 import OLMO2
from tplus_dist.hf.families.olmo3 import OLMO3
from tplus_dist.hf.families.opt import OPT
from tplus_dist.hf.families.phi import PHI
from tplus_dist.hf.families.phi3 import PHI3
from tplus_dist.hf.families.qwen2 import QWEN2
from tplus_dist.hf.families.qwen3 import QWEN3
from tplus_dist.hf.families.stablelm import STABLELM
from tplus_dist.hf.families.starcoder2 import STARCODER2

FAMILIES: tuple[Family, ...] = (
    GPT2,
    OPT,
    BLOOM,
    LLAMA,
    MISTRAL,
    MINISTRAL,
    QWEN2,
    QWEN3,
    GEMMA,
    GEMMA2,
    GEMMA3,
    PHI,
    GPT_NEOX,
    OLMO2,
    OLMO3,
    PHI3,
    STABLELM,
    STARCODER2,
    GRANITE,
)
"""Export tries them in this order and takes the first that represents the model exactly."""

__all__ = [
    "BLOOM",
    "FAMILIES",
    "GEMMA",
    "GEMMA2",
    "GEMMA3",
    "GPT2",
    "GPT_NEOX",
    "GRANITE",
    "LLAMA",
    "MINISTRAL",
    "MISTRAL",
    "OLMO2",
    "OLMO3",
    "OPT",
    "PHI",
    "PHI3",
    "QWEN2",
    "QWEN3",
    "STABLELM",
    "STARCODER2",
]
