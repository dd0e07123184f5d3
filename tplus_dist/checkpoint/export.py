"""`tplus export CHECKPOINT --format hf|consolidated OUT`: a checkpoint of any layout as one model.

A one-process checkpoint exports from one process. A distributed one is loaded on its own layout (run the export
under torchrun / the deepspeed launcher with the checkpoint's process count: every rank rebuilds its part and
loads its own files), gathered into the whole decoder's state (TP slices, ZeRO-3 partitions, pipeline stages),
and written by rank 0:
- consolidated: OUT/model.safetensors (decoder parameter names) and OUT/config.yaml (the run's config);
- hf: a Hugging Face folder through tplus_dist.hf.export, which reloads it with transformers and checks its logits
  against the checkpoint's model before it returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tplus_dist.checkpoint.manager import ENGINE_DIR, ENGINE_TAG
from tplus_dist.checkpoint.store import CheckpointError, find_checkpoint, verify_files
from tplus_dist.config import RunConfig, from_dict


def _whole_state(cfg: RunConfig, ckpt: Any) -> dict[str, torch.Tensor]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    saved = ckpt.manifest["layout"]
    if not ckpt.manifest["engine"]:
        if world != 1:
            raise CheckpointError(f"{ckpt.path} was saved by one process: export it with one process")
        state: dict[str, torch.Tensor] = torch.load(ckpt.path / "model.pt", map_location="cpu", weights_only=True)
        return state
    if world != saved["world"]:
        raise CheckpointError(
            f"{ckpt.path} was saved on {saved['world']} processes ({saved}); export it with as many: "
            f"torchrun --nproc_per_node {saved['world']} -m tplus_dist export ... (exporting from another process "
            "count needs resharding, not built yet)"
        )
    from tplus_dist.optim import build_optimizer
    from tplus_dist.parallel.engine import build_engine, deepspeed_config
    from tplus_dist.parallel.groups import DeepSpeedMPU, destroy_process_groups
    from tplus_dist.parallel.state import full_state_dict
    from tplus_dist.train.run import build_decoder, setup_layout

    device = torch.device("cpu")
    layout = setup_layout(cfg, device)
    try:
        model = build_decoder(cfg, layout, device)
        optimizer = build_optimizer(model, cfg.optim, cfg.model)
        groups = layout.groups
        pipeline = groups.dims.pp > 1 and (groups.dims.vpp or 1) == 1
        mpu = None if pipeline else DeepSpeedMPU(groups)
        engine = build_engine(model, optimizer, deepspeed_config(cfg, groups.dims.dp, "cpu"), mpu=mpu)
        path, _ = engine.load_checkpoint(
            str(ckpt.path / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {ckpt.path / ENGINE_DIR}")
        return full_state_dict(engine, tp_group=groups.tp, pp_group=groups.pp)
    finally:
        destroy_process_groups()


def export_checkpoint(path: Path, fmt: str, out: Path, family: str | None = None) -> Path | None:
    """Export the checkpoint at ``path`` (or a checkpoints directory's latest) to ``out``; returns ``out`` on rank
    0 (None elsewhere). An existing non-empty ``out`` is refused: nothing is overwritten."""
    if fmt not in ("hf", "consolidated"):
        raise ValueError(f"--format must be hf or consolidated, got {fmt!r}")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; export into a new directory")
    ckpt = find_checkpoint(path)
    verify_files(ckpt)  # every file, by every rank: export is rare and must not read a damaged shard
    cfg = from_dict(RunConfig, ckpt.manifest["config"])
    state = _whole_state(cfg, ckpt)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
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
