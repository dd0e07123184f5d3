"""Hugging Face ``transformers`` interop: export a `Decoder` as a transformers model family, load one back.

Every family is one table entry (`Family`): what it can represent (`Spec`), the config translation both ways
(``to_hf`` / ``from_hf``) and the parameter mapping (``rules``: one `Rule` per HF tensor, both ways). Export picks
the first family whose spec admits every architecture choice of the ``ModelConfig``, writes config.json and
safetensors weights, then reloads the folder with ``AutoModelForCausalLM`` and checks the logits. A choice that no
family computes is an `HFExportError` naming the field; nothing is exported "approximately".

Conventions worth knowing:

* Weights are written in fp32 (exact for fp32 and bf16 models); the check runs in fp32.
* Vocabulary: only the ``vocab_size`` real rows are written (HF ``vocab_size`` = ours); `load` pads the embedding
  back to ``padded_vocab_size`` with zero rows, which `Decoder.forward` never returns.
* Biases a family always has (GPT-2's Conv1D, LayerNorm biases, Phi's head bias, ...) are written as zeros when our
  model has none: the same function. `load` reads them back as biases, unless the config that `export` stores
  next to the HF one (key ``tplus_dist_model``) says there were none and they are still all zero.
* Gemma's ``(1 + w)`` norm gain is storage only: ``norm_unit_offset`` converts to and from every family.
* Dropout never changes the exported function (inference); it maps to the family's dropout keys where they exist
  and is otherwise dropped with a warning.
* transformers is imported lazily, inside the functions: importing tplus_dist must not import it.
"""

from __future__ import annotations

from tplus_dist.hf.convert import _verify, choose_family, export, hf_config_dict, load
from tplus_dist.hf.core import (
    FIELD_HANDLING,
    STASH_KEY,
    VERIFY_TOL,
    Family,
    HFExportError,
    HFLoadError,
    Keys,
    Rule,
    Spec,
    blockers,
)
from tplus_dist.hf.families import FAMILIES
from tplus_dist.hf.tokenizer import save_tokenizer

__all__ = [
    "FAMILIES",
    "FIELD_HANDLING",
    "STASH_KEY",
    "VERIFY_TOL",
    "Family",
    "HFExportError",
    "HFLoadError",
    "Keys",
    "Rule",
    "Spec",
    "_verify",
    "blockers",
    "choose_family",
    "export",
    "hf_config_dict",
    "load",
    "save_tokenizer",
]
