"""`tplus prepare`: documents -> tokens -> packed samples -> zstd MDS shards, published atomically.

Output layout (DIR is ``--out``)::

    DIR/manifest.json          written last; describes everything below (see MANIFEST FORMAT in the README)
    DIR/tokenizer.json         (hf or train:N) | DIR/tokenizer.tiktoken (tiktoken) | nothing (bytes)
    DIR/train/index.json       a mosaicml-streaming MDS dataset: index + shard.NNNNN.mds.zstd files
    DIR/val/...                the same, when --val-fraction > 0

Each sample holds two columns, three with labels (a contract the loader reads):

- ``tokens``: ``ndarray:uint16`` (``uint32`` when the vocabulary exceeds 65536), seq_len + 1 ids. Sample i is
  stream[i*seq_len : i*seq_len + seq_len + 1] of its split's token stream (every document followed by EOS):
  consecutive samples share one token, so each token is a target exactly once. The tail too short for a
  sample is dropped and counted.
- ``doc_starts``: ``ndarray:uint32``, the ascending positions p in [0, seq_len] where a document begins
  (p = 0 only when a document starts exactly there), then the end marker seq_len + 1. The marker is there
  because MDS cannot store an empty array (a sample inside one long document has no start); drop values
  above seq_len, or use it as the end of the last segment.
- ``label`` (only with ``--labels``): ``int32``, the sample's label id (model.adaln's condition). Each label's
  documents are packed into samples of their own, so a sample never mixes labels; each label's stream drops its
  own tail. ``labels`` in the manifest lists the names of the ids and the counts per label.

A document goes to val iff blake2b-64 of its ordinal (keyed, see :func:`is_val_document`) falls below
val_fraction: decided while streaming, no second pass, the same split for any number of workers.

The work happens in a sibling DIR.tmp-<pid>-<random> directory that is renamed to DIR only when complete
(manifest last, everything fsync'd); a failure or Ctrl-C removes it, and a later run removes those left by
killed runs. An existing DIR is never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from tplus_dist.data.readers import (
    InputError,
    PrepareError,
    read_records,
    resolve_input_groups,
)
from tplus_dist.data.streaming_compat import import_streaming
from tplus_dist.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_kind,
)
from tplus_dist.fsutil import fsync_dir

log = logging.getLogger(__name__)

FORMAT = "tplus-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VAL_HASH_KEY = b"tplus-val-split-v1"
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # streaming's default: 64 MiB of uncompressed samples per shard
# Text per tokenizer task: large enough that pickling and IPC are noise (~1 ms a task), small enough that
# the bounded number of tasks in flight keeps memory flat whatever the corpus size, and that the workers
# finish together (the last task runs alone).
BATCH_CHARS = 1 << 16
BATCH_DOCS = 4096

__all__ = [
    "FORMAT_VERSION",
    "InputError",
    "ManifestError",
    "PrepareError",
    "is_val_document",
    "main",
    "prepare",
    "read_manifest",
    "tokenizer_from_manifest",
    "verify_main",
    "verify_shards",
]


class ManifestError(PrepareError):
    """A prepared dataset that does not match its manifest (or has none)."""


def is_val_document(ordinal: int, val_fraction: float) -> bool:
    """Whether document number ``ordinal`` (0-based, over non-empty documents in input order) goes to val."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(ordinal.to_bytes(8, "little"), digest_size=8, key=VAL_HASH_KEY).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0**64


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id: uint16 up to 65536 ids, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ---------------------------------------------------------------------------------------------- tokenizing


def _prepare_tokenizer(tok: Tokenizer) -> Tokenizer:
    """Settings for corpus encoding: special-token text inside a document stays text, so that EOS comes
    only from document ends (tiktoken's encode_ordinary does the same)."""
    if isinstance(tok, HFTokenizer):
        tok.tok.encode_special_tokens = True
    return tok


def encode_documents(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): the documents' ids, each followed by EOS, as one uint32 array, and per-document
    lengths (EOS included)."""
    eos = np.array([tok.eos_id], np.uint32)
    if isinstance(tok, ByteTokenizer):
        arrays = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    elif isinstance(tok, HFTokenizer):
        arrays = [np.asarray(e.ids, np.uint32) for e in tok.tok.encode_batch(texts)]
    elif isinstance(tok, TiktokenTokenizer):
        arrays = [np.asarray(tok.enc.encode_ordinary(t), np.uint32) for t in texts]
    else:
        arrays = [np.asarray(tok.encode(t), np.uint32) for t in texts]
    parts: list[np.ndarray] = []
    for a in arrays:
        parts.append(a)
        parts.append(eos)
    lengths = np.fromiter((len(a) + 1 for a in arrays), np.int64, len(arrays))
    tokens = np.concatenate(parts).astype(np.uint32, copy=False) if parts else np.empty(0, np.uint32)
    return tokens, lengths


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """tokenizers reads TOKENIZERS_PARALLELISM at each call: off, one worker means one core."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# Worker processes (spawned: nothing is inherited; the tokenizer is rebuilt from its saved file).
_worker_tokenizers: dict[tuple[str, str | None, str | None], Tokenizer] = {}


def _worker_init(parent: int) -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides (it stops the workers and cleans up).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one process, one core: K workers use K cores, tokenizers' own thread pool would oversubscribe them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A parent killed outright (kill -9, OOM) cannot stop its workers, and they would wait on the task queue
    forever (each holds the queue's pipe open); they notice being re-parented and leave."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _worker_ready() -> int:
    return os.getpid()


def _worker_encode(kind: str, path: str | None, pat_str: str | None, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    key = (kind, path, pat_str)
    tok = _worker_tokenizers.get(key)
    if tok is None:
        tok = _worker_tokenizers[key] = _prepare_tokenizer(load_tokenizer(kind, path, pat_str))
    return encode_documents(tok, texts)


class _Workers:
    """K spawned tokenizer processes with ordered results and a bound on the tasks in flight.

    ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (OOM kill) fails the pending
    futures with BrokenProcessPool instead of leaving ``get()`` waiting forever."""

    def __init__(self, n: int) -> None:
        import multiprocessing

        self.n = n
        self.pool = ProcessPoolExecutor(
            n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)
        )
        # started now, so that the workers' imports overlap the parent's tokenizer and streaming setup
        self.ready = [self.pool.submit(_worker_ready) for _ in range(n)]

    def wait_ready(self) -> None:
        for f in self.ready:
            f.result()

    def map_ordered(
        self, kind: str, path: str | None, pat_str: str | None, batches: Iterator[tuple[list[str], BatchMeta]]
    ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], BatchMeta]]:
        """((tokens, lengths), meta) per batch, in input order, at most 4K batches in flight (reading never
        runs far ahead of tokenizing, so memory stays flat; enough queued that no worker waits)."""
        pending: deque[tuple[Future[tuple[np.ndarray, np.ndarray]], BatchMeta]] = deque()
        for texts, meta in batches:
            pending.append((self.pool.submit(_worker_encode, kind, path, pat_str, texts), meta))
            if len(pending) >= 4 * self.n:
                fut, flags = pending.popleft()
                yield fut.result(), flags
        while pending:
            fut, flags = pending.popleft()
            yield fut.result(), flags

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop after an error or Ctrl-C: drop the queued tasks, let the running ones (one batch each, about a
        second) finish, and join the workers. Not terminate(): a worker killed while writing its result leaves
        a partial message in the pipe, and the executor's manager thread then waits on it forever."""
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- packing


BatchMeta = tuple[np.ndarray, np.ndarray | None]
"""Per document of a batch: whether it goes to val, and its label id (None without --labels)."""


class _Packer:
    """Cuts one split's token stream (of one label, with --labels) into overlapping samples of seq_len + 1 and
    writes them."""

    def __init__(self, writer: Any, seq_len: int, dtype: str, label: int | None = None) -> None:
        self.writer = writer
        self.label = None if label is None else np.int32(label)
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.buf = np.empty(0, self.dtype)
        self.starts = np.empty(0, np.int64)  # document starts, relative to buf[0]
        self.samples = 0
        self.tokens = 0
        self.documents = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        L = self.seq_len
        doc_starts = len(self.buf) + np.concatenate(([0], np.cumsum(lengths[:-1])))
        self.buf = np.concatenate((self.buf, tokens.astype(self.dtype, copy=False)))
        self.starts = np.concatenate((self.starts, doc_starts))
        self.tokens += len(tokens)
        self.documents += len(lengths)
        n = (len(self.buf) - 1) // L if len(self.buf) > L else 0
        if n == 0:
            return
        lo = np.arange(n, dtype=np.int64) * L
        first = np.searchsorted(self.starts, lo, "left")
        last = np.searchsorted(self.starts, lo + L, "right")
        end_marker = np.array([L + 1], np.uint32)
        for j in range(n):
            s = int(lo[j])
            starts = (self.starts[first[j] : last[j]] - s).astype(np.uint32)
            sample: dict[str, Any] = {
                "tokens": self.buf[s : s + L + 1],
                "doc_starts": np.concatenate((starts, end_marker)),
            }
            if self.label is not None:
                sample["label"] = self.label
            self.writer.write(sample)
        cut = n * L
        self.samples += n
        self.buf = self.buf[cut:].copy()  # copy: release the consumed prefix
        keep = self.starts >= cut  # a start at exactly `cut` is position 0 of the next sample too
        self.starts = self.starts[keep] - cut

    def summary(self) -> dict[str, int]:
        covered = self.samples * self.seq_len + 1 if self.samples else 0
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "documents": self.documents,
            "dropped_tail_tokens": self.tokens - covered,
        }


class _Packers:
    """A packer per split, or per (split, label) with --labels (made as labels appear), over one writer per split."""

    def __init__(self, writers: dict[str, Any], seq_len: int, dtype: str) -> None:
        self.writers, self.seq_len, self.dtype = writers, seq_len, dtype
        self.packers: dict[tuple[str, int | None], _Packer] = {}

    def get(self, split: str, label: int | None) -> _Packer:
        key = (split, label)
        if key not in self.packers:
            self.packers[key] = _Packer(self.writers[split], self.seq_len, self.dtype, label)
        return self.packers[key]

    def add(self, tokens: np.ndarray, lengths: np.ndarray, is_val: np.ndarray, labels: np.ndarray | None) -> None:
        if labels is None and not is_val.any():
            self.get("train", None).add(tokens, lengths)
            return
        keys = is_val.astype(np.int64) if labels is None else labels.astype(np.int64) * 2 + is_val
        for key in np.unique(keys):
            sel = keys == key
            split = "val" if key % 2 else "train"
            packer = self.get(split, None if labels is None else int(key // 2))
            packer.add(tokens[np.repeat(sel, lengths)], lengths[sel])

    def summary(self, split: str) -> dict[str, int]:
        """The split's counts, summed over its labels."""
        total = {"samples": 0, "tokens": 0, "documents": 0, "dropped_tail_tokens": 0}
        for (s, _), p in self.packers.items():
            if s == split:
                for k, v in p.summary().items():
                    total[k] += v
        return total

    def per_label(self, split: str, n_labels: int) -> dict[str, list[int]]:
        """Per label id: samples, documents and tokens of the split."""
        out = {k: [0] * n_labels for k in ("samples", "documents", "tokens")}
        for (s, label), p in self.packers.items():
            if s == split and label is not None:
                summ = p.summary()
                for k in out:
                    out[k][label] = summ[k]
        return out


def _pack(
    results: Iterator[tuple[tuple[np.ndarray, np.ndarray], BatchMeta]], packers: _Packers, progress: bool
) -> None:
    """Route each batch's documents to their split's (and label's) packer, with a progress bar (documents,
    tokens/s)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    n_tokens = 0
    # disable None: no bar when stderr is not a terminal (a redirected log would collect its carriage returns)
    with tqdm(
        desc="prepare", unit="doc", disable=None if progress else True, mininterval=0.5, dynamic_ncols=True
    ) as bar:
        for (tokens, lengths), (is_val, labels) in results:
            packers.add(tokens, lengths, is_val, labels)
            n_tokens += len(tokens)
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
            bar.update(len(lengths))


# ---------------------------------------------------------------------------------------------- files


def _sha256_and_fsync(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(root: Path, path: Path) -> dict[str, Any]:
    return {"file": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": _sha256_and_fsync(path)}


def _tokenizer_entry(path: Path) -> dict[str, Any]:
    """The tokenizer file's size and sha256 (fsync'd), so that verification checks it like the shards."""
    return {"bytes": path.stat().st_size, "sha256": _sha256_and_fsync(path)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    except OverflowError:
        return False
    return True


def clean_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove DIR.tmp-<pid>-<hex> directories whose process is gone (runs that were killed)."""
    pattern = re.compile(re.escape(out.name) + r"\.tmp-(\d+)-[0-9a-f]+")
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m[1])
        if pid != os.getpid() and _pid_alive(pid):
            log.warning("%s: left alone, its process %d is still running (another prepare?)", p, pid)
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by an interrupted earlier run (pid %d)", p, pid)
        removed.append(p)
    return removed


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text.lower())
    if not m:
        raise PrepareError(f"--shard-size-limit: {text!r} is not a size (bytes, or 512k, 64mb, 1g)")
    return int(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m[2]]


# ---------------------------------------------------------------------------------------------- prepare


MAX_LABELS = 1 << 20
"""More label ids than this is a mistake (a document id taken for a label), not a condition to embed."""


class Labeler:
    """Label ids of documents, for --labels: ``input``, the index of the --input argument a document came from;
    ``field:NAME``, the value of a JSON field / parquet column: strings numbered in order of first appearance
    (or as listed by --label-names), non-negative integers taken as ids."""

    def __init__(self, spec: str, inputs: Sequence[str], names: Sequence[str] | None = None) -> None:
        self.field: str | None = None
        if spec == "input":
            if names is not None and len(names) != len(inputs):
                raise PrepareError(
                    f"--label-names lists {len(names)} names, but --labels input needs one per --input ({len(inputs)})"
                )
            self.names = list(names) if names is not None else [str(i) for i in inputs]
        elif spec.startswith("field:") and spec[len("field:") :]:
            self.field = spec[len("field:") :]
            self.names = list(names) if names is not None else []
        else:
            raise PrepareError(f"--labels must be `input` or `field:NAME`, got {spec!r}")
        if len(set(self.names)) != len(self.names):
            raise PrepareError(f"--label-names: a name is listed twice ({', '.join(self.names)})")
        self.spec, self.fixed = spec, names is not None
        self.ids = {n: i for i, n in enumerate(self.names)}
        self.kind: type | None = None
        self.max_id = -1

    def id_of(self, value: str | int | None, where: str) -> int:
        """The id of a field's value (``where`` names the file and line for errors)."""
        field = f"label field {self.field!r}"
        if isinstance(value, str):
            if self.kind is int:
                raise InputError(f"{where}: {field} holds the string {value!r}, but earlier documents hold integers")
            self.kind = str
            i = self.ids.get(value)
            if i is None:
                if self.fixed:
                    raise InputError(f"{where}: {field} holds {value!r}, not one of --label-names")
                i = self.ids[value] = len(self.names)
                self.names.append(value)
        elif isinstance(value, int):
            if self.kind is str:
                raise InputError(f"{where}: {field} holds the integer {value}, but earlier documents hold strings")
            self.kind = int
            if self.fixed and value >= len(self.names):
                raise InputError(f"{where}: {field} holds {value}, outside --label-names (0 .. {len(self.names) - 1})")
            i = value
        else:
            raise InputError(f"{where}: no label")
        if i >= MAX_LABELS:
            raise InputError(f"{where}: {field} gives the label id {i}; at most {MAX_LABELS} labels are supported")
        self.max_id = max(self.max_id, i)
        return i

    def final_names(self) -> list[str]:
        """The name of each id (integer labels without --label-names are named by their value)."""
        if self.kind is int and not self.fixed:
            return [str(i) for i in range(self.max_id + 1)]
        return self.names


def _labeled_documents(
    groups: list[list[Path]], text_field: str, labeler: Labeler | None, counts: dict[str, int]
) -> Iterator[tuple[str, int | None]]:
    """Non-empty documents (an empty one would be a lone EOS) with their label ids (None without --labels);
    counts what was skipped."""
    field = labeler.field if labeler is not None else None
    for g, paths in enumerate(groups):
        for path in paths:
            for text, value, where in read_records(path, text_field, field):
                if not text:
                    counts["empty"] += 1
                    continue
                counts["documents"] += 1
                if labeler is None:
                    yield text, None
                elif field is None:
                    yield text, g  # --labels input: the input's index
                else:
                    yield text, labeler.id_of(value, where)


def _batches(docs: Iterator[tuple[str, int | None]], val_fraction: float) -> Iterator[tuple[list[str], BatchMeta]]:
    """(texts, (is_val, labels)) batches of about BATCH_CHARS characters; ordinals count across batches."""
    texts: list[str] = []
    flags: list[bool] = []
    labels: list[int] = []
    chars = 0

    def batch() -> tuple[list[str], BatchMeta]:
        return texts, (np.array(flags, bool), np.array(labels, np.int64) if labels else None)

    for ordinal, (d, label) in enumerate(docs):
        texts.append(d)
        flags.append(is_val_document(ordinal, val_fraction))
        if label is not None:
            labels.append(label)
        chars += len(d)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
            yield batch()
            texts, flags, labels, chars = [], [], [], 0
    if texts:
        yield batch()


def _save_tokenizer(
    spec: str, paths: list[Path], text_field: str, tmp: Path
) -> tuple[str, str | None, str | None, Tokenizer]:
    """Build (or train) the tokenizer, save it into ``tmp``; (kind, file, pat_str, tokenizer rebuilt from it)."""
    if spec.startswith("train:"):
        counts = {"documents": 0, "empty": 0}
        log.info("training a byte-level BPE (%s) on the input: one pass", spec)
        tok = build_tokenizer(spec, (text for text, _ in _labeled_documents([paths], text_field, None, counts)))
        if counts["documents"] == 0:
            raise InputError(f"empty corpus: the {len(paths)} input file(s) hold no non-empty document")
    else:
        tok = build_tokenizer(spec)
    kind = tokenizer_kind(tok)
    file: str | None = None
    pat_str: str | None = None
    if isinstance(tok, HFTokenizer):
        file = "tokenizer.json"
        if spec.startswith("train:"):
            tok.save(tmp / file)
        else:
            shutil.copyfile(spec, tmp / file)  # verbatim: the file the user named
    elif isinstance(tok, TiktokenTokenizer):
        file = "tokenizer.tiktoken"
        shutil.copyfile(tok.path, tmp / file)
        pat_str = tok.pat_str
    # what we publish is what we use: rebuild from the saved copy
    rebuilt = load_tokenizer(kind, tmp / file if file else None, pat_str)
    if (rebuilt.vocab_size, rebuilt.eos_id) != (tok.vocab_size, tok.eos_id):
        raise PrepareError(f"tokenizer {spec}: the saved copy does not rebuild the same vocabulary")
    return kind, file, pat_str, rebuilt


def prepare(
    inputs: Sequence[str],
    tokenizer: str,
    seq_len: int,
    out: str | Path,
    *,
    val_fraction: float = 0.0,
    workers: int = 1,
    text_field: str = "text",
    shard_size_limit: int | str = DEFAULT_SHARD_SIZE_LIMIT,
    progress: bool = True,
    labels: str | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Tokenize, pack and shard ``inputs`` into the new directory ``out``; returns the manifest.

    inputs: files, directories (recursive) or globs (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet).
    tokenizer: ``bytes`` | ``train:N`` | path to tokenizer.json | path to a .tiktoken file (or ``tiktoken:PATH``).
    workers: tokenizer processes (1 = in this process, one core).
    labels: ``input`` or ``field:NAME``: record each sample's label (see :class:`Labeler`); label_names fixes
    the names (and ids, in order) of the labels.
    Raises PrepareError (InputError for bad input) naming the file and the reason; ``out`` then does not exist.
    """
    t_start = time.perf_counter()
    if not isinstance(seq_len, int) or seq_len < 1:
        raise PrepareError(f"--seq-len must be a positive integer, got {seq_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    size_limit = _parse_size(shard_size_limit)
    if not 0 < size_limit < 1 << 32:
        raise PrepareError(f"--shard-size-limit must be in (0, 4 GiB), got {size_limit}")
    if label_names is not None and labels is None:
        raise PrepareError("--label-names needs --labels")
    labeler = Labeler(labels, inputs, label_names) if labels is not None else None
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise PrepareError(f"{out} already exists; refusing to overwrite it (remove it, or choose another --out)")
    groups = resolve_input_groups(inputs)
    paths = [p for g in groups for p in g]
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    pool: _Workers | None = None
    writers: dict[str, Any] = {}
    try:
        if workers > 1:
            pool = _Workers(workers)
        kind, tok_file, pat_str, tok = _save_tokenizer(tokenizer, paths, text_field, tmp)
        _prepare_tokenizer(tok)
        log.info("tokenizer %s: %s, vocab %d, eos %d", tokenizer, kind, tok.vocab_size, tok.eos_id)
        dtype = token_dtype(tok.vocab_size)
        columns = {"tokens": f"ndarray:{dtype}", "doc_starts": "ndarray:uint32"}
        if labeler is not None:
            columns["label"] = "int32"
        streaming = import_streaming()
        split_names = ["train", "val"] if val_fraction > 0 else ["train"]
        for s in split_names:
            writers[s] = streaming.MDSWriter(
                out=str(tmp / s), columns=columns, compression="zstd", size_limit=size_limit
            )
        packers = _Packers(writers, seq_len, dtype)
        counts = {"documents": 0, "empty": 0}
        batches = _batches(_labeled_documents(groups, text_field, labeler, counts), val_fraction)
        if pool is not None:
            pool.wait_ready()
        t_pipe = time.perf_counter()
        if pool is None:
            with _single_threaded_tokenizers():
                results = ((encode_documents(tok, texts), meta) for texts, meta in batches)
                _pack(results, packers, progress)
        else:
            task_file = str(tmp / tok_file) if tok_file else None
            _pack(pool.map_ordered(kind, task_file, pat_str, batches), packers, progress)
        for w in writers.values():
            w.finish()
        t_pipe_end = time.perf_counter()
        if counts["documents"] == 0:
            raise InputError(f"empty corpus: the {len(paths)} input file(s) hold no non-empty document")
        summaries = {s: packers.summary(s) for s in split_names}
        for s, summ in summaries.items():
            if summ["samples"] == 0:
                # An empty split would only fail later, in the trainer; say it now, with the numbers.
                hint = "raise --val-fraction or use --val-fraction 0" if s == "val" else "give more input"
                raise PrepareError(
                    f"{s} split: {summ['documents']} documents, {summ['tokens']} tokens, fewer than one sample of "
                    f"seq_len + 1 = {seq_len + 1} tokens; {hint}, or lower --seq-len"
                )
        splits: dict[str, Any] = {}
        for s in split_names:
            index = tmp / s / "index.json"
            shard_names = [
                (sh.get("zip_data") or sh["raw_data"])["basename"] for sh in json.loads(index.read_text())["shards"]
            ]
            splits[s] = {
                "dir": s,
                **summaries[s],
                "index": _file_entry(tmp, index),
                "shards": [_file_entry(tmp, tmp / s / name) for name in shard_names],
            }
            fsync_dir(tmp / s)
        from tplus_dist import __version__

        seconds = time.perf_counter() - t_start
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tplus_dist_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seq_len": seq_len,
            "sample_tokens": seq_len + 1,
            "dtype": dtype,
            "columns": columns,
            "compression": "zstd",
            "doc_starts": "positions in [0, seq_len] where a document begins, ascending, then seq_len + 1",
            "tokenizer": {
                "kind": kind,
                "spec": tokenizer,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "file": tok_file,
                **(_tokenizer_entry(tmp / tok_file) if tok_file else {}),
                **({"pat_str": pat_str} if pat_str else {}),
            },
            "val_fraction": val_fraction,
            "val_split": "document ordinal -> blake2b-64 keyed 'tplus-val-split-v1' < val_fraction * 2^64",
            "splits": splits,
            "documents": counts["documents"],
            "empty_documents_skipped": counts["empty"],
            "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths],
            "text_field": text_field,
            "workers": workers,
            "shard_size_limit": size_limit,
            **({"labels": _labels_entry(labeler, packers, split_names)} if labeler is not None else {}),
            "timing": {
                "seconds": round(seconds, 3),
                "pipeline_seconds": round(t_pipe_end - t_pipe, 3),
                "tokens_per_s": round(sum(x["tokens"] for x in summaries.values()) / max(t_pipe_end - t_pipe, 1e-9)),
            },
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        appeared = f"{out} appeared while preparing (another prepare?); refusing to overwrite it"
        if out.exists() or out.is_symlink():  # appeared while we worked: still never overwrite
            raise PrepareError(appeared)
        try:
            os.rename(tmp, out)  # atomic on one filesystem; fails on a non-empty DIR made in the last instant
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise PrepareError(appeared) from None
            raise
        fsync_dir(out.parent)
    except BaseException:
        try:
            if pool is not None:
                stopping, pool = pool, None  # close() in finally must not run on it again
                stopping.abort()
            for w in writers.values():
                with contextlib.suppress(Exception):
                    w.cancel_future_jobs()  # the writer's upload threads
        finally:  # even if a second Ctrl-C interrupts the above
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.close()
    return manifest


def _labels_entry(labeler: Labeler, packers: _Packers, split_names: list[str]) -> dict[str, Any]:
    """The manifest's ``labels``: where they came from, the name of each id, and per-label counts per split."""
    names = labeler.final_names()
    per_split = {s: packers.per_label(s, len(names)) for s in split_names}
    for i, name in enumerate(names):
        train = per_split["train"]
        if train["documents"][i] and not train["samples"][i]:
            log.warning(
                "label %d (%s): %d document(s), %d tokens, too few for one train sample of seq_len + 1 tokens; dropped",
                i,
                name,
                train["documents"][i],
                train["tokens"][i],
            )
    return {
        "source": labeler.spec,
        "count": len(names),
        "names": names,
        "column": "label",
        "splits": per_split,
    }


# ---------------------------------------------------------------------------------------------- reading back

_REQUIRED = ("format", "format_version", "seq_len", "dtype", "tokenizer", "splits", "inputs")
_REQUIRED_SPLIT = ("samples", "tokens", "documents", "dropped_tail_tokens", "index", "shards")
_REQUIRED_TOKENIZER = ("kind", "vocab_size", "eos_id", "file")


def _check_entry(root: Path, entry: dict[str, Any], check_sha256: bool) -> None:
    path = root / entry["file"]
    if not path.is_file():
        raise ManifestError(f"{path}: missing (listed in {root / MANIFEST})")
    size = path.stat().st_size
    if size < entry["bytes"]:
        raise ManifestError(f"{path}: truncated: {size} bytes, the manifest lists {entry['bytes']}")
    if size != entry["bytes"]:
        raise ManifestError(f"{path}: size differs: {size} bytes, the manifest lists {entry['bytes']}")
    if check_sha256:
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise ManifestError(f"{path}: checksum mismatch: sha256 {digest}, the manifest lists {entry['sha256']}")


def read_manifest(directory: str | Path, *, check_sha256: bool = False) -> dict[str, Any]:
    """The manifest of a prepared dataset, after checking it: required keys present, every listed file
    (index.json and shards of each split) present with its listed size, and, with ``check_sha256``, its
    checksum. Raises ManifestError naming the file and what differs."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing (not a `tplus prepare` output, or an unfinished one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: lacks {', '.join(missing)}; not a `tplus prepare` manifest")
    if manifest["format"] != FORMAT or not isinstance(manifest["format_version"], int):
        raise ManifestError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {manifest['format_version']} is newer than this tplus_dist reads "
            f"({FORMAT_VERSION})"
        )
    missing = [k for k in _REQUIRED_TOKENIZER if k not in manifest["tokenizer"]]
    if missing:
        raise ManifestError(f"{path}: tokenizer lacks {', '.join(missing)}")
    if "train" not in manifest["splits"]:
        raise ManifestError(f"{path}: no train split")
    for name, split in manifest["splits"].items():
        missing = [k for k in _REQUIRED_SPLIT if k not in split]
        if missing:
            raise ManifestError(f"{path}: split {name!r} lacks {', '.join(missing)}")
        for entry in [split["index"], *split["shards"]]:
            _check_entry(root, entry, check_sha256)
    tok_file = manifest["tokenizer"]["file"]
    if tok_file and not (root / tok_file).is_file():
        raise ManifestError(f"{root / tok_file}: missing (the tokenizer listed in {path})")
    return manifest


def verify_shards(directory: str | Path, threads: int | None = None) -> dict[str, Any]:
    """Full check, everything hashed (no cache): :func:`read_manifest`, each split's index.json agreeing with the
    manifest (the same shard files, the same sample counts), and the sha256 of every listed file (index, shards,
    tokenizer), on ``threads`` threads (default: all cores). `tplus prepare --verify DIR` runs it; training runs
    the same check in parallel over its ranks (tplus_dist.data.verify). Raises ManifestError naming the first
    damaged file; returns the manifest."""
    from tplus_dist.data.verify import verify_prepared

    verify_prepared(directory, None, threads=threads or _default_workers())
    return read_manifest(directory)


def tokenizer_from_manifest(directory: str | Path) -> Tokenizer:
    """The tokenizer a prepared dataset was made with, rebuilt from the file saved beside it."""
    root = Path(directory)
    t = read_manifest(root)["tokenizer"]
    tok = load_tokenizer(t["kind"], root / t["file"] if t["file"] else None, t.get("pat_str"))
    if (tok.vocab_size, tok.eos_id) != (t["vocab_size"], t["eos_id"]):
        raise ManifestError(
            f"{root / MANIFEST}: tokenizer rebuilds with vocab {tok.vocab_size} / eos {tok.eos_id}, "
            f"the manifest lists {t['vocab_size']} / {t['eos_id']}"
        )
    return tok


# ---------------------------------------------------------------------------------------------- command


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    """The options of `tplus prepare` (preparing; ``--verify`` is dispatched to :func:`build_verify_parser`)."""
    p = argparse.ArgumentParser(
        prog="tplus prepare",
        description="Tokenize documents into packed, zstd-compressed MDS shards (train/ and val/) with a manifest.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files, directories (recursive) or globs: .txt (one document each), .jsonl[.gz|.zst], .parquet",
    )
    p.add_argument(
        "--tokenizer", required=True, help="bytes | train:N | path/to/tokenizer.json | path/to/file.tiktoken"
    )
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sample (each sample stores seq_len + 1)")
    p.add_argument("--out", required=True, help="output directory; must not exist")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for val/ (default 0)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="tokenizer processes (default: all cores)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column of the text (default text)")
    p.add_argument(
        "--labels",
        metavar="input|field:NAME",
        help="record a label per sample (model.adaln's condition): the --input argument a document came from, or "
        "a JSON field / parquet column (strings, or non-negative integers taken as ids); each label is packed apart",
    )
    p.add_argument(
        "--label-names",
        metavar="A,B,...",
        help="with --labels: the labels' names in id order (input: one per --input; field: the allowed strings)",
    )
    p.add_argument(
        "--shard-size-limit",
        default=str(DEFAULT_SHARD_SIZE_LIMIT),
        help="uncompressed bytes per shard, e.g. 67108864 or 64mb (default 64 MiB)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of preparing: check the prepared dataset DIR against its manifest (every file's size and "
        "sha256, each index.json's shards and sample count) and print files, bytes, seconds and GB/s; exit 0 when "
        "intact, 2 naming the first damaged file (takes only --workers: hashing threads)",
    )
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    """The options of `tplus prepare --verify DIR [--workers N]`."""
    p = argparse.ArgumentParser(
        prog="tplus prepare --verify",
        description="Check a prepared dataset against its manifest.json: every listed file's size and sha256 (no "
        "cache: everything is read), and each split's index.json against the manifest. Exit 0: intact; 2: damaged.",
    )
    p.add_argument("--verify", required=True, metavar="DIR", help="a `tplus prepare` output")
    p.add_argument("--workers", type=int, default=_default_workers(), help="hashing threads (default: all cores)")
    return p


def verify_main(argv: list[str]) -> int:
    """`tplus prepare --verify DIR [--workers N]`: prints a one-line summary; exit 0 intact, 2 damaged (the message
    names the file and what differs), 1 unreadable."""
    from tplus_dist.data.verify import verify_prepared

    args = build_verify_parser().parse_args(argv)
    if args.workers < 1:
        print("tplus prepare: error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        report = verify_prepared(args.verify, None, threads=args.workers)
    except (ValueError, FileNotFoundError) as e:  # ManifestError is a ValueError
        print(f"tplus prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tplus prepare: error: {e}", file=sys.stderr)
        return 1
    gb = report.bytes / 1e9
    print(
        f"verified {args.verify}: {report.files} files, {report.bytes:,} bytes ({gb:.3f} GB) in {report.seconds:.2f} s "
        f"({gb / max(report.seconds, 1e-9):.2f} GB/s, {args.workers} thread(s)): intact"
    )
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """`tplus prepare ...`: prepare (exit 0; 2 bad input; 1 an OS error on the output side; 130 interrupted), or
    with ``--verify DIR`` check a prepared dataset (:func:`verify_main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--verify" or a.startswith("--verify=") for a in argv):
        return verify_main(argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="tplus prepare: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    logging.getLogger("tplus_dist.data.readers").setLevel(logging.INFO)
    # SIGTERM (a scheduler's kill) cleans up like Ctrl-C does; signal handlers belong to the main thread
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        manifest = prepare(
            args.input,
            args.tokenizer,
            args.seq_len,
            args.out,
            val_fraction=args.val_fraction,
            workers=args.workers,
            text_field=args.text_field,
            shard_size_limit=args.shard_size_limit,
            progress=not args.no_progress,
            labels=args.labels,
            label_names=args.label_names.split(",") if args.label_names is not None else None,
        )
    except KeyboardInterrupt:
        print(f"tplus prepare: interrupted; nothing was written at {args.out}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # PrepareError and InputError are ValueErrors
        print(f"tplus prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions on the output side
        print(f"tplus prepare: error: {e}", file=sys.stderr)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    for name, s in manifest["splits"].items():
        print(
            f"{name}: {s['samples']} samples of {manifest['seq_len'] + 1} tokens, {s['documents']} documents, "
            f"{s['tokens']} tokens ({s['dropped_tail_tokens']} dropped at the tail), {len(s['shards'])} shard(s)"
        )
    if "labels" in manifest:
        lab = manifest["labels"]
        train = lab["splits"]["train"]["samples"]
        shown = ", ".join(f"{i} {n}: {train[i]}" for i, n in enumerate(lab["names"][:20]))
        more = f", ... ({lab['count']} labels)" if lab["count"] > 20 else ""
        print(f"labels ({lab['source']}), train samples per label: {shown}{more}")
    t = manifest["timing"]
    print(f"wrote {args.out} in {t['seconds']:.1f} s ({t['tokens_per_s']:,} tokens/s while tokenizing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
