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


def export_checkpoint(path: Path, fmt: str, out: Path, family: str | None = None) -> Path | None:
    """Export the checkpoint at ``path`` (or a checkpoints directory's latest) to ``out``; returns ``out`` on rank
    0 (None elsewhere). An existing non-empty ``out`` is refused: nothing is overwritten."""
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
        (out / "config.yaml").write_text(cfg.to_yaml())
        return out
    from tplus_dist import hf

    return hf.export(model, cfg.model, out, family=family)
