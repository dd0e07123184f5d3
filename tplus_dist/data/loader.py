"""Batches from prepared shards, in the global sample order (see order.py), for one data-parallel rank.

Shards are read through mosaicml-streaming's StreamingDataset (local directories, or remote object stores),
used as a random-access store: the order is ours, not streaming's, because streaming's resumption is exact only
for a constant global batch, and ours must not depend on the batch schedule, the number of ranks or where the
run restarted. Each shard is decompressed on first use into data.cache_dir (never beside the source, which is
only read), shared by every job on the node that reads the same data (see :func:`open_split`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
    """Whether data.shards names an object store (s3://...) rather than a directory (a path or file://)."""
    return "://" in uri and not uri.startswith("file://")


def _uri_key(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def fetch_manifest(shards: str, cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, downloading it first when remote (into
    ``cache_dir/remote/<hash of the URI>/manifest.json``). Local: ``read_manifest`` (keys, every listed file present
    with its size; the checksums are :func:`tplus_dist.data.verify.verify_prepared`'s). Raises ManifestError /
    ValueError / FileNotFoundError naming the file."""
    if is_remote(shards):
        import_streaming()
        from streaming.base.storage.download import CloudDownloader

        from tplus_dist.data.cached_stream import temp_name

        path = Path(cache_dir) / "remote" / _uri_key(shards) / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            CloudDownloader.direct_download(f"{shards.rstrip('/')}/manifest.json", str(tmp), 60)
        except Exception as e:  # storage clients raise their own types
            raise FileNotFoundError(f"data.shards: cannot read {shards.rstrip('/')}/manifest.json: {e}") from None
        os.replace(tmp, path)
    else:
        from tplus_dist.data.prepare import read_manifest

        if Path(shards).is_file():
            raise FileNotFoundError(f"data.shards: {shards} is a file, not a directory written by `tplus prepare`")
        if not Path(shards).exists():
            raise FileNotFoundError(f"data.shards: {shards} does not exist")

        # every shard present with its listed size: a truncated or missing shard stops the run before it starts
        return read_manifest(shards)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"data.shards: {path} is not valid JSON: {e}") from None
    for key in ("seq_len", "tokenizer", "splits"):
        if key not in manifest:
            raise ValueError(f"data.shards: {path} lacks the key {key!r}; not a `tplus prepare` manifest")
    return dict(manifest)


def clean_stale_shared_memory() -> int:
    """Unlink streaming's shared memory (segments in /dev/shm, file locks in the temp dir) left on this node by jobs
    that were killed: only registrations none of whose files a live process holds (a live job's are kept, whoever
    made them). Opening a split does this itself, under the node's registration lock
    (tplus_dist/data/streaming_shm.py); this entry point is for tools and tests. Returns the prefixes cleaned."""
    import_streaming()
    from tplus_dist.data.streaming_shm import clean_stale_registrations, registration_lock

    with registration_lock():
        return len(clean_stale_registrations())


def split_cache_dir(shards: str, split: str, cache_dir: str | Path, index_bytes: bytes, sha256: dict[str, str]) -> Path:
    """Where a split's decompressed shards are cached: ``cache_dir/{local,remote}/<key>/<split>``, the key a hash of
    the source (absolute path or URI) and of its content (index.json and the manifest's shard checksums), so that
    data prepared anew under the same name never reads an old copy. Disk: the split's uncompressed size, once
    per node and content, shared by every job that reads it."""
    kind = "remote" if is_remote(shards) else "local"
    source = shards.rstrip("/") if is_remote(shards) else os.path.abspath(shards)
    h = hashlib.sha256(f"{source}\0{split}\0".encode())
    h.update(hashlib.sha256(index_bytes).digest())
    h.update(json.dumps(sorted(sha256.items())).encode())
    return Path(cache_dir) / kind / h.hexdigest()[:16] / split


def _read_index(shards: str, split: str, cache_dir: str | Path) -> bytes:
    if not is_remote(shards):
        path = Path(shards) / split / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"data.shards: {path} does not exist")
        return path.read_bytes()
    import_streaming()
    from streaming.base.storage.download import CloudDownloader

    from tplus_dist.data.cached_stream import temp_name

    uri = f"{shards.rstrip('/')}/{split}/index.json"
    tmp = temp_name(Path(cache_dir) / "remote" / _uri_key(shards) / f"{split}-index.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        CloudDownloader.direct_download(uri, str(tmp), 60)
        return tmp.read_bytes()
    except Exception as e:  # storage clients raise their own types
        raise FileNotFoundError(f"data.shards: cannot read {uri}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def open_split(shards: str, split: str, cache_dir: str | Path, manifest: dict[str, Any] | None = None) -> Any:
    """A StreamingDataset over one split (train or val) of ``shards`` (a prepared directory or its URI), used for
    random access. Shards are read from the source and decompressed into ``cache_dir`` (see
    :func:`split_cache_dir`): the source is only read, so it may be read-only or shared.

    With ``manifest``: the split's index.json must have the manifest's sha256 and agree with it (shard files,
    sample count), and each shard's sha256 is checked as it is fetched. Raises ManifestError (ValueError) or
    FileNotFoundError naming the file."""
    streaming = import_streaming()
    from tplus_dist.data.cached_stream import CachedStream, remove_dead_temp_files, write_atomically
    from tplus_dist.data.prepare import ManifestError
    from tplus_dist.data.verify import check_index

    source = f"{shards.rstrip('/')}/{split}" if is_remote(shards) else os.path.abspath(os.path.join(shards, split))
    index_bytes = _read_index(shards, split, cache_dir)
    sha256: dict[str, str] = {}
    entry = (manifest or {}).get("splits", {}).get(split)
    if entry is not None:
        got, want = hashlib.sha256(index_bytes).hexdigest(), entry["index"]["sha256"]
        if got != want:
            raise ManifestError(f"{source}/index.json: damaged: its sha256 is {got}, the manifest lists {want}")
        check_index(index_bytes, entry, f"{source}/index.json")
        sha256 = {e["file"].rsplit("/", 1)[-1]: e["sha256"] for e in entry["shards"]}
    local = split_cache_dir(shards, split, cache_dir, index_bytes, sha256)
    local.mkdir(parents=True, exist_ok=True)
    index = local / "index.json"
    if not index.is_file() or index.read_bytes() != index_bytes:
        write_atomically(index, index_bytes)
    remove_dead_temp_files(local)
    stream = CachedStream(source, str(local), sha256, remote=is_remote(shards))
    return streaming.StreamingDataset(streams=[stream], shuffle=False, batch_size=1, predownload=None)


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
        """Samples in the split (one epoch of the stream)."""
        return self.order.n

    def batch_size_at(self, position: int) -> int:
        """The global batch (sequences) of the step that starts at stream position ``position``."""
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
        """This rank's micro-batches of the next optimizer step; advances the position by the global batch."""
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
        """The stream position, with the sample count and seed that give it its meaning."""
        return {"position": self.position, "num_samples": self.order.n, "seed": self.order.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. Raises ValueError when the data or its seed differ (another order)."""
        if state["num_samples"] != self.order.n or state["seed"] != self.order.seed:
            raise ValueError(
                f"data state is for {state['num_samples']} samples with seed {state['seed']}, but the dataset has "
                f"{self.order.n} samples with seed {self.order.seed}: not the same data order"
            )
        self.position = int(state["position"])
        self._stream = None  # reopened at the restored position (prefetched batches are dropped)


class EvalBatches:
    """The validation set: the first ``n_samples`` samples of a split in stored order, the same every evaluation and
    whatever the layout (micro-batch size, accumulation, data-parallel size, pipeline). They are cut into
    micro-batches of ``micro_batch`` samples (the last one shorter), dealt round-robin to the ``dp_size`` data-parallel
    ranks; where the deal leaves a rank one batch short, it gets a stand-in whose targets are all ``ignore_index``, so
    that every rank runs the same number of forwards (ZeRO-3 gathers parameters in each; a pipeline's stages exchange
    activations) while the stand-in adds no token to the mean. The mean itself is token-weighted over every sample
    (token_mean.py), so it does not depend on how the samples are split.

    Raises ValueError when the split holds no sample, or fewer than ``n_samples`` (``None``: the whole split)."""

    def __init__(
        self,
        dataset: Any,
        seq_len: int,
        micro_batch: int,
        n_samples: int | None = None,
        labels: bool = False,
        *,
        dp_size: int = 1,
        dp_rank: int = 0,
        ignore_index: int = -100,
    ) -> None:
        self.reader = SampleReader(dataset, seq_len, labels)
        size = len(self.reader)
        if size == 0:
            raise ValueError("the validation split holds no sample")
        if n_samples is not None and n_samples > size:
            raise ValueError(f"({n_samples}) is more than the {size} samples of the validation split")
        self.n_samples = n = size if n_samples is None else n_samples
        self.ignore_index = ignore_index
        every = [np.arange(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]
        per_rank = -(-len(every) // dp_size)
        mine: list[np.ndarray | None] = list(every[dp_rank::dp_size])
        self.batches = mine + [None] * (per_rank - len(mine))

    def __iter__(self) -> Iterator[MicroBatch]:
        for idx in self.batches:
            if idx is None:  # a stand-in: sample 0, no target counts
                chunk, labels = self.reader[np.arange(1)]
                yield MicroBatch(chunk[:, :-1], torch.full_like(chunk[:, 1:], self.ignore_index), np.arange(0), labels)
                continue
            chunk, labels = self.reader[idx]
            yield MicroBatch(chunk[:, :-1], chunk[:, 1:], idx, labels)
