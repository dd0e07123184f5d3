"""Benchmark of `tplus prepare` (prints figures; not a test). Nothing downloads.

    python -m tplus_dist.data.bench_prepare [--mb 5] [--workers 1,2] [--growth 10] [--seq-len 1024] [--vocab 4096]

The corpus is Python's own documentation (pydoc_data, ~460 KB), repeated with a numbered prefix per copy
into a .jsonl of ``--mb`` megabytes; the tokenizer is a byte-level BPE of ``--vocab`` tokens trained on one
copy (saved as tokenizer.json, so training is not timed).

(a) Throughput: prepare with K workers against the tokenizers library's own ``encode_batch`` over the same
    documents, on K cores (K = 1: TOKENIZERS_PARALLELISM=false; K = 2: RAYON_NUM_THREADS=2), documents
    already in memory and in one call (the library's best case). Both run in one fresh process per K,
    alternated, best of ``--repeats``. prepare's figure is its whole pipeline (read + JSON, tokenize, pack,
    write zstd shards) once its workers have started; the end-to-end figure adds worker start-up (each
    spawned worker imports tplus_dist, hence torch), streaming's import and the checksums.
(b) Memory: peak RSS of prepare (the parent, and the largest worker) on the corpus and on one ``--growth``
    times larger, each in a fresh process. The pipeline holds a bounded number of batches; the parent also
    holds the shard being written (streaming's MDSWriter buffers a whole shard, compresses it, writes it),
    so its peak is a baseline + about 2-3x --shard-size-limit, whatever the input size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def write_corpus(path: Path, megabytes: float) -> int:
    """A .jsonl of about ``megabytes`` MB: copies of the pydoc topics, each copy's documents numbered."""
    docs = _pydoc()
    target = int(megabytes * 1e6)
    written = copy = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for d in docs:
                line = json.dumps({"text": f"[copy {copy}] {d}"}) + "\n"
                f.write(line)
                written += len(line)
            copy += 1
    return written


def _vm_hwm_kb() -> int:
    """Peak resident set of this process (kB), from /proc (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it prints one JSON line last."""
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "tplus_dist.data.bench_prepare", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{r.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def _throughput(corpus: str, tokenizer: str, workers: int, seq_len: int, out: str, repeats: int) -> None:
    """Reference and prepare alternately in one process, best of ``repeats`` each: the cores here are shared,
    and alternating exposes both to the same load drift."""
    from tokenizers import Tokenizer

    from tplus_dist.data.prepare import prepare

    tok = Tokenizer.from_file(tokenizer)
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    tok.encode_batch(docs[:8])  # warm up (thread pool)
    ref_s = prep_tps = 0.0
    call_s = float("inf")
    n = tokens = 0
    for i in range(repeats):
        t = time.perf_counter()
        n = sum(len(e.ids) for e in tok.encode_batch(docs)) + len(docs)  # + EOS, as prepare counts
        dt = time.perf_counter() - t
        ref_s = dt if i == 0 else min(ref_s, dt)
        t = time.perf_counter()
        m = prepare([corpus], tokenizer, seq_len, f"{out}-{i}", workers=workers, progress=False)
        call_s = min(call_s, time.perf_counter() - t)
        prep_tps = max(prep_tps, m["timing"]["tokens_per_s"])
        tokens = sum(s["tokens"] for s in m["splits"].values())
    print(json.dumps({"tokens": tokens, "ref_tokens": n, "ref_tps": n / ref_s, "prep_tps": prep_tps, "call_s": call_s}))


def _memory(corpus: str, tokenizer: str, workers: int, seq_len: int, out: str, shard_limit: int) -> None:
    from tplus_dist.data.prepare import prepare

    t = time.perf_counter()
    m = prepare([corpus], tokenizer, seq_len, out, workers=workers, shard_size_limit=shard_limit, progress=False)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker, joined
    result = {
        "tokens": sum(s["tokens"] for s in m["splits"].values()),
        "shards": sum(len(s["shards"]) for s in m["splits"].values()),
        "call_s": time.perf_counter() - t,
        "parent_rss_mb": _vm_hwm_kb() / 1024,
        "worker_rss_mb": children / 1024 if workers > 1 else 0.0,
    }
    print(json.dumps(result))


def run(
    megabytes: float, workers: list[int], seq_len: int, vocab: int, growth: int, repeats: int, shard_mb: int
) -> None:
    from tplus_dist.data.tokenizers import HFTokenizer

    with tempfile.TemporaryDirectory(prefix="tplus-bench-prepare-") as d:
        root = Path(d)
        corpus = root / "corpus.jsonl"
        size = write_corpus(corpus, megabytes)
        tok_path = root / "tokenizer.json"
        HFTokenizer.train_bpe(_pydoc(), vocab).save(tok_path)
        print(f"corpus: {size / 1e6:.1f} MB jsonl (pydoc_data topics, numbered copies); BPE vocab {vocab}; ", end="")
        print(f"seq_len {seq_len}; {os.cpu_count()} cores")

        print(f"\n(a) throughput, tokens/s, same documents on K cores (best of {repeats}, alternated)")
        print(f"{'K':>3} {'encode_batch':>13} {'prepare':>10} {'ratio':>6} {'prepare end-to-end':>19}")
        for k in workers:
            env = {"TOKENIZERS_PARALLELISM": "false"} if k == 1 else {"RAYON_NUM_THREADS": str(k)}
            args = [str(corpus), str(tok_path), str(k), str(seq_len), str(root / f"out-{k}"), str(repeats)]
            r = _child(["--_throughput", *args], env)
            assert r["tokens"] == r["ref_tokens"], r
            print(
                f"{k:>3} {r['ref_tps']:>13,.0f} {r['prep_tps']:>10,.0f} {r['prep_tps'] / r['ref_tps']:>6.2f} "
                f"{r['tokens'] / r['call_s']:>12,.0f} ({r['call_s']:.1f} s)"
            )

        k = max(workers)
        print(f"\n(b) peak RSS of prepare, {k} worker(s), {shard_mb} MiB shards, as the input grows {growth}x")
        print(f"{'input MB':>9} {'tokens':>11} {'shards':>7} {'parent MB':>10} {'worker MB':>10} {'seconds':>8}")
        big = root / "corpus-big.jsonl"
        big_size = write_corpus(big, megabytes * growth)
        for path, mb in ((corpus, size / 1e6), (big, big_size / 1e6)):
            args = [str(path), str(tok_path), str(k), str(seq_len), str(root / f"rss-{mb:.0f}"), str(shard_mb << 20)]
            r = _child(["--_memory", *args])
            print(
                f"{mb:>9.1f} {r['tokens']:>11,} {r['shards']:>7} {r['parent_rss_mb']:>10.0f} "
                f"{r['worker_rss_mb']:>10.0f} {r['call_s']:>8.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--_throughput", "--_memory"):  # one measurement, in a fresh process
        fn = _throughput if argv[0] == "--_throughput" else _memory
        fn(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5], int(argv[6]))
        return 0
    p = argparse.ArgumentParser(prog="python -m tplus_dist.data.bench_prepare", description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=5.0, help="corpus size in MB (default 5)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--growth", type=int, default=10, help="the memory run's larger input, x --mb (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per figure, best kept (default 3)")
    p.add_argument("--shard-mb", type=int, default=1, help="shard size limit of the memory runs, MiB (default 1)")
    a = p.parse_args(argv)
    run(a.mb, [int(k) for k in a.workers.split(",")], a.seq_len, a.vocab, a.growth, a.repeats, a.shard_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
