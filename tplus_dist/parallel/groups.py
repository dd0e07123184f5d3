"""Process groups from megatron-core's parallel_state, handed out explicitly.

megatron-core's tensor_parallel layers read parallel_state's module globals, so those are initialized;
everything of ours receives a ``ProcessGroups`` instead of reading globals. On CPU, parallel_state works
with gloo as is (megatron-core 0.16.1): initialize_model_parallel touches CUDA only for SHARP (left off),
and its GlobalMemoryBuffer allocates on the GPU only when first used (by megatron's own attention, which
we do not use). We pass ``create_gloo_process_groups=False`` under gloo: those extra gloo copies of the
data-parallel groups serve the distributed optimizer's CPU side and would duplicate the groups we have.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from tplus_dist.parallel.dims import MEGATRON_ORDER, GroupKind, ParallelDims, launch_env

Backend = Literal["gloo", "nccl"]
ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's groups and ranks within them. mp is the model-parallel (TP x PP) block."""

    dims: ParallelDims
    rank: int
    tp: ProcessGroup
    pp: ProcessGroup
    dp: ProcessGroup
    mp: ProcessGroup
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    mp_ranks: tuple[int, ...]

    @property
    def tp_rank(self) -> int:
        return self.tp_ranks.index(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.pp_ranks.index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dp_ranks.index(self.rank)

    @property
    def mp_rank(self) -> int:
        return self.mp_ranks.index(self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def _parallel_state() -> Any:
    # Imported on use: megatron.core takes seconds to import, and config/dims code must not pay for it.
    from megatron.core import parallel_state

    return parallel_state


def init_process_groups(
    dims: ParallelDims, backend: Backend = "gloo", timeout: datetime.timedelta | None = None
) -> ProcessGroups:
    """Initialize torch.distributed (from the launcher's environment) if needed, then megatron-core's
    tensor/pipeline/data-parallel groups for ``dims``; return this rank's groups."""
    dims.validate()
    if not dist.is_initialized():
        env = launch_env()  # a clear error naming the variable, instead of a rendezvous hang
        if env.local_rank == 0:
            # One process a node, before the rendezvous: no rank of this job can be creating its buffer yet.
            clean_stale_deepspeed_buffers()
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    world = dist.get_world_size()
    if world != dims.world_size:
        raise RuntimeError(f"the layout is for {dims.world_size} ranks ({dims}), but {world} processes were started")
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        raise RuntimeError("parallel_state is already initialized: call destroy_process_groups() first")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp,
        order=MEGATRON_ORDER,  # explicit: dims.coords assumes it
        create_gloo_process_groups=backend != "gloo",
        **({} if timeout is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout.total_seconds() / 60))}),
    )
    rank = dist.get_rank()
    tp, pp = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    dp, mp = ps.get_data_parallel_group(), ps.get_model_parallel_group()
    groups = ProcessGroups(
        dims=dims,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        mp=mp,
        tp_ranks=tuple(dist.get_process_group_ranks(tp)),
        pp_ranks=tuple(dist.get_process_group_ranks(pp)),
        dp_ranks=tuple(dist.get_process_group_ranks(dp)),
        mp_ranks=tuple(dist.get_process_group_ranks(mp)),
    )
    # Our coordinates and megatron's groups must agree, or data sharding and checkpoints go wrong silently.
    kinds: tuple[GroupKind, ...] = ("tp", "pp", "dp", "mp")
    for kind in kinds:
        got, expected = sorted(getattr(groups, f"{kind}_ranks")), dims.group_ranks(kind, rank)
        if got != expected:
            raise RuntimeError(f"rank {rank}: megatron's {kind} group is {got}, ParallelDims expected {expected}")
    return groups


def set_collective_timeout(timeout: datetime.timedelta) -> int:
    """Give every process group this process belongs to (the world, megatron's, DeepSpeed's, the pipeline's)
    ``timeout``: a collective that has not completed by then raises (gloo) or aborts the process (NCCL's watchdog,
    which names the rank and the operation) instead of waiting forever. Groups take torch's default (30 minutes for
    gloo) when their creator passes none, as DeepSpeed does, so this runs after every group exists. Uses
    ``torch.distributed.distributed_c10d._set_pg_timeout``, the call megatron-core's ``update_pg_timeout`` makes.
    Returns the number of groups set."""
    c10d = dist.distributed_c10d
    groups = [g for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def destroy_process_groups(keep_world: bool = False, failed: bool = False) -> None:
    """Tear down parallel_state and torch.distributed (safe to call when either is not initialized), and remove
    this rank's DeepSpeed shared-memory buffer. ``keep_world``: keep torch.distributed (the default group) for
    another layout in the same processes (re-initializing it through the launcher's store can read the previous
    incarnation's addresses). ``failed``: this rank is ending on an error: no collective (the other ranks may be
    dead, or waiting in another collective: a barrier here is how one rank's error became a hang), only the
    buffer is removed; the process is about to exit and the launcher ends the others."""
    if failed:
        remove_deepspeed_shm_buffer()
        return
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_world:
        dist.barrier()  # nobody reads another rank's buffer any more
        remove_deepspeed_shm_buffer()
        dist.destroy_process_group()


def remove_deepspeed_shm_buffer(env: dict[str, str] | None = None) -> list[str]:
    """Unlink /dev/shm/deepspeed_allreduce_buffer_*_{MASTER_ADDR}_{MASTER_PORT}_{LOCAL_RANK}: DeepSpeed's CPU
    shared-memory all-reduce (used when the deepspeed launcher sets LOCAL_SIZE) leaves 66 MB a rank behind.
    Only this rank's, of this job (address and port). Returns the paths removed."""
    env = dict(os.environ) if env is None else env
    keys = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    if not all(k in env for k in keys):
        return []
    addr, port, local = (env[k] for k in keys)
    removed = []
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{local}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def clean_stale_deepspeed_buffers() -> list[str]:
    """Unlink the DeepSpeed CPU all-reduce buffers of this user (``/dev/shm/deepspeed_allreduce_buffer_{uid}_*``)
    that no live process holds: a killed job's (kill -9, OOM) stay behind, about 69 MB a rank, and nothing else
    removes them. A live job's buffers are kept (its processes keep them open and mapped; see tplus_dist/shm.py).
    The name is DeepSpeed's ``ops/csrc/cpu/comm/shm.cpp:shm_initialize`` (SHM_BUFFER_NAME, getuid(), MASTER_ADDR,
    MASTER_PORT, rank). Returns the paths removed."""
    from tplus_dist.shm import SHM_DIR, remove_unheld

    return remove_unheld(sorted(glob.glob(f"{SHM_DIR}/deepspeed_allreduce_buffer_{os.getuid()}_*")))


class DeepSpeedMPU:
    """The ``mpu=`` object deepspeed.initialize expects, answered from ProcessGroups.

    DeepSpeed's "model parallel" group is every rank holding a different part of the same replica (its own
    pipeline grid uses TP x PP): ZeRO all-reduces gradient norms and overflow flags over it. With PP = 1 that
    is the tensor-parallel group. The tensor_* methods are what DeepSpeed uses for TP-aware checkpoints.
    No sequence-parallel methods: DeepSpeed reads those as its own Ulysses sequence parallelism."""

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups

    # model parallel (TP x PP)
    def get_model_parallel_rank(self) -> int:
        return self.groups.mp_rank

    def get_model_parallel_world_size(self) -> int:
        return len(self.groups.mp_ranks)

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.groups.mp

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return len(self.groups.tp_ranks)

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self.groups.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.tp_ranks[0]

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return len(self.groups.dp_ranks)

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.groups.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.groups.dp_ranks)

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return len(self.groups.pp_ranks)

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.groups.pp
