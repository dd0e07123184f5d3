"""`tplus prepare`: readers, tokenizers, packing, shards, manifest, atomic publish, errors."""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstd

from tplus_dist.cli import main as cli_main
from tplus_dist.data import prepare as prepare_mod
from tplus_dist.data.prepare import (
    InputError,
    ManifestError,
    PrepareError,
    is_val_document,
    prepare,
    read_manifest,
    tokenizer_from_manifest,
    verify_shards,
)
from tplus_dist.data.readers import iter_documents, resolve_inputs
from tplus_dist.data.streaming_compat import import_streaming
from tplus_dist.data.tokenizers import HFTokenizer, TiktokenTokenizer

# ---------------------------------------------------------------------------------------------- corpus


def pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".zst"):
        half = len(lines) // 2
        cut = lines.index(b"\n", half) + 1
        path.write_bytes(zstd.compress(lines[:cut]) + zstd.compress(lines[cut:]))  # two frames
    else:
        path.write_bytes(lines)
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({"n": list(range(len(docs))), field: docs}), path, row_group_size=40)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """(inputs, documents in order): ~3 MB over .jsonl.gz, a directory of .txt, .parquet, .jsonl.zst and .jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    base = pydoc()
    docs: list[str] = []
    for i, d in enumerate(base):
        docs += [d, d.upper(), f"naïve café — 🙂 #{i}\r\n{d[::-1]}", d.replace(" ", "  "), f"{i}\n{d.title()}"]
        docs.append(d.swapcase())
    docs[7] = "a literal <|endoftext|> inside a document stays text"
    docs[8] = "  \n"  # whitespace is a document too; only empty ones are skipped
    n = len(docs)
    cuts = [0, n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5, n]
    parts = [docs[cuts[i] : cuts[i + 1]] for i in range(5)]
    write_jsonl(root / "a.jsonl.gz", parts[0])
    (root / "txt" / "sub").mkdir(parents=True)
    for j, d in enumerate(parts[1]):  # a directory, read recursively, in sorted order
        (root / "txt" / ("sub" if j % 2 else "") / f"{j:04d}.txt").write_bytes(d.encode())
    (root / "txt" / "README.md").write_text("skipped: not a supported suffix inside a directory")
    write_parquet(root / "c.parquet", parts[2])
    write_jsonl(root / "d.jsonl.zst", parts[3])
    lines = [json.dumps({"text": d, "meta": 1}) for d in parts[4]]
    lines.insert(3, json.dumps({"text": ""}))  # empty: skipped and counted
    lines.insert(5, "   ")  # blank line: skipped
    (root / "e.jsonl").write_text("\n".join(lines) + "\n")
    txt_order = sorted((root / "txt" / ("sub" if j % 2 else "") / f"{j:04d}.txt", d) for j, d in enumerate(parts[1]))
    # os.walk order: files of a directory, then its subdirectories
    top = [d for p, d in txt_order if p.parent.name == "txt"]
    sub = [d for p, d in txt_order if p.parent.name == "sub"]
    ordered = parts[0] + top + sub + parts[2] + parts[3] + parts[4]
    inputs = [str(root / "a.jsonl.gz"), str(root / "txt"), str(root / "c.*"), str(root / "d.jsonl.zst")]
    inputs.append(str(root / "e.jsonl"))
    return inputs, ordered


def read_split(root: Path, split: str, scratch: Path) -> list[dict[str, np.ndarray]]:
    """Every sample of a split, through streaming's MDS reader (LocalDataset reads decompressed shards)."""
    streaming = import_streaming()
    copy = scratch / f"read-{root.name}-{split}"
    shutil.copytree(root / split, copy)
    for z in copy.glob("*.mds.zstd"):
        (copy / z.name.removesuffix(".zstd")).write_bytes(zstd.decompress(z.read_bytes()))
    ds = streaming.LocalDataset(str(copy))
    return [ds[i] for i in range(len(ds))]


def check_dataset(out: Path, docs: list[str], decode: Callable[[list[int]], str], scratch: Path) -> dict[str, Any]:
    """Round trip: reassembling each split's overlapping samples and splitting at EOS gives back its documents
    in order (all but the ones cut by the dropped tail); doc_starts and the manifest's counts agree."""
    m = verify_shards(out)
    seq, eos = m["seq_len"], m["tokenizer"]["eos_id"]
    val_fraction = m["val_fraction"]
    expected = {"train": [d for i, d in enumerate(docs) if not is_val_document(i, val_fraction)]}
    if val_fraction > 0:
        expected["val"] = [d for i, d in enumerate(docs) if is_val_document(i, val_fraction)]
    assert sorted(m["splits"]) == sorted(expected)
    for split, want in expected.items():
        info = m["splits"][split]
        samples = read_split(out, split, scratch)
        assert len(samples) == info["samples"] > 0
        for a, b in itertools.pairwise(samples):
            assert a["tokens"][-1] == b["tokens"][0]  # consecutive samples overlap by one token
        stream = np.concatenate([samples[0]["tokens"]] + [s["tokens"][1:] for s in samples[1:]]).astype(np.int64)
        assert all(s["tokens"].dtype == np.dtype(m["dtype"]) and len(s["tokens"]) == seq + 1 for s in samples)
        assert len(stream) == info["samples"] * seq + 1 == info["tokens"] - info["dropped_tail_tokens"]
        assert info["documents"] == len(want)
        # split at EOS: complete documents, then the start of the one the tail cut (if any)
        ends = np.flatnonzero(stream == eos)
        pieces = np.split(stream, ends + 1)
        complete, partial = pieces[:-1], pieces[-1]
        got = [decode(p[:-1].tolist()) for p in complete]
        assert got == want[: len(got)]
        assert len(want) - len(got) <= info["dropped_tail_tokens"]  # each lost document's EOS is in the tail
        if info["dropped_tail_tokens"] == 0:
            assert len(got) == len(want) and len(partial) == 0
        # doc_starts: positions after an EOS (and 0 at the very start), then the end marker seq + 1
        starts = {0} | {int(i) + 1 for i in ends}
        for j, s in enumerate(samples):
            want_starts = [p for p in range(seq + 1) if j * seq + p in starts] + [seq + 1]
            assert s["doc_starts"].dtype == np.uint32 and s["doc_starts"].tolist() == want_starts, j
    return m


# ---------------------------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def prepared_bytes(corpus: tuple[list[str], list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs, _ = corpus
    out = tmp_path_factory.mktemp("prep") / "bytes"
    prepare(inputs, "bytes", 512, out, val_fraction=0.1, workers=1, shard_size_limit="300kb", progress=False)
    return out


def test_round_trip_several_formats(prepared_bytes: Path, corpus: tuple[list[str], list[str]], tmp_path: Path) -> None:
    inputs, docs = corpus
    assert sum(len(d.encode()) for d in docs) > 2_500_000  # several MB of text
    m = check_dataset(prepared_bytes, docs, lambda ids: bytes(ids).decode("utf-8"), tmp_path)
    assert len(m["splits"]["train"]["shards"]) > 3 and m["splits"]["val"]["samples"] > 10
    # the manifest describes the data and the inputs
    assert m["format_version"] == 1 and m["seq_len"] == 512 and m["dtype"] == "uint16"
    assert m["columns"] == {"tokens": "ndarray:uint16", "doc_starts": "ndarray:uint32"}
    assert m["tokenizer"] == {"kind": "bytes", "spec": "bytes", "vocab_size": 257, "eos_id": 256, "file": None}
    assert m["documents"] == len(docs) == sum(s["documents"] for s in m["splits"].values())
    assert m["empty_documents_skipped"] == 1
    files = resolve_inputs(inputs)
    assert [i["path"] for i in m["inputs"]] == [str(p.resolve()) for p in files]
    assert [i["bytes"] for i in m["inputs"]] == [p.stat().st_size for p in files]
    for s in m["splits"].values():
        for e in s["shards"]:
            assert (prepared_bytes / e["file"]).stat().st_size == e["bytes"]
    total = sum(len(d.encode("utf-8")) + 1 for d in docs)
    assert sum(s["tokens"] for s in m["splits"].values()) == total
    assert not list(prepared_bytes.parent.glob("*.tmp-*"))


def test_readers_stream_one_document_at_a_time(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "first"}\n{not json\n')
    docs = iter_documents([p])
    assert next(docs) == "first"  # read before the bad line is reached
    with pytest.raises(InputError, match=r"x.jsonl:2: invalid JSON"):
        next(docs)


def test_val_split_is_a_stable_hash_of_the_ordinal() -> None:
    flags = [is_val_document(i, 0.1) for i in range(20_000)]
    assert 0.09 < sum(flags) / len(flags) < 0.11
    assert flags == [is_val_document(i, 0.1) for i in range(20_000)]
    assert not any(is_val_document(i, 0.0) for i in range(1000))


# ---------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("small")
    docs = pydoc()
    return write_jsonl(root / "docs.jsonl", docs), docs


def tiny_tiktoken(path: Path, extra_rank: int | None = None) -> Path:
    """256 single bytes and a few English merges (every merge's parts are tokens), as a .tiktoken file."""
    merges = [b"th", b"he", b"the", b" t", b" the", b"in", b"er", b"an", b"on", b"re", b"es", b"ing", b" a", b"e "]
    ranks = {bytes([b]): b for b in range(256)} | {m: 256 + i for i, m in enumerate(merges)}
    if extra_rank is not None:
        ranks[b"tion"] = extra_rank
    lines = [base64.b64encode(t).decode() + f" {r}" for t, r in sorted(ranks.items(), key=lambda x: -x[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("spec", ["train:600", "tokenizer.json", "tiny.tiktoken"])
def test_each_tokenizer_spec_round_trips(spec: str, small: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, docs = small
    if spec == "tokenizer.json":
        HFTokenizer.train_bpe(docs[:30], 800).save(tmp_path / spec)
        spec = str(tmp_path / spec)
    elif spec.endswith(".tiktoken"):
        spec = str(tiny_tiktoken(tmp_path / spec))
    out = tmp_path / "out"
    m = prepare([str(src)], spec, 64, out, val_fraction=0.2, progress=False)
    tok = tokenizer_from_manifest(out)
    assert (tok.vocab_size, tok.eos_id) == (m["tokenizer"]["vocab_size"], m["tokenizer"]["eos_id"])
    check_dataset(out, docs, tok.decode, tmp_path)
    kind = m["tokenizer"]["kind"]
    if kind == "hf":
        assert (out / "tokenizer.json").is_file() and m["tokenizer"]["file"] == "tokenizer.json"
        assert m["tokenizer"]["vocab_size"] <= (600 if spec == "train:600" else 800)
    else:
        assert kind == "tiktoken" and m["tokenizer"]["file"] == "tokenizer.tiktoken"
        assert (out / "tokenizer.tiktoken").read_bytes() == Path(spec).read_bytes()
        assert isinstance(tok, TiktokenTokenizer) and m["tokenizer"]["pat_str"] == tok.pat_str
        assert m["tokenizer"]["eos_id"] == 256 + 14 and tok.encode("the") == [258]


def test_large_vocabulary_stores_uint32(small: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, docs = small
    spec = tiny_tiktoken(tmp_path / "big.tiktoken", extra_rank=70_000)
    m = prepare([str(src)], f"tiktoken:{spec}", 64, tmp_path / "out", progress=False)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 70_002
    assert m["columns"]["tokens"] == "ndarray:uint32"
    check_dataset(tmp_path / "out", docs, tokenizer_from_manifest(tmp_path / "out").decode, tmp_path)


def test_literal_special_token_text_never_becomes_eos(tmp_path: Path) -> None:
    docs = ["before <|endoftext|> after " * 20, "second document " * 30]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    m = prepare([str(src)], "train:300", 8, tmp_path / "out", progress=False)
    assert m["splits"]["train"]["documents"] == 2
    check_dataset(tmp_path / "out", docs, tokenizer_from_manifest(tmp_path / "out").decode, tmp_path)


# ---------------------------------------------------------------------------------------------- workers


def test_one_and_two_workers_write_identical_shards(small: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, docs = small
    big = write_jsonl(tmp_path / "more.jsonl.gz", [f"{i} {d}" for i in range(3) for d in docs])
    HFTokenizer.train_bpe(docs, 1000).save(tmp_path / "tok.json")
    kw: dict[str, Any] = {"val_fraction": 0.1, "shard_size_limit": 200_000, "progress": False}
    m1 = prepare([str(src), str(big)], str(tmp_path / "tok.json"), 128, tmp_path / "w1", workers=1, **kw)
    m2 = prepare([str(src), str(big)], str(tmp_path / "tok.json"), 128, tmp_path / "w2", workers=2, **kw)
    assert m1["splits"] == m2["splits"]  # counts, file names, sizes and sha256 of every shard and index
    assert len(m1["splits"]["train"]["shards"]) > 1 and m1["splits"]["val"]["samples"] > 0
    for e in m1["splits"]["train"]["shards"]:
        assert (tmp_path / "w1" / e["file"]).read_bytes() == (tmp_path / "w2" / e["file"]).read_bytes()


def test_interrupt_with_workers_leaves_nothing(
    small: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, docs = small
    big = write_jsonl(tmp_path / "more.jsonl", [f"{i} {d}" for i in range(4) for d in docs])
    calls = []
    real_add = prepare_mod._Packer.add

    def add(self: Any, tokens: np.ndarray, lengths: np.ndarray) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C midway, with batches in flight in the workers
        real_add(self, tokens, lengths)

    monkeypatch.setattr(prepare_mod._Packer, "add", add)
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt):
        prepare([str(big)], "bytes", 64, tmp_path / "out", workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more.jsonl"]
    assert set(multiprocessing.active_children()) <= before  # the workers were stopped and joined


# ---------------------------------------------------------------------------------------------- bad input

BAD_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda d: d / "nope.jsonl", r"nope.jsonl: no such file"),
    "suffix": (lambda d: _write(d / "x.csv", b"a,b\n"), r"x.csv: unsupported suffix"),
    "json": (lambda d: _write(d / "x.jsonl", b'{"text": "ok"}\n{"text": oops}\n'), r"x.jsonl:2: invalid JSON"),
    "field": (lambda d: _write(d / "x.jsonl", b'{"text": "ok"}\n{"body": "b"}\n'), r"x.jsonl:2: no field 'text'"),
    "type": (lambda d: _write(d / "x.jsonl", b'{"text": 3}\n'), r"x.jsonl:1: field 'text' is int, not a string"),
    "null": (lambda d: _write(d / "x.jsonl", b'{"text": null}\n'), r"x.jsonl:1: field 'text' is null"),
    "object": (lambda d: _write(d / "x.jsonl", b'["text"]\n'), r"x.jsonl:1: expected a JSON object"),
    "utf8-jsonl": (
        lambda d: _write(d / "x.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'),
        r"x.jsonl:2: not valid UTF-8",
    ),
    "utf8-txt": (lambda d: _write(d / "x.txt", b"fine\nfine\nbad \xc3\x28\n"), r"x.txt:3: not valid UTF-8"),
    "gzip": (lambda d: _write(d / "x.jsonl.gz", b"\x1f\x8b\x08\x00garbage"), r"x.jsonl.gz:1: cannot decompress"),
    "zstd": (
        lambda d: _write(d / "x.jsonl.zst", zstd.compress(b'{"text": "a"}\n' * 1000)[:-20]),
        r"x.jsonl.zst:\d+: cannot decompress",
    ),
    "parquet-column": (lambda d: write_parquet(d / "x.parquet", ["a"], field="body"), r"x.parquet: no column 'text'"),
    "parquet-type": (
        lambda d: _table(d / "x.parquet", pa.table({"text": [1, 2]})),
        r"x.parquet: column 'text' is int64, not a string",
    ),
    "parquet-null": (
        lambda d: _table(d / "x.parquet", pa.table({"text": ["a", None]})),
        r"x.parquet: row 2: column 'text' is null",
    ),
    "parquet-corrupt": (lambda d: _write(d / "x.parquet", b"PAR1 not really"), r"x.parquet: not a readable parquet"),
    "fifo": (lambda d: _fifo(d / "x.txt"), r"x.txt: not a regular file"),
    "empty-corpus": (lambda d: _write(d / "x.jsonl", b'{"text": ""}\n\n'), r"empty corpus"),
    "glob": (lambda d: d / "*.nothing", r"no file matches"),
    "empty-dir": (lambda d: _mkdir(d / "emptydir"), r"emptydir: directory holds no file"),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _table(p: Path, t: pa.Table) -> Path:
    pq.write_table(t, p)
    return p


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_reason(case: str, tmp_path: Path) -> None:
    make, pattern = BAD_CASES[case]
    (tmp_path / "in").mkdir()
    good = _write(tmp_path / "in" / "good.jsonl", b'{"text": "a good document"}\n' * 50)
    bad = make(tmp_path / "in")
    out = tmp_path / "out" / "ds"
    inputs = [str(bad)] if case == "empty-corpus" else [str(good), str(bad)]
    with pytest.raises(InputError, match=pattern):
        prepare(inputs, "bytes", 16, out, progress=False)
    assert not out.exists()
    assert not list(out.parent.glob("ds.tmp-*")) if out.parent.exists() else True


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "x.jsonl", b'{"text": "a"}\n')
    p.chmod(0)
    with pytest.raises(InputError, match=r"x.jsonl: cannot read \(permission denied\)"):
        prepare([str(p)], "bytes", 16, tmp_path / "out", progress=False)


def test_empty_val_split_is_an_error(tmp_path: Path) -> None:
    # val documents tiny, train documents long: train fills samples, val cannot
    docs = ["x" if is_val_document(i, 0.1) else "a long training document " * 20 for i in range(40)]
    assert "x" in docs
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    with pytest.raises(PrepareError, match=r"val split: \d+ documents, \d+ tokens, fewer than one sample"):
        prepare([str(src)], "bytes", 64, tmp_path / "out", val_fraction=0.1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_bad_arguments(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.txt", b"some text")
    for kw, pattern in [
        ({"seq_len": 0}, "seq-len"),
        ({"val_fraction": 1.0}, "val-fraction"),
        ({"workers": 0}, "workers"),
        ({"shard_size_limit": "lots"}, "shard-size-limit"),
    ]:
        args: dict[str, Any] = {"seq_len": 4, **kw}
        with pytest.raises(PrepareError, match=pattern):
            prepare([str(src)], "bytes", args.pop("seq_len"), tmp_path / "out", progress=False, **args)
    with pytest.raises(ValueError, match="N must be an integer"):
        prepare([str(src)], "train:abc", 4, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


# ---------------------------------------------------------------------------------------------- publishing


def test_existing_output_is_refused_and_untouched(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.txt", b"some text " * 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match=r"out already exists; refusing to overwrite"):
        prepare([str(src)], "bytes", 16, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob("out.tmp-*"))


def test_stale_temp_dirs_are_cleaned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _write(tmp_path / "x.txt", b"some text " * 100)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"out.tmp-{dead.pid}-0badc0de"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard.00000.mds.zstd").write_bytes(b"half")
    alive = tmp_path / f"out.tmp-{os.getppid()}-00ff"  # a live process's: perhaps another prepare at work
    alive.mkdir()
    with caplog.at_level(logging.INFO, logger="tplus_dist.data.prepare"):
        prepare([str(src)], "bytes", 16, tmp_path / "out", progress=False)
    assert not stale.exists() and alive.exists()
    assert any("interrupted earlier run" in r.message and str(stale) in r.message for r in caplog.records)
    read_manifest(tmp_path / "out")


def test_damaged_shards_are_detected(prepared_bytes: Path, tmp_path: Path) -> None:
    m = read_manifest(prepared_bytes, check_sha256=True)
    shard = m["splits"]["train"]["shards"][1]["file"]
    assert shard == "train/shard.00001.mds.zstd"

    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(prepared_bytes, d)
        return d

    d = copy("truncated")
    with open(d / shard, "r+b") as f:
        f.truncate(m["splits"]["train"]["shards"][1]["bytes"] - 100)
    with pytest.raises(ManifestError, match=r"train/shard.00001.mds.zstd: truncated: \d+ bytes, the manifest lists"):
        read_manifest(d)

    d = copy("corrupted")
    data = bytearray((d / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / shard).write_bytes(bytes(data))
    read_manifest(d)  # same size: only the checksum can tell
    damaged = r"train/shard.00001.mds.zstd: damaged: its sha256 is [0-9a-f]{64}, the manifest lists"
    with pytest.raises(ManifestError, match=damaged):
        verify_shards(d)
    with pytest.raises(ManifestError, match=r"checksum mismatch"):
        read_manifest(d, check_sha256=True)

    d = copy("missing")
    (d / "val" / "shard.00000.mds.zstd").unlink()
    with pytest.raises(ManifestError, match=r"val/shard.00000.mds.zstd: missing"):
        read_manifest(d)

    d = copy("nomanifest")
    (d / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest.json: missing"):
        read_manifest(d)

    d = copy("badkeys")
    bad = json.loads((d / "manifest.json").read_text())
    del bad["splits"]["train"]["shards"]
    (d / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=r"split 'train' lacks shards"):
        read_manifest(d)


# ---------------------------------------------------------------------------------------------- command


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", pydoc()[:10])
    out = tmp_path / "out"
    args = ["prepare", "--input", str(src), "--tokenizer", "bytes", "--seq-len", "128", "--out", str(out)]
    assert cli_main([*args, "--workers", "1", "--no-progress"]) == 0
    assert "train:" in capsys.readouterr().out
    verify_shards(out)
    assert cli_main([*args, "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    missing = ["prepare", "--input", str(tmp_path / "nope.txt"), "--tokenizer", "bytes", "--seq-len", "8"]
    assert cli_main([*missing, "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_bad_input_while_training_the_tokenizer(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.jsonl", b'{"text": "hello world"}\n{"text": 1}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: field 'text' is int"):
        prepare([str(src)], "train:300", 4, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]
