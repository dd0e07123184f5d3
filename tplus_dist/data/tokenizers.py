"""Tokenizers that need no download: byte-level, a byte-level BPE trained on the corpus, or a
Hugging Face tokenizer.json on disk."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus EOS = 256."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer (tokenizer.json). EOS is the first of its known end tokens."""

    EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, tok: object, source: str) -> None:
        from tokenizers import Tokenizer as _Tok

        assert isinstance(tok, _Tok)
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        eos = next((tok.token_to_id(n) for n in self.EOS_NAMES if tok.token_to_id(n) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer {source} has none of the end-of-text tokens {', '.join(self.EOS_NAMES)}")
        self.eos_id = eos

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data.tokenizer: {p} does not exist")
        try:
            return cls(_Tok.from_file(str(p)), str(p))
        except Exception as e:  # tokenizers raises plain Exceptions on malformed JSON
            raise ValueError(f"data.tokenizer: {p} is not a tokenizer.json: {e}") from None

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        """A byte-level BPE (GPT-2's scheme: no unknown tokens) trained with the tokenizers library."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = _Tok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, f"train:{vocab_size}")

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids))


def build_tokenizer(spec: str, texts: Iterable[str] | None = None) -> Tokenizer:
    """``bytes`` | ``train:N`` (needs ``texts``) | path to tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("train:"):
        if texts is None:
            raise ValueError("data.tokenizer: train:N needs the corpus to train on")
        return HFTokenizer.train_bpe(texts, int(spec.split(":", 1)[1]))
    return HFTokenizer.from_file(spec)
