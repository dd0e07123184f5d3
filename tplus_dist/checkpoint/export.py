"""`tplus export CHECKPOINT --format hf|consolidated OUT`: a checkpoint of any layout as one model.

One process reads the whole decoder's parameters from the checkpoint's state files (sharded.py: every rank's
pieces, tensor-parallel slices joined, whatever layout saved them) and writes:
- consolidated: OUT/model.safetensors (decoder parameter names) and OUT/config.yaml (the run's config);
- hf: a Hugging Face folder through tplus_dist.hf.export, which reloads it with transformers and checks its logits
  against the checkpoint's model before it returns.
Under a launcher only rank 0 exports; the others return.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tplus_dist.checkpoint.extra_state import without_extra_state
from tplus_dist.checkpoint.sharded import whole_tensors
from tplus_dist.checkpoint.store import Checkpoint, CheckpointError, find_checkpoint, verify_files
from tplus_dist.config import RunConfig, from_dict
from tplus_dist.config.base import without_renamed
from tplus_dist.data.tokenizers import Tokenizer
from tplus_dist.fsutil import respect_umask

RECORD = "data_manifest.json"
"""Written in the run directory when the run starts: the prepared dataset's manifest as the run read it."""


def run_record(ckpt: Checkpoint, cfg: RunConfig) -> tuple[dict[str, Any] | None, str]:
    """The tokenizer entry of the run's ``data_manifest.json`` (kind, vocab_size, eos_id, sha256 of its file), and
    the file it came from (or, with None, where it was looked for). The run directory is the checkpoint's
    grandparent (RUN_DIR/checkpoints/step_N) or, when checkpoint.dir put the checkpoints elsewhere, the config's
    log.run_dir; a directory that records another run id than the checkpoint's is skipped."""
    from tplus_dist.train.rundir import read_identity

    owner = (ckpt.manifest.get("run") or {}).get("id")
    looked = []
    for run_dir in (ckpt.path.parent.parent, Path(cfg.log.run_dir.format(name=cfg.log.name))):
        path = run_dir / RECORD
        looked.append(str(path))
        identity = read_identity(run_dir)
        if not path.is_file() or (owner and identity is not None and identity["id"] != owner):
            continue
        try:
            entry = json.loads(path.read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entry, dict) and "kind" in entry and "vocab_size" in entry:
            return entry, str(path)
    return None, " or ".join(dict.fromkeys(looked))


def _describe(entry: dict[str, Any]) -> str:
    sha, spec = entry.get("sha256"), entry.get("spec")
    return (
        (f"{spec}: " if spec else "")
        + f"{entry['kind']}, vocab {entry['vocab_size']}"
        + (f", sha256 {sha[:12]}" if sha else "")
    )


def _entry(tok: Tokenizer, file: Path | None) -> dict[str, Any]:
    """What a data manifest would record for ``tok`` read from ``file``."""
    from tplus_dist.data.tokenizers import tokenizer_kind

    entry: dict[str, Any] = {"kind": tokenizer_kind(tok), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    if file is not None and entry["kind"] != "bytes":
        entry["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    return entry


def _mismatch(found: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """Why the tokenizer ``found`` is not the one ``recorded`` (None: it is): kind, vocabulary, EOS, file hash (a
    tokenizer file the run recorded without its hash proves nothing)."""
    if recorded["kind"] != "bytes" and not recorded.get("sha256"):
        return f"the run recorded no sha256 of its {recorded['kind']} tokenizer file to compare with"
    for key, what in (("kind", "kind"), ("vocab_size", "vocab size"), ("eos_id", "EOS id"), ("sha256", "sha256")):
        if key in recorded and recorded[key] is not None and found.get(key) != recorded[key]:
            return f"its {what} is {found.get(key)}, the run's is {recorded[key]}"
    return None


def _explicit_tokenizer(spec: str) -> tuple[Tokenizer, Path | None, str]:
    """``--tokenizer SPEC``: the tokenizer, the file it was read from and how to name it; errors name the option."""
    from tplus_dist.data.prepare import MANIFEST, read_manifest, tokenizer_from_manifest
    from tplus_dist.data.tokenizers import build_tokenizer

    if spec.startswith("train:"):
        raise ValueError("--tokenizer train:N names no file; pass the prepared dataset directory it was saved in")
    if Path(spec).is_dir():
        if not (Path(spec) / MANIFEST).is_file():
            raise ValueError(
                f"--tokenizer {spec}: a directory without a prepared dataset's manifest ({MANIFEST}); pass a "
                "prepared dataset directory, a tokenizer.json or .tiktoken file, or bytes"
            )
        file = read_manifest(spec)["tokenizer"]["file"]
        return tokenizer_from_manifest(spec), Path(spec) / file if file else None, f"the dataset prepared at {spec}"
    try:
        tok = build_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {spec}: {str(e).removeprefix('data.tokenizer: ')}") from None
    return tok, None if spec == "bytes" else Path(spec.removeprefix("tiktoken:")), spec


def run_tokenizer(
    cfg: RunConfig, spec: str | None = None, ckpt: Checkpoint | None = None
) -> tuple[Tokenizer | None, str, list[str]]:
    """The tokenizer the run of ``ckpt`` trained with, where it was found (or, with None, why none was) and
    warnings to print.

    Only a tokenizer that provably is the run's is returned: the run directory's ``data_manifest.json`` (see
    :func:`run_record`) records the tokenizer's kind, vocabulary size, EOS id and the sha256 of its file, and a
    candidate must match all of them. Candidates: the tokenizer saved beside the local prepared dataset the run
    read (data.shards, or data.source prepared in data.cache_dir); the byte tokenizer when the record says bytes
    (it needs no file: remote shards too); and, only when data.shards is unset, data.tokenizer itself when it is
    ``bytes`` or a file (with data.shards set the run never read data.tokenizer). Without a record nothing is
    provable and None comes back.

    ``spec`` (``--tokenizer``: ``bytes``, a prepared dataset directory, a tokenizer.json or a .tiktoken file) is
    used as given; when it contradicts the run's record a warning names both."""
    from tplus_dist.data.prepare import MANIFEST, read_manifest, tokenizer_from_manifest
    from tplus_dist.data.tokenizers import ByteTokenizer, build_tokenizer
    from tplus_dist.train.run import prepared_dir

    recorded, where = run_record(ckpt, cfg) if ckpt is not None else (None, "no checkpoint given")
    if spec is not None:
        tok, file, source = _explicit_tokenizer(spec)
        found = _entry(tok, file)
        warnings = []
        if recorded is not None and (why := _mismatch(found, recorded)) is not None:
            warnings.append(
                f"--tokenizer {spec} ({_describe(found)}) is not the tokenizer the run trained with "
                f"({_describe(recorded)}, recorded in {where}): {why}; exporting it as asked"
            )
        return tok, source, warnings
    if recorded is None:
        return None, f"the run's record of its tokenizer ({RECORD}) is not at {where}", []
    data = cfg.data
    candidates: list[tuple[str, Any]] = []
    shards = prepared_dir(cfg) if data.shards is None else Path(data.shards) if "://" not in data.shards else None
    if shards is not None and (shards / MANIFEST).is_file():

        def beside_shards(root: Path = shards) -> tuple[Tokenizer, Path | None]:
            file = read_manifest(root)["tokenizer"]["file"]
            return tokenizer_from_manifest(root), root / file if file else None

        candidates.append((f"the dataset prepared at {shards}", beside_shards))
    if recorded["kind"] == "bytes":
        candidates.append(("bytes", lambda: (ByteTokenizer(), None)))
    elif data.shards is None and not data.tokenizer.startswith("train:"):
        spec_path = Path(data.tokenizer.removeprefix("tiktoken:"))
        if spec_path.is_file():
            candidates.append((data.tokenizer, lambda: (build_tokenizer(data.tokenizer), spec_path)))
    rejected = []
    for source, load in candidates:
        try:
            tok, file = load()
        except (OSError, ValueError) as e:
            rejected.append(f"{source} cannot be read ({e})")
            continue
        why = _mismatch(_entry(tok, file), recorded)
        if why is None:
            return tok, source, []
        rejected.append(f"{source} is not it: {why}")
    shown = data.shards if data.shards is not None else str(shards)
    detail = "; ".join(rejected) if rejected else f"its prepared dataset ({shown}) is not here"
    return None, f"no tokenizer here matches the one the run recorded in {where} ({_describe(recorded)}): {detail}", []


def export_checkpoint(
    path: Path, fmt: str, out: Path, family: str | None = None, tokenizer: str | None = None
) -> Path | None:
    """Export the checkpoint at ``path`` (or a checkpoints directory's latest) to ``out``; returns ``out`` on rank
    0 (None elsewhere). An existing non-empty ``out`` is refused: nothing is overwritten, and a refused export
    creates nothing (every check runs before ``out`` is made). ``hf`` writes the run's tokenizer too when one
    provably is the run's (see :func:`run_tokenizer`; ``tokenizer`` names it instead, with a warning when it
    contradicts the run's record); without one it warns once, saying why, and writes the model alone."""
    if fmt not in ("hf", "consolidated"):
        raise ValueError(f"--format must be hf or consolidated, got {fmt!r}")
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher: one process reads every rank's files
        return None
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; export into a new directory")
    ckpt = find_checkpoint(path)
    verify_files(ckpt)  # every file: export is rare and must not read a damaged shard
    cfg = from_dict(RunConfig, without_renamed(ckpt.manifest["config"]))  # (a checkpoint of an older version too)
    state = whole_tensors(ckpt.path, ckpt.manifest["state"])
    from tplus_dist.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.load_state_dict(state)  # strict: every parameter of the decoder, nothing else
    if fmt == "consolidated":
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in without_extra_state(model.state_dict()).items()},
            str(out / "model.safetensors"),
        )
        respect_umask(out / "model.safetensors")
        (out / "config.yaml").write_text(cfg.to_yaml())
        return out
    from tplus_dist import hf

    # every refusal (the tokenizer, the family, the vocabulary) comes before ``out`` exists: hf.export checks the
    # family and the vocabulary before it creates the folder
    tok, source, warnings = run_tokenizer(cfg, tokenizer, ckpt)
    for line in warnings:
        print(f"tplus: warning: {line}", flush=True)
    if tok is None:
        print(
            f"tplus: warning: no tokenizer written with the model: {source}; pass --tokenizer (bytes, the prepared "
            "dataset directory, a tokenizer.json or .tiktoken file)",
            flush=True,
        )
    # written beside ``out`` and renamed into place once the logit check passed: a failure leaves no half export
    staging = out.parent / f".{out.name}.exporting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf.export(model, cfg.model, staging, family=family, tokenizer=tok)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
