"""Streaming document readers for `tplus prepare`: one document at a time, never a whole corpus in memory.

Supported inputs (by suffix):

- ``.txt``: the whole file is one document (UTF-8; a leading byte-order mark is dropped).
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, the document in a string field
  (``text`` unless told otherwise); blank lines are skipped. zstd is decompressed as a stream by pyarrow
  (already needed for parquet), so no extra package is required.
- ``.parquet``: the named string column, read batch by batch.

Every problem is a :class:`InputError` naming the file (and line or row) and the reason.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_PARQUET_BATCH_ROWS = 1024


class PrepareError(ValueError):
    """A problem with `tplus prepare`'s inputs, arguments or outputs (a ValueError: the CLI maps it to exit 2)."""


class InputError(PrepareError):
    """An input file that cannot be read as documents."""


def suffix_of(path: Path) -> str | None:
    """The supported suffix ``path`` ends with, or None."""
    name = path.name.lower()
    # longest first, so that .jsonl.gz is not taken for an unsupported .gz
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return None


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _walk(directory: Path) -> list[Path]:
    """Supported files under ``directory``, recursively, in sorted (deterministic) order."""
    found: list[Path] = []
    skipped = 0
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            if suffix_of(p) is None:
                skipped += 1
            else:
                found.append(p)
    if skipped:
        log.info("%s: skipped %d file(s) without a supported suffix (%s)", directory, skipped, ", ".join(SUFFIXES))
    return found


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if suffix_of(path) is None:
        raise InputError(f"{path}: unsupported suffix (supported: {', '.join(SUFFIXES)})")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read (permission denied)")


def resolve_inputs(specs: Sequence[str]) -> list[Path]:
    """Files named by ``specs`` (paths, directories searched recursively, or globs), in order, each once.

    An explicitly named file (or one a glob matched) must have a supported suffix; inside directories, files
    with other suffixes are skipped (and counted in a log line)."""
    if not specs:
        raise InputError("no input given")
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        if _is_glob(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError(f"{spec}: no file matches this pattern")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(spec)]
        for c in candidates:
            files = _walk(c) if c.is_dir() else [c]
            if c.is_dir() and not files:
                raise InputError(f"{c}: directory holds no file with a supported suffix ({', '.join(SUFFIXES)})")
            for f in files:
                _check_file(f)
                key = f.resolve()
                if key in seen:
                    log.warning("%s: named more than once; read once", f)
                    continue
                seen.add(key)
                out.append(f)
    return out


class _ArrowRaw(io.RawIOBase):
    """pyarrow's decompressing stream as a raw file, so io.BufferedReader can split it into lines."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.stream.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        self.stream.close()
        super().close()


def _open_binary(path: Path) -> BinaryIO:
    suffix = suffix_of(path)
    try:
        if suffix == ".jsonl.gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        if suffix == ".jsonl.zst":
            import pyarrow as pa

            raw = _ArrowRaw(pa.CompressedInputStream(pa.OSFile(str(path), "rb"), "zstd"))
            return io.BufferedReader(raw, 1 << 20)
        return open(path, "rb")  # closed by the caller's with
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


def _utf8_error(path: Path, e: UnicodeDecodeError, where: str) -> InputError:
    return InputError(f"{path}{where}: not valid UTF-8 ({e.reason} at byte {e.start})")


def read_txt(path: Path) -> Iterator[str]:
    """The file as one document."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        yield data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _utf8_error(path, e, f":{line}") from None


def read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` string of each line's JSON object (plain, gzip or zstd file)."""
    lineno = 0
    with _open_binary(path) as f:
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated compressed stream
                raise InputError(f"{path}:{lineno + 1}: cannot decompress ({e})") from None
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, e, f":{lineno}") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
            if text_field not in obj:
                fields = ", ".join(sorted(obj)[:10]) or "none"
                raise InputError(f"{path}:{lineno}: no field {text_field!r} (fields: {fields})")
            text = obj[text_field]
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                raise InputError(f"{path}:{lineno}: field {text_field!r} is {kind}, not a string")
            yield text


def read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column, read a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names[:10]) or 'none'})")
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise InputError(f"{path}: column {text_field!r} is {col_type}, not a string")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    raise InputError(f"{path}: row {row}: column {text_field!r} is null, not a string")
                yield value
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e, f": row {row + 1}") from None
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: row {row + 1}: cannot read ({e})") from None


def read_file(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, chosen by its suffix."""
    suffix = suffix_of(path)
    if suffix == ".txt":
        yield from read_txt(path)
    elif suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from read_jsonl(path, text_field)
    elif suffix == ".parquet":
        yield from read_parquet(path, text_field)
    else:
        raise InputError(f"{path}: unsupported suffix (supported: {', '.join(SUFFIXES)})")


def iter_documents(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of every file, in order (empty documents included: the caller decides)."""
    for p in paths:
        yield from read_file(p, text_field)
