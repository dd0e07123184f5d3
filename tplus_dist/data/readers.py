"""Streaming document readers for `tplus prepare`: one document at a time, never a whole corpus in memory.

Supported inputs (by suffix):

- ``.txt``: the whole file is one document (UTF-8; a leading byte-order mark is dropped).
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, the document in a string field
  (``text`` unless told otherwise); blank lines are skipped. zstd is decompressed as a stream by pyarrow
  (already needed for parquet), so no extra package is required.
- ``.parquet``: the named string column, read batch by batch.

Each reader yields records (text, label, where): ``label`` is the value of ``label_field`` (a string or a
non-negative integer; None when no label field is asked for) and ``where`` names the file and line or row, for
error messages further on. Every problem is a :class:`InputError` naming the file (and line or row) and the
reason.
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

Record = tuple[str, str | int | None, str]
"""(text, label, where) of one document."""

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
    return [p for group in resolve_input_groups(specs) for p in group]


def resolve_input_groups(specs: Sequence[str]) -> list[list[Path]]:
    """:func:`resolve_inputs` per spec: the files each spec adds (a file named by two specs belongs to the
    first; a spec may then add none)."""
    if not specs:
        raise InputError("no input given")
    groups: list[list[Path]] = []
    seen: set[Path] = set()
    for spec in specs:
        out: list[Path] = []
        groups.append(out)
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
    return groups


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


def read_txt(path: Path, label_field: str | None = None) -> Iterator[Record]:
    """The file as one document."""
    if label_field is not None:
        raise InputError(f"{path}: a .txt file has no fields to read the label {label_field!r} from")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _utf8_error(path, e, f":{line}") from None
    yield text, None, str(path)


def check_label(value: Any, field: str, where: str) -> str | int:
    """A label value as read: a string or a non-negative integer (JSON booleans and floats are refused)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if value is None or isinstance(value, bool):
        kind = "null" if value is None else "bool"
    else:
        kind = f"{value!r}" if isinstance(value, int) else type(value).__name__
    raise InputError(f"{where}: label field {field!r} is {kind}, not a string or a non-negative integer")


def read_jsonl(path: Path, text_field: str, label_field: str | None = None) -> Iterator[Record]:
    """The ``text_field`` string (and ``label_field`` value) of each line's JSON object (plain, gzip or zstd)."""
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
            where = f"{path}:{lineno}"
            if label_field is None:
                yield text, None, where
                continue
            if label_field not in obj:
                fields = ", ".join(sorted(obj)[:10])
                raise InputError(f"{where}: no label field {label_field!r} (fields: {fields})")
            yield text, check_label(obj[label_field], label_field, where), where


def read_parquet(path: Path, text_field: str, label_field: str | None = None) -> Iterator[Record]:
    """The ``text_field`` column (and ``label_field``), read a batch of rows at a time."""
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
    columns = [text_field]
    if label_field is not None:
        if label_field not in schema.names:
            names = ", ".join(schema.names[:10]) or "none"
            raise InputError(f"{path}: no label column {label_field!r} (columns: {names})")
        columns.append(label_field)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            labels = batch.column(1).to_pylist() if label_field is not None else None
            for i, value in enumerate(batch.column(0).to_pylist()):
                row += 1
                if value is None:
                    raise InputError(f"{path}: row {row}: column {text_field!r} is null, not a string")
                where = f"{path}: row {row}"
                if labels is None or label_field is None:
                    yield value, None, where
                else:
                    yield value, check_label(labels[i], label_field, where), where
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e, f": row {row + 1}") from None
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: row {row + 1}: cannot read ({e})") from None


def read_records(path: Path, text_field: str = "text", label_field: str | None = None) -> Iterator[Record]:
    """The documents of one file as (text, label, where), chosen by its suffix."""
    suffix = suffix_of(path)
    if suffix == ".txt":
        yield from read_txt(path, label_field)
    elif suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from read_jsonl(path, text_field, label_field)
    elif suffix == ".parquet":
        yield from read_parquet(path, text_field, label_field)
    else:
        raise InputError(f"{path}: unsupported suffix (supported: {', '.join(SUFFIXES)})")


def read_file(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, chosen by its suffix."""
    for text, _, _ in read_records(path, text_field):
        yield text


def iter_documents(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of every file, in order (empty documents included: the caller decides)."""
    for p in paths:
        yield from read_file(p, text_field)
