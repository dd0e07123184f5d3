"""`tplus export CHECKPOINT --format hf|consolidated OUT`: a checkpoint of any layout as one model.

One process reads the whole decoder's parameters from the checkpoint's state files (sharded.py: every rank's
pieces, tensor-parallel slices joined, whatever layout saved them) and writes:
- consolidated: OUT/model.safetensors (decoder parameter names) and OUT/config.yaml (the run's config);
- hf: a Hugging Face folder through tplus_dist.hf.export, which reloads it with transformers and checks its logits
  against the checkpoint's model before it returns.
Under a launcher only rank 0 exports; the others return.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tplus_dist.checkpoint.sharded import whole_tensors
from tplus_dist.checkpoint.store import CheckpointError, find_checkpoint, verify_files
from tplus_dist.config import RunConfig, from_dict
from tplus_dist.data.tokenizers import Tokenizer
from tplus_dist.fsutil import respect_umask


def run_tokenizer(cfg: RunConfig, spec: str | None = None) -> tuple[Tokenizer | None, str]:
    """The tokenizer a run trained with, and where it was found (or, with None, why it was not).

    ``spec`` overrides the search: ``bytes``, a prepared dataset directory, a tokenizer.json or a .tiktoken file.
    Otherwise: the prepared dataset the run read (data.shards, or data.source prepared in data.cache_dir), whose
    manifest names the tokenizer file saved beside the shards; data.tokenizer itself when it is ``bytes`` or a
    file. A ``train:N`` tokenizer exists only beside the shards it was trained for."""
    from tplus_dist.data.prepare import MANIFEST, tokenizer_from_manifest
    from tplus_dist.data.tokenizers import ByteTokenizer, build_tokenizer
    from tplus_dist.train.run import prepared_dir

    if spec is not None:
        if (Path(spec) / MANIFEST).is_file():
            return tokenizer_from_manifest(spec), f"the dataset prepared at {spec}"
        if spec.startswith("train:"):
            raise ValueError("--tokenizer train:N names no file; pass the prepared dataset directory it was saved in")
        return build_tokenizer(spec), spec
    data = cfg.data
    shards = Path(data.shards) if data.shards is not None and "://" not in data.shards else None
    if data.shards is None:
        shards = prepared_dir(cfg)
    if shards is not None and (shards / MANIFEST).is_file():
        return tokenizer_from_manifest(shards), f"the dataset prepared at {shards}"
    if data.tokenizer == "bytes":
        return ByteTokenizer(), "bytes"
    spec_path = data.tokenizer.removeprefix("tiktoken:")
    if not data.tokenizer.startswith("train:") and Path(spec_path).is_file():
        return build_tokenizer(data.tokenizer), data.tokenizer
    where = data.shards if data.shards is not None else str(shards)
    return None, f"the run's prepared dataset ({where}) is not here and data.tokenizer is {data.tokenizer!r}"


def export_checkpoint(
    path: Path, fmt: str, out: Path, family: str | None = None, tokenizer: str | None = None
) -> Path | None:
    """Export the checkpoint at ``path`` (or a checkpoints directory's latest) to ``out``; returns ``out`` on rank
    0 (None elsewhere). An existing non-empty ``out`` is refused: nothing is overwritten. ``hf`` writes the run's
    tokenizer too (see :func:`run_tokenizer`; ``tokenizer`` overrides where it comes from); without one it warns
    and writes the model alone."""
    if fmt not in ("hf", "consolidated"):
        raise ValueError(f"--format must be hf or consolidated, got {fmt!r}")
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher: one process reads every rank's files
        return None
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; export into a new directory")
    ckpt = find_checkpoint(path)
    verify_files(ckpt)  # every file: export is rare and must not read a damaged shard
    cfg = from_dict(RunConfig, ckpt.manifest["config"])
    state = whole_tensors(ckpt.path, ckpt.manifest["state"])
    from tplus_dist.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.load_state_dict(state)  # strict: every parameter of the decoder, nothing else
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "consolidated":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        respect_umask(out / "model.safetensors")
        (out / "config.yaml").write_text(cfg.to_yaml())
        return out
    from tplus_dist import hf

    tok, source = run_tokenizer(cfg, tokenizer)
    if tok is None:
        print(
            f"tplus: warning: no tokenizer written with the model: {source}; pass --tokenizer (bytes, the prepared "
            "dataset directory, a tokenizer.json or .tiktoken file)",
            flush=True,
        )
    return hf.export(model, cfg.model, out, family=family, tokenizer=tok)
