"""Saving and loading the whole training state, for one process or every rank of a distributed run.

What a checkpoint holds (Trainer.state_dict's list, split by who owns it):
- model and optimizer: one process writes ``model.pt`` and ``optimizer.pt``; under a DeepSpeed engine (data,
  tensor or pipeline parallel) every rank writes its own shards through ``engine.save_checkpoint`` under
  ``engine/`` (ZeRO partitions, TP slices and pipeline layers each in their own files, in parallel);
- ``trainer/rankNNNNN.pt`` per rank: step, tokens, the learning-rate and batch-size schedule positions, the data
  position (the global sample index, the same on every rank) and the RNG states (Python, NumPy, torch CPU and CUDA)
  of that rank;
- ``manifest.json``: format, step, tokens, layout, the whole config, package versions, and every file's size and
  checksum; written last, by rank 0, after every rank's files are written and checksummed (store.py publishes it).
"""

from __future__ import annotations

import datetime
import random
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tplus_dist.checkpoint.store import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    file_entries,
    find_checkpoint,
    list_files,
    new_staging_dir,
    prune,
    publish,
    read_manifest,
    remove_stale_staging,
    verify_files,
)
from tplus_dist.config import ConfigError, RunConfig, to_dict

TRAINER_DIR = "trainer"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _broadcast(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value)
    return out


def _agree(error: str | None) -> None:
    """Raise on every rank if any rank failed (the first failure's message), so no rank waits for the others."""
    errors = [e for e in _all_gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


# ------------------------------------------------------------------ RNG state as plain data (weights_only loads)


def rng_state_plain() -> dict[str, Any]:
    py = random.getstate()
    np_state: Any = np.random.get_state(legacy=True)  # ("MT19937", keys, pos, has_gauss, cached_gaussian)
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state_plain(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ the layout


def layout_of(trainer: Any) -> dict[str, Any]:
    layout = getattr(trainer, "layout", None)
    groups = getattr(layout, "groups", None)
    if groups is None:
        return {"world": 1, "tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero": None}
    d = groups.dims
    return {"world": d.world_size, "tp": d.tp, "pp": d.pp, "dp": d.dp, "vpp": d.vpp or 1, "zero": d.zero_stage}


def engine_of(trainer: Any) -> Any:
    """The DeepSpeed engine a trainer steps through, or None for the one-process runner."""
    runner = trainer.runner
    return getattr(runner, "engine", None) or getattr(getattr(runner, "step", None), "engine", None)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("tplus-dist", "torch", "deepspeed", "megatron-core", "mosaicml-streaming"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class SaveResult:
    path: Path
    seconds: float
    bytes: int


class CheckpointManager:
    """Save into / load from ``root`` for this rank (call on every rank of a distributed run)."""

    def __init__(self, cfg: RunConfig, root: Path) -> None:
        self.cfg = cfg
        self.ck = cfg.checkpoint
        self.root = root

    # ------------------------------------------------------------------------------------------------- save
    def save(self, trainer: Any) -> SaveResult:
        t0 = time.perf_counter()
        step = int(trainer.state.step)
        rank, world = _rank(), _world()
        error = None
        staging: Path | None = None
        if rank == 0:
            try:
                staging = new_staging_dir(self.root, step)
            except OSError as e:
                error = f"cannot create a checkpoint directory under {self.root}: {e}"
        _agree(error)
        staging = Path(_broadcast(str(staging)))
        try:
            self._write(trainer, staging, rank)
        except (OSError, RuntimeError) as e:  # a full disk, a permission, an engine failure
            error = f"saving step {step} into {staging} failed on rank {rank}: {e}"
        _agree(error)
        if _distributed():
            dist.barrier()  # every rank's files are complete
        names = list_files(staging)
        try:
            mine = file_entries(staging, names[rank::world])  # the checksums, in parallel over the ranks
        except OSError as e:
            mine, error = {}, f"checksumming {staging} failed on rank {rank}: {e}"
        _agree(error)
        entries: dict[str, Any] = {}
        for part in _all_gather(mine):
            entries.update(part)
        final = None
        if rank == 0:
            try:
                final = publish(staging, self._manifest(trainer, entries))
                prune(self.root, self.ck.keep_last, self.ck.keep_every, protect=[final])
            except (OSError, CheckpointError) as e:
                error = f"publishing {staging} failed: {e}"
        _agree(error)
        final = Path(_broadcast(str(final)))
        size = sum(e["bytes"] for e in entries.values())
        return SaveResult(final, time.perf_counter() - t0, size)

    def _write(self, trainer: Any, staging: Path, rank: int) -> None:
        (staging / TRAINER_DIR).mkdir(exist_ok=True)
        engine = engine_of(trainer)
        if engine is not None:
            engine.save_checkpoint(str(staging / ENGINE_DIR), tag=ENGINE_TAG, client_state={}, save_latest=False)
        elif rank == 0:
            torch.save(trainer.model.state_dict(), staging / "model.pt")
            torch.save(trainer.optimizer.state_dict(), staging / "optimizer.pt")
        own = {
            "step": trainer.state.step,
            "tokens": trainer.state.tokens,
            "scheduler": trainer.scheduler.state_dict(),
            "data": trainer.train_data.state_dict(),
            "rng": rng_state_plain(),
        }
        torch.save(own, staging / TRAINER_DIR / f"rank{rank:05d}.pt")

    def _manifest(self, trainer: Any, files: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "step": trainer.state.step,
            "tokens": trainer.state.tokens,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "layout": layout_of(trainer),
            "engine": engine_of(trainer) is not None,
            "config": to_dict(self.cfg),
            "versions": _versions(),
            "files": files,
        }

    # ------------------------------------------------------------------------------------------------- load
    def find(self, path: Path) -> Checkpoint:
        """The checkpoint at ``path`` (resolved on rank 0, the same on every rank)."""
        error, found = None, None
        if _rank() == 0:
            try:
                found = str(find_checkpoint(path).path)
            except CheckpointError as e:
                error = str(e)
        _agree(error)
        where = Path(_broadcast(found))
        return Checkpoint(where, read_manifest(where))

    def check_model(self, ckpt: Checkpoint) -> None:
        """The model must be the one saved: ConfigError listing each field that differs."""
        saved = ckpt.manifest["config"]["model"]
        now = to_dict(self.cfg)["model"]
        diffs = [
            f"model.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}" for k in now if saved.get(k) != now[k]
        ]
        if diffs:
            raise ConfigError("model", f"differs from the checkpoint {ckpt.path}: " + "; ".join(diffs))

    def check_compatible(self, trainer: Any, ckpt: Checkpoint) -> None:
        """The model must be the one saved, and (until resharding exists) the layout too: ConfigError / CheckpointError
        naming what differs."""
        self.check_model(ckpt)
        saved_layout, layout = ckpt.manifest["layout"], layout_of(trainer)
        if saved_layout != layout or ckpt.manifest["engine"] != (engine_of(trainer) is not None):
            raise CheckpointError(
                f"{ckpt.path} was saved with layout {saved_layout}, this run has {layout}: resuming on another layout "
                "is not supported yet; resume with the saved layout"
            )

    def load(self, trainer: Any, ckpt: Checkpoint) -> None:
        rank, world = _rank(), _world()
        self.check_compatible(trainer, ckpt)
        error = None
        if self.ck.verify:
            names = sorted(ckpt.manifest["files"])
            try:
                verify_files(ckpt, names[rank::world])
            except CheckpointError as e:
                error = str(e)
            _agree(error)
        own_file = ckpt.path / TRAINER_DIR / f"rank{rank:05d}.pt"
        if not own_file.is_file():
            raise CheckpointError(f"{own_file} is missing: the checkpoint has no state for rank {rank}")
        own = torch.load(own_file, map_location="cpu", weights_only=True)
        engine = engine_of(trainer)
        if engine is not None:
            path, _ = engine.load_checkpoint(
                str(ckpt.path / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint under {ckpt.path / ENGINE_DIR}")
        else:
            dev = trainer.device
            trainer.model.load_state_dict(torch.load(ckpt.path / "model.pt", map_location=dev, weights_only=True))
            trainer.optimizer.load_state_dict(
                torch.load(ckpt.path / "optimizer.pt", map_location=dev, weights_only=True)
            )
        trainer.scheduler.load_state_dict(own["scheduler"])
        trainer.train_data.load_state_dict(own["data"])
        trainer.state.step, trainer.state.tokens = int(own["step"]), int(own["tokens"])
        set_rng_state_plain(own["rng"])

    def clean_staging(self) -> None:
        """Remove staging directories of interrupted saves (rank 0, before training starts)."""
        if _rank() == 0 and self.root.is_dir():
            remove_stale_staging(self.root)
