"""Process groups on real gloo processes: megatron-core's groups equal what ParallelDims computes, a
collective over each group sums exactly its members, and the DeepSpeed mpu adapter agrees with both.

Spawning and importing megatron-core cost seconds per process, so each world size is spawned once and
runs all of its layouts in turn (initialize, check, destroy)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tplus_dist.parallel import DeepSpeedMPU, ParallelDims, destroy_process_groups, init_process_groups
from tplus_dist.parallel.groups import ProcessGroups
from tplus_dist.spawn import run_distributed

# (tensor_parallel, pipeline_parallel, virtual stages) per world size
LAYOUTS_2 = [(2, 1, None), (1, 2, None), (1, 1, None)]  # TP=2, PP=2, DP=2
LAYOUTS_4 = [(2, 1, None), (1, 2, 2), (2, 2, None)]  # TP=2 x DP=2, PP=2 x DP=2 (interleaved), TP=2 x PP=2


def _sum_over(group: dist.ProcessGroup, rank: int) -> float:
    # 2**rank: the sum names exactly which ranks took part
    x = torch.tensor([float(2**rank)])
    dist.all_reduce(x, group=group)
    return float(x.item())


def _check_layout(rank: int, world: int, tp: int, pp: int, vpp: int | None) -> None:
    dims = ParallelDims(tp=tp, pp=pp, world_size=world, vpp=vpp, zero_stage=1).validate()
    g: ProcessGroups = init_process_groups(dims, backend="gloo")
    where = f"rank {rank}, {dims}"
    c = dims.coords(rank)
    assert (g.tp_rank, g.pp_rank, g.dp_rank) == (c.tp, c.pp, c.dp), where
    for kind in ("tp", "pp", "dp", "mp"):
        members = dims.group_ranks(kind, rank)
        assert list(getattr(g, f"{kind}_ranks")) == members, (where, kind)
        assert _sum_over(getattr(g, kind), rank) == sum(2**r for r in members), (where, kind)

    # megatron's own globals (which its tensor_parallel layers read) agree too
    from megatron.core import parallel_state as ps

    assert ps.get_tensor_model_parallel_rank() == c.tp and ps.get_tensor_model_parallel_world_size() == tp
    assert ps.get_pipeline_model_parallel_rank() == c.pp and ps.get_pipeline_model_parallel_world_size() == pp
    assert ps.get_data_parallel_rank() == c.dp and ps.get_data_parallel_world_size() == dims.dp
    assert ps.get_virtual_pipeline_model_parallel_world_size() == vpp

    mpu = DeepSpeedMPU(g)
    assert (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()) == (c.tp, tp)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (c.dp, dims.dp)
    assert (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()) == (c.pp, pp)
    assert mpu.get_model_parallel_world_size() == tp * pp
    assert mpu.get_model_parallel_rank() == dims.group_ranks("mp", rank).index(rank)
    assert mpu.get_data_parallel_group_ranks() == dims.group_ranks("dp", rank)
    assert mpu.get_tensor_model_parallel_src_rank() == dims.group_ranks("tp", rank)[0]
    for group, expected in (
        (mpu.get_model_parallel_group(), "mp"),
        (mpu.get_tensor_model_parallel_group(), "tp"),
        (mpu.get_data_parallel_group(), "dp"),
        (mpu.get_pipeline_model_parallel_group(), "pp"),
    ):
        assert dist.get_process_group_ranks(group) == dims.group_ranks(expected, rank), (where, expected)

    # only parallel_state goes; torch.distributed stays up for the next layout
    ps.destroy_model_parallel()
    assert not ps.model_parallel_is_initialized()


def _worker(rank: int, world: int, layouts: list[tuple[int, int, int | None]]) -> None:
    try:
        for tp, pp, vpp in layouts:
            _check_layout(rank, world, tp, pp, vpp)
        # a second init while one is live is refused, rather than silently mixing two layouts
        dims = ParallelDims(tp=1, pp=1, world_size=world).validate()
        init_process_groups(dims)
        try:
            init_process_groups(dims)
        except RuntimeError as e:
            assert "already initialized" in str(e)
        else:
            raise AssertionError("a second init_process_groups was accepted")
    finally:
        destroy_process_groups()
    assert not dist.is_initialized()


@pytest.mark.slow
def test_groups_on_2_processes() -> None:
    run_distributed(_worker, 2, LAYOUTS_2)


@pytest.mark.slow
def test_groups_on_4_processes() -> None:
    run_distributed(_worker, 4, LAYOUTS_4)
