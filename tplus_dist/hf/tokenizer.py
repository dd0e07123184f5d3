"""Our tokenizers (data/tokenizers.py) as transformers fast tokenizers, written beside an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tplus_dist.hf.core import HFExportError


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of tokenizers' ByteLevel pre-tokenizer and decoder."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:  # control bytes, space, ...: mapped past 255, to printable characters
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_tokenizer(eos_token: str, eos_id: int) -> Any:
    """ByteTokenizer as a `tokenizers` Tokenizer: id b for byte b (a BPE over the 256 ByteLevel characters with no
    merges) and ``eos_token`` at ``eos_id``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
    assert tok.token_to_id(eos_token) == eos_id
    return tok


def _tiktoken_tokenizer(tok: Any, eos_token: str) -> Any:
    """A TiktokenTokenizer as a `tokenizers` Tokenizer: transformers' TikTokenConverter (ranks -> BPE vocab and
    merges, the pre-tokenization regex, ByteLevel bytes), fed our parsed ranks instead of its cached download."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tplus_dist.data.tokenizers import load_tiktoken_ranks

    ranks = load_tiktoken_ranks(tok.path)

    class _Converter(TikTokenConverter):
        def extract_vocab_merges_from_model(self, tiktoken_url: str) -> Any:
            import tiktoken.load

            real = tiktoken.load.load_tiktoken_bpe
            tiktoken.load.load_tiktoken_bpe = lambda *_a, **_k: ranks
            try:
                return super().extract_vocab_merges_from_model(tiktoken_url)
            finally:
                tiktoken.load.load_tiktoken_bpe = real

    return _Converter(
        vocab_file=str(tok.path), pattern=tok.pat_str, additional_special_tokens={eos_token: tok.eos_id}
    ).converted()


def save_tokenizer(tok: Any, out_dir: str | Path, max_length: int | None = None) -> dict[str, int]:
    """Write our tokenizer (data/tokenizers.py: ByteTokenizer, HFTokenizer from ``train:N`` or a tokenizer.json,
    TiktokenTokenizer) as a transformers fast tokenizer into ``out_dir`` (tokenizer.json with its special tokens,
    tokenizer_config.json, special_tokens_map.json), so that ``AutoTokenizer.from_pretrained(out_dir)`` encodes
    text to the ids ours gives and decodes them back. Returns the special token ids for config.json and
    generation_config.json: eos (the end-of-text token every training document ends with), bos = eos (documents
    are packed, so each one follows an EOS: GPT-2's convention; the tokenizer adds none by itself, as ours does
    not), unless a tokenizer.json's post-processor adds its own BOS to every text (then that one), and pad = eos
    (no padding token was trained; padded positions are masked by the attention mask).
    ``max_length``: the model's context (the tokenizer's model_max_length).

    Bytes and tiktoken encode a literal "<|endoftext|>" in the text as text (``split_special_tokens``), as ours do;
    a tokenizer.json keeps its own special-token matching."""
    from transformers import PreTrainedTokenizerFast

    from tplus_dist.data.tokenizers import ENDOFTEXT, ByteTokenizer, HFTokenizer, TiktokenTokenizer

    split_special, bos_id = True, tok.eos_id
    if isinstance(tok, ByteTokenizer):
        fast, eos_token = _byte_level_tokenizer(ENDOFTEXT, tok.eos_id), ENDOFTEXT
    elif isinstance(tok, TiktokenTokenizer):
        fast, eos_token = _tiktoken_tokenizer(tok, ENDOFTEXT), ENDOFTEXT
    elif isinstance(tok, HFTokenizer):
        fast, split_special = tok.tok, False
        eos_token = fast.id_to_token(tok.eos_id)
        # a tokenizer.json whose post-processor starts every text with its own BOS (Llama's "<s> $A") trained the
        # model with it: that token is the BOS
        start = fast.encode("").ids
        bos_id = start[0] if start else tok.eos_id
    else:
        raise TypeError(f"cannot write a {type(tok).__name__} as a transformers tokenizer")
    if fast.token_to_id(eos_token) != tok.eos_id:
        raise HFExportError(f"tokenizer: {eos_token!r} is id {fast.token_to_id(eos_token)}, ours says {tok.eos_id}")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=fast,
        eos_token=eos_token,
        bos_token=fast.id_to_token(bos_id),
        pad_token=eos_token,
        split_special_tokens=split_special,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: generate(**tok(text)) refuses them
        **({"model_max_length": max_length} if max_length is not None else {}),
    )
    wrapped.save_pretrained(str(out_dir))
    return {"bos_token_id": bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
