"""Modules' extra state in checkpoints: the FP8 scaling state of Transformer Engine's layers.

torch lets a module carry state that is not a parameter or buffer through ``get_extra_state`` /
``set_extra_state``; ``state_dict`` files it under ``<module>._extra_state``. TE 2.20.2 module/base.py
``TransformerEngineBaseModule.get_extra_state`` (l. 1354-1417) returns a uint8 tensor (a pickled dict: the recipe, and
under delayed scaling the scales and amax histories; empty for a stateless recipe, _extra_state.py l. 56-63, or for a
module that never ran in FP8); the fusible ops behind te.RMSNorm / te.LayerNorm do the same (ops/op.py l. 632-709,
empty without quantizers). It is one opaque
value per module, so our checkpoints keep it per module, by the decoder's module name, in each rank's trainer file,
never split or concatenated like a parameter; the sharded parameter state (sharded.py) does not see it.

Between providers: a torch-provider checkpoint has none, so a te model starts fresh FP8 scaling state (TE
initialises it at the first FP8 forward); a te checkpoint's extra state has no module to go to in a torch model
and is dropped. HF export holds parameters only (:func:`without_extra_state`).

Loading delayed scaling's state: TE 2.20.2 ``set_extra_state`` (module/base.py l. 1419-1439, ops/op.py l. 711-721)
returns at once on an empty tensor, and otherwise unpickles only with NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 set
(_extra_state.py l. 17, 83-106: a DelayedScaling payload is classed unsafe and it raises otherwise, naming the
variable), as the payload is a pickle. A resumed delayed-scaling run needs it set; current and block scaling are
stateless (their extra state is empty).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import nn

SUFFIX = "_extra_state"
"""torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX: the state_dict key of a module's extra state."""
_COMPILED_PREFIX = re.compile(r"^_orig_mod\.|(?<=\.)_orig_mod\.")


def has_extra_state(module: nn.Module) -> bool:
    """Whether ``module`` defines its own get_extra_state (torch's base one raises)."""
    return type(module).get_extra_state is not nn.Module.get_extra_state


def _named(model: nn.Module, rename: Callable[[str], str] | None) -> Iterable[tuple[str, nn.Module]]:
    core = getattr(model, "module", model)  # under an engine: its module
    rename = rename or getattr(core, "decoder_name", None)
    for name, module in core.named_modules():
        if has_extra_state(module):
            key = f"{name}.{SUFFIX}" if name else SUFFIX
            key = _COMPILED_PREFIX.sub("", key)
            yield (rename(key) if rename is not None else key), module


def extra_states(model: nn.Module, rename: Callable[[str], str] | None = None) -> dict[str, Any]:
    """{decoder module name + "._extra_state": value} of every module of ``model`` (the decoder, an engine around
    it, a pipeline stage or interleaved chunks, named as the whole decoder names them through the model's
    ``decoder_name``) that has extra state."""
    return {key: module.get_extra_state() for key, module in _named(model, rename)}


def merge(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One value per module from several ranks' extra states (in rank order): the first rank's that has it. Ranks
    that hold the same module (data-parallel replicas, tensor-parallel shards of one layer) share its scaling
    state when TE reduces amaxes over them (precision.amax_reduction_group)."""
    out: dict[str, Any] = {}
    for states in per_rank:
        for key, value in states.items():
            out.setdefault(key, value)
    return out


def load_extra_states(
    model: nn.Module, states: Mapping[str, Any], rename: Callable[[str], str] | None = None
) -> tuple[list[str], list[str]]:
    """Give each module of ``model`` with extra state its value from ``states`` (as :func:`extra_states` names
    them). Returns (the model's keys ``states`` lacks: those modules keep the fresh state they have, e.g. a
    torch-provider checkpoint into a te model; the keys of ``states`` no module takes: dropped, e.g. the
    reverse)."""
    seen, missing = set(), []
    for key, module in _named(model, rename):
        if key in states:
            module.set_extra_state(states[key])
            seen.add(key)
        else:
            missing.append(key)
    return missing, sorted(set(states) - seen)


def without_extra_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a state_dict) without modules' extra state: for exports, which hold parameters only."""
    return {k: v for k, v in state.items() if not k.endswith(SUFFIX)}


UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
"""Transformer Engine 2.20.2's switch (transformer_engine/pytorch/_extra_state.py) for unpickling DelayedScaling's
extra state: without it ``set_extra_state`` refuses the payload."""


@contextlib.contextmanager
def unsafe_pickle_allowed() -> Iterator[None]:
    """``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` while the block runs (TE reads it at each ``set_extra_state``), and
    the variable as it was afterwards. For loading a checkpoint this project wrote and verified only."""
    before = os.environ.get(UNSAFE_PICKLE_ENV)
    os.environ[UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[UNSAFE_PICKLE_ENV] = before
