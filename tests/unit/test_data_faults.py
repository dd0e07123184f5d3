"""Damaged or read-only data. Damage is found before the first step, named, and nothing of the run is written; the
digest cache; `tplus prepare --verify`; a read-only prepared folder trains and is left as it was. Expected digests
come from hashlib on the files, never from the code under test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tplus_dist.cli import main
from tplus_dist.data.loader import open_split
from tplus_dist.data.prepare import ManifestError, prepare
from tplus_dist.data.verify import assign, cache_path, verify_prepared
from tplus_dist.train.metrics import read_metrics

SEQ = 64
TRAIN = [  # the smallest run that reaches the data: a damaged file must stop it before anything is written
    "train",
    "configs/tiny.yaml",
    "--train.steps=1",
    "--schedule.warmup_steps=0",  # (tiny's 20-step warmup would outlast the run: refused)
    "--train.micro_batch_size=4",
    "--train.eval_interval=0",
    f"--model.seq_len={SEQ}",
    "--log.progress=false",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python's help topics, bytes, seq_len 64, several small shards, a val split."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("verify")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:40]))
    out = root / "prepared"
    prepare([str(src)], "bytes", SEQ, out, val_fraction=0.2, workers=1, shard_size_limit="20kb", progress=False)
    return out


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(prepared, d)
    return d


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    """One byte inverted in the middle; the size stays; the mtime is put back with os.utime when asked."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def train_cli(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main([*TRAIN, f"--data.shards={data}", f"--data.cache_dir={tmp_path}/cache", f"--log.run_dir={tmp_path}/run"])
    return rc, capsys.readouterr().err


def test_flipped_byte_in_a_shard_stops_the_run_before_the_run_directory_exists(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = copy_of(prepared, tmp_path)
    victim = data / "train" / "shard.00002.mds.zstd"
    listed = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][2]
    assert listed["file"] == "train/shard.00002.mds.zstd" and listed["sha256"] == sha256(victim)
    flip_byte(victim)
    rc, err = train_cli(data, tmp_path, capsys)
    assert rc == 2
    line = err.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in err  # one line, no zstd traceback
    assert str(victim) in err and sha256(victim) in err and listed["sha256"] in err
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(p.name for p in (prepared / "train").iterdir())


def test_manifest_checksum_edited_is_named(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_of(prepared, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["splits"]["val"]["shards"][0]
    entry["sha256"] = hashlib.sha256(b"not the shard").hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    rc, err = train_cli(data, tmp_path, capsys)
    assert rc == 2
    assert str(data / entry["file"]) in err and entry["sha256"] in err and sha256(data / entry["file"]) in err
    assert not (tmp_path / "run").exists()


def test_index_sample_count_edited_is_named(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_of(prepared, tmp_path)
    index_file = data / "train" / "index.json"
    index = json.loads(index_file.read_text())
    listed = sum(int(s["samples"]) for s in index["shards"])
    index["shards"][0]["samples"] -= 1
    index_file.write_text(json.dumps(index))
    rc, err = train_cli(data, tmp_path, capsys)
    assert rc == 2
    assert f"{index_file}: {listed - 1} samples, the manifest lists {listed}" in err
    assert not (tmp_path / "run").exists()


def test_tokenizer_file_is_checked(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} " * 30}) + "\n" for i in range(60)))
    out = tmp_path / "p"
    prepare([str(src)], "train:300", 16, out, workers=1, progress=False)
    tok = out / json.loads((out / "manifest.json").read_text())["tokenizer"]["file"]
    assert tok.name == "tokenizer.json"
    verify_prepared(out)
    flip_byte(tok)
    with pytest.raises(ManifestError, match=rf"{tok}: damaged: its sha256 is {sha256(tok)}"):
        verify_prepared(out)


def test_cache_skips_unchanged_files_and_catches_an_edit_with_the_mtime_put_back(
    prepared: Path, tmp_path: Path
) -> None:
    data = copy_of(prepared, tmp_path)
    cache = tmp_path / "cache"
    files = sorted(p for p in data.rglob("*") if p.name == "index.json" or p.name.endswith(".zstd"))
    first = verify_prepared(data, cache)
    assert (first.files, first.hashed_files) == (len(files), len(files))
    assert first.bytes == sum(p.stat().st_size for p in files)
    again = verify_prepared(data, cache)
    assert (again.files, again.hashed_files, again.hashed_bytes) == (len(files), 0, 0)
    # the cache is trusted while a file's (size, mtime, ctime, inode) stay: a wrong recorded digest shows it
    victim = data / "val" / "shard.00000.mds.zstd"
    record = cache_path(cache, data)
    cached: dict[str, Any] = json.loads(record.read_text())
    cached["files"]["val/shard.00000.mds.zstd"]["sha256"] = "0" * 64
    record.write_text(json.dumps(cached))
    with pytest.raises(ManifestError, match=r"val/shard.00000.mds.zstd: damaged: its sha256 is 0{64}"):
        verify_prepared(data, cache)
    # a new mtime forces a rehash of that file alone
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rehashed = verify_prepared(data, cache)
    assert (rehashed.hashed_files, rehashed.hashed_bytes) == (1, victim.stat().st_size)
    # an edit with the mtime restored (os.utime) still changes the ctime, so it is hashed and caught
    flip_byte(victim, keep_mtime=True)
    with pytest.raises(ManifestError, match=rf"{victim}: damaged: its sha256 is {sha256(victim)}"):
        verify_prepared(data, cache)


def test_ranks_share_the_hashing_and_raise_the_same_error(prepared: Path, tmp_path: Path) -> None:
    data = copy_of(prepared, tmp_path)
    sizes = [5, 1, 9, 3, 3, 7]
    shares = assign(sizes, 2)
    assert sorted(shares[0] + shares[1]) == list(range(6)) and not set(shares[0]) & set(shares[1])
    assert abs(sum(sizes[i] for i in shares[0]) - sum(sizes[i] for i in shares[1])) <= max(sizes)
    flip_byte(data / "train" / "shard.00000.mds.zstd")
    box: list[Any] = [None, None]
    barrier = threading.Barrier(2)
    errors: list[str] = ["", ""]
    hashed: list[int] = [0, 0]

    def gather(rank: int, obj: Any) -> list[Any]:
        box[rank] = obj
        barrier.wait()
        out = list(box)
        barrier.wait()
        return out

    def rank_fn(rank: int) -> None:
        try:
            verify_prepared(data, tmp_path / "cache", rank=rank, world=2, all_gather=lambda o: gather(rank, o))
        except ManifestError as e:
            errors[rank] = str(e)
        hashed[rank] = len(box[rank])

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors[0] == errors[1] and "train/shard.00000.mds.zstd: damaged" in errors[0]
    n_files = len([p for p in data.rglob("*") if p.name == "index.json" or p.name.endswith(".zstd")])
    assert hashed[0] + hashed[1] == n_files and min(hashed) > 0


def test_a_shard_damaged_after_verification_is_named_when_read(prepared: Path, tmp_path: Path) -> None:
    """open_split checks each shard's sha256 as it fetches it (remote shards are verified only there)."""
    data = copy_of(prepared, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    victim = data / "train" / "shard.00000.mds.zstd"
    flip_byte(victim)
    ds = open_split(str(data), "train", tmp_path / "cache", manifest)
    with pytest.raises(ManifestError, match=rf"{victim}: damaged: its sha256 is {sha256(victim)}"):
        ds[0]


def test_cli_prepare_verify(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_of(prepared, tmp_path)
    files = [p for p in data.rglob("*") if p.name == "index.json" or p.name.endswith(".zstd")]
    assert main(["prepare", "--verify", str(data), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(files)} files, {sum(p.stat().st_size for p in files):,} bytes" in out and "intact" in out
    flip_byte(data / "val" / "index.json")
    assert main(["prepare", "--verify", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'val' / 'index.json'}" in err and "Traceback" not in err
    assert main(["prepare", "--verify", str(tmp_path / "nothing")]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_read_only_prepared_folder_trains_and_nothing_appears_in_it(prepared: Path, tmp_path: Path) -> None:
    """The prepared folder is a read-only bind mount (a private mount namespace: root cannot write there either)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespace here (unshare -m needs CAP_SYS_ADMIN)")
    data = copy_of(prepared, tmp_path)

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(data)): (p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")}

    before = snapshot()
    train = [sys.executable, "-m", "tplus_dist", *TRAIN, "--train.steps=2", "--train.eval_interval=2"]
    train += [f"--data.shards={data}", f"--data.cache_dir={tmp_path}/cache", f"--log.run_dir={tmp_path}/run"]
    script = (
        f"mount --bind {data} {data} && mount -o remount,bind,ro {data} || exit 91; "
        f"touch {data}/probe 2>/dev/null && exit 90; exec " + " ".join(train)
    )
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode == 91:
        pytest.skip(f"cannot make a read-only bind mount here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert snapshot() == before
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    decompressed = list((tmp_path / "cache" / "local").glob("*/train/shard.*.mds"))
    assert decompressed and all(p.stat().st_size > 0 for p in decompressed)
