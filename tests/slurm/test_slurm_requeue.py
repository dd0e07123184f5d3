"""A real SLURM (Debian's slurm-wlm: slurmctld, slurmd, munge) on this machine, a one-node cluster with 2 CPUs:
the project's own sbatch template runs 2 ranks on CPU through `tplus launch` and torchrun or the deepspeed CLI,
gets the preemption signal mid-run, saves, requeues itself, and the requeued job resumes and finishes with the same
losses as an uninterrupted run. The daemons this test starts are stopped by their pids at the end.

Needs root and slurm-wlm + munge installed (`.ci/run` installs them: `apt-get install slurm-wlm munge`); skipped
otherwise, saying so."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tplus_dist.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "tplus-tests"
RUN = [
    "--model.seq_len=64",
    "--model.n_layers=2",
    "--train.steps=40",
    "--train.micro_batch_size=4",
    "--train.eval_interval=0",
    "--log.progress=false",
    "--log.tensorboard=false",
    "--schedule.warmup_steps=2",
    "--parallel.zero_stage=1",
    "--checkpoint.interval_steps=0",
    f"--data.cache_dir={CACHE}",
]
COMPARED = ("step", "loss", "grad_norm", "lr", "first_sample", "last_sample", "tokens")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "runs SLURM's daemons as root"
    for exe in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install slurm-wlm munge)"
    return None


def _wait(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.munged_pid: int | None = None

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            for d in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
                Path(d).mkdir(parents=True, exist_ok=True)
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "-c"], check=True)
            subprocess.run(["chown", "-R", "munge:munge", "/etc/munge", "/run/munge", "/var/lib/munge",
                            "/var/log/munge"], check=True)  # fmt: skip
            os.chmod("/etc/munge/munge.key", 0o400)
            subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], check=True)
            self.munged_pid = int(Path("/run/munge/munged.pid").read_text())
        for d in ("state", "spool"):
            (self.base / d).mkdir()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=tplus-test",
                    f"SlurmctldHost={host}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SlurmUser=root",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "MpiDefault=none",
                    "MinJobAge=3600",
                    f"StateSaveLocation={self.base / 'state'}",
                    f"SlurmdSpoolDir={self.base / 'spool'}",
                    f"SlurmctldPidFile={self.base / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.base / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.base / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.base / 'slurmd.log'}",
                    f"NodeName={host} CPUs=2 RealMemory=4000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            out = (self.base / f"{daemon[0]}.out").open("wb")
            self.procs.append(subprocess.Popen([*daemon, "-f", str(self.conf)], env=self.env, stdout=out, stderr=out))
        _wait("the node to be idle", lambda: "idle" in self._sinfo(), 60)

    def _sinfo(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.munged_pid is not None:
            os.kill(self.munged_pid, 15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = _missing()
    if why and os.environ.get("TPLUS_REQUIRE_SLURM") == "1":  # .ci/run installs SLURM: it must run there
        pytest.fail(f"TPLUS_REQUIRE_SLURM=1 but a real SLURM cannot run here: {why}")
    if why:
        pytest.skip(f"a real SLURM on this machine: {why}")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def metric_rows(run_dir: Path) -> list[list[Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r[k] for k in COMPARED] for r in rows if "loss" in r]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_preempted_job_requeues_and_resumes_as_the_same_run(cluster: Cluster, tmp_path: Path, launcher: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run, through the same launcher outside SLURM
    whole = tmp_path / "whole"
    cmd = [sys.executable, "-m", "tplus_dist", "launch", "--launcher", launcher, "--nproc-per-node", "2",
           "--master-port", str(free_port()), "configs/tiny.yaml", *RUN, f"--log.run_dir={whole}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    want = metric_rows(whole)
    assert [r[0] for r in want] == list(range(1, 41))

    run_dir = tmp_path / "job"
    log = tmp_path / "job.out"
    submit = [
        "sbatch", "--parsable", f"--chdir={ROOT}", f"--output={log}", "--job-name=tplus-test",
        f"--export=ALL,LAUNCHER={launcher},NPROC_PER_NODE=2,TPLUS_PYTHON={sys.executable},OMP_NUM_THREADS=1",
        "slurm/train-1node.sbatch", "configs/tiny.yaml", *RUN, f"--log.run_dir={run_dir}",
    ]  # fmt: skip
    job_id = cluster.run(*submit).strip().split(";")[0]

    def trained(at_least: int) -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and sum(1 for _ in metrics.open()) >= at_least

    _wait("the job's first steps", lambda: trained(3), 300, every=0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)  # what --signal=B:USR1@120 delivers
    # requeued: pending again (SLURM holds a requeued job ~2 minutes; release it now)
    _wait("the requeue", lambda: int(cluster.job(job_id).get("Restarts", "0")) >= 1, 300)
    _wait("the requeued job to be pending", lambda: cluster.job(job_id)["JobState"] == "PENDING", 120)
    # slurmd refuses a job whose start is not later than its revoked credential (same second): wait for the node
    # to be idle again and a moment more before releasing it
    _wait("the node to be idle", lambda: cluster._sinfo().strip() == "idle", 120)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    state = _wait(
        "the requeued job to finish",
        lambda: (s := cluster.job(job_id)["JobState"]) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s,
        600,
    )
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "tplus: preemption signal" in text and f"tplus: requeueing job {job_id}" in text
    assert "(restart 1)" in text and "tplus: resumed from" in text, text[-4000:]
    saved = [line for line in text.splitlines() if "(signal)" in line]
    assert saved, text[-4000:]  # the ranks saved on the signal
    got = metric_rows(run_dir)
    assert got == want  # every step once (the resumed run truncated nothing it needed), bit for bit


def test_an_environment_without_the_project_stops_the_job_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    # the system's Python stands in for a container image that lacks tplus-dist
    bare = shutil.which("python3", path="/usr/bin:/bin")
    assert bare is not None
    log = tmp_path / "job.out"
    submit = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={log}", "--job-name=tplus-bare",
              f"--export=ALL,NPROC_PER_NODE=2,TPLUS_PYTHON={bare}", "slurm/train-1node.sbatch",
              "configs/tiny.yaml"]  # fmt: skip
    job_id = cluster.run(*submit).strip().split(";")[0]
    state = _wait(
        "the job to end",
        lambda: (s := cluster.job(job_id)["JobState"]) in ("COMPLETED", "FAILED", "CANCELLED") and s,
        120,
    )
    text = log.read_text()
    assert state == "FAILED", text
    assert f"'{bare} -c \"import torch, deepspeed, tplus_dist.train.run\"' failed on the allocation" in text
    assert "(no container): are tplus-dist and its requirements installed there?" in text
    assert "ModuleNotFoundError: No module named" in text  # the reason, last line of the traceback
    assert "tplus launch" not in text  # stopped before any launcher
