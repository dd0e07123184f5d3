"""Tokenizers, corpora and the batches the trainer reads."""

from tplus_dist.data.corpus import TokenStream, read_documents, tokenize_documents
from tplus_dist.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "TokenStream",
    "Tokenizer",
    "build_tokenizer",
    "read_documents",
    "tokenize_documents",
]
