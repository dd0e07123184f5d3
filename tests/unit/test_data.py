"""Tokenizers and the in-memory corpus that need no download."""

from __future__ import annotations

from pathlib import Path

import pytest

from tplus_dist.data import ByteTokenizer, HFTokenizer, build_tokenizer, read_documents


def test_builtin_corpus_is_real_text() -> None:
    docs = read_documents("builtin:pydoc")
    text = "".join(docs)
    assert len(text) > 200_000 and "statement" in text


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = ByteTokenizer()
    s = "naïve café — ok"
    assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_trained_bpe_round_trips_and_saves(tmp_path: Path) -> None:
    docs = read_documents("builtin:pydoc")[:20]
    tok = build_tokenizer("train:400", docs)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 400
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    tok.save(tmp_path / "tokenizer.json")
    again = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.encode(docs[1]) == tok.encode(docs[1])


def test_bad_sources_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"bin\.txt"):
        read_documents(str(tmp_path / "bin.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build_tokenizer(str(tmp_path / "missing.json"))
