"""Data: tokenizers, `tplus prepare` (corpus -> MDS shards), and the loader (global sample order, growing batch)."""

from tplus_dist.data.corpus import pydoc_documents
from tplus_dist.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer", "pydoc_documents"]
