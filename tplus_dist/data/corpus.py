"""The built-in corpus: Python's own documentation, which every CPython installation carries.

(Corpora on disk are read by `tplus prepare`: see readers.py.)"""

from __future__ import annotations


def pydoc_documents() -> list[str]:
    """Python's help topics (pydoc_data): ~460 KB of English prose, one document per topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]
