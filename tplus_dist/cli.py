"""`tplus`: train | config | plan | verify-resume | export | launch | bench | prepare."""

from __future__ import annotations

import os
import socket
import sys
import traceback

from tplus_dist import exitcodes
from tplus_dist.checkpoint.store import CheckpointError, CheckpointSaveError
from tplus_dist.config import ConfigError, load_config
from tplus_dist.launch import LaunchError
from tplus_dist.parallel.dims import LaunchEnvError

USAGE = """tplus COMMAND [args]

commands:
  train CONFIG [--section.key=value ...] [--resume PATH]
                                           train (a run directory under runs/ gets config, metrics, tensorboard,
                                           checkpoints); resumes from the run's latest checkpoint, or from PATH
  config CONFIG [--section.key=value ...] [--provider te]
                                           print the resolved, validated config (with the te provider: which
                                           pieces run in Transformer Engine and which in torch)
  plan CONFIG [--nodes N] [--gpus-per-node G] [--gpu-memory 80GiB] [--search] [...]
                                           predicted per-GPU memory (weights, gradients, optimizer, activations
                                           per pipeline stage, buffers) and whether it fits; --search ranks every
                                           layout that fits by estimated step time (tplus plan --help)
  verify-resume CONFIG [...] --steps N [--at K] [--resume-with OVERRIDE ...]
                                           run N steps, and again stopped after step K, saved and resumed
                                           (on another layout with --resume-with); report whether the
                                           continuation matches and where it first differs
  export CHECKPOINT --format hf|consolidated OUT [--family NAME] [--tokenizer SPEC]
                                           a checkpoint (under torchrun when distributed) as a Hugging Face
                                           folder (logits checked; with the run's tokenizer, or SPEC: bytes, a
                                           prepared dataset, a tokenizer.json or .tiktoken) or one safetensors file
  launch [--launcher torchrun|deepspeed] [--nproc-per-node G] [...] [--dry-run] CONFIG [...]
                                           start training on this node with torchrun or the deepspeed CLI,
                                           the job's shape from SLURM or the options (once per node)
  bench [--model PRESET] [...]             forward+backward tokens/s beside a nanoGPT-style reference
  prepare --input PATH... --tokenizer SPEC --seq-len N --out DIR [...]
                                           tokenize documents into packed MDS shards (tplus prepare --help)
  prepare --verify DIR [--workers N]       check a prepared dataset against its manifest (sizes, sha256s,
                                           index.json): exit 0 intact, 2 damaged (naming the file)
"""


def _split(argv: list[str]) -> tuple[str | None, list[str]]:
    """CONFIG is the first argument that is not an override."""
    config = None
    overrides = []
    for a in argv:
        if a.startswith("--") or ("=" in a and not a.endswith((".yaml", ".yml"))):
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError("", f"unexpected argument {a!r} (overrides look like --section.key=value)")
    return config, overrides


def _resume_flag(argv: list[str]) -> list[str]:
    """``--resume PATH`` / ``--resume=PATH`` -> ``--checkpoint.resume=PATH``."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            if i + 1 >= len(argv):
                raise ConfigError("checkpoint.resume", "--resume needs a path")
            out.append(f"--checkpoint.resume={argv[i + 1]}")
            i += 2
            continue
        out.append("--checkpoint.resume=" + a.split("=", 1)[1] if a.startswith("--resume=") else a)
        i += 1
    return out


def _usage_error(message: str) -> int:
    """``tplus: MESSAGE`` and the usage on stderr; exit code 2 (bad input)."""
    print(f"tplus: {message}\n\n{USAGE}", file=sys.stderr, flush=True)
    return exitcodes.report(exitcodes.BAD_INPUT)


def cmd_train(argv: list[str]) -> int:
    config, overrides = _split(_resume_flag(argv))
    if config is None:  # (no built-in default run: that would train a 134M-parameter model on a guessed corpus)
        return _usage_error("train needs a CONFIG file, e.g. tplus train configs/tiny.yaml")
    cfg = load_config(config, overrides)
    from tplus_dist.train.run import train_run

    result = train_run(cfg)
    rank0 = os.environ.get("RANK", "0") == "0"  # under a launcher, rank 0 speaks for the job
    if result.stopped and result.step < cfg.train.steps:
        if rank0:
            print(
                f"tplus: stopped at step {result.step} of {cfg.train.steps} on {result.stopped}, with its checkpoint "
                f"{result.checkpoint}; run the same command to resume (exit code {exitcodes.STOPPED})",
                flush=True,
            )
        return exitcodes.report(exitcodes.STOPPED, step=result.step, checkpoint=result.checkpoint)
    if rank0 and not result.history:
        print(
            f"tplus: nothing to do: the run in {result.run_dir} already reached train.steps={cfg.train.steps} (its "
            "latest checkpoint); raise train.steps to continue it, or start another run with --checkpoint.resume=none"
        )
    elif rank0:
        last = result.history[-1]
        print(
            f"tplus: finished: {len(result.history)} steps, step {result.step} of {cfg.train.steps}, final loss "
            f"{last.get('loss', float('nan')):.4f}; run in {result.run_dir}"
        )
    return exitcodes.report(exitcodes.FINISHED, step=result.step)


def cmd_config(argv: list[str]) -> int:
    """The resolved config: what the file and overrides say, with every derived field (null in the file) at the value
    a run uses (RunConfig.resolved). Without CONFIG, the defaults."""
    argv = _provider_flag(argv)
    config, overrides = _split(argv)
    cfg = load_config(config, overrides).resolved()
    print(cfg.to_yaml(), end="")
    if cfg.model.provider == "te":  # the te provider's table, as YAML comments (the output stays loadable)
        from tplus_dist.backends.te_provider import TE_VERSION, format_plan, te_plan

        tp = cfg.parallel.tensor_parallel
        print(f"# te provider (Transformer Engine {TE_VERSION}), tensor_parallel {tp}: each piece's implementation")
        for line in format_plan(te_plan(cfg.model, tp)).splitlines():
            print("#   " + line)
        from tplus_dist.precision import bf16_layer_indices, recipe_spec

        spec = recipe_spec(cfg.precision)
        if spec is not None:  # what the te.Linear GEMMs run in, and which blocks stay out of FP8
            name, kwargs = spec
            args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            kept = bf16_layer_indices(cfg.precision, cfg.model.n_layers)
            print(f"# FP8: te.Linear GEMMs under transformer_engine.common.recipe.{name}({args}); blocks kept in bf16: "
                  f"{kept or 'none'}; norms, attention core, embedding and logits stay bf16")  # fmt: skip
    return 0


def _provider_flag(argv: list[str]) -> list[str]:
    """``--provider NAME`` / ``--provider=NAME`` -> ``--model.provider=NAME``."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--provider":
            if i + 1 >= len(argv):
                raise ConfigError("", "--provider needs a value: torch or te")
            out.append(f"--model.provider={argv[i + 1]}")
            i += 2
            continue
        out.append("--model.provider=" + a.split("=", 1)[1] if a.startswith("--provider=") else a)
        i += 1
    return out


def cmd_plan(argv: list[str]) -> int:
    from tplus_dist.plan import main as plan_main

    return plan_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from tplus_dist.bench import main as bench_main

    return bench_main(argv)


def cmd_prepare(argv: list[str]) -> int:
    from tplus_dist.data.prepare import main as prepare_main

    return prepare_main(argv)


def cmd_verify_resume(argv: list[str]) -> int:
    steps, at, work, rest, resume_with, i = None, None, None, [], [], 0
    while i < len(argv):
        a = argv[i]
        key, _, value = a.partition("=")
        if a == "--resume-with":  # the next argument is an override, --section.field=value
            if i + 1 >= len(argv):
                raise ValueError("--resume-with needs an override, e.g. --resume-with --parallel.tensor_parallel=1")
            resume_with.append(argv[i + 1])
            i += 2
            continue
        if key in ("--steps", "--at", "--work-dir"):
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value")
                value, i = argv[i + 1], i + 1
            if key == "--steps":
                steps = int(value)
            elif key == "--at":
                at = int(value)
            else:
                work = value
        else:
            rest.append(a)
        i += 1
    if steps is None:
        raise ValueError("verify-resume needs --steps N (the length of the run to compare)")
    config, overrides = _split(rest)
    if config is None:
        return _usage_error("verify-resume needs a CONFIG file, e.g. tplus verify-resume configs/tiny.yaml --steps 8")
    cfg = load_config(config, overrides)
    from pathlib import Path

    from tplus_dist.checkpoint.verify import verify_resume

    resume_cfg = None
    if resume_with:
        from tplus_dist.checkpoint.verify import check_resume_overrides

        resume_cfg = load_config(config, [*overrides, *resume_with])
        check_resume_overrides(cfg, resume_cfg, resume_with, int(os.environ.get("WORLD_SIZE", "1")))
    report = verify_resume(cfg, steps, at, Path(work) if work else None, resume_cfg, resume_with)
    if os.environ.get("RANK", "0") == "0":
        print(report.text())
    return 0 if report.matches else 1


def cmd_launch(argv: list[str]) -> int:
    from tplus_dist.launch import USAGE as LAUNCH_USAGE
    from tplus_dist.launch import main as launch_main

    if not argv or argv[0] in ("-h", "--help"):
        print(LAUNCH_USAGE)
        return 0
    return launch_main(argv)


def cmd_export(argv: list[str]) -> int:
    fmt, family, tokenizer, positional, i = "hf", None, None, [], 0
    while i < len(argv):
        key, _, value = argv[i].partition("=")
        if key in ("--format", "--family", "--tokenizer"):
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value")
                value, i = argv[i + 1], i + 1
            if key == "--format":
                fmt = value
            elif key == "--family":
                family = value
            else:
                tokenizer = value
        else:
            positional.append(argv[i])
        i += 1
    if len(positional) != 2:
        raise ValueError("usage: tplus export CHECKPOINT --format hf|consolidated OUT")
    from pathlib import Path

    from tplus_dist.checkpoint.export import export_checkpoint

    out = export_checkpoint(Path(positional[0]), fmt, Path(positional[1]), family, tokenizer)
    if out is not None:
        print(f"tplus: exported {positional[0]} as {fmt} to {out}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "config": cmd_config,
    "plan": cmd_plan,
    "bench": cmd_bench,
    "prepare": cmd_prepare,
    "verify-resume": cmd_verify_resume,
    "export": cmd_export,
    "launch": cmd_launch,
}


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N``, which the deepspeed launcher adds before the script's own
    arguments (the rank is read from LOCAL_RANK, which it also sets)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith("--local_rank="):
            continue
        elif a == "--local_rank" and i + 1 < len(argv) and argv[i + 1].isdigit():
            skip = True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    from tplus_dist.console import quiet_library_notices

    quiet_library_notices()  # library notices once (rank 0) or not at all, before the libraries are imported
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"tplus: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if cmd in ("train", "config", "verify-resume") and rest and rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        return _bad_input(f"config error: {e}")
    except (LaunchEnvError, LaunchError) as e:
        return _bad_input(f"launch error: {e}")
    except CheckpointSaveError as e:  # every rank knows the failing rank's message (the ranks agree on it)
        print(f"tplus: {_who()}failed: {e}", file=sys.stderr, flush=True)
        return exitcodes.report(exitcodes.FAILED)
    except CheckpointError as e:
        return _bad_input(f"checkpoint error: {e}")
    except (FileNotFoundError, ValueError) as e:
        return _bad_input(f"error: {e}")
    except KeyboardInterrupt:
        print(f"tplus: {_who()}interrupted: stopped at once, without saving", file=sys.stderr, flush=True)
        return exitcodes.report(exitcodes.INTERRUPTED)
    except Exception as e:  # a failure during the run: the traceback, then one line naming the rank and the call
        traceback.print_exc()
        print(f"tplus: {_who()}failed{_where(e)}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return exitcodes.report(exitcodes.FAILED)


def _who() -> str:
    """'rank R of W (host): ' under a launcher, else ''."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')} of {world} ({socket.gethostname()}): " if world > 1 else ""


def _bad_input(message: str) -> int:
    print(f"tplus: {_who()}{message}", file=sys.stderr, flush=True)
    return exitcodes.report(exitcodes.BAD_INPUT)


def _where(e: BaseException) -> str:
    """' in torch.distributed all_reduce, called from tplus_dist/x.py:N (function)' for an error raised inside a
    collective (a timeout, a peer that died), else ' at tplus_dist/x.py:N (function)' (the innermost frame of ours)."""
    ours, collective = None, None
    for frame, line in traceback.walk_tb(e.__traceback__):
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if "/tplus_dist/" in name and not name.endswith("/tplus_dist/faults.py") and collective is None:
            ours = f"tplus_dist/{name.rsplit('/tplus_dist/', 1)[1]}:{line} ({frame.f_code.co_name})"
        elif collective is None and name.endswith(("distributed_c10d.py", "pipelining/schedules.py")):
            module = "torch.distributed" if name.endswith("distributed_c10d.py") else "torch.distributed.pipelining"
            collective = f"{module} {frame.f_code.co_name}"
    if collective:
        return f" in {collective}" + (f", called from {ours}" if ours else "")
    return f" at {ours}" if ours else ""


if __name__ == "__main__":
    raise SystemExit(main())
