"""The built-in corpus (Python's own documentation) and plain-text sources, read as documents."""

from __future__ import annotations

import glob
from pathlib import Path


def read_documents(source: str) -> list[str]:
    """The documents of ``source``: ``builtin:pydoc`` or a path / glob of .txt files (one document each)."""
    if source == "builtin:pydoc":
        # Python's own help topics: ~460 KB of English prose that every CPython installation carries
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    paths = sorted(glob.glob(source, recursive=True)) if any(c in source for c in "*?[") else [source]
    if not paths:
        raise FileNotFoundError(f"data.source: no file matches {source!r}")
    docs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data.source: {path} does not exist or is not a file")
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"data.source: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not any(d.strip() for d in docs):
        raise ValueError(f"data.source: {source!r} holds no text")
    return docs
