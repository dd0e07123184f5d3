"""Optimizer and scheduler from the config: the two calls the trainer makes."""

from __future__ import annotations

import torch
from torch import nn

from tplus_dist.config.model import ModelConfig
from tplus_dist.config.sections import OptimConfig, ScheduleConfig
from tplus_dist.optim.adafactor import Adafactor
from tplus_dist.optim.param_groups import build_param_groups
from tplus_dist.optim.scaled_adam import ScaledAdam
from tplus_dist.optim.schedules import Scheduler
from tplus_dist.optim.soap import SOAP


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, model_cfg: ModelConfig) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over :func:`build_param_groups` (per-kind groups with lr_scale and decay).

    The groups start at the peak rate; :func:`build_scheduler` rewrites lr and weight_decay every step."""
    groups = build_param_groups(model, optim_cfg, model_cfg)
    c = optim_cfg
    if c.name == "adamw":
        params = [p for g in groups for p in g["params"]]
        # fused: one kernel for all tensors on CUDA; elsewhere torch picks foreach when it can
        on_cuda = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps, fused=True if on_cuda else None)
    if c.name == "adafactor":
        return Adafactor(
            groups,
            lr=c.lr,
            decay_rate=c.adafactor_decay_rate,
            clip_threshold=c.adafactor_clip_threshold,
            scale_parameter=c.adafactor_scale_parameter,
            momentum=c.adafactor_momentum,
            factored=c.adafactor_factored,
        )
    if c.name == "soap":
        return SOAP(
            groups,
            lr=c.lr,
            betas=c.betas,
            eps=c.eps,
            shampoo_beta=c.soap_shampoo_beta,
            precondition_frequency=c.soap_precondition_frequency,
            max_precond_dim=c.soap_max_precond_dim,
        )
    if c.name == "scaled_adam":
        return ScaledAdam(
            groups,
            lr=c.lr,
            betas=c.betas,
            eps=c.eps,
            scalar_lr_scale=c.scaled_adam_scalar_lr_scale,
            param_min_rms=c.scaled_adam_param_min_rms,
            param_max_rms=c.scaled_adam_param_max_rms,
        )
    raise ValueError(f"unknown optimizer {c.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: ScheduleConfig,
    optim_cfg: OptimConfig,
    total_steps: int,
    total_tokens: int | None = None,
) -> Scheduler:
    """The per-step lr (times each group's lr_scale) and weight-decay writer. ``total_steps`` (``total_tokens`` on
    the token clock) is the default end of the decay; ``schedule.decay_steps`` / ``decay_tokens`` override it."""
    return Scheduler(optimizer, sched_cfg, optim_cfg, total_steps, total_tokens=total_tokens)
