"""The global sample order and the growing batch: pure functions of (seed, position), so that sample k
of the stream is the same sequence whatever the batch schedule, the number of data-parallel ranks or
where the run restarted.

Position k (0, 1, 2, ...) counts samples consumed by the whole job. Epoch e = k // n covers positions
[e*n, (e+1)*n). Within an epoch the order is a block shuffle seeded by (seed, epoch): the shards are
permuted, consecutive groups of ``block_shards`` shards form blocks, and samples are permuted within each
block. Blocks keep a remote stream to a few shards at a time (shuffle quality against locality, as
streaming's py1b), and the whole order needs memory in the number of shards, not samples.

A step consumes the contiguous positions [p, p + B); its micro-batch j (of size m) on data-parallel rank r
holds positions p + (j * dp + r) * m + [0, m). The global batch is the same set of samples whatever dp,
so the mean loss over it is too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


class SampleOrder:
    """Position in the stream -> dataset sample index."""

    def __init__(self, samples_per_shard: list[int], seed: int, shuffle: bool = True, block_shards: int = 8) -> None:
        if not samples_per_shard or sum(samples_per_shard) == 0:
            raise ValueError("the dataset has no samples")
        self.samples_per_shard = np.asarray(samples_per_shard, dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.samples_per_shard)])
        self.n = int(self.shard_offsets[-1])
        self.seed = seed
        self.shuffle = shuffle
        self.block_shards = max(1, block_shards)
        self._epochs: OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch_blocks(self, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(block start offsets, shard ids of each block) for an epoch."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            shards = rng.permutation(len(self.samples_per_shard))
            groups = [shards[i : i + self.block_shards] for i in range(0, len(shards), self.block_shards)]
            sizes = [int(self.samples_per_shard[g].sum()) for g in groups]
            self._epochs[epoch] = (np.concatenate([[0], np.cumsum(sizes)]), groups)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _block(self, epoch: int, b: int, shards: np.ndarray) -> np.ndarray:
        """Sample indices of block b of an epoch, in their shuffled order."""
        key = (epoch, b)
        if key not in self._blocks:
            members = np.concatenate([np.arange(self.shard_offsets[s], self.shard_offsets[s + 1]) for s in shards])
            rng = np.random.default_rng([self.seed, epoch, b + 1])
            self._blocks[key] = members[rng.permutation(len(members))]
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[key]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices of stream positions (any order, any epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions % self.n
        out = np.empty_like(positions)
        epochs, within = np.divmod(positions, self.n)
        for e in np.unique(epochs):
            sel = epochs == e
            starts, groups = self._epoch_blocks(int(e))
            w = within[sel]
            blk = np.searchsorted(starts, w, side="right") - 1
            res = np.empty_like(w)
            for b in np.unique(blk):
                bsel = blk == b
                res[bsel] = self._block(int(e), int(b), groups[b])[w[bsel] - starts[b]]
            out[sel] = res
        return out

    def index(self, position: int) -> int:
        return int(self.indices(np.array([position]))[0])


@dataclass(frozen=True)
class BatchRamp:
    """Global batch size (sequences) as a function of tokens consumed (Megatron's rampup_batch_size,
    counted in tokens): from ``start``, grow by ``increment`` in equal token intervals over
    ``ramp_tokens`` until ``end``. The micro-batch stays fixed; gradient accumulation grows."""

    end: int
    start: int | None = None
    increment: int = 0
    ramp_tokens: int = 0

    @property
    def ramps(self) -> bool:
        return self.start is not None and self.start < self.end

    def batch_size(self, tokens: int) -> int:
        if not self.ramps:
            return self.end
        assert self.start is not None
        n_increments = (self.end - self.start) // self.increment
        interval = self.ramp_tokens / n_increments
        done = math.floor(tokens / interval) if interval > 0 else n_increments
        return min(self.end, self.start + self.increment * done)


def micro_batch_positions(first: int, micro: int, dp: int, rank: int, n_micro: int) -> list[np.ndarray]:
    """Stream positions of this rank's micro-batches in a step that starts at position ``first``."""
    return [first + (j * dp + rank) * micro + np.arange(micro) for j in range(n_micro)]
