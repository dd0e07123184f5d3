"""Parallelism: the layout (ParallelDims), its process groups, and the DeepSpeed mpu adapter.

groups.py imports megatron-core only when called, so importing this package stays cheap."""

from tplus_dist.parallel.dims import LaunchEnv, LaunchEnvError, ParallelDims, RankCoords, launch_env
from tplus_dist.parallel.groups import DeepSpeedMPU, ProcessGroups, destroy_process_groups, init_process_groups

__all__ = [
    "DeepSpeedMPU",
    "LaunchEnv",
    "LaunchEnvError",
    "ParallelDims",
    "ProcessGroups",
    "RankCoords",
    "destroy_process_groups",
    "init_process_groups",
    "launch_env",
]
