"""Checkpoint directories: staged, verified, published atomically, pruned.

    CHECKPOINTS/
      latest                  "step_00000100": written (write + rename) only after that checkpoint is complete
      step_00000100/
        manifest.json         written last: step, tokens, layout, config, versions, every file's size and checksum
        trainer/rank00000.pt  ... (each rank writes its own files, in parallel)
      .partial-step_00000200-<nonce>/   a save in progress (or one a crash interrupted: never read, removed later)

A checkpoint becomes visible by one rename of its staging directory, after every rank's files are written and
checksummed; `latest` is replaced (rename) after that. A kill -9 or a full disk mid-save leaves a partial
directory that nothing reads, and `latest` still names the previous, complete checkpoint.

`latest` is a hint for people and other tools, not the truth: a kill between the rename and the update of
`latest` leaves a complete checkpoint newer than the one `latest` names. A run starting from its checkpoints
directory takes the newest complete checkpoint that verifies (:func:`complete_checkpoints`) and repairs `latest`
(:func:`repair_latest`), and publishing a step that already exists accepts the existing checkpoint when it
verifies and moves it aside (``.damaged-*``, never deleted) when it does not (:func:`publish`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from tplus_dist.faults import inject
from tplus_dist.fsutil import fsync_dir, write_atomic

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
DAMAGED_PREFIX = ".damaged-"
FORMAT_VERSION = 2
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file or field and what is wrong."""


class CheckpointSaveError(CheckpointError):
    """A save that failed (a full disk, a permission, an error on one rank): the run fails (exit 1), and the
    previous checkpoint stays the newest."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checksum(path: Path) -> str:
    """xxh3-128 of the file (several GB/s, so verifying a checkpoint costs little next to reading it)."""
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def new_staging_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{PARTIAL_PREFIX}{step_name(step)}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def list_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative paths, sorted), the manifest excluded."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entries(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (directory / n).stat().st_size, "xxh3_128": checksum(directory / n)} for n in names}


def publish(staging: Path, manifest: dict[str, Any]) -> tuple[Path, str | None]:
    """Write the manifest into ``staging``, rename it to its final name, point ``latest`` at it. Returns the
    published path and a note for the log when a checkpoint of that step already existed.

    A published checkpoint is never overwritten. If one of the same step exists (a run killed after the rename and
    before ``latest`` was updated, then retrained to that step) and verifies, it is kept, ``staging`` is removed
    and ``latest`` names the existing one; if it does not verify, it is renamed aside to ``.damaged-step_...-N``
    (kept for inspection) and this save is published in its place."""
    step = int(manifest["step"])
    final = staging.parent / step_name(step)
    write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    fsync_dir(staging)
    inject("save.after_manifest", step)
    note = None
    if final.exists():
        owner, ours = _owner(final), (manifest.get("run") or {}).get("id")
        if owner is not None and ours is not None and owner != ours:
            raise CheckpointError(
                f"{final} belongs to another run (run id {owner}): checkpoint.dir is shared with another run; "
                "give each run its own checkpoint directory"
            )
        problem = checkpoint_problem(final)
        if problem is None:
            shutil.rmtree(staging)
            write_atomic(final.parent / LATEST, final.name + "\n")
            return final, f"{final} already existed and verifies; kept it (this save of the same step is discarded)"
        aside = final.parent / f"{DAMAGED_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        note = f"{final} already existed but {problem}; moved it to {aside} and published this save"
    os.rename(staging, final)
    fsync_dir(final.parent)
    inject("save.after_rename", step)
    write_atomic(final.parent / LATEST, final.name + "\n")
    inject("save.after_latest", step)
    return final, note


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{file}: checkpoint format {got!r}, this version reads format {FORMAT_VERSION}")
    return manifest


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """The published checkpoints under ``root`` whose manifest is readable, newest step first (a directory whose
    manifest is missing or unreadable is not a checkpoint: a save that never finished, or damage)."""
    found = []
    for p in root.glob("step_*") if root.is_dir() else ():
        if not p.is_dir() or not (p / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(p)
        except CheckpointError:
            continue
        if p.name == step_name(int(manifest.get("step", -1))):
            found.append(Checkpoint(p, manifest))
    return sorted(found, key=lambda c: c.step, reverse=True)


def read_latest(root: Path) -> str | None:
    """The name ``latest`` holds, or None when there is no (readable) ``latest``."""
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def repair_latest(root: Path, ckpt: Checkpoint) -> str | None:
    """Point ``root/latest`` at ``ckpt`` if it names something else; returns a line saying what was repaired, or
    None when ``latest`` was right."""
    named = read_latest(root)
    if named == ckpt.path.name:
        return None
    write_atomic(root / LATEST, ckpt.path.name + "\n")
    was = f"named {named}" if named else "was missing"
    return f"{root / LATEST} {was}; {ckpt.path.name} is the newest complete checkpoint, latest now names it"


def find_checkpoint(path: Path) -> Checkpoint:
    """``path`` is a checkpoint directory, or a checkpoints directory: then its newest complete checkpoint (the one
    ``latest`` names, unless a kill left ``latest`` behind a newer complete one)."""
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        return Checkpoint(path, read_manifest(path))
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint: neither {MANIFEST} nor a complete step_* directory")
    return found[0]


def _owner(path: Path) -> str | None:
    """The run id a checkpoint's manifest records, or None (unreadable, or written before run ids)."""
    try:
        run = json.loads((path / MANIFEST).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run.get("id") if isinstance(run, dict) else None


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (its manifest, or a file's presence, size or checksum), or
    None when it verifies."""
    try:
        verify_files(Checkpoint(path, read_manifest(path)))
    except CheckpointError as e:
        return str(e)
    return None


def verify_files(ckpt: Checkpoint, names: Iterable[str] | None = None) -> None:
    """Check that the manifest's files (or ``names`` of them) exist with their size and checksum."""
    files: dict[str, dict[str, Any]] = ckpt.manifest["files"]
    for name in files if names is None else names:
        want = files[name]
        path = ckpt.path / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes, the manifest says {want['bytes']}: truncated or replaced")
        got = checksum(path)
        if got != want["xxh3_128"]:
            raise CheckpointError(f"{path} fails its checksum ({got}, manifest {want['xxh3_128']}): corrupted")


def prune(root: Path, keep_last: int, keep_every: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete published checkpoints beyond the newest ``keep_last``, except steps that are multiples of
    ``keep_every`` and ``protect``ed paths, and staging directories older than the newest checkpoint. Returns
    what was deleted."""
    published = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())
    keep = set(published[-keep_last:]) if keep_last > 0 else set()
    keep |= {p.resolve() for p in protect}
    removed = []
    for p in published:
        step = int(p.name.removeprefix("step_"))
        if p in keep or p.resolve() in keep or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed


def remove_stale_staging(root: Path) -> list[Path]:
    """Staging directories left by interrupted saves (call when no save is running)."""
    stale = [p for p in root.glob(f"{PARTIAL_PREFIX}*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
