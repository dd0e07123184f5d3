"""An export is a model people can use: the run's tokenizer travels with the weights, AutoTokenizer and
AutoModelForCausalLM load the folder, and HF's greedy ``generate`` is our model's greedy decoding (an argmax loop in
plain PyTorch). Every file the export writes has the user's umask. CPU, fp32, tiny."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tplus_dist import ModelConfig, build_model, hf
from tplus_dist.data.tokenizers import ByteTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer
from tplus_dist.model import Decoder

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Hello, world! Hello there; the weather is fine.\n",
    "naïve café — 日本語 and emoji 🙂 in UTF-8, tabs\tand  double  spaces",
    "a literal <|endoftext|> inside a document",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_tiktoken(path: Path) -> Path:
    """256 single bytes and a few English merges (every merge's parts are tokens), as a .tiktoken file."""
    merges = [b"th", b"he", b"the", b" t", b" the", b"in", b"er", b"an", b"on", b"re", b"ing", b" a", b"e "]
    ranks = {bytes([b]): b for b in range(256)} | {m: 256 + i for i, m in enumerate(merges)}
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def make_tokenizer(kind: str, tmp_path: Path) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return HFTokenizer.train_bpe(TEXTS * 30, 300)
    return TiktokenTokenizer(tiny_tiktoken(tmp_path / "tiny.tiktoken"))


def model_for(tok: Tokenizer, **kw: Any) -> tuple[ModelConfig, Decoder]:
    """A tiny Llama for ``tok`` (3 rows past its vocabulary: the export must not confuse the two), its parameters
    moved off their init."""
    cfg = ModelConfig(vocab_size=tok.vocab_size + 3, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seq_len=48, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cfg, model


def greedy(model: Decoder, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding in plain PyTorch: the argmax of the last position's logits, appended, until EOS or n."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids


@pytest.mark.parametrize("kind", ["bytes", "bpe", "tiktoken"])
def test_export_writes_a_tokenizer_and_generate_equals_our_greedy_decoding(kind: str, tmp_path: Path) -> None:
    tok = make_tokenizer(kind, tmp_path)
    cfg, model = model_for(tok)
    out = hf.export(model, cfg, tmp_path / "out", tokenizer=tok)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    for d in (config, gen):
        assert (d["eos_token_id"], d["bos_token_id"], d["pad_token_id"]) == (tok.eos_id,) * 3

    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token_id == theirs.pad_token_id == tok.eos_id
    assert theirs.model_max_length == cfg.seq_len
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ids == tok.encode(text), text
        with_eos = [*ids, tok.eos_id]
        assert theirs.decode(with_eos, skip_special_tokens=True) == tok.decode(with_eos)
    assert theirs.decode([tok.eos_id]) == theirs.eos_token  # the special token itself, not bytes of text

    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for prompt in ("The quick", "Hello"):
        ids = tok.encode(prompt)
        with torch.no_grad():  # as a user calls it: the tokenizer's whole output into generate
            got = hf_model.generate(**theirs(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert got[0].tolist() == greedy(model, ids, 12, tok.eos_id)
        assert len(got[0]) > len(ids)


def test_a_tokenizer_json_with_its_own_bos_keeps_it(tmp_path: Path) -> None:
    """A tokenizer.json whose post-processor starts every text with "<s>" (Llama's template): ours and HF's encode
    it alike, and <s> is the exported BOS while "</s>" is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(TEXTS * 30, trainer=trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.encode("Hello")[0] == 0 and tok.eos_id == 1
    cfg, model = model_for(tok)
    out = hf.export(model, cfg, tmp_path / "out", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    theirs = AutoTokenizer.from_pretrained(out)
    assert (theirs.bos_token, theirs.eos_token) == ("<s>", "</s>")
    assert all(theirs(t).input_ids == tok.encode(t) for t in TEXTS)


def test_generate_stops_at_the_tokenizers_eos(tmp_path: Path) -> None:
    """A model whose every next token is EOS: HF's generate must know EOS to stop after one token."""
    tok = ByteTokenizer()
    cfg, model = model_for(tok)
    with torch.no_grad():  # every token embeds as ones, the layers add nothing, and only EOS's head row reads it
        model.embed.weight.fill_(1.0)
        for block in model.blocks():
            block.attn.wo.weight.zero_()
            block.mlp.w_down.weight.zero_()
        model.final_norm.weight.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[tok.eos_id] = 1.0
    out = hf.export(model, cfg, tmp_path / "out", tokenizer=tok)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode("stop")
    got = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()
    assert got == greedy(model, ids, 10, tok.eos_id) == [*ids, tok.eos_id]


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=200, n_layers=1, d_model=32, n_heads=2, seq_len=16)
    with pytest.raises(hf.HFExportError, match=r"257 tokens, more than the model's vocab_size \(200\)"):
        hf.export(build_model(cfg), cfg, tmp_path, tokenizer=tok)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_exported_files_have_the_users_umask(umask: int, tmp_path: Path) -> None:
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=257, n_layers=1, d_model=32, n_heads=2, seq_len=16)
    old = os.umask(umask)
    try:
        out = hf.export(build_model(cfg), cfg, tmp_path / "out", tokenizer=tok)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
