"""Tokenizers that need no download: byte-level, a byte-level BPE trained on the corpus, a Hugging Face
tokenizer.json on disk, or a tiktoken BPE file (``.tiktoken``) on disk."""

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


# GPT-2's pre-tokenization regex, as tiktoken 0.14 ships it for r50k/gpt2 (possessive quantifiers: same splits,
# faster). A .tiktoken file holds only the merge ranks, not the regex that splits text into words before the
# merges, nor any special token; GPT-2's regex is the common byte-level choice. The manifest records it.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """The merge ranks of a ``.tiktoken`` file: one ``base64(token) rank`` per line.

    The format is the one tiktoken.load.load_tiktoken_bpe reads; we parse it here because that function goes
    through tiktoken's download cache, which keys local files by path and returns the cached copy when the
    file at that path has since changed (and writes a copy under /tmp/data-gym-cache)."""
    import base64
    import binascii

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"data.tokenizer: cannot read {p} ({e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            found = line[:60]
            raise ValueError(f"data.tokenizer: {p}:{lineno}: expected 'base64-token rank', found {found!r}") from None
        if rank < 0 or rank in seen:
            raise ValueError(f"data.tokenizer: {p}:{lineno}: rank {rank} is negative or repeats line {seen.get(rank)}")
        if token in ranks:
            raise ValueError(f"data.tokenizer: {p}:{lineno}: token {token!r} listed twice")
        ranks[token] = rank
        seen[rank] = lineno
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # tiktoken's byte-level BPE needs every single byte as a token, or encoding some text panics
        raise ValueError(f"data.tokenizer: {p} lacks {len(missing)} of the 256 single-byte tokens (first {missing[0]})")
    return ranks


class TiktokenTokenizer:
    """A byte-level BPE from a ``.tiktoken`` rank file, run by tiktoken.

    The file carries only the ranks, so two choices are ours: the pre-tokenization regex (GPT-2's unless
    ``pat_str`` is given) and EOS, ``<|endoftext|>``, appended as the id after the highest rank. Documents are
    encoded as ordinary text: a literal ``<|endoftext|>`` inside a document never becomes EOS."""

    def __init__(self, path: str | Path, pat_str: str = GPT2_PAT_STR) -> None:
        import tiktoken

        self.path = Path(path)
        self.pat_str = pat_str
        ranks = load_tiktoken_ranks(self.path)
        self.eos_id = max(ranks.values()) + 1
        self.enc = tiktoken.Encoding(
            name=f"tplus:{self.path.name}",
            pat_str=pat_str,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: self.eos_id},
        )
        self.vocab_size = int(self.enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        return list(self.enc.encode_ordinary(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # like the other tokenizers, EOS decodes to nothing
        return str(self.enc.decode([i for i in ids if i != self.eos_id]))


def _looks_like_tiktoken(path: Path) -> bool:
    """A .tiktoken suffix, or a file that does not start like JSON (a tokenizer.json is one JSON object)."""
    if path.suffix == ".tiktoken":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip()
    except OSError:
        return False
    return bool(head) and not head.startswith(b"{")


def tokenizer_kind(tok: Tokenizer) -> str:
    """``bytes`` | ``hf`` | ``tiktoken``: how a saved tokenizer is rebuilt (see :func:`load_tokenizer`)."""
    if isinstance(tok, ByteTokenizer):
        return "bytes"
    if isinstance(tok, HFTokenizer):
        return "hf"
    if isinstance(tok, TiktokenTokenizer):
        return "tiktoken"
    raise TypeError(f"unknown tokenizer type {type(tok).__name__}")


def load_tokenizer(kind: str, path: str | Path | None = None, pat_str: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer of ``kind`` from its saved file (none for ``bytes``)."""
    if kind == "bytes":
        return ByteTokenizer()
    if path is None:
        raise ValueError(f"data.tokenizer: a {kind} tokenizer needs its file")
    if kind == "hf":
        return HFTokenizer.from_file(path)
    if kind == "tiktoken":
        return TiktokenTokenizer(path, pat_str or GPT2_PAT_STR)
    raise ValueError(f"data.tokenizer: unknown tokenizer kind {kind!r} (bytes, hf, tiktoken)")


def build_tokenizer(spec: str, texts: Iterable[str] | None = None) -> Tokenizer:
    """``bytes`` | ``train:N`` (needs ``texts``) | path to tokenizer.json | ``tiktoken:PATH`` or a path to a
    ``.tiktoken`` file (also recognized by its content: base64 lines, not JSON)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("train:"):
        if texts is None:
            raise ValueError("data.tokenizer: train:N needs the corpus to train on")
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) <= 257:
            raise ValueError(f"data.tokenizer: {spec!r}: N must be an integer above 257 (256 bytes + EOS)")
        return HFTokenizer.train_bpe(texts, int(n))
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.split(":", 1)[1])
    p = Path(spec)
    if p.is_dir():
        raise ValueError(f"data.tokenizer: {spec} is a directory, not a tokenizer.json or tiktoken file")
    if p.is_file() and _looks_like_tiktoken(p):
        return TiktokenTokenizer(p)
    return HFTokenizer.from_file(spec)
