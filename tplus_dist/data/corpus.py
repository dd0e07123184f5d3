"""In-memory token streams for single-process runs and the quickstart.

(Corpora larger than memory go through `tplus prepare` and streaming shards.)"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch

from tplus_dist.data.tokenizers import HFTokenizer, Tokenizer


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


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One stream: each document's tokens followed by EOS."""
    if isinstance(tokenizer, HFTokenizer):
        encoded = tokenizer.encode_batch(docs)
    else:
        encoded = [tokenizer.encode(d) for d in docs]
    out: list[int] = []
    for ids in encoded:
        out.extend(ids)
        out.append(tokenizer.eos_id)
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.int32
    return np.asarray(out, dtype=dtype)


class TokenStream:
    """Random windows of seq_len + 1 tokens from a token array, in a seeded order (nanoGPT's sampler)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        if len(tokens) < seq_len + 2:
            raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        """Back to the first batch (validation reads the same batches every time)."""
        self.generator.manual_seed(self.seed)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.seq_len - 1, (batch_size,), generator=self.generator)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = self.tokens[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
