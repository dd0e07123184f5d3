"""Checking a prepared dataset against its manifest: every listed file's sha256, and each index.json's agreement.

``tplus prepare`` records every file it writes (each split's ``index.json`` and shards, and the tokenizer file)
with its size and sha256 in ``manifest.json``. :func:`verify_prepared` checks what the manifest promises:

- structure and sizes (``read_manifest``: a missing or truncated file), then each split's ``index.json`` against
  the manifest (the same shard files in the same order, the same sample count), then the sha256 of every listed
  file: a flipped byte, an edited index, or a manifest whose checksum was edited all stop here, named.
- In parallel: the files are dealt to the ranks (largest first, to the least loaded rank), each rank hashes its
  share with a thread pool (hashlib releases the GIL on large updates), and the digests are combined with one
  all-gather, so every rank raises the same one-line error.
- Cached: a file's digest is stored in ``CACHE_DIR/verified/<key>.json`` keyed by its path and
  (size, mtime_ns, ctime_ns, inode); a restart re-hashes only files whose key changed. What the cache can and
  cannot catch: any write through the filesystem changes mtime and ctime, and ``os.utime`` can put the mtime back
  but never the ctime (the kernel sets it to now), so an edit with the mtime restored is still re-hashed. A change
  that bypasses the filesystem (bit rot on the medium, a write to the block device, a storage system that does not
  keep ctime) leaves the key as it was and is not seen until the cache entry is dropped: ``tplus prepare --verify
  DIR`` always hashes everything and ignores the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tplus_dist.data.prepare import ManifestError, read_manifest
from tplus_dist.fsutil import write_atomic

CACHE_VERSION = 1
CHUNK = 1 << 22  # 4 MiB reads: large enough that hashing, not the syscalls, sets the pace
UNREADABLE = "!"  # a digest starting with this is the reason a file could not be read (no hex digest does)


@dataclass
class VerifyReport:
    """What a verification covered. ``seconds`` is this call's wall-clock time on this rank."""

    files: int
    bytes: int
    hashed_files: int
    """Files hashed now (by all ranks); the others' digests came from the cache."""
    hashed_bytes: int
    seconds: float


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, as hex, read in 4 MiB chunks. Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def listed_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file the manifest records with a checksum, as ``{"file", "bytes", "sha256"}`` entries (paths relative
    to the dataset): each split's index.json and shards, and the tokenizer file when the manifest lists its sha256
    (manifests written before the tokenizer's checksum was recorded do not)."""
    entries = []
    for split in manifest["splits"].values():
        entries += [split["index"], *split["shards"]]
    tok = manifest["tokenizer"]
    if tok.get("file") and "sha256" in tok and "bytes" in tok:
        entries.append({"file": tok["file"], "bytes": tok["bytes"], "sha256": tok["sha256"]})
    return entries


def shard_names(index: dict[str, Any]) -> list[str]:
    """The file names an MDS index.json lists, one per shard (the compressed file when there is one)."""
    return [(sh.get("zip_data") or sh["raw_data"])["basename"] for sh in index["shards"]]


def check_index(index_bytes: bytes, split: dict[str, Any], where: str) -> dict[str, Any]:
    """Parse a split's index.json and check it against the manifest's split entry: the same shard files in the
    same order, and the same number of samples. ``where`` names the file in errors. Returns the parsed index;
    raises ManifestError."""
    try:
        index = json.loads(index_bytes)
        names = shard_names(index)
        samples = sum(int(sh["samples"]) for sh in index["shards"])
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{where}: not a readable MDS index ({e})") from None
    files = [f"{split['dir']}/{n}" for n in names]
    listed = [e["file"] for e in split["shards"]]
    if files != listed:
        raise ManifestError(f"{where}: lists the shards {files}, the manifest {listed}")
    if samples != split["samples"]:
        raise ManifestError(f"{where}: {samples} samples, the manifest lists {split['samples']}")
    return dict(index)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def assign(sizes: list[int], world: int) -> list[list[int]]:
    """Deal file indices to ``world`` ranks, largest first to the least loaded rank (ties: the lower rank), so the
    ranks finish together; the same on every rank. Returns each rank's indices in ascending order."""
    load = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += sizes[i]
    return [sorted(s) for s in shares]


def cache_path(cache_dir: str | Path, directory: str | Path) -> Path:
    """Where the digests of one dataset directory are cached: ``cache_dir/verified/<sha256 of its real path>``."""
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return Path(cache_dir) / "verified" / f"{key}.json"


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return dict(data["files"])


def _write_cache(path: Path, directory: Path, files: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never a part (the temp name is unique per writer,
    so several writers, e.g. one per node on a shared cache_dir, replace each other whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"version": CACHE_VERSION, "directory": str(directory), "files": files}))


def default_threads() -> int:
    """Hashing threads per process: this process's cores divided among the node's ranks (LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def verify_prepared(
    directory: str | Path,
    cache_dir: str | Path | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    all_gather: Callable[[Any], list[Any]] | None = None,
    write_cache: bool = True,
    threads: int | None = None,
) -> VerifyReport:
    """Check a `tplus prepare` output against its manifest (see the module docstring) before it is trained on.

    ``rank``/``world``/``all_gather``: this process's share of the hashing among ``world`` processes that all call
    this function; ``all_gather(obj)`` returns every rank's obj in rank order (e.g. ``dist.all_gather_object``).
    ``cache_dir``: reuse and record digests there (None: hash everything, record nothing); ``write_cache``: this
    process writes the merged cache (one process per node). ``threads``: hashing threads (default: the cores
    divided among the node's ranks). Raises ManifestError (a ValueError) naming the first damaged file and what
    differs, the same on every rank; returns a VerifyReport."""
    t0 = time.perf_counter()
    root = Path(directory).absolute()
    manifest = read_manifest(root)  # keys, presence and sizes: a missing or truncated file stops here
    for split in manifest["splits"].values():
        index_file = root / split["index"]["file"]
        check_index(index_file.read_bytes(), split, str(index_file))
    entries = listed_files(manifest)
    for e in entries:  # read_manifest checked the shards' and indexes' sizes; the tokenizer's too, here
        try:
            size = (root / e["file"]).stat().st_size
        except FileNotFoundError:
            raise ManifestError(f"{root / e['file']}: missing (listed in {root / 'manifest.json'})") from None
        if size != e["bytes"]:
            raise ManifestError(f"{root / e['file']}: size differs: {size} bytes, the manifest lists {e['bytes']}")
    cfile = cache_path(cache_dir, root) if cache_dir is not None else None
    cache = _load_cache(cfile) if cfile is not None else {}
    mine = assign([int(e["bytes"]) for e in entries], world)[rank]
    results: dict[str, Any] = {}  # file -> {"key": stat key, "sha256": digest, "hashed": bool}
    todo: list[tuple[str, list[int]]] = []
    for i in mine:
        name = entries[i]["file"]
        key = _stat_key((root / name).stat())
        hit = cache.get(name)
        if isinstance(hit, dict) and hit.get("key") == key and isinstance(hit.get("sha256"), str):
            results[name] = {"key": key, "sha256": hit["sha256"], "hashed": False}
        else:
            todo.append((name, key))

    def digest(name: str) -> str:
        try:
            return sha256_file(root / name)
        except OSError as e:  # reported after the gather, on every rank: a rank that raised alone would hang the rest
            return f"{UNREADABLE}{e.strerror or e}"

    with ThreadPoolExecutor(max(1, min(threads or default_threads(), len(todo) or 1))) as pool:
        for (name, key), d in zip(todo, pool.map(digest, (name for name, _ in todo)), strict=True):
            results[name] = {"key": key, "sha256": d, "hashed": True}
    if world > 1:
        assert all_gather is not None, "world > 1 needs all_gather"
        merged: dict[str, Any] = {}
        for part in all_gather(results):
            merged.update(part)
        results = merged
    if cfile is not None and write_cache:
        fresh = {n: {"key": r["key"], "sha256": r["sha256"]} for n, r in results.items()}
        _write_cache(cfile, root, {**cache, **{n: v for n, v in fresh.items() if not v["sha256"].startswith("!")}})
    bad = [e for e in entries if results[e["file"]]["sha256"] != e["sha256"]]
    if bad:
        e, got = bad[0], results[bad[0]["file"]]["sha256"]
        more = f"; {len(bad) - 1} more file(s) differ: {', '.join(b['file'] for b in bad[1:4])}" if len(bad) > 1 else ""
        if got.startswith(UNREADABLE):
            raise ManifestError(f"{root / e['file']}: cannot be read ({got.removeprefix(UNREADABLE)}){more}")
        raise ManifestError(
            f"{root / e['file']}: damaged: its sha256 is {got}, the manifest lists {e['sha256']} (same size, "
            f"{e['bytes']} bytes: the file or manifest.json changed after `tplus prepare` wrote them){more}"
        )
    hashed = [e for e in entries if results[e["file"]]["hashed"]]
    return VerifyReport(
        files=len(entries),
        bytes=sum(int(e["bytes"]) for e in entries),
        hashed_files=len(hashed),
        hashed_bytes=sum(int(e["bytes"]) for e in hashed),
        seconds=time.perf_counter() - t0,
    )


def dist_verify_prepared(
    directory: str | Path, cache_dir: str | Path | None, threads: int | None = None
) -> VerifyReport:
    """:func:`verify_prepared` in every process of the torch.distributed job (each hashes its share with ``threads``
    threads; one process a node, LOCAL_RANK 0, writes the cache), or in this process alone when torch.distributed
    is not initialized. Every rank raises the same ManifestError, or returns the same totals."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return verify_prepared(directory, cache_dir, threads=threads)
    world = dist.get_world_size()

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return verify_prepared(
        directory,
        cache_dir,
        rank=dist.get_rank(),
        world=world,
        all_gather=gather,
        write_cache=int(os.environ.get("LOCAL_RANK", "0")) == 0,
        threads=threads,
    )
