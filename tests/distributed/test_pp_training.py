"""Pipeline parallelism (DeepSpeed's pipeline engine, 1F1B over gradient-accumulation micro-batches) alone and with
data and tensor parallelism computes what one process computes: the same losses and gradient norms over five
steps, and the same parameters afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_tp_training import compare, distributed, single


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_equals_one_process(tmp_path: Path, zero: int, tied: bool) -> None:
    model = [f"--model.tie_embeddings={str(tied).lower()}", "--model.z_loss=1e-4"]
    compare(
        single(tmp_path, "--train.grad_accum=4", *model),
        distributed(
            tmp_path,
            2,
            "--train.grad_accum=4",
            "--parallel.pipeline_parallel=2",
            f"--parallel.zero_stage={zero}",
            *model,
        ),
    )


@pytest.mark.slow
def test_pipeline_and_data_parallel_equal_one_process(tmp_path: Path) -> None:
    # PP 2 x DP 2: global batch 8 = 4 x 1 x 2 replicas; 2 micro-batches per replica keep the pipeline busy
    compare(
        single(tmp_path, "--train.micro_batch_size=2", "--train.grad_accum=4"),
        distributed(
            tmp_path, 4, "--train.micro_batch_size=2", "--train.grad_accum=2", "--parallel.pipeline_parallel=2"
        ),
    )


@pytest.mark.slow
def test_tensor_pipeline_layout_equals_one_process(tmp_path: Path) -> None:
    compare(
        single(tmp_path, "--train.grad_accum=2", "--model.qk_norm=rmsnorm", "--model.n_kv_heads=1"),
        distributed(
            tmp_path, 4, "--train.grad_accum=2", "--parallel.pipeline_parallel=2", "--parallel.tensor_parallel=2",
            "--model.qk_norm=rmsnorm", "--model.n_kv_heads=1",
        ),
    )  # fmt: skip
