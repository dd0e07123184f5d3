"""The real launchers start a tensor-parallel run that computes what one process computes: torchrun and the
deepspeed CLI, on CPU with gloo, through `python -m tplus_dist.train`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_tp_training import BASE
from tplus_dist.config import load_config
from tplus_dist.spawn import free_port
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


def single_losses(tmp_path: Path) -> list[tuple[float, float]]:
    _, history = train(load_config("configs/tiny.yaml", [*BASE, *STEPS, f"--log.run_dir={tmp_path}/one"]))
    return [(m["loss"], m["grad_norm"]) for m in history]


def assert_close(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> None:
    assert len(a) == len(b) == 3
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert abs(la - lb) < 1e-5 and abs(ga - gb) < 1e-5 * ga, (a, b)


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
