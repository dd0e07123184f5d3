"""Tokenizers and the in-memory corpus that need no download."""

from __future__ import annotations

from pathlib import Path

import pytest

from tplus_dist.data import ByteTokenizer, HFTokenizer, build_tokenizer, pydoc_documents


def test_builtin_corpus_is_real_text() -> None:
    docs = pydoc_documents()
    text = "".join(docs)
    assert len(text) > 200_000 and "statement" in text


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = ByteTokenizer()
    s = "naïve café — ok"
    assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_trained_bpe_round_trips_and_saves(tmp_path: Path) -> None:
    docs = pydoc_documents()[:20]
    tok = build_tokenizer("train:400", docs)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 400
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    tok.save(tmp_path / "tokenizer.json")
    again = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.encode(docs[1]) == tok.encode(docs[1])


def test_missing_tokenizer_file_is_named(tmp_path: Path) -> None:
    # bad corpus files (missing, not UTF-8, empty) are prepare's to report: tests/unit/test_prepare.py
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build_tokenizer(str(tmp_path / "missing.json"))
