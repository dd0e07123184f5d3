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
import secrets
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

        path = Path(cache_dir) / "remote" / _uri_key(shards) / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"manifest.json.tmp-{_host()}-{os.getpid()}")
        try:
            CloudDownloader.direct_download(f"{shards.rstrip('/')}/manifest.json", str(tmp), 60)
        except Exception as e:  # storage clients raise their own types
            raise FileNotFoundError(f"data.shards: cannot read {shards.rstrip('/')}/manifest.json: {e}") from None
        os.replace(tmp, path)
    else:
        from tplus_dist.data.prepare import read_manifest

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


def _host() -> str:
    return os.uname().nodename.replace("-", "_")


_TMP_MARK = ".tmp-"


def _temp_name(path: Path) -> Path:
    """A name beside ``path`` that no other process (of this or another node sharing the directory) uses."""
    return path.with_name(f"{path.name}{_TMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the whole file or none; concurrent writers of the same bytes are harmless
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_dead_temp_files(directory: Path) -> None:
    """Temp files of processes on this node that are gone (a job killed while decompressing a shard)."""
    from tplus_dist.data.prepare import _pid_alive

    host = _host()
    for path in directory.glob(f"*{_TMP_MARK}{host}-*"):
        pid = path.name.rsplit(_TMP_MARK, 1)[1].removeprefix(f"{host}-").split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)


def _make_cached_stream_class() -> type:
    """Defined on first use: it subclasses streaming's Stream, and streaming is imported only when needed."""
    import_streaming()
    from streaming.base.compression import decompress
    from streaming.base.storage.download import CloudDownloader
    from streaming.base.stream import Stream
    from streaming.base.util import retry

    from tplus_dist.data.prepare import ManifestError

    class CachedStream(Stream):
        """A split read from ``source`` (a prepared directory's split, local or remote) through a decompressed copy
        in ``local`` (under data.cache_dir): nothing is ever written into the source, and any number of jobs share
        one copy.

        Streaming (``streaming/base/stream.py:Stream``) would decompress a local dataset in place (``local`` is the
        source when there is no remote), and with a remote it refuses a second live dataset on the same ``local``
        (``streaming/base/shared/prefix.py:_check_and_find``, "Reused local directory"). This stream is given no
        remote, so concurrent jobs may share ``local``, and fetches each shard itself, on first use: it reads (or
        downloads) the compressed file, checks its sha256 against the manifest when one is given (remote shards are
        verified here, as they arrive), decompresses it, and renames the result into place from a temp name unique
        to the process, so two jobs preparing the same shard never see a partial file."""

        def __init__(self, source: str, local: str, sha256: dict[str, str] | None = None) -> None:
            super().__init__(remote=None, local=local, split=None)
            self.source = source.rstrip("/")
            self.sha256 = dict(sha256 or {})

        def set_up_local(self, shards: list[Any], cache_usage_per_shard: np.ndarray) -> None:
            # The compressed files live in the source: count them as present, so that streaming (no remote, so it
            # "keeps zips", ``streaming/base/format/base/reader.py:Reader.set_up_local``) never deletes a
            # decompressed file for lack of its zip, and asks prepare_shard for a missing one on first use.
            listing = {str(p) for p in Path(self.local).iterdir() if p.is_file()}
            for shard in shards:
                for _, zip_info in shard.file_pairs:
                    if zip_info is not None:
                        listing.add(os.path.join(self.local, zip_info.basename))
            for i, shard in enumerate(shards):
                cache_usage_per_shard[i] = shard.set_up_local(listing, self.safe_keep_zip)

        def _fetch(self, basename: str) -> bytes:
            if not is_remote(self.source):
                return Path(self.source, basename).read_bytes()
            tmp = _temp_name(Path(self.local) / basename)
            remote = f"{self.source}/{basename}"
            try:
                retry(num_attempts=self.download_retry)(
                    lambda: CloudDownloader.direct_download(remote, str(tmp), self.download_timeout)
                )()
                return tmp.read_bytes()
            finally:
                tmp.unlink(missing_ok=True)

        def prepare_shard(self, shard: Any) -> int:
            """Make the shard's decompressed file(s) present in ``local``; returns the bytes added. Raises
            ManifestError (a ValueError) naming the source file when it is damaged (sha256, size, or zstd)."""
            delta = 0
            for raw_info, zip_info in shard.file_pairs:
                raw_path = Path(self.local) / raw_info.basename
                if raw_path.is_file():
                    continue
                info = zip_info or raw_info
                where = f"{self.source}/{info.basename}"
                data = self._fetch(info.basename)
                want = self.sha256.get(info.basename)
                if want is not None and hashlib.sha256(data).hexdigest() != want:
                    raise ManifestError(
                        f"{where}: damaged: its sha256 is {hashlib.sha256(data).hexdigest()}, the manifest lists {want}"
                    )
                if zip_info is not None:
                    try:
                        data = decompress(shard.compression, data)
                    except Exception as e:  # zstd.Error and kin: name the file instead of a codec traceback
                        raise ManifestError(f"{where}: cannot be decompressed ({shard.compression}: {e})") from None
                if len(data) != raw_info.bytes:
                    raise ManifestError(
                        f"{where}: holds {len(data)} bytes of samples, its index.json lists {raw_info.bytes}"
                    )
                _write_atomically(raw_path, data)
                delta += raw_info.bytes
            return delta

    return CachedStream


_cached_stream_class: type | None = None


def cached_stream(source: str, local: str, sha256: dict[str, str] | None = None) -> Any:
    """A streaming Stream over ``source`` (a split's directory or URI) decompressed on first use into ``local``;
    ``sha256``: shard file name -> expected sha256 (from the manifest), checked as each shard is fetched."""
    global _cached_stream_class
    if _cached_stream_class is None:
        _cached_stream_class = _make_cached_stream_class()
    return _cached_stream_class(source, local, sha256)


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

    uri = f"{shards.rstrip('/')}/{split}/index.json"
    tmp = _temp_name(Path(cache_dir) / "remote" / _uri_key(shards) / f"{split}-index.json")
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
        _write_atomically(index, index_bytes)
    _remove_dead_temp_files(local)
    stream = cached_stream(source, str(local), sha256)
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
