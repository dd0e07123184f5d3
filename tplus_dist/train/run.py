"""`tplus train`: everything a single-process run needs, built from one RunConfig."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tplus_dist import precision
from tplus_dist.config import ConfigError, RunConfig
from tplus_dist.data.corpus import pydoc_documents
from tplus_dist.data.loader import EvalBatches, ShardBatches, fetch_manifest, open_split
from tplus_dist.data.order import BatchRamp
from tplus_dist.fsutil import write_atomic
from tplus_dist.model import build_model
from tplus_dist.model.decoder import model_flops_per_token, model_num_params
from tplus_dist.optim import build_optimizer, build_scheduler
from tplus_dist.train.hooks import ConsoleHook, EvalHook, Hook, MetricsFileHook
from tplus_dist.train.metrics import MetricsWriter, device_peak_flops
from tplus_dist.train.rundir import (
    RunLock,
    check_writable,
    new_identity,
    read_identity,
    release_all,
    started_by,
    write_identity,
)
from tplus_dist.train.trainer import Trainer

PREPARE_FORMAT = 1
"""Bump when prepare's output changes, so that cached automatic preparations are redone."""


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda was asked for but torch sees no CUDA device")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Data:
    train: ShardBatches
    val: EvalBatches | None
    shards: str
    manifest: dict[str, Any]


def prepared_dir(cfg: RunConfig) -> Path:
    """Where data.source is prepared in data.cache_dir (keyed by what determines its content)."""
    d = cfg.data
    key = json.dumps([PREPARE_FORMAT, d.source, d.tokenizer, cfg.seq_len, d.val_fraction], sort_keys=True)
    return Path(d.cache_dir) / "prepared" / hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_prepared(cfg: RunConfig) -> str:
    """data.shards, or the source prepared once into the cache (keyed by what determines its content)."""
    if cfg.data.shards is not None:
        return cfg.data.shards
    from tplus_dist.data.prepare import PrepareError, prepare

    d = cfg.data
    out = prepared_dir(cfg)
    if (out / "manifest.json").is_file():
        return str(out)
    inputs = [d.source]
    if d.source == "builtin:pydoc":
        # Python's help topics, written once as JSON lines so prepare reads them like any corpus
        src = out.with_name(out.name + "-pydoc.jsonl")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_documents()))
        inputs = [str(src)]
    print(f"tplus: preparing {d.source} ({d.tokenizer}, seq_len {cfg.seq_len}) into {out}", flush=True)
    try:
        prepare(inputs=inputs, tokenizer=d.tokenizer, seq_len=cfg.seq_len, out=out, val_fraction=d.val_fraction)
    except PrepareError:
        if not (out / "manifest.json").is_file():  # another process prepared the same corpus meanwhile: reuse it
            raise
    return str(out)


def batch_ramp(cfg: RunConfig, dp_size: int = 1) -> BatchRamp:
    t = cfg.train
    return BatchRamp(
        end=t.micro_batch_size * t.grad_accum * dp_size,
        start=None if t.batch_size_start is None else t.batch_size_start * dp_size,
        increment=t.batch_size_increment * dp_size,
        ramp_tokens=t.batch_ramp_tokens,
    )


def total_tokens(cfg: RunConfig, ramp: BatchRamp) -> int:
    """Tokens the whole run consumes (the token clock's default end of decay)."""
    tokens = 0
    for _ in range(cfg.train.steps):
        tokens += ramp.batch_size(tokens) * cfg.seq_len
    return tokens


def data_labels(cfg: RunConfig, manifest: dict[str, Any], shards: str) -> bool:
    """Whether the loader reads each sample's label for the model (data.labels), after checking that the shards'
    labels exist and fit model.n_conditions: a label the model cannot embed stops the run before it starts."""
    labels = manifest.get("labels")
    conditioned = cfg.model.adaln != "none"
    if cfg.data.labels is True and labels is None:
        raise ConfigError(
            "data.labels",
            f"is true, but the shards at {shards} carry no labels: prepare them with `tplus prepare --labels "
            "input` (the input a document came from) or `--labels field:NAME`",
        )
    if labels is None:
        if conditioned and cfg.data.labels is None and int(os.environ.get("RANK", "0")) == 0:
            print(
                f"tplus: warning: model.adaln is {cfg.model.adaln}, but the shards at {shards} carry no labels: "
                "every sequence trains unconditioned, as the plain model would",
                flush=True,
            )
        return False
    if not conditioned or cfg.data.labels is False:
        return False
    if labels["count"] > cfg.model.n_conditions:
        raise ConfigError(
            "model.n_conditions",
            f"({cfg.model.n_conditions}) is smaller than the {labels['count']} labels ({labels['source']}) of the "
            f"shards at {shards} (ids 0 .. {labels['count'] - 1}); raise it, or set data.labels false",
        )
    return True


def verify_data(shards: str, manifest: dict[str, Any], cache_dir: str) -> None:
    """Check local shards against their manifest (every listed file's sha256, each index.json's shards and sample
    count) in parallel over the job's ranks, digests cached per file in cache_dir (a restart hashes only changed
    files). Remote shards: their index.json is checked when the split is opened, each shard's sha256 as it is
    downloaded. Raises ManifestError (a ValueError: `tplus` exits 2 with one line) naming the damaged file."""
    from tplus_dist.data.loader import is_remote
    from tplus_dist.data.verify import dist_verify_prepared

    if is_remote(shards):
        return
    report = dist_verify_prepared(shards, cache_dir)
    if report.hashed_files and int(os.environ.get("RANK", "0")) == 0:
        gb = report.hashed_bytes / 1e9
        print(
            f"tplus: verified {report.files} files of {shards} ({report.bytes / 1e9:.3f} GB) against its manifest in "
            f"{report.seconds:.1f} s ({report.hashed_files} hashed, {gb:.3f} GB; the rest unchanged since checked)",
            flush=True,
        )


def build_data(cfg: RunConfig, dp_size: int = 1, dp_rank: int = 0) -> Data:
    """Open the shards and check they fit the model and the run, and that they are intact (:func:`verify_data`),
    before any work is saved."""
    shards = ensure_prepared(cfg)
    manifest = fetch_manifest(shards, cfg.data.cache_dir)
    if manifest["seq_len"] != cfg.seq_len:
        raise ConfigError(
            "train.seq_len",
            f"({cfg.seq_len}) differs from the seq_len {manifest['seq_len']} the shards at {shards} were prepared with",
        )
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab}) of the shards at {shards}",
        )
    use_labels = data_labels(cfg, manifest, shards)
    d = cfg.data
    verify_data(shards, manifest, d.cache_dir)
    train = ShardBatches(
        open_split(shards, "train", d.cache_dir, manifest),
        cfg.seq_len,
        cfg.train.micro_batch_size,
        batch_ramp(cfg, dp_size),
        seed=d.seed if d.seed is not None else cfg.train.seed,
        shuffle=d.shuffle,
        block_shards=d.shuffle_block_shards,
        dp_size=dp_size,
        dp_rank=dp_rank,
        num_workers=d.num_workers,
        labels=use_labels,
    )
    val = None
    has_val = manifest["splits"].get("val", {}).get("samples", 0) > 0
    if not has_val:
        from tplus_dist.config.base import check_unused

        check_unused(
            cfg.train, "train", ("eval_interval", "eval_samples"),
            f"the shards at {shards} have no validation split (prepare them with a val fraction above 0)",
            off=(0,),
        )  # fmt: skip
    if has_val and cfg.train.eval_interval > 0:
        try:
            val = EvalBatches(
                open_split(shards, "val", d.cache_dir, manifest),
                cfg.seq_len,
                cfg.train.micro_batch_size,
                cfg.train.eval_samples,
                labels=use_labels,
                dp_size=dp_size,
                dp_rank=dp_rank,
                ignore_index=cfg.model.ignore_index,
            )
        except ValueError as e:
            raise ConfigError("train.eval_samples", f"{e} at {shards}") from None
    return Data(train, val, shards, manifest)


@dataclass
class Layout:
    """Where this process stands: one process, or a rank of a data-parallel job."""

    world: int = 1
    rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    groups: Any = None
    """parallel.groups.ProcessGroups when distributed."""


def setup_layout(cfg: RunConfig, device: torch.device) -> Layout:
    """One process unless launched by torchrun / the deepspeed launcher (WORLD_SIZE > 1): then the launcher's
    environment and the parallel layout are checked, and the process groups made, before any model is built."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        # a split of the model needs its processes: on one it would be ignored and the whole model trained instead
        for name in ("tensor_parallel", "pipeline_parallel"):
            size = getattr(cfg.parallel, name)
            if size > 1:
                raise ConfigError(
                    f"parallel.{name}",
                    f"({size}) has no effect: it splits the model over {size} processes, and this run is one "
                    f"process; start it with tplus launch --nproc-per-node {cfg.parallel.model_parallel} (or "
                    "torchrun), or set it to 1",
                )
        return Layout()
    from tplus_dist.parallel.dims import ParallelDims, launch_env
    from tplus_dist.parallel.groups import init_process_groups

    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        # the deepspeed launcher says LOCAL_SIZE; streaming (which elects one process per node to set up
        # shared memory) and torch read LOCAL_WORLD_SIZE
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    env = launch_env()
    dims = ParallelDims.from_config(cfg.parallel, world, cfg.model).validate()
    if cfg.optim.name in ("adafactor", "soap", "scaled_adam"):
        from tplus_dist.parallel.engine import use_bf16

        # Both read each weight as a matrix (factored moments, Kronecker preconditioners, whole-tensor RMS):
        # ZeRO 1-3 and DeepSpeed's bf16 optimizer hand the optimizer flat partitions, and a tensor-parallel
        # slice is not the matrix, so only replicated fp32 parameters keep their meaning.
        reason = (
            f"zero_stage {dims.zero_stage} hands it flat partitions"
            if dims.zero_stage
            else f"tensor_parallel {dims.tp} hands it slices of each matrix"
            if dims.tp > 1
            else "bf16 under DeepSpeed hands it flat partitions"
            if use_bf16(cfg, device.type)
            else None
        )
        if reason:
            raise ConfigError(
                "optim.name",
                f"{cfg.optim.name} works on whole matrices, but {reason}; on {world} processes use it with "
                "parallel.zero_stage 0, parallel.tensor_parallel 1 and precision.dtype fp32, or use adamw",
            )
    timeout = datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    groups = init_process_groups(dims, backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Layout(world, env.rank, dims.dp, groups.dp_rank, groups)


def build_decoder(cfg: RunConfig, layout: Layout, device: torch.device) -> torch.nn.Module:
    """The decoder for this rank: whole, its tensor-parallel slice (megatron-core layers, or Transformer Engine's
    with model.provider te), or its pipeline stage (a DeepSpeed PipelineModule, or the interleaved chunks). Every
    rank starts from the values one process would have (model/init.py), whatever the layout. Then the precision:
    a pipeline stage runs each forward in precision.precision_context (the other layouts' forward runs in the
    trainer's), and with precision.fp8 the first/last layers named by precision.num_layers_at_*_in_bf16 run with
    FP8 off (precision.keep_layers_in_bf16)."""
    torch.manual_seed(cfg.train.seed)
    model = _build_decoder(cfg, layout, device)
    groups = layout.groups
    amax_group = precision.amax_reduction_group(groups) if cfg.precision.fp8 != "none" else None
    if groups is not None and groups.dims.pp > 1:
        # DeepSpeed's pipeline engine calls the PipelineModule once per micro-batch (PipelineEngine._exec_forward_pass
        # -> DeepSpeedEngine.forward -> module(...)); torch's PipelineStage calls each chunk once per micro-batch: a
        # forward hook puts each call in its own precision context, as the trainer's loss_on does. The loss is
        # computed outside it there as here.
        chunks = getattr(model, "chunks", None)  # interleaved: one PipelineStage per chunk
        parts: list[torch.nn.Module] = list(chunks) if isinstance(chunks, torch.nn.ModuleList) else [model]
        for part in parts:
            precision.hold_during_forward(
                part, lambda: precision.precision_context(cfg.precision, device, amax_reduction_group=amax_group)
            )
    precision.keep_layers_in_bf16(model, cfg.precision, cfg.model.n_layers, amax_reduction_group=amax_group)
    return model


def _build_decoder(cfg: RunConfig, layout: Layout, device: torch.device) -> torch.nn.Module:
    from tplus_dist.backends import LayerProvider, get_provider

    groups = layout.groups
    tp_group = groups.tp if groups is not None and groups.dims.tp > 1 else None
    provider: LayerProvider | None = None
    if cfg.model.provider == "te":
        from tplus_dist.backends.te_provider import TEProvider  # imports TE on use (CUDA only)

        # the tensor-parallel group the megatron path splits over (None: whole layers)
        provider = TEProvider(tp_group, device=device, params_dtype=torch.float32)
    elif tp_group is not None:
        from tplus_dist.backends.megatron_provider import MegatronProvider

        provider = MegatronProvider(
            tp_group, device=device, params_dtype=torch.float32, sequence_parallel=cfg.parallel.sequence_parallel
        )
    if groups is None or groups.dims.pp == 1:
        return build_model(cfg.model, provider).to(device)
    provider = provider if provider is not None else get_provider("torch")
    from tplus_dist.model.init import draw_init_seed

    cfg.model.validate()
    virtual = groups.dims.vpp or 1
    if virtual > 1:
        from tplus_dist.parallel.interleaved import InterleavedChunks

        return InterleavedChunks(cfg.model, provider, groups, virtual, init_seed=draw_init_seed()).to(device)
    from tplus_dist.parallel.pipeline import build_pipeline

    return build_pipeline(cfg.model, provider, groups, init_seed=draw_init_seed()).to(device)


def checkpoint_root(cfg: RunConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir.format(run_dir=run_dir))


@dataclass
class RunStart:
    """What :func:`open_run` decided, the same on every rank."""

    run_dir: Path
    manager: Any
    """checkpoint.CheckpointManager for run_dir's checkpoints."""
    ckpt: Any
    """checkpoint.Checkpoint to resume from, or None."""
    locks: list[RunLock]
    """The run directory's and the checkpoint directory's, held by rank 0 for the run ([] on the other ranks)."""
    restarted: bool = False
    """The run directory existed and the run starts again from its beginning (it died before its first checkpoint)."""


def _choose_run_dir(cfg: RunConfig, locks: list[RunLock]) -> Path:
    """Where this command runs (rank 0; creates nothing). The first of runs/NAME, NAME-1, NAME-2, ... that is this
    command's run (run.json's config is this one: the run continues there, from its own newest checkpoint or, when
    it died before its first, from the start), or, for NAME itself with checkpoint.resume auto, any run with
    checkpoints (resumed as before; a changed model or optimizer is refused later), or that is empty or missing.
    Another run's directory is passed over; a run that another job is running raises RunInUseError (the lock
    taken here is appended to ``locks``)."""
    from tplus_dist.checkpoint.store import complete_checkpoints

    base = Path(cfg.log.run_dir.format(name=cfg.log.name))
    config = cfg.to_dict()
    path, i = base, 0
    while True:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return path
        if path.is_dir():
            auto = i == 0 and cfg.checkpoint.resume == "auto" and complete_checkpoints(checkpoint_root(cfg, path))
            if auto or started_by(path, config):
                locks.append(RunLock(path))  # a job running there: stop here, naming it
                return path
        i += 1
        path = base.with_name(f"{base.name}-{i}")


def open_run(cfg: RunConfig, run_dir: Path | None, data: Data) -> RunStart:
    """Decide the run directory and the checkpoint to resume, check everything, then create the directory (every
    rank calls it; rank 0 decides and writes). In order, each failure one line naming the field or path, before
    anything is created: the run and checkpoint directories can be written; another job holds the run or its
    checkpoint directory (their locks); checkpoint.dir holds another run's checkpoints; the checkpoint to resume
    verifies and holds this model and optimizer: the run's own newest that verifies (`latest` repaired when it
    lagged behind; the same command finds its run again, see :func:`_choose_run_dir`), else checkpoint.resume's
    path. Only then is the directory created and locked, with run.json, config and data manifest written."""
    from tplus_dist.checkpoint import CheckpointError, CheckpointManager
    from tplus_dist.checkpoint.store import Checkpoint, complete_checkpoints, read_manifest, repair_latest
    from tplus_dist.parallel import comm

    resume = cfg.checkpoint.resume
    explicit = None if resume in ("auto", "none") else Path(resume)
    plan: Any = None
    locks: list[RunLock] = []
    error: BaseException | None = None
    if comm.rank() == 0:
        try:
            if run_dir is None:
                run_dir = _choose_run_dir(cfg, locks)
            existed = run_dir.is_dir() and any(run_dir.iterdir())
            root = checkpoint_root(cfg, run_dir)
            check_writable(run_dir, "log.run_dir")
            check_writable(root, "checkpoint.dir")
            if explicit is not None and not explicit.exists():
                raise CheckpointError(f"checkpoint.resume: {explicit} does not exist")
            if explicit is not None and not explicit.is_dir():
                raise CheckpointError(
                    f"checkpoint.resume: {explicit} is a file, not a checkpoint directory (step_*) or a checkpoints "
                    "directory"
                )
            if existed and not locks:
                locks.append(RunLock(run_dir))  # before reading its checkpoints: no other job may be writing them
            if root.is_dir():
                locks.append(RunLock(root))  # a checkpoint directory another job is writing: stop here
            identity = (read_identity(run_dir) if existed else None) or new_identity(run_dir)
            owned = CheckpointManager(cfg, root, identity).owned(complete_checkpoints(root), legacy_ours=existed)
            # the run's own checkpoints continue it (also when it started from --resume PATH: they are newer)
            candidates = [] if resume == "none" else [str(c.path) for c in owned]
            plan = (str(run_dir), identity, existed, candidates)
        except Exception as e:
            release_all(locks)
            error = e
    comm.agree(error, ValueError)
    run_dir_s, identity, existed, candidates = comm.broadcast(plan)
    run_dir = Path(run_dir_s)
    if comm.world() > 1:  # every rank writes its own checkpoint files: each checks it can, wherever it runs
        try:
            check_writable(checkpoint_root(cfg, run_dir), "checkpoint.dir")
            error = None
        except ConfigError as e:
            error = ConfigError("checkpoint.dir", f"on rank {comm.rank()}: {e.reason}")
        comm.agree(error, ValueError)
    manager = CheckpointManager(cfg, checkpoint_root(cfg, run_dir), identity)
    try:
        ckpt = None
        if candidates:
            ckpt = manager.select([Checkpoint(Path(c), read_manifest(Path(c))) for c in candidates])
            if ckpt is None:
                raise CheckpointError(
                    f"none of the checkpoints in {manager.root} verifies (each is named above); resume one of them "
                    "explicitly with --resume PATH into another run, or start afresh with --checkpoint.resume=none"
                )
            if explicit is not None and comm.rank() == 0:
                print(f"tplus: {run_dir} already continues {explicit}: resuming its own newest checkpoint", flush=True)
        elif explicit is not None:
            ckpt = manager.find(explicit)
            manager.verify(ckpt)  # a damaged file stops here, before anything is created
        if ckpt is not None:
            manager.check_compatible(ckpt)  # another model or optimizer stops here, before anything is written
        if comm.rank() == 0:
            held = {lock.key for lock in locks}
            # a checkpoint directory outside the run's is locked before the run directory is created: a second run
            # sharing it stops without leaving a directory behind
            for path in sorted((run_dir, manager.root), key=lambda d: d.resolve().is_relative_to(run_dir.resolve())):
                path.mkdir(parents=True, exist_ok=True)
                if os.path.realpath(path) not in held:
                    locks.append(RunLock(path))
            write_identity(run_dir, identity, cfg.to_dict())
            if candidates and ckpt is not None:
                note = repair_latest(manager.root, ckpt)
                if note:
                    print(f"tplus: {note}", flush=True)
            if ckpt is None or ckpt.step < cfg.train.steps:  # (a finished run resumed does nothing: no new config)
                name = "config.yaml" if ckpt is None else f"config.resumed_{ckpt.path.name}.yaml"
                (run_dir / name).write_text(cfg.to_yaml())
            manifest_file = run_dir / "data_manifest.json"
            if not manifest_file.exists():
                manifest_file.write_text(json.dumps({"shards": data.shards, **data.manifest}, indent=1))
            if existed:  # what was logged after the step the run continues from is recomputed
                truncate_metrics(run_dir / "metrics.jsonl", ckpt.step if ckpt is not None else 0)
            manager.clean_staging()
        comm.agree(None)  # rank 0's writes above succeeded (the other ranks learn of a failure here)
    except Exception as e:
        release_all(locks)
        comm.agree(e, ValueError)  # raises on every rank; a failure on one alone (rank 0's writes) reaches all
        raise
    return RunStart(run_dir, manager, ckpt, locks, restarted=existed and ckpt is None)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows after ``step``: a resumed run recomputes them (rewritten atomically)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))


def build_trainer(cfg: RunConfig, run_dir: Path | None = None, stop: Any = None) -> tuple[Trainer, Path]:
    """Everything a run needs, checked before anything is written; returns the trainer and its directory.
    A checkpoint to resume from (checkpoint.resume) is loaded before returning. ``stop`` is a StopRequest
    (checkpoint/signals.py) for saving and stopping on a signal."""
    cfg.validate()
    device = resolve_device(cfg.train.device)
    precision.precheck(cfg, device)  # no Transformer Engine / CUDA / FP8-capable GPU: stop before any work
    torch.set_num_threads(int(os.environ.get("TPLUS_NUM_THREADS", torch.get_num_threads())))
    from tplus_dist.parallel.engine import load_deepspeed_overrides

    ds_overrides = load_deepspeed_overrides(cfg.parallel.deepspeed_config)  # a bad file stops here, before work
    layout = setup_layout(cfg, device)
    if cfg.schedule.unit == "tokens":  # the run's length in tokens is known now (the data-parallel size is)
        cfg.check_run_length(total_tokens(cfg, batch_ramp(cfg, layout.dp)))
    if device.type == "cuda" and layout.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    seed_everything(cfg.train.seed)
    check_writable(Path(cfg.data.cache_dir), "data.cache_dir")  # (rank 0 may prepare into it next)
    if layout.world > 1:
        import torch.distributed as dist

        if layout.rank == 0:  # one process prepares (or downloads the manifest); the others reuse its result
            ensure_prepared(cfg)
        dist.barrier()
    data = build_data(cfg, layout.dp, layout.dp_rank)  # every input is checked before anything is written
    start = open_run(cfg, run_dir, data)
    run_dir, manager, ckpt = start.run_dir, start.manager, start.ckpt

    model = build_decoder(cfg, layout, device)
    if cfg.parallel.recompute_granularity != "none":
        from tplus_dist.train.recompute import apply_recompute

        apply_recompute(model, cfg.parallel)  # before compile (it traces the checkpoints) and the engine
    if cfg.train.compile:
        from tplus_dist.train.compile import apply_compile

        # each block in place: names, checkpoints and the engine see the eager module. With the te provider graph
        # breaks are allowed: TE's modules and autocast are not traceable by dynamo as a whole (unverified on a GPU)
        apply_compile(model, fullgraph=cfg.model.provider != "te")
    optimizer = build_optimizer(model, cfg.optim, cfg.model)
    engine = None
    if layout.world > 1:
        from tplus_dist.parallel.engine import build_engine, deepspeed_config
        from tplus_dist.parallel.groups import DeepSpeedMPU

        first_accum = data.train.ramp.batch_size(0) // (cfg.train.micro_batch_size * layout.dp)
        ds_config = deepspeed_config(cfg, layout.dp, device.type, grad_accum=first_accum, overrides=ds_overrides)
        # DeepSpeed's pipeline module brings its own grid (the same groups) as the mpu
        deepspeed_pipeline = layout.groups.dims.pp > 1 and (layout.groups.dims.vpp or 1) == 1
        mpu = None if deepspeed_pipeline else DeepSpeedMPU(layout.groups)
        engine = build_engine(model, optimizer, ds_config, mpu=mpu)
        model, optimizer = engine, engine.optimizer  # the scheduler writes the groups the engine steps with
    scheduler = build_scheduler(
        optimizer, cfg.schedule, cfg.optim, cfg.train.steps, total_tokens=total_tokens(cfg, data.train.ramp)
    )
    # every rank: ZeRO-3 forwards need all of them; none without a validation split (nothing to report, not nan)
    hooks: list[Hook] = [EvalHook(cfg.train.eval_interval if data.val is not None else 0)]
    writer = None
    if layout.rank == 0:  # the step's row is written before a save starts: a kill mid-save cannot lose it
        purge = ckpt.step if ckpt else (0 if start.restarted else None)  # what is recomputed
        writer = MetricsWriter(run_dir, tensorboard=cfg.log.tensorboard, purge_after=purge)
        hooks.append(MetricsFileHook(writer))
    from tplus_dist.checkpoint.hook import CheckpointHook

    background = cfg.checkpoint.background if cfg.checkpoint.background is not None else device.type == "cuda"
    log = writer.write if writer is not None else None
    hooks.append(CheckpointHook(manager, stop, verbose=layout.rank == 0, background=background, log=log))
    if layout.rank == 0:
        hooks.append(ConsoleHook(cfg.train.log_interval, progress=cfg.log.progress))
    trainer = Trainer(
        cfg,
        model,
        optimizer,
        scheduler,
        data.train,
        data.val,
        device,
        hooks,
        peak_flops=device_peak_flops(device, cfg.log.peak_tflops),
        n_devices=layout.world,
        flops_per_token=model_flops_per_token(cfg.model, cfg.seq_len),
    )
    if engine is not None:
        from tplus_dist.parallel.engine import EngineStep, EngineStepRunner

        def loss_fn(
            _engine: torch.nn.Module, mb: tuple[torch.Tensor, ...]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            labels = mb[2] if len(mb) > 2 else None  # (tokens, targets, labels)
            return trainer.loss_on(mb[0].to(device), mb[1].to(device), labels)

        if layout.groups.dims.pp > 1 and (layout.groups.dims.vpp or 1) > 1:
            from tplus_dist.parallel.interleaved import InterleavedChunks, InterleavedStepRunner

            chunks = engine.module
            assert isinstance(chunks, InterleavedChunks)
            trainer.runner = InterleavedStepRunner(engine, chunks, layout.groups, device, trainer.guard)
        elif layout.groups.dims.pp > 1:
            from tplus_dist.parallel.pipeline import PipelineStepRunner

            trainer.runner = PipelineStepRunner(engine, layout.groups, device, trainer.guard)
        else:
            step = EngineStep(engine, loss_fn, layout.groups.dp, ignore_index=cfg.model.ignore_index)
            trainer.runner = EngineStepRunner(step, trainer.guard, counts_loss=layout.groups.tp_rank == 0)
    trainer.layout = layout
    if cfg.precision.fp8 != "none":
        trainer.amax_reduction_group = precision.amax_reduction_group(layout.groups)
    trainer.checkpoints, trainer.run_locks = manager, start.locks
    if layout.world > 1:  # every group exists now (DeepSpeed's and the pipeline's too)
        from tplus_dist.parallel.groups import set_collective_timeout

        set_collective_timeout(datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes))
    if ckpt is not None:
        manager.load(trainer, ckpt)
        if layout.rank == 0:
            print(f"tplus: resumed from {ckpt.path} (step {ckpt.step}, {trainer.state.tokens:,} tokens)", flush=True)
            from tplus_dist.checkpoint.manager import layout_of

            saved_layout, now_layout = ckpt.manifest["layout"], layout_of(trainer)
            if saved_layout != now_layout:
                t = ckpt.manifest["config"]["train"]
                was = t["micro_batch_size"] * t["grad_accum"] * saved_layout["dp"]
                now = cfg.train.micro_batch_size * cfg.train.grad_accum * layout.dp
                note = (
                    ""
                    if was == now
                    else (
                        f"; the global batch changes from {was} to {now} sequences (micro_batch_size x grad_accum x "
                        "data-parallel ranks): set train.grad_accum to keep it"
                    )
                )
                print(f"tplus: resharded from layout {saved_layout} to {now_layout}{note}", flush=True)
    return trainer, run_dir


@dataclass
class RunResult:
    """How a `tplus train` run ended (every rank)."""

    run_dir: Path
    history: list[dict[str, Any]]
    """This run's per-step metrics."""
    step: int
    """The step the run stands at."""
    stopped: str | None = None
    """The signal's name when the run stopped on one (checkpoint.on_signal: saved, then stopped), else None."""
    checkpoint: Path | None = None
    """The last checkpoint this run published."""


def train(cfg: RunConfig, run_dir: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Train as configured (resuming per checkpoint.resume); returns the run directory and this run's per-step
    metrics. SIGTERM / SIGUSR1 / SIGINT save a checkpoint after the current step and end the run
    (checkpoint.on_signal); :func:`train_run` also tells whether the run stopped that way."""
    result = train_run(cfg, run_dir)
    return result.run_dir, result.history


def train_run(cfg: RunConfig, run_dir: Path | None = None) -> RunResult:
    """:func:`train`, returning how the run ended (finished, or stopped on a signal with its checkpoint)."""
    from tplus_dist.checkpoint.signals import StopRequest

    stop = StopRequest().install() if cfg.checkpoint.on_signal else None
    try:
        return _train(cfg, run_dir, stop)
    finally:
        if stop is not None:
            stop.uninstall()


def _plan_line(cfg: RunConfig, trainer: Trainer) -> str:
    """tplus plan's one-line prediction for this run (tplus_dist/plan.py); a model the plan cannot describe yet is
    named rather than stopping the run (the prediction is advice, not a precondition)."""
    from tplus_dist.plan import train_start_line

    world = trainer.layout.world if trainer.layout is not None else 1
    try:
        return train_start_line(cfg.resolved(), world, trainer.device)
    except Exception as e:  # advice only: a model choice the memory model cannot build is named, and the run goes on
        return f"tplus: plan: no prediction for this run ({type(e).__name__}: {e})"


def _train(cfg: RunConfig, run_dir: Path | None, stop: Any) -> RunResult:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    failed = True
    try:
        trainer, run_dir = build_trainer(cfg, run_dir, stop)
        if (not distributed or int(os.environ.get("RANK", "0")) == 0) and trainer.state.step < cfg.train.steps:
            n = model_num_params(cfg.model)  # the whole model's, however it is split
            layout = trainer.layout.groups.dims if trainer.layout is not None and trainer.layout.groups else None
            where = f"{layout}" if distributed else str(trainer.device)
            print(f"tplus: {n / 1e6:.2f}M parameters on {where}; writing {run_dir}", flush=True)
            print(_plan_line(cfg, trainer), flush=True)
        try:
            history = trainer.fit()
        finally:
            trainer.close()
        if (not distributed or int(os.environ.get("RANK", "0")) == 0) and trainer.state.step > 0:
            from tplus_dist.plan import train_end_line

            print(train_end_line(trainer.device), flush=True)
        from tplus_dist.checkpoint.hook import CheckpointHook

        saved = next((h.saved for h in trainer.hooks if isinstance(h, CheckpointHook)), None)
        stopped = stop.signal_name if stop is not None and trainer.stop_requested else None
        failed = False
        return RunResult(run_dir, history, trainer.state.step, stopped, saved.path if saved else None)
    finally:
        if distributed:
            from tplus_dist.parallel.groups import destroy_process_groups

            # after a failure: no collective (the other ranks may be gone or stuck); the process exits next
            destroy_process_groups(failed=failed)
