"""A distributed run's console tells each thing once: library notices once (rank 0) or not at all, no progress-bar
carriage returns in a redirected log, and a real error still shows (tplus_dist/console.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_tp_training import CACHE
from tplus_dist.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
NOTICES = [  # what every rank printed before (one line each), as the libraries word it
    "Transformer Engine and Apex are not installed",  # megatron-core, four of them, at import
    "Setting accelerator to CPU",  # DeepSpeed's accelerator notice
    "built successfully",  # DeepSpeed's communication op
    "Setting OMP_NUM_THREADS environment variable for each process",  # torchrun's banner (tplus launch says it once)
    "CUDA_DEVICE_MAX_CONNECTIONS",  # megatron-core's tensor-parallel layers, about CUDA
    "c10d::broadcast_: an autograd kernel was not registered",  # the pipeline's tied-weight broadcast
    "is deprecated. Please use `torch.distributed",  # torch 2.13 on DeepSpeed's all_gather / reduce_scatter
]
RUN = [
    "--model.seq_len=64", "--train.steps=3", "--schedule.warmup_steps=1", "--train.micro_batch_size=4",
    "--train.eval_interval=2", "--train.log_interval=1", "--log.tensorboard=false", f"--data.cache_dir={CACHE}",
]  # fmt: skip


def launch(tmp_path: Path, layout: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
    if fault:
        env["TPLUS_FAULT"] = fault
    cmd = [
        sys.executable, "-m", "tplus_dist", "launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "configs/tiny.yaml", *RUN, *layout, f"--log.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    # stdout and stderr are pipes, as in a SLURM job's log: not terminals
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["--parallel.tensor_parallel=2"], ["--parallel.pipeline_parallel=2"], ["--parallel.zero_stage=3"]],
    ids=["tp2", "pp2-tied", "dp2-zero3"],
)
def test_a_two_rank_run_prints_each_library_notice_at_most_once(tmp_path: Path, layout: list[str]) -> None:
    proc = launch(tmp_path, layout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for notice in NOTICES:
        assert out.count(notice) <= 1, f"{notice!r} printed {out.count(notice)} times:\n{out[-4000:]}"
    assert out.count("tplus launch: OMP_NUM_THREADS=1 for each rank") == 1
    assert "\r" not in out  # no progress bar in a log: plain lines at the log interval instead
    assert [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("step ")] == [
        "step 1", "step 2", "step 3"
    ]  # fmt: skip
    assert "warnings.warn(" not in proc.stderr, proc.stderr[-3000:]  # no library warning left at all on CPU


@pytest.mark.slow
def test_a_real_error_still_shows_with_its_traceback(tmp_path: Path) -> None:
    proc = launch(tmp_path, ["--parallel.tensor_parallel=2"], fault="forward:raise:rank=1:step=2")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "tplus: rank 1 of 2" in proc.stderr and "failed" in proc.stderr and "RuntimeError" in proc.stderr
