"""Optimizers (AdamW, Adafactor, SOAP), parameter groups (weight decay, muP), schedules and gradient clipping."""

from tplus_dist.optim.adafactor import Adafactor
from tplus_dist.optim.builder import build_optimizer, build_scheduler
from tplus_dist.optim.clipping import clip_grad_norm
from tplus_dist.optim.param_groups import build_param_groups, group_weight_decay
from tplus_dist.optim.schedules import Scheduler, lr_at
from tplus_dist.optim.soap import SOAP

__all__ = [
    "SOAP",
    "Adafactor",
    "Scheduler",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "clip_grad_norm",
    "group_weight_decay",
    "lr_at",
]
