"""Parameter groups: which tensors decay, and each group's learning-rate multiplier (muP).

One group per parameter kind (``Decoder.parameter_kinds``): embedding, hidden, head, vector. Each group carries

* ``name``       -- the kind, for logging;
* ``lr_scale``   -- multiplies the scheduled rate: 1/width_mult for hidden matrices under muP, else 1;
* ``decay``      -- whether decoupled weight decay applies (matrices and embeddings, never norms or biases);
* ``lr`` and ``weight_decay`` -- the values the optimizer reads, set for the peak rate here and re-set every
  step by :class:`tplus_dist.optim.schedules.Scheduler`.

Weight decay convention. Every optimizer here decays decoupled, as torch's AdamW does: ``p *= 1 - lr * wd`` with
the group's ``lr``. We want the per-step shrink to be ``lr(t) * weight_decay`` (or ``lr(t)^2`` under PaLM's
``lr_squared``), with lr(t) the *base* scheduled rate, so that under muP the decay does not change with width
(microsoft/mup's default for AdamW: weight_decay *= width_mult when lr /= width_mult). Hence the group value
``weight_decay = shrink / group lr``; see :func:`group_weight_decay`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tplus_dist.config.model import ModelConfig
from tplus_dist.config.sections import OptimConfig

KINDS = ("embedding", "hidden", "head", "vector")
DECAYED_KINDS = ("embedding", "hidden", "head")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's wrapper (its parameter names carry no ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


def _kinds(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    model = unwrap(model)
    kinds = getattr(model, "parameter_kinds", None)
    if callable(kinds):
        return list(kinds())
    # any other module: matrices are hidden, everything else a vector (keeps tests and ad-hoc models working)
    return [(n, p, "hidden" if p.ndim >= 2 else "vector") for n, p in model.named_parameters()]


def group_weight_decay(group: dict[str, Any], base_lr: float, optim_cfg: OptimConfig) -> float:
    """The group's ``weight_decay`` such that the optimizer's decoupled shrink ``group lr * wd`` equals
    ``base_lr * optim.weight_decay`` (constant) or ``base_lr^2`` (lr_squared); 0 for groups that do not decay."""
    if not group.get("decay", False):
        return 0.0
    # group lr = base_lr * lr_scale, so dividing by lr_scale (not by base_lr) never divides by a zero rate
    if optim_cfg.weight_decay_schedule == "lr_squared":
        return base_lr / group["lr_scale"]
    return optim_cfg.weight_decay / group["lr_scale"]


def build_param_groups(model: nn.Module, optim_cfg: OptimConfig, model_cfg: ModelConfig) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into per-kind groups (see the module docstring).

    Under muP (``model_cfg.init == "mup"``) hidden matrices get lr / width_mult: with Adam-like optimizers the
    update of a fan-in-n matrix grows like n, so its rate must shrink like 1/n (Tensor Programs V, Table 3).
    Embeddings, the head (whose output is already scaled by 1/width_mult in the forward) and vectors keep the
    base rate."""
    mup = model_cfg.init == "mup"
    by_kind: dict[str, list[nn.Parameter]] = {k: [] for k in KINDS}
    seen: set[int] = set()
    for _, p, kind in _kinds(model):
        if not p.requires_grad or id(p) in seen:  # a tied tensor is optimized once
            continue
        seen.add(id(p))
        by_kind[kind].append(p)
    groups: list[dict[str, Any]] = []
    for kind in KINDS:
        if not by_kind[kind]:
            continue
        lr_scale = 1.0 / model_cfg.width_mult if (mup and kind == "hidden") else 1.0
        group: dict[str, Any] = {
            "params": by_kind[kind],
            "name": kind,
            "lr_scale": lr_scale,
            "decay": kind in DECAYED_KINDS,
            "lr": optim_cfg.lr * lr_scale,
        }
        group["weight_decay"] = group_weight_decay(group, optim_cfg.lr, optim_cfg)
        groups.append(group)
    return groups
