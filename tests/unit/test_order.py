"""The global sample order and the batch ramp: pure functions of (seed, position)."""

from __future__ import annotations

import numpy as np
import pytest

from tplus_dist.data.order import BatchRamp, SampleOrder, micro_batch_positions

SHARDS = [50, 50, 37, 13, 50, 20, 44]
N = sum(SHARDS)


@pytest.mark.parametrize("block_shards", [1, 3, 100])
def test_each_epoch_is_a_permutation_and_epochs_differ(block_shards: int) -> None:
    order = SampleOrder(SHARDS, seed=5, block_shards=block_shards)
    e0, e1 = order.indices(np.arange(N)), order.indices(np.arange(N, 2 * N))
    assert sorted(e0.tolist()) == list(range(N)) and sorted(e1.tolist()) == list(range(N))
    assert (e0 != e1).any()


def test_order_depends_only_on_seed_and_position() -> None:
    a, b = SampleOrder(SHARDS, seed=5), SampleOrder(SHARDS, seed=5)
    pos = np.random.default_rng(0).integers(0, 5 * N, 300)
    assert (a.indices(pos) == np.array([b.index(int(p)) for p in pos])).all()  # any access pattern
    assert (SampleOrder(SHARDS, seed=6).indices(np.arange(N)) != a.indices(np.arange(N))).any()
    assert SampleOrder(SHARDS, seed=5, shuffle=False).indices(np.arange(N + 3)).tolist() == [*range(N), 0, 1, 2]


def test_blocks_keep_few_shards_in_flight() -> None:
    order = SampleOrder(SHARDS, seed=1, block_shards=2)
    offsets = np.concatenate([[0], np.cumsum(SHARDS)])
    first_block = order.indices(np.arange(60))  # at most two shards' worth (<= 100 samples) ahead
    shards = {int(np.searchsorted(offsets, i, side="right") - 1) for i in first_block}
    assert len(shards) <= 2


def test_ramp_gives_configured_batch_sizes_at_configured_tokens() -> None:
    ramp = BatchRamp(end=64, start=16, increment=16, ramp_tokens=3 * 1000)
    assert [ramp.batch_size(t) for t in (0, 999, 1000, 1999, 2000, 2999, 3000, 10**9)] == [
        16,
        16,
        32,
        32,
        48,
        48,
        64,
        64,
    ]
    assert BatchRamp(end=64).batch_size(0) == 64


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_ranks_split_a_step_into_disjoint_micro_batches_covering_it(dp: int) -> None:
    micro, n_micro, first = 3, 4, 100
    per_rank = [np.concatenate(micro_batch_positions(first, micro, dp, r, n_micro)) for r in range(dp)]
    union = np.concatenate(per_rank)
    assert sorted(union.tolist()) == list(range(first, first + micro * n_micro * dp))
