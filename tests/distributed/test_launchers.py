"""The real launchers start a tensor-parallel run that computes what one process computes: torchrun and the
deepspeed CLI, on CPU with gloo, through `python -m tplus_dist.train`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.test_tp_training import BASE, KEYS, fp32_run
from tplus_dist.config import load_config
from tplus_dist.spawn import free_port
from tplus_dist.tolerances import Fp32Run
from tplus_dist.train.run import train

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["--train.steps=3"]


def launched_losses(cmd: list[str], run_dir: Path) -> list[tuple[float, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # our one-line errors first, then the end of the output
        ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "tplus:" in line or "Error" in line]
        raise AssertionError("\n".join(ours[:20]) + "\n...\n" + proc.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


Reference = tuple[list[tuple[float, float]], Fp32Run]


def single_losses(tmp_path: Path) -> Reference:
    """The one-process run's losses and gradient norms, and its rounding bounds (tplus_dist/tolerances.py)."""
    _, history = train(load_config("configs/tiny.yaml", [*BASE, *STEPS, f"--log.run_dir={tmp_path}/one"]))
    run = fp32_run([[m[k] for k in KEYS] for m in history], STEPS)
    return [(m["loss"], m["grad_norm"]) for m in history], run


def assert_close(reference: Reference, b: list[tuple[float, float]]) -> None:
    """A launched run's losses and norms within fp32 rounding in another order of the one-process run's."""
    a, run = reference
    assert len(a) == len(b) == 3
    worst = [0.0, 0.0]
    for step, ((la, ga), (lb, gb)) in enumerate(zip(a, b, strict=True), 1):
        assert abs(la - lb) <= run.loss(step, la), (step, a, b, run.loss(step, la))
        assert abs(ga - gb) <= run.grad_norm(step, ga), (step, a, b, run.grad_norm(step, ga))
        worst = [
            max(worst[0], abs(la - lb) / run.loss(step, la)),
            max(worst[1], abs(ga - gb) / run.grad_norm(step, ga)),
        ]
    print(f"observed / bound: loss {worst[0]:.2f}, grad_norm {worst[1]:.2f}")


@pytest.mark.slow
def test_torchrun_launches_tensor_parallel(tmp_path: Path) -> None:
    run_dir = tmp_path / "torchrun"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "tplus_dist.train", "configs/tiny.yaml", *BASE, *STEPS, "--parallel.tensor_parallel=2",
        f"--log.run_dir={run_dir}",
    ]  # fmt: skip
    assert_close(single_losses(tmp_path), launched_losses(cmd, run_dir))


@pytest.mark.slow
def test_deepspeed_launcher_starts_tensor_parallel_and_leaves_no_shared_memory(tmp_path: Path) -> None:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher is not None, "the deepspeed CLI is installed with deepspeed"
    run_dir = tmp_path / "deepspeed"
    port = free_port()
    cmd = [
        launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "tplus_dist.train",
        "configs/tiny.yaml", *BASE, *STEPS, "--parallel.tensor_parallel=2", f"--log.run_dir={run_dir}",
    ]  # fmt: skip
    assert_close(single_losses(tmp_path), launched_losses(cmd, run_dir))
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow
def test_verify_resume_under_torchrun_checks_a_tensor_parallel_layout(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "tplus_dist", "verify-resume", "configs/tiny.yaml", *BASE, "--parallel.tensor_parallel=2",
        "--model.resid_dropout=0.1", "--steps", "4", "--at", "2", "--work-dir", str(tmp_path / "verify"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the continuation matches bit for bit (4 steps" in proc.stdout


@pytest.mark.slow
def test_verify_resume_under_torchrun_checks_a_resume_on_another_layout(tmp_path: Path) -> None:
    # stopped as TP 2 (global batch 4 = micro 4 x 1 rank), resumed as ZeRO 3 over 2 data-parallel ranks (2 x 2)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "tplus_dist", "verify-resume", "configs/tiny.yaml", *BASE, "--parallel.tensor_parallel=2",
        "--steps", "4", "--at", "2", "--work-dir", str(tmp_path / "verify"),
        "--resume-with", "--parallel.tensor_parallel=1", "--resume-with", "--parallel.zero_stage=3",
        "--resume-with", "--train.micro_batch_size=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed on another layout (--parallel.tensor_parallel=1 --parallel.zero_stage=3" in proc.stdout
    assert "the continuation matches to fp32 reduction-order noise (4 steps" in proc.stdout


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_exports_from_one_process_or_under_torchrun(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tplus_dist import hf

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "tp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    train_cmd = [
        *launch, "--master_port", str(free_port()), "-m", "tplus_dist.train", "configs/tiny.yaml", *BASE, *STEPS,
        "--parallel.tensor_parallel=2", "--model.tie_embeddings=false", f"--log.run_dir={run_dir}",
    ]  # fmt: skip
    launched_losses(train_cmd, run_dir)
    for fmt, launcher in (("consolidated", [*launch, "--master_port", str(free_port())]), ("hf", [sys.executable])):
        cmd = [*launcher, "-m", "tplus_dist", "export", str(run_dir / "checkpoints"), "--format", fmt,
               str(tmp_path / fmt)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    flat = load_file(str(tmp_path / "consolidated" / "model.safetensors"))
    assert flat["head.weight"].shape[0] == 257 + (-257 % 64)  # whole padded vocabulary: both TP slices
    cfg, model = hf.load(tmp_path / "hf")  # the HF export checked its logits against the gathered model
    v = cfg.vocab_size  # (the vocabulary's padding rows come back as zeros)
    assert all(torch.equal(p[:v], flat[n][:v]) for n, p in model.state_dict().items())


@pytest.mark.slow
def test_tplus_launch_starts_two_nodes_through_a_torchrun_rendezvous(tmp_path: Path) -> None:
    # Two "nodes" on this machine, one rank each, tensor parallel across them, as a 2-node job would run. The
    # second gets its own /dev/shm (a mount namespace), as another machine would: streaming keeps per-node state
    # there, and two node leaders on one /dev/shm would collide.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a second node's own /dev/shm needs root and unshare")
    run_dir = tmp_path / "two-nodes"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (1, 0):  # the second node first: it waits for the first one's rendezvous
        cmd = [
            sys.executable, "-m", "tplus_dist", "launch", "--nodes", "2", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", port, "--nproc-per-node", "1", "--connect-timeout", "120",
            "configs/tiny.yaml", *BASE, *STEPS, "--parallel.tensor_parallel=2", f"--log.run_dir={run_dir}",
        ]  # fmt: skip
        if node == 1:
            mount = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *cmd]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        time.sleep(2)
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "tplus launch: 2 node(s) x 1 = 2 ranks (options); this is node 1" in outs[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert_close(single_losses(tmp_path), [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r])
