"""Batches from prepared shards, in the global sample order (see order.py), for one data-parallel rank.

Shards are read through mosaicml-streaming's StreamingDataset (local directories, or remote object stores
downloaded into a local cache), used as a random-access store: the order is ours, not streaming's, because
streaming's resumption is exact only for a constant global batch, and ours must not depend on the batch
schedule, the number of ranks or where the run restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tempfile import gettempdir
from typing import Any

import numpy as np
import torch

from tplus_dist.data.order import BatchRamp, SampleOrder, micro_batch_positions
from tplus_dist.data.streaming_compat import import_streaming


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    """[m, seq_len] inputs."""
    targets: torch.Tensor
    """[m, seq_len] next tokens."""
    positions: np.ndarray
    """Stream positions of the m samples (global sample indices); for validation, the samples' indices."""
    labels: torch.Tensor | None = None
    """[m] each sample's label id (shards prepared with --labels, read when data.labels asks); None: no labels."""


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]
    global_batch: int
    """Sequences in this optimizer step, over all data-parallel ranks."""
    first_sample: int
    last_sample: int
    """First and last global stream position the step consumes (inclusive)."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def split_location(shards: str, split: str, cache_dir: str | Path) -> tuple[str | None, str]:
    """(remote, local) for streaming: a local directory is read in place; a remote one is cached under
    cache_dir/remote/<hash of the URI>/split."""
    if is_remote(shards):
        key = hashlib.sha256(shards.rstrip("/").encode()).hexdigest()[:16]
        return f"{shards.rstrip('/')}/{split}", str(Path(cache_dir) / "remote" / key / split)
    return None, str(Path(shards) / split)


def fetch_manifest(shards: str, cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, downloading it first when remote."""
    if is_remote(shards):
        import_streaming()
        from streaming.base.storage.download import CloudDownloader

        _, local = split_location(shards, "manifest", cache_dir)
        path = Path(local).with_name("manifest.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"manifest.json.tmp-{os.getpid()}")
        try:
            CloudDownloader.direct_download(f"{shards.rstrip('/')}/manifest.json", str(tmp), 60)
        except Exception as e:  # storage clients raise their own types
            raise FileNotFoundError(f"data.shards: cannot read {shards.rstrip('/')}/manifest.json: {e}") from None
        os.replace(tmp, path)
    else:
        from tplus_dist.data.prepare import read_manifest

        # every shard present with its listed size: a truncated or missing shard stops the run before it starts
        # (`tplus_dist.data.prepare.verify_shards` also checks the sha256 of each)
        return read_manifest(shards)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"data.shards: {path} is not valid JSON: {e}") from None
    for key in ("seq_len", "tokenizer", "splits"):
        if key not in manifest:
            raise ValueError(f"data.shards: {path} lacks the key {key!r}; not a `tplus prepare` manifest")
    return manifest


def clean_own_shared_memory(locals_: list[str]) -> int:
    """Unlink streaming's shared memory left by a crashed earlier run that used our local directories.

    Streaming registers each dataset's local directories in shared memory and refuses a second dataset on
    the same directory; after a kill -9 those segments stay in /dev/shm and block the restart. Its own
    clean_stale_shared_memory() removes every job's segments on the node; this removes only those that
    name our directories. Returns the number of prefixes cleaned."""
    import_streaming()
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    ours = {os.path.abspath(p) for p in locals_}
    cleaned = 0
    # every registration there is, whatever its prefix: streaming skips prefixes that still have a filelock in
    # the temp dir (crashed jobs leave those too), so registrations are not contiguous from 0
    suffix = _get_path(0, LOCALS).lstrip("/").split("_", 1)[1]
    for path in sorted(Path("/dev/shm").glob(f"*_{suffix}")):
        head = path.name.split("_", 1)[0]
        if not head.isdigit():
            continue
        prefix = int(head)
        try:
            their_locals, _ = _unpack_locals(path.read_bytes())
        except Exception:
            continue
        if not ours & {os.path.abspath(p) for p in their_locals}:
            continue
        for name in SHM_TO_CLEAN:
            (Path("/dev/shm") / _get_path(prefix, name).lstrip("/")).unlink(missing_ok=True)
        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
            (Path(gettempdir()) / _get_path(prefix, lock).lstrip("/")).unlink(missing_ok=True)
        cleaned += 1
    return cleaned


def open_split(shards: str, split: str, cache_dir: str | Path) -> Any:
    """A StreamingDataset over one split (train or val), used for random access."""
    streaming = import_streaming()
    remote, local = split_location(shards, split, cache_dir)
    if remote is None and not (Path(local) / "index.json").is_file():
        raise FileNotFoundError(f"data.shards: {local}/index.json does not exist")
    clean_own_shared_memory([local])
    return streaming.StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1, predownload=None)


class SampleReader(torch.utils.data.Dataset):
    """dataset indices -> ([m, seq_len + 1] LongTensor, [m] label ids or None); map-style, so DataLoader workers
    can prefetch."""

    def __init__(self, dataset: Any, seq_len: int, labels: bool = False) -> None:
        self.dataset = dataset
        self.seq_len = seq_len
        self.labels = labels

    def __len__(self) -> int:
        return int(self.dataset.num_samples)

    def __getitem__(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = []
        labels = []
        for i in indices:
            sample = self.dataset[int(i)]
            tokens = sample["tokens"]
            if len(tokens) != self.seq_len + 1:
                raise ValueError(
                    f"sample {int(i)} holds {len(tokens)} tokens, expected seq_len + 1 = {self.seq_len + 1}"
                )
            rows.append(tokens)
            if self.labels:
                labels.append(int(sample["label"]))
        ids = torch.tensor(labels, dtype=torch.int64) if self.labels else None
        return torch.from_numpy(np.stack(rows).astype(np.int64)), ids


class ShardBatches:
    """One rank's view of the stream: ``next_step()`` returns this rank's micro-batches of the next
    optimizer step. The state is the stream position alone (samples the job consumed)."""

    def __init__(
        self,
        dataset: Any,
        seq_len: int,
        micro_batch: int,
        ramp: BatchRamp,
        seed: int,
        shuffle: bool = True,
        block_shards: int = 8,
        dp_size: int = 1,
        dp_rank: int = 0,
        num_workers: int = 0,
        labels: bool = False,
    ) -> None:
        unit = micro_batch * dp_size
        for size in {ramp.end, ramp.start or ramp.end, ramp.increment or unit}:
            if size % unit:
                raise ValueError(
                    f"batch size {size} is not a multiple of micro_batch_size x data-parallel ranks ({unit})"
                )
        self.reader = SampleReader(dataset, seq_len, labels)
        self.order = SampleOrder(list(dataset.samples_per_shard), seed, shuffle, block_shards)
        self.seq_len, self.micro, self.ramp = seq_len, micro_batch, ramp
        self.dp_size, self.dp_rank, self.num_workers = dp_size, dp_rank, num_workers
        self.position = 0
        self._stream: Iterator[tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor | None]]] | None = None

    @property
    def num_samples(self) -> int:
        return self.order.n

    def batch_size_at(self, position: int) -> int:
        return self.ramp.batch_size(position * self.seq_len)

    def _plan(self, start: int) -> Iterator[np.ndarray]:
        """Stream positions of this rank's micro-batches from ``start`` on, step after step."""
        p = start
        while True:
            b = self.batch_size_at(p)
            yield from micro_batch_positions(
                p, self.micro, self.dp_size, self.dp_rank, b // (self.micro * self.dp_size)
            )
            p += b

    def _open_stream(self) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor | None]]]:
        plan = self._plan(self.position)
        if self.num_workers == 0:
            return ((pos, self.reader[self.order.indices(pos)]) for pos in plan)
        loader = torch.utils.data.DataLoader(
            self.reader,
            sampler=(self.order.indices(pos) for pos in self._plan(self.position)),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            persistent_workers=False,
        )
        return zip(plan, loader, strict=False)

    def next_step(self) -> StepBatch:
        if self._stream is None:
            self._stream = self._open_stream()
        b = self.batch_size_at(self.position)
        micro = []
        for _ in range(b // (self.micro * self.dp_size)):
            pos, (chunk, labels) = next(self._stream)
            micro.append(MicroBatch(chunk[:, :-1], chunk[:, 1:], pos, labels))
        first = self.position
        self.position += b
        return StepBatch(micro, b, first, first + b - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_samples": self.order.n, "seed": self.order.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.order.n or state["seed"] != self.order.seed:
            raise ValueError(
                f"data state is for {state['num_samples']} samples with seed {state['seed']}, but the dataset has "
                f"{self.order.n} samples with seed {self.order.seed}: not the same data order"
            )
        self.position = int(state["position"])
        self._stream = None  # reopened at the restored position (prefetched batches are dropped)


class EvalBatches:
    """The first ``n_batches`` micro-batches of a split, in stored order: the same every evaluation."""

    def __init__(self, dataset: Any, seq_len: int, micro_batch: int, n_batches: int, labels: bool = False) -> None:
        self.reader = SampleReader(dataset, seq_len, labels)
        n = min(len(self.reader), micro_batch * n_batches)
        if n == 0:
            raise ValueError("the validation split holds no sample")
        self.batches = [np.arange(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]

    def __iter__(self) -> Iterator[MicroBatch]:
        for idx in self.batches:
            chunk, labels = self.reader[idx]
            yield MicroBatch(chunk[:, :-1], chunk[:, 1:], idx, labels)
