"""`tplus launch [options] CONFIG [--section.field=value ...]`: start training with torchrun or the deepspeed CLI
on this node, one node or many, inside a SLURM allocation or not.

Where it runs once per node (srun --ntasks-per-node=1 in slurm/*.sbatch, or by hand on each node), it derives the
job's shape from SLURM's environment (SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, SLURM_NODEID, SLURM_JOB_ID,
SLURM_GPUS_ON_NODE) or from its options, checks everything it can before any rank starts, and runs the launcher's
command:

- torchrun: ``--nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST0:PORT --rdzv-id JOB``;
- deepspeed: a hostfile made from the allocation (``host slots=G`` per node) and ``--no_ssh --node_rank R``, so
  each node starts its own ranks (no pdsh or ssh between nodes).

Checks, each a one-line error naming the problem: the config file exists on this node and is valid; the
layout (parallel.*) fits nodes x processes per node; this node has as many GPUs as processes per node (CUDA runs);
the master address resolves and, from nodes other than the first, accepts a TCP connection within
--connect-timeout seconds (the rendezvous store listens there); the project imports (a container without it
fails in the shell before this runs: slurm/*.sbatch checks it first).

The launcher process ignores SIGUSR1 (so does everything it starts, until tplus_dist.train installs its handler):
a preemption signal sent to every process of the job step (``scancel --signal=USR1 JOB``, as slurm/*.sbatch
does) reaches the training ranks, which save and stop, while the launchers stay up and exit when the ranks do.
`tplus launch` waits for the launcher and exits with its ranks' code (tplus_dist/exitcodes.py: 0 finished, 75
stopped with a checkpoint, 1 failed, 2 bad input); Ctrl-C or SIGTERM to it stops the ranks gracefully
(:func:`run_launcher`). ``--dry-run`` prints the derived shape, the hostfile and the command, and starts nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tplus_dist.config import load_config


class LaunchError(RuntimeError):
    """The job cannot start as asked; the message names the variable, option or file."""


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list ("node[01-03,07],gpu-a1") as host names, in order (what
    ``scontrol show hostnames`` prints)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", spec):
        parts = re.split(r"(\[[^\]]*\])", item)
        names = [""]
        for part in parts:
            if not part:
                continue
            if part.startswith("["):
                choices = []
                for r in part[1:-1].split(","):
                    lo, _, hi = r.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise LaunchError(f"SLURM_JOB_NODELIST: cannot read the range {r!r} in {spec!r}")
                    width = len(lo)
                    choices += [str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1)]
                names = [n + c for n in names for c in choices]
            else:
                names = [n + part for n in names]
        hosts += names
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST: no hosts in {spec!r}")
    return hosts


@dataclass(frozen=True)
class JobShape:
    hosts: list[str]
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    job_id: str
    source: str
    """Where the shape came from: "slurm" or "options"."""

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world(self) -> int:
        return self.nodes * self.nproc_per_node


def _int(env: Mapping[str, str], name: str) -> int | None:
    if name not in env:
        return None
    raw = env[name].split("(")[0].split(",")[0]  # SLURM_GPUS_ON_NODE "4", SLURM_TASKS_PER_NODE "2(x3)"
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}: expected an integer, got {env[name]!r}") from None


def job_shape(
    env: Mapping[str, str],
    nproc_per_node: int | None = None,
    nodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> JobShape:
    """The job's hosts, this node's rank, processes per node and rendezvous address: options first, then SLURM's
    environment, then one node here."""
    in_slurm = "SLURM_JOB_ID" in env and "SLURM_JOB_NODELIST" in env
    if in_slurm:
        hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
        n = _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES") or len(hosts)
        if n != len(hosts):
            raise LaunchError(f"SLURM_JOB_NUM_NODES is {n} but SLURM_JOB_NODELIST names {len(hosts)} hosts")
        if nodes is not None and nodes != n:
            raise LaunchError(f"--nodes {nodes} does not match the allocation's {n} nodes (SLURM_JOB_NUM_NODES)")
        rank = node_rank if node_rank is not None else _int(env, "SLURM_NODEID")
        if rank is None:
            raise LaunchError("SLURM_NODEID is not set: run tplus launch through srun, one task per node")
        job = env["SLURM_JOB_ID"]
        gpus = _int(env, "SLURM_GPUS_ON_NODE")
        source = "slurm"
    else:
        n = nodes or 1
        hosts = [socket.gethostname()] if n == 1 else []
        if n > 1:
            if not master_addr:
                raise LaunchError(f"--nodes {n} outside SLURM needs --master-addr (the first node) and --node-rank")
            hosts = [master_addr] + [f"node{i}" for i in range(1, n)]
        rank = node_rank or 0
        job = env.get("TPLUS_JOB_ID", "tplus")
        gpus = None
        source = "options"
    if not 0 <= rank < n:
        raise LaunchError(f"the node rank {rank} is outside [0, {n})")
    per_node = nproc_per_node or gpus or _cuda_devices() or 1
    addr = master_addr or env.get("MASTER_ADDR") or hosts[0]
    port = master_port or _int(env, "MASTER_PORT") or (29500 + int(job) % 20000 if job.isdigit() else 29500)
    return JobShape(hosts, rank, per_node, addr, port, job, source)


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def check_job(shape: JobShape, config: str, overrides: list[str], connect_timeout: float) -> None:
    """Everything that can fail before a rank starts; LaunchError / ConfigError naming what."""
    path = Path(config)
    if path.is_dir():
        raise LaunchError(f"the config file {config} is a directory, not a YAML file")
    if not path.is_file():
        raise LaunchError(f"the config file {config} does not exist on {socket.gethostname()} (node {shape.node_rank})"
                          "; every node must see the same path (a shared filesystem or the image)")  # fmt: skip
    cfg = load_config(config, overrides)
    from tplus_dist.parallel.dims import ParallelDims

    ParallelDims.from_config(cfg.parallel, shape.world, cfg.model).validate()  # ConfigError naming the field
    device = cfg.train.device
    wants_cuda = device.startswith("cuda") or (device == "auto" and _cuda_devices() > 0)
    if wants_cuda:
        have = _cuda_devices()
        if have < shape.nproc_per_node:
            raise LaunchError(f"{socket.gethostname()} has {have} GPUs, but {shape.nproc_per_node} processes per node "
                              "were asked for (--nproc-per-node / SLURM_GPUS_ON_NODE)")  # fmt: skip
    try:
        socket.getaddrinfo(shape.master_addr, shape.master_port)
    except OSError as e:
        raise LaunchError(f"MASTER_ADDR {shape.master_addr!r} does not resolve: {e}") from None
    if shape.node_rank > 0 and connect_timeout > 0:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                with socket.create_connection((shape.master_addr, shape.master_port), timeout=5):
                    break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"cannot reach the master {shape.master_addr}:{shape.master_port} from "
                        f"{socket.gethostname()} within {connect_timeout:.0f} s ({e}): check MASTER_ADDR / "
                        "MASTER_PORT, the network and that node 0 started"
                    ) from None
                time.sleep(1)


def hostfile_text(shape: JobShape) -> str:
    return "".join(f"{h} slots={shape.nproc_per_node}\n" for h in shape.hosts)


def build_command(
    launcher: str, shape: JobShape, config: str, overrides: list[str], hostfile: Path | None = None
) -> list[str]:
    if launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={shape.nodes}", f"--nproc-per-node={shape.nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={shape.master_addr}:{shape.master_port}",
            f"--rdzv-id={shape.job_id}", f"--node-rank={shape.node_rank}",
            "--max-restarts=0",
            "-m", "tplus_dist.train", config, *overrides,
        ]  # fmt: skip
    if launcher == "deepspeed":
        assert hostfile is not None
        # the deepspeed CLI is this module; run it with this interpreter (no PATH lookup: inside a job or a
        # container the environment's bin directory is often not on PATH)
        return [
            sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--no_ssh",
            f"--node_rank={shape.node_rank}", f"--master_addr={shape.master_addr}",
            f"--master_port={shape.master_port}",
            "--module", "tplus_dist.train", config, *overrides,
        ]  # fmt: skip
    raise LaunchError(f"--launcher must be torchrun or deepspeed, got {launcher!r}")


USAGE = """usage: tplus launch [--launcher torchrun|deepspeed] [--nproc-per-node G] [--nodes N] [--node-rank R]
                    [--master-addr HOST] [--master-port PORT] [--connect-timeout S] [--dry-run]
                    CONFIG [--section.field=value ...]"""


@dataclass
class LaunchOptions:
    config: str
    overrides: list[str]
    launcher: str = "torchrun"
    nproc_per_node: int | None = None
    nodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    connect_timeout: float = 300.0
    dry_run: bool = False


_TYPES: dict[str, type] = {
    "launcher": str,
    "nproc_per_node": int,
    "nodes": int,
    "node_rank": int,
    "master_addr": str,
    "master_port": int,
    "connect_timeout": float,
}


_LEAST: dict[str, float] = {"nproc_per_node": 1, "nodes": 1, "node_rank": 0, "master_port": 1, "connect_timeout": 0}
"""The smallest value each numeric option takes: 0 processes or nodes would not silently become one."""


def parse(argv: list[str]) -> LaunchOptions:
    """The launch options, then the config file and its overrides (passed on to every rank unchanged)."""
    values: dict[str, object] = {}
    dry = False
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        key, _, value = argv[i].partition("=")
        name = key[2:].replace("-", "_")
        if key == "--dry-run":
            dry, i = True, i + 1
            continue
        if name not in _TYPES:
            break  # a --section.field before the config: reported below
        if not value:
            if i + 1 >= len(argv):
                raise LaunchError(f"{key} needs a value\n{USAGE}")
            value, i = argv[i + 1], i + 1
        try:
            values[name] = _TYPES[name](value)
        except ValueError:
            raise LaunchError(f"{key}: expected {_TYPES[name].__name__}, got {value!r}") from None
        i += 1
    for name, least in _LEAST.items():
        given = values.get(name)
        if isinstance(given, (int, float)) and given < least:
            raise LaunchError(f"--{name.replace('_', '-')} must be at least {least:g}, got {given}")
    rest = argv[i:]
    if not rest or rest[0].startswith("--"):
        raise LaunchError(f"the config file comes first after the launch options\n{USAGE}")
    return LaunchOptions(config=rest[0], overrides=rest[1:], dry_run=dry, **values)  # type: ignore[arg-type]


def main(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    o = parse(argv)
    shape = job_shape(env, o.nproc_per_node, o.nodes, o.node_rank, o.master_addr, o.master_port)
    check_job(shape, o.config, o.overrides, 0.0 if o.dry_run else o.connect_timeout)
    hostfile = None
    if o.launcher == "deepspeed":
        hostfile = Path(env.get("TMPDIR", "/tmp")) / f"tplus-hostfile-{shape.job_id}-{shape.node_rank}"
    cmd = build_command(o.launcher, shape, o.config, o.overrides, hostfile)
    print(
        f"tplus launch: {shape.nodes} node(s) x {shape.nproc_per_node} = {shape.world} ranks ({shape.source}); "
        f"this is node {shape.node_rank} ({socket.gethostname()}); rendezvous {shape.master_addr}:{shape.master_port}",
        flush=True,
    )
    if hostfile is not None:
        print(f"tplus launch: hostfile {hostfile}:\n{hostfile_text(shape)}", end="", flush=True)
    print("tplus launch: " + shlex.join(cmd), flush=True)
    env = rank_environment(o.launcher, shape, env)
    if o.dry_run:
        return 0
    if hostfile is not None:
        hostfile.write_text(hostfile_text(shape))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the launcher; the ranks install their own
    return run_launcher(cmd, dict(env))


def rank_environment(launcher: str, shape: JobShape, env: Mapping[str, str]) -> Mapping[str, str]:
    """The launcher's environment. torchrun, given several processes per node and no OMP_NUM_THREADS, sets it to 1
    for each rank and prints a four-line banner about it; here the same value is set before, and said in one line."""
    if launcher != "torchrun" or shape.nproc_per_node <= 1 or "OMP_NUM_THREADS" in env:
        return env
    print(
        "tplus launch: OMP_NUM_THREADS=1 for each rank (torchrun's default with several ranks per node; set "
        "OMP_NUM_THREADS to give each rank more threads)",
        flush=True,
    )
    return {**env, "OMP_NUM_THREADS": "1"}


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc: torchrun starts its ranks in sessions of their own, so a
    process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _die_with_parent() -> None:
    """In the launcher's child: SIGTERM it if `tplus launch` dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher as a child and exit with the code of its ranks (tplus_dist.exitcodes): torchrun turns any
    rank's non-zero code into its own 1, so the ranks report theirs in a status directory instead (a stopped rank
    then exits 0 and torchrun ends quietly).

    Signals: the child runs in a process group of its own, so a terminal's Ctrl-C reaches this process only. The
    first SIGINT or SIGTERM is relayed to every rank as SIGUSR1 (the launchers ignore it; the ranks save a
    checkpoint at the end of the step and stop: torchrun's own SIGTERM handling would kill them after 30 s); a
    second is relayed as SIGINT (the ranks stop at once). SIGUSR1 sent to the whole job (SLURM) reaches the ranks
    directly."""
    from tplus_dist import exitcodes

    with tempfile.TemporaryDirectory(prefix="tplus-status-") as status:
        proc = subprocess.Popen(
            cmd, env={**env, exitcodes.STATUS_DIR: status}, process_group=0, preexec_fn=_die_with_parent
        )
        asked = 0

        def relay(signum: int, _frame: object) -> None:
            nonlocal asked
            asked += 1
            sig = signal.SIGUSR1 if asked == 1 else signal.SIGINT
            if asked == 1:
                print(
                    f"tplus launch: {signal.Signals(signum).name}: the ranks save a checkpoint at the end of the step "
                    "and stop (send it again to stop them at once)",
                    flush=True,
                )
            for pid in descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

        previous = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        reports = exitcodes.collected(Path(status))
    codes = {int(r["code"]) for r in reports}
    stopped = [r for r in reports if int(r["code"]) == exitcodes.STOPPED]
    if rc < 0:
        return 128 - rc  # the launcher itself was killed by a signal
    if rc == 0:
        if stopped:
            print(
                f"tplus launch: the ranks stopped at step {stopped[0].get('step')} with a checkpoint; run the same "
                f"command to resume (exit code {exitcodes.STOPPED})",
                flush=True,
            )
            return exitcodes.STOPPED
        return 0
    for code in (exitcodes.FAILED, exitcodes.INTERRUPTED, exitcodes.BAD_INPUT):
        if code in codes:
            return code
    return rc
