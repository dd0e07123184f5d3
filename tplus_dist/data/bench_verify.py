"""What verifying prepared data costs: `python -m tplus_dist.data.bench_verify [--gb 1] [--files 8]`.

Writes a synthetic prepared dataset (random bytes in --files shards, an index.json and a manifest.json with their
sha256s) into a temp dir, then times: sha256 on one core (hashlib, the cost per GB); :func:`verify_prepared` with
1 and 2 threads in one process; 1 and 2 ranks of one thread each (gloo processes, the way training splits the work);
and a restart whose digests come from the cache (only stat calls). The files were just written, so they are read
from the page cache: these are hashing figures; on a cold disk or a network filesystem the read speed is the bound.
Prints a table; asserts nothing."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tplus_dist.data.verify import dist_verify_prepared, sha256_file, verify_prepared


def write_synthetic(root: Path, gb: float, n_files: int) -> int:
    """A dataset that read_manifest and verify_prepared accept: one train split of ``n_files`` random shards."""
    rng = np.random.default_rng(0)
    size = int(gb * 1e9) // n_files
    (root / "train").mkdir(parents=True)
    shards, index_shards = [], []
    for i in range(n_files):
        name = f"shard.{i:05d}.mds.zstd"
        data = rng.bytes(size)
        (root / "train" / name).write_bytes(data)
        shards.append({"file": f"train/{name}", "bytes": size, "sha256": hashlib.sha256(data).hexdigest()})
        index_shards.append({"zip_data": {"basename": name, "bytes": size}, "samples": 1})
    index = json.dumps({"version": 2, "shards": index_shards}).encode()
    (root / "train" / "index.json").write_bytes(index)
    index_entry = {"file": "train/index.json", "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}
    manifest = {
        "format": "tplus-prepared",
        "format_version": 1,
        "seq_len": 1,
        "dtype": "uint16",
        "tokenizer": {"kind": "bytes", "vocab_size": 257, "eos_id": 256, "file": None},
        "inputs": [],
        "splits": {
            "train": {
                "dir": "train",
                "samples": n_files,
                "tokens": 0,
                "documents": 0,
                "dropped_tail_tokens": 0,
                "index": index_entry,
                "shards": shards,
            }
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return size * n_files + len(index)


def _rank(rank: int, world: int, data: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dist.barrier()
        t0 = time.perf_counter()
        dist_verify_prepared(data, None, threads=1)
        dist.barrier()
        torch.save(time.perf_counter() - t0, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Write the synthetic data, print the table (see the module docstring), remove the data; returns 0."""
    from tplus_dist.spawn import run_distributed

    ap = argparse.ArgumentParser(prog="python -m tplus_dist.data.bench_verify", description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="synthetic data to write and verify (GB, 1e9 bytes)")
    ap.add_argument("--files", type=int, default=8, help="shards it is split into")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tplus-bench-verify-"))
    try:
        data = tmp / "data"
        total = write_synthetic(data, args.gb, args.files)
        gb = total / 1e9
        files = sorted((data / "train").iterdir())
        for f in files:  # once, so that every timing reads from the page cache
            sha256_file(f)
        print(f"{len(files)} files, {gb:.3f} GB (page cache: hashing figures, not disk reads)")

        def best(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        def row(what: str, t: float, base: float | None = None) -> None:
            speedup = f"  x{base / t:.2f}" if base else ""
            print(f"{what:<40}{gb / t:>8.2f} GB/s{t / gb:>9.2f} s/GB{speedup}")

        one_core = best(lambda: [sha256_file(f) for f in files])
        row("sha256, one core", one_core)
        base = None
        for threads in (1, 2):
            t = best(partial(verify_prepared, data, None, threads=threads))
            base = base or t
            row(f"verify_prepared, {threads} thread(s)", t, base)
        for world in (1, 2):
            times = []
            for r in range(args.repeats):
                out = tmp / f"ranks{world}-{r}"
                out.mkdir()
                run_distributed(_rank, world, str(data), str(out))
                times.append(max(torch.load(out / f"rank{k}.pt") for k in range(world)))
            t = min(times)
            if world == 1:
                base = t
            row(f"{world} rank(s) x 1 thread (gloo)", t, base)
        cache = tmp / "cache"
        verify_prepared(data, cache)
        t = best(lambda: verify_prepared(data, cache))
        per_file = t / len(files) * 1e6
        print(f"{'restart, all digests cached':<40}{t * 1e3:>8.2f} ms, {len(files)} files ({per_file:.0f} us a file)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
