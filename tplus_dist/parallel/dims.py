"""The parallel layout in one place: sizes, validation, and which rank sits where.

Ranks are laid out in megatron-core's default order "tp-cp-ep-dp-pp" (with cp = ep = 1): tensor-parallel
neighbours are adjacent global ranks (they talk every layer, so they should share a node), then data
parallel, and pipeline stages are the slowest axis. ``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from tplus_dist.config.base import ConfigError, check
from tplus_dist.config.model import ModelConfig
from tplus_dist.config.sections import ParallelConfig

# The order handed to parallel_state.initialize_model_parallel; the coordinates below assume it.
MEGATRON_ORDER = "tp-cp-ep-dp-pp"

GroupKind = Literal["tp", "pp", "dp", "mp"]


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the layout."""

    tp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class ParallelDims:
    """Tensor x data x pipeline layout of ``world_size`` ranks (torchtitan-style); ``validate()`` before use."""

    tp: int
    pp: int
    world_size: int
    vpp: int | None = None
    zero_stage: int = 1
    sequence_parallel: bool = False
    model: ModelConfig | None = None
    """When given, validate() also checks that heads, vocabulary and layers split evenly."""

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> ParallelDims:
        return cls(
            tp=cfg.tensor_parallel,
            pp=cfg.pipeline_parallel,
            world_size=world_size,
            vpp=cfg.virtual_pipeline_stages,
            zero_stage=cfg.zero_stage,
            sequence_parallel=cfg.sequence_parallel,
            model=model,
        )

    def to_config(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel=self.tp,
            pipeline_parallel=self.pp,
            virtual_pipeline_stages=self.vpp,
            zero_stage=self.zero_stage,
            sequence_parallel=self.sequence_parallel,
        )

    def validate(self) -> ParallelDims:
        """Raise ConfigError naming the field, with a sentence saying what does not fit. Returns self."""
        cfg = self.to_config()
        cfg.validate("parallel")
        check(self.world_size >= 1, "world_size", f"must be at least 1, got {self.world_size}")
        if self.world_size % (self.tp * self.pp) != 0:
            field = "parallel.tensor_parallel" if self.world_size % self.tp else "parallel.pipeline_parallel"
            raise ConfigError(
                field,
                f"world size {self.world_size} is not divisible by tensor_parallel {self.tp} x "
                f"pipeline_parallel {self.pp}; the data-parallel size is world size / (tensor_parallel x "
                "pipeline_parallel), so choose sizes whose product divides the number of processes",
            )
        if self.model is not None:
            cfg.check_fits(self.model, "parallel")
        return self

    # -- sizes
    @property
    def dp(self) -> int:
        """Data-parallel size, derived: every rank not used by TP x PP holds a replica."""
        return self.world_size // (self.tp * self.pp)

    @property
    def world(self) -> int:
        return self.world_size

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    # -- coordinates (megatron's "tp-cp-ep-dp-pp" order)
    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return RankCoords(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def rank_of(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def tp_rank(self, rank: int) -> int:
        return self.coords(rank).tp

    def dp_rank(self, rank: int) -> int:
        return self.coords(rank).dp

    def pp_rank(self, rank: int) -> int:
        return self.coords(rank).pp

    def group_ranks(self, kind: GroupKind, rank: int) -> list[int]:
        """Global ranks of ``rank``'s group: tp, pp, dp, or mp (model parallel = its TP x PP block)."""
        c = self.coords(rank)
        if kind == "tp":
            return [self.rank_of(t, c.dp, c.pp) for t in range(self.tp)]
        if kind == "dp":
            return [self.rank_of(c.tp, d, c.pp) for d in range(self.dp)]
        if kind == "pp":
            return [self.rank_of(c.tp, c.dp, p) for p in range(self.pp)]
        if kind == "mp":
            return sorted(self.rank_of(t, c.dp, p) for p in range(self.pp) for t in range(self.tp))
        raise ValueError(f"unknown group kind {kind!r}")

    def all_groups(self, kind: GroupKind) -> list[list[int]]:
        """Every group of one kind, each as sorted global ranks, in order of their first rank."""
        seen: dict[int, list[int]] = {}
        for r in range(self.world_size):
            g = self.group_ranks(kind, r)
            seen.setdefault(g[0], g)
        return [seen[k] for k in sorted(seen)]

    def __str__(self) -> str:
        vpp = f" x vpp {self.vpp}" if self.vpp else ""
        return f"world {self.world_size} = tp {self.tp} x dp {self.dp} x pp {self.pp}{vpp}, ZeRO {self.zero_stage}"


# -- the launcher's environment


class LaunchEnvError(RuntimeError):
    """The process was not started the way a distributed run needs. The message names the variable."""

    def __init__(self, variable: str, reason: str) -> None:
        self.variable = variable
        self.reason = reason
        super().__init__(
            f"{variable}: {reason} (start distributed runs with `torchrun --nproc_per_node N ...` "
            "or `deepspeed --num_gpus N ...`, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
        )


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun / the deepspeed launcher / SLURM wrappers tell each process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_world_size: int | None = None


def _int_var(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise LaunchEnvError(name, "is not set")
    raw = env[name].strip()
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(name, f"must be an integer, got {env[name]!r}") from None


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read and check the launcher's variables; raise LaunchEnvError naming the missing or wrong one.

    Call it before building any model, so a bad launch fails in a second with a clear message rather
    than in a rendezvous timeout minutes later."""
    env = os.environ if env is None else env
    world = _int_var(env, "WORLD_SIZE")
    if world < 1:
        raise LaunchEnvError("WORLD_SIZE", f"must be at least 1, got {world}")
    rank = _int_var(env, "RANK")
    if not 0 <= rank < world:
        raise LaunchEnvError("RANK", f"({rank}) must be in [0, WORLD_SIZE {world})")
    local_rank = _int_var(env, "LOCAL_RANK")
    local_world = _int_var(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None
    if local_world is not None and not 1 <= local_world <= world:
        raise LaunchEnvError("LOCAL_WORLD_SIZE", f"({local_world}) must be in [1, WORLD_SIZE {world}]")
    bound = local_world if local_world is not None else world
    if not 0 <= local_rank < bound:
        limit = f"LOCAL_WORLD_SIZE {local_world}" if local_world is not None else f"WORLD_SIZE {world}"
        raise LaunchEnvError("LOCAL_RANK", f"({local_rank}) must be in [0, {limit})")
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        raise LaunchEnvError("MASTER_ADDR", "is not set" if "MASTER_ADDR" not in env else "is empty")
    port = _int_var(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise LaunchEnvError("MASTER_PORT", f"must be a TCP port in [1, 65535], got {port}")
    return LaunchEnv(rank, world, local_rank, addr, port, local_world)
