"""Saving and loading the whole training state, for one process or every rank of a distributed run.

What a checkpoint holds (Trainer.state_dict's list, split by who owns it):
- model and optimizer: ``state/rankNNNNN.safetensors``, every rank its own pieces, in parallel, by decoder
  parameter name and range (sharded.py): loadable on any layout, exportable from any process count;
- ``trainer/rankNNNNN.pt`` per rank: step, tokens, the learning-rate and batch-size schedule positions, the data
  position (the global sample index, the same on every rank) and the RNG states (Python, NumPy, torch CPU and CUDA)
  of that rank;
- ``manifest.json``: format, step, tokens, layout, the whole config, package versions, the state index (which
  file holds which range of which parameter), and every file's size and checksum; written last, by rank 0,
  after every rank's files are written and checksummed (store.py publishes it).
"""

from __future__ import annotations

import copy
import datetime
import random
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tplus_dist.checkpoint import extra_state
from tplus_dist.checkpoint.sharded import _core, build_index, load_state, snapshot_state, write_state
from tplus_dist.checkpoint.store import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointSaveError,
    file_entries,
    find_checkpoint,
    new_staging_dir,
    prune,
    publish,
    read_manifest,
    remove_stale_staging,
    verify_files,
)
from tplus_dist.config import ConfigError, ModelConfig, RunConfig, from_dict, to_dict
from tplus_dist.faults import active, inject
from tplus_dist.parallel import comm

TRAINER_DIR = "trainer"


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
    """From the start of the save to its publication."""
    bytes: int
    stall: float
    """How long the step loop waited: the whole save, or only the snapshot of a background save."""
    step: int = 0
    note: str | None = None
    """A line for the log when a checkpoint of the same step already existed (see store.publish)."""


@dataclass
class _Pending:
    """A save whose files are being written (by a thread, or inline); finished by ``_finish`` on every rank."""

    step: int
    staging: Path
    t0: float
    head: dict[str, Any]
    metas: list[dict[str, Any]]
    thread: threading.Thread | None = None
    entries: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    stall: float = 0.0


def model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """A model section as the values that make the model: derived fields resolved (ModelConfig.resolved), without
    d_ff_multiple (it acts only through d_ff) and provider (the implementation, not the model). A section that no
    longer loads (a field since renamed) stays as it is."""
    try:
        resolved = to_dict(from_dict(ModelConfig, model, "model").resolved())
    except ConfigError:
        return dict(model)
    resolved.pop("d_ff_multiple", None)
    resolved.pop("provider", None)  # an implementation: a checkpoint resumes under either provider
    return dict(resolved)


class CheckpointManager:
    """Save into / load from ``root`` for this rank (call on every rank of a distributed run). ``run``: the owning
    run's identity ({"id", "dir"}, train/rundir.py), recorded in every manifest so that a run resumes only its own
    checkpoints."""

    def __init__(self, cfg: RunConfig, root: Path, run: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.ck = cfg.checkpoint
        self.root = root
        self.run = run
        self.pending: _Pending | None = None
        self.verified: Path | None = None
        """A checkpoint whose files :meth:`select` verified (load does not read them twice)."""
        self._buffers: dict[str, torch.Tensor] = {}  # host copies reused by background saves

    # ------------------------------------------------------------------------------------------------- save
    def save(self, trainer: Any) -> SaveResult:
        """Save the whole state and publish it (every rank); the step loop waits for all of it."""
        result = self._save(trainer, background=False)
        assert result is not None
        return result

    def save_in_background(self, trainer: Any) -> float:
        """Snapshot the whole state into host memory and write it from a thread; returns the seconds the caller
        waited (the snapshot). Every rank later calls :meth:`finish_pending` at the same point, once all agree
        that their writes are done (:meth:`pending_done`), or :meth:`wait`."""
        self._save(trainer, background=True)
        return self.pending.stall if self.pending is not None else 0.0

    def _save(self, trainer: Any, background: bool) -> SaveResult | None:
        if self.pending is not None:
            self.wait()  # one save at a time, in order
        t0 = time.perf_counter()
        step = int(trainer.state.step)
        rank = comm.rank()
        error = None
        staging: Path | None = None
        if rank == 0:
            try:
                staging = new_staging_dir(self.root, step)
            except OSError as e:
                error = f"cannot create a checkpoint directory under {self.root}: {e}"
        comm.agree(error, CheckpointSaveError)
        staging = Path(comm.broadcast(str(staging)))
        inject("save.before_files", step)
        job = _Pending(step, staging, t0, self._manifest_head(trainer), [])
        tensors: list[tuple[str, torch.Tensor]] = []
        own: dict[str, Any] = {}
        try:
            tensors, job.metas = snapshot_state(trainer, rank, self._buffers if background else None)
            own = copy.deepcopy(self._trainer_state(trainer))
        except (RuntimeError, TypeError, CheckpointError) as e:
            job.error = f"saving step {step} into {staging} failed on rank {rank}: {e}"
        if background and job.error is None:
            job.thread = threading.Thread(
                target=self._write, args=(job, tensors, own, rank), name=f"tplus-save-{step}", daemon=True
            )
            job.thread.start()
            job.stall = time.perf_counter() - t0
            self.pending = job
            return None
        if job.error is None:
            self._write(job, tensors, own, rank)
        job.stall = -1.0  # the whole save
        return self._finish(job)

    def _trainer_state(self, trainer: Any) -> dict[str, Any]:
        return {
            "step": trainer.state.step,
            "tokens": trainer.state.tokens,
            "scheduler": trainer.scheduler.state_dict(),
            "data": trainer.train_data.state_dict(),
            "rng": rng_state_plain(),
            **({"guard": trainer.guard.state_dict()} if hasattr(trainer, "guard") else {}),  # skips, spike window
            # modules' own state (TE's FP8 scaling state), one value per module (extra_state.py)
            "extra_state": extra_state.extra_states(_core(trainer)),
        }

    def _write(self, job: _Pending, tensors: list[tuple[str, torch.Tensor]], own: dict[str, Any], rank: int) -> None:
        """Write this rank's files and checksum them (in a thread for a background save: errors are kept)."""
        try:
            state = write_state(job.staging, rank, tensors)
            if active("save.mid_file", job.step):  # as if the process died while the file was half written
                with state.open("r+b") as f:
                    f.truncate(state.stat().st_size // 2)
                inject("save.mid_file", job.step)
            (job.staging / TRAINER_DIR).mkdir(exist_ok=True)
            trainer_file = job.staging / TRAINER_DIR / f"rank{rank:05d}.pt"
            torch.save(own, trainer_file)
            names = [str(f.relative_to(job.staging)) for f in (state, trainer_file)]
            job.entries = file_entries(job.staging, names)
            inject("save.after_state", job.step)
        except (OSError, RuntimeError, TypeError) as e:  # a full disk, a permission
            job.error = f"saving step {job.step} into {job.staging} failed on rank {rank}: {e}"

    def _finish(self, job: _Pending) -> SaveResult:
        """Every rank: agree that every rank's files are written, then rank 0 publishes the manifest."""
        self.pending = None
        comm.agree(job.error, CheckpointSaveError)
        all_metas = [m for part in comm.all_gather(job.metas) for m in part]
        entries: dict[str, Any] = {}
        for part in comm.all_gather(job.entries):
            entries.update(part)
        error, final, note = None, None, None
        if comm.rank() == 0:
            try:
                manifest = {**job.head, "state": build_index(all_metas), "files": entries}
                final, note = publish(job.staging, manifest)
                prune(self.root, self.ck.keep_last, self.ck.keep_every, protect=[final])
            except (OSError, CheckpointError) as e:
                error = f"publishing {job.staging} failed: {e}"
        comm.agree(error, CheckpointSaveError)
        final = Path(comm.broadcast(str(final)))
        seconds = time.perf_counter() - job.t0
        size = sum(e["bytes"] for e in entries.values())
        return SaveResult(final, seconds, size, seconds if job.stall < 0 else job.stall, job.step, note)

    def pending_done(self) -> bool:
        """Whether this rank has no background save still writing (no collective)."""
        return self.pending is None or self.pending.thread is None or not self.pending.thread.is_alive()

    def finish_pending(self) -> SaveResult | None:
        """Publish the background save once this rank's thread is done (every rank calls it together, after
        agreeing that every rank's is)."""
        job = self.pending
        if job is None:
            return None
        if job.thread is not None:
            job.thread.join()
        return self._finish(job)

    def wait(self) -> SaveResult | None:
        """Block until a background save is written, then publish it (every rank)."""
        return self.finish_pending()

    def _manifest_head(self, trainer: Any) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "step": trainer.state.step,
            "tokens": trainer.state.tokens,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "layout": layout_of(trainer),
            "config": to_dict(self.cfg),
            "versions": _versions(),
            **({"run": self.run} if self.run is not None else {}),
        }

    # ------------------------------------------------------------------------------------------------- load
    def find(self, path: Path) -> Checkpoint:
        """The checkpoint at ``path`` (resolved on rank 0, the same on every rank)."""
        error, found = None, None
        if comm.rank() == 0:
            try:
                found = str(find_checkpoint(path).path)
            except CheckpointError as e:
                error = str(e)
        comm.agree(error, CheckpointError)
        where = Path(comm.broadcast(found))
        return Checkpoint(where, read_manifest(where))

    def verify(self, ckpt: Checkpoint) -> None:
        """Check every file of ``ckpt`` against its manifest (each rank a share; checkpoint.verify false: nothing),
        raising CheckpointError naming the first damaged file on every rank; load then does not read them again."""
        error = None
        if self.ck.verify:
            try:
                verify_files(ckpt, sorted(ckpt.manifest["files"])[comm.rank() :: comm.world()])
            except CheckpointError as e:
                error = str(e)
        comm.agree(error, CheckpointError)
        self.verified = ckpt.path

    def select(self, candidates: list[Checkpoint]) -> Checkpoint | None:
        """The newest of ``candidates`` (newest first, the same list on every rank) whose files all verify against
        its manifest (each rank checks a share of the files; with checkpoint.verify false, the first). Rank 0
        prints one line for each one skipped, saying what is wrong with it. Returns None when none verifies."""
        for ckpt in candidates:
            try:
                self.verify(ckpt)
                return ckpt
            except CheckpointError as e:
                if comm.rank() == 0:
                    print(f"tplus: warning: not resuming from {ckpt.path}: {e}", flush=True)
        return None

    def owned(self, candidates: list[Checkpoint], legacy_ours: bool) -> list[Checkpoint]:
        """The candidates this run owns (the manifest's run id is this run's). ConfigError naming checkpoint.dir
        when another run's checkpoints are there: two runs in one directory would resume each other's state and
        overwrite each other's `latest` and step names. A manifest without a run id (written before run ids) is
        this run's when ``legacy_ours`` (the run directory already existed)."""
        mine = None if self.run is None else self.run["id"]
        ours, others = [], []
        for c in candidates:
            owner = c.manifest.get("run")
            if (owner is None and legacy_ours) or (owner is not None and owner.get("id") == mine):
                ours.append(c)
            else:
                others.append(c)
        if others:
            who = others[0].manifest.get("run") or {}
            raise ConfigError(
                "checkpoint.dir",
                f"{self.root} holds checkpoints of another run ({who.get('dir', 'a run without a recorded id')}, "
                f"{others[0].path.name}): two runs sharing a checkpoint directory would resume and overwrite each "
                "other's checkpoints; give this run its own directory (checkpoint.dir may use {run_dir}), or resume "
                "that run's checkpoint explicitly with --resume PATH into a run with its own checkpoint.dir",
            )
        return ours

    def check_model(self, ckpt: Checkpoint) -> None:
        """The model must be the one saved: ConfigError listing each field that differs. Derived fields compare by
        the value the model is built with (a null d_ff and the d_ff it derives are the same model; d_ff_multiple
        counts only through d_ff)."""
        saved = model_identity(ckpt.manifest["config"]["model"])
        now = model_identity(to_dict(self.cfg)["model"])
        diffs = [
            f"model.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}" for k in now if saved.get(k) != now[k]
        ]
        if diffs:
            raise ConfigError("model", f"differs from the checkpoint {ckpt.path}: " + "; ".join(diffs))

    def check_compatible(self, ckpt: Checkpoint) -> None:
        """The model and the optimizer must be the ones saved (ConfigError naming what differs); the layout may
        differ (the state is resharded, see sharded.py)."""
        self.check_model(ckpt)
        saved = ckpt.manifest["config"]["optim"]["name"]
        if saved != self.cfg.optim.name:
            raise ConfigError("optim.name", f"is {self.cfg.optim.name!r}, but {ckpt.path} holds the state of {saved!r}")

    def load(self, trainer: Any, ckpt: Checkpoint) -> None:
        """Load ``ckpt`` into ``trainer`` on this rank, on the saved layout or another one. On another layout the
        step, tokens, schedules and data position (a global sample index) come from rank 0's file, and so do the
        RNG states: per-rank random streams cannot map onto other ranks."""
        rank, world = comm.rank(), comm.world()
        self.check_compatible(ckpt)
        error = None
        if self.ck.verify and ckpt.path != self.verified:
            names = sorted(ckpt.manifest["files"])
            try:
                verify_files(ckpt, names[rank::world])
            except CheckpointError as e:
                error = str(e)
            comm.agree(error, CheckpointError)
        same_layout = ckpt.manifest["layout"] == layout_of(trainer)
        own_file = ckpt.path / TRAINER_DIR / f"rank{rank if same_layout else 0:05d}.pt"
        if not own_file.is_file():
            raise CheckpointError(f"{own_file} is missing: the checkpoint has no trainer state for rank {rank}")
        own = torch.load(own_file, map_location="cpu", weights_only=True)
        try:
            load_state(trainer, ckpt.path, ckpt.manifest["state"])
        except CheckpointError as e:
            error = str(e)
        comm.agree(error, CheckpointError)
        engine = engine_of(trainer)
        if engine is not None:
            engine.global_steps = int(own["step"])  # DeepSpeed's own counter (logging, its timers)
        trainer.scheduler.load_state_dict(own["scheduler"])
        trainer.train_data.load_state_dict(own["data"])
        trainer.state.step, trainer.state.tokens = int(own["step"]), int(own["tokens"])
        if "guard" in own and hasattr(trainer, "guard"):  # (older checkpoints have none)
            trainer.guard.load_state_dict(own["guard"])
        set_rng_state_plain(own["rng"])
        self._load_extra_states(trainer, ckpt, own, same_layout)

    def _load_extra_states(self, trainer: Any, ckpt: Checkpoint, own: dict[str, Any], same_layout: bool) -> None:
        """Modules' extra state (TE's FP8 scaling state): this rank's own on the saved layout; on another, each
        module's from the first saved rank that held it (extra_state.merge). A te model resumed from a checkpoint
        without it (a torch-provider run, or an older one) starts fresh scaling state; one line says so."""
        core = _core(trainer)
        if not any(extra_state.has_extra_state(m) for m in core.modules()):
            return  # (a te checkpoint's extra state has no module here: dropped)
        if same_layout:
            states = own.get("extra_state", {})
        else:
            files = sorted((ckpt.path / TRAINER_DIR).glob("rank*.pt"))
            states = extra_state.merge(
                torch.load(f, map_location="cpu", weights_only=True).get("extra_state", {}) for f in files
            )
        # TE 2.20.2 keeps DelayedScaling's amax history and scales as a pickle inside its uint8 extra-state tensor and
        # unpickles it only under NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (transformer_engine/pytorch/_extra_state.py).
        # Set for this load only: the checkpoint is this run's own (its run id is checked before any load) and its
        # files were verified against the manifest's checksums; a resumed FP8 run continues exactly only with it.
        with extra_state.unsafe_pickle_allowed():
            missing, _dropped = extra_state.load_extra_states(core, states)
        if missing and comm.rank() == 0:
            print(
                f"tplus: {ckpt.path} holds no FP8 scaling state for {len(missing)} modules (e.g. {missing[0]}); "
                "Transformer Engine starts it fresh",
                flush=True,
            )

    def clean_staging(self) -> None:
        """Remove staging directories of interrupted saves (rank 0, before training starts)."""
        if comm.rank() == 0 and self.root.is_dir():
            remove_stale_staging(self.root)
